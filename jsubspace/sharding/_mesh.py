"""Device meshes and multi-host start-up.

The population's models are split over a 1-D `models` mesh axis: every Gram kernel reduces over
models with `psum`, so this is the axis that scales with N.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MODELS = "models"


def models_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
    """A 1-D mesh with axis `models`.

    Args:
        devices: the devices to use, or how many of `jax.devices()` to take (all by default).
            Under `jax.distributed` the default spans every process's devices.
    """
    if devices is None:
        devices = jax.devices()
    elif isinstance(devices, int):
        available = jax.devices()
        if not 1 <= devices <= len(available):
            raise ValueError(f"asked for {devices} devices, {len(available)} available")
        devices = available[:devices]
    return Mesh(np.asarray(list(devices)), (MODELS,))


def stacked_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of an `(N, ...)` stack: models split over the `models` axis."""
    return NamedSharding(mesh, P(MODELS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def padded_count(n_models: int, mesh: Mesh) -> int:
    """N rounded up to a multiple of the mesh size (padding models are all-zero)."""
    d = mesh.devices.size
    return -(-n_models // d) * d


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_seconds: int = 30,
) -> None:
    """Starts JAX's multi-controller runtime, one process per host.

    With no arguments on TPU / SLURM / Kubernetes clusters JAX finds the values itself. On CPU
    (tests, localhost) the gloo collectives are selected so that `psum` crosses processes.
    A process that stops answering for `heartbeat_timeout_seconds` fails the others' collectives
    instead of leaving them waiting forever.
    """
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )


def host_array(x) -> np.ndarray:
    """The full value of a `jax.Array` on this host, also when it spans several processes.

    Replicated arrays are read from a local shard; arrays sharded across processes are gathered
    (a collective: every process must call this at the same point).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
