"""One layer of N models -> one `jax.Array` sharded over the `models` mesh axis.

Arrays are built with `jax.make_array_from_callback`: JAX calls the callback only for the shards
of addressable devices, so each device (and under `jax.distributed`, each host) reads only the
bytes of its own models. The stack is zero-padded to a multiple of the mesh size; padding models
are masked out by the kernels (`n_models` is carried along). The stored dtype is kept.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jsubspace.errors import CheckpointError
from jsubspace.errors import NonFiniteError
from jsubspace.io._population import DenseLayer
from jsubspace.io._population import LoraLayer
from jsubspace.io._population import Population
from jsubspace.sharding import _mesh


class PlacedDense(NamedTuple):
    """A dense layer on the mesh.

    Attributes:
        x: `dtype[N_pad, m, n]`, sharded over models; rows >= n_models are zero.
        n_models: the true N.
    """

    x: jax.Array
    n_models: int


class PlacedLora(NamedTuple):
    """A LoRA layer on the mesh, in factors: `dW_i = scales[i] * b[i] @ a[i]`.

    Attributes:
        a: `dtype[N_pad, r, n]`, sharded over models.
        b: `dtype[N_pad, m, r]`, sharded over models.
        scales: `f32[N_pad]`; zero for padding models.
        n_models: the true N.
    """

    a: jax.Array
    b: jax.Array
    scales: jax.Array
    n_models: int


Placed = PlacedDense | PlacedLora


def _stack(shape, dtype, mesh: Mesh, read_one) -> jax.Array:
    """`dtype[shape]` sharded on axis 0; `read_one(i)` is model i's slice (None: padding), or its
    leading part (LoRA factors of a smaller rank), the rest left zero."""
    n_pad = shape[0]

    def callback(index):
        rows = range(*index[0].indices(n_pad))
        block = np.zeros((len(rows),) + tuple(shape[1:]), dtype)
        for j, i in enumerate(rows):
            value = read_one(i)
            if value is not None:
                block[(j, *(slice(0, k) for k in value.shape))] = value
        return block[(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback(tuple(shape), _mesh.stacked_sharding(mesh), callback)


def _as(array: np.ndarray, shape, dtype, ref) -> np.ndarray:
    try:
        out = np.asarray(array).reshape(shape)
    except ValueError:
        raise CheckpointError(
            ref.path, f"tensor {ref.name!r} cannot be viewed as {shape}"
        ) from None
    return out if out.dtype == dtype else out.astype(dtype)


def place_layer(layer: DenseLayer | LoraLayer, mesh: Mesh) -> Placed:
    """Reads one layer of every model straight into a sharded stack.

    Args:
        layer: an aligned layer of a population.
        mesh: a mesh with a `models` axis.

    Returns:
        PlacedDense or PlacedLora.
    """
    n = len(layer.refs) if isinstance(layer, DenseLayer) else len(layer.a_refs)
    n_pad = _mesh.padded_count(n, mesh)
    if isinstance(layer, DenseLayer):
        m, k = layer.shape

        def read(i):
            return None if i >= n else _as(layer.refs[i].read(), (m, k), layer.dtype, layer.refs[i])

        return PlacedDense(_stack((n_pad, m, k), layer.dtype, mesh, read), n)

    m, k = layer.shape
    r = layer.rank

    def read_a(i):
        if i >= n:
            return None
        return _as(layer.a_refs[i].read(), layer.a_refs[i].shape, layer.dtype, layer.a_refs[i])

    def read_b(i):
        if i >= n:
            return None
        return _as(layer.b_refs[i].read(), layer.b_refs[i].shape, layer.dtype, layer.b_refs[i])

    scales = np.zeros(n_pad, np.float32)
    scales[:n] = layer.scales
    return PlacedLora(
        _stack((n_pad, r, k), layer.dtype, mesh, read_a),
        _stack((n_pad, m, r), layer.dtype, mesh, read_b),
        jax.device_put(scales, _mesh.stacked_sharding(mesh)),
        n,
    )


@jax.jit
def _nonfinite_counts(x: jax.Array) -> jax.Array:
    return jnp.sum(~jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


def _host_nonfinite_counts(x: jax.Array) -> np.ndarray:
    """`_nonfinite_counts` of a CPU array of this process, one model at a time on each device's
    own buffer (numpy views, no copy): XLA's CPU backend gives the jitted count an int32
    temporary the size of the whole stack, which was the peak of a side-space run."""
    counts = np.zeros(x.shape[0], np.int64)
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        for i, model in enumerate(np.asarray(shard.data)):
            counts[start + i] = model.size - np.count_nonzero(np.isfinite(model))
    return counts


def nonfinite_report(layer_name: str, model_names, placed: Placed) -> list[tuple[str, str, int]]:
    """`(model, layer, count)` for every model whose values in this layer are not all finite."""
    arrays = [placed.x] if isinstance(placed, PlacedDense) else [placed.a, placed.b]
    on_host = jax.process_count() == 1 and next(iter(arrays[0].devices())).platform == "cpu"
    count = _host_nonfinite_counts if on_host else _nonfinite_counts
    counts = sum(_mesh.host_array(count(a)) for a in arrays)
    return [
        (model_names[i], layer_name, int(c)) for i, c in enumerate(counts[: placed.n_models]) if c
    ]


def stream_layers(
    population: Population,
    mesh: Mesh,
    *,
    layers=None,
    prefetch: int = 1,
    check_finite: bool = True,
) -> Iterator[tuple[DenseLayer | LoraLayer, Placed]]:
    """Yields `(layer, placed)` one layer at a time, reading the next ones in the background.

    The working set is the current layer plus `prefetch` layers, whatever N is, provided the
    caller drops its reference to a layer before asking for the next one.

    Args:
        population: the aligned population.
        mesh: mesh with a `models` axis.
        layers: a subset of `population.layers` (all by default), e.g. to resume a run.
        prefetch: how many layers to read ahead (0 reads in the caller's thread).
        check_finite: raise NonFiniteError naming models and layers with NaN / Inf.
    """
    todo = list(population.layers if layers is None else layers)
    names = population.names
    if prefetch <= 0:
        for layer in todo:
            placed = place_layer(layer, mesh)
            if check_finite and (bad := nonfinite_report(layer.name, names, placed)):
                raise NonFiniteError(bad)
            yield layer, placed
            del placed  # Released before the next layer is read.
        return
    lock = threading.Lock()  # One reader at a time keeps the bounded-memory promise.

    def load(layer):
        with lock:
            return place_layer(layer, mesh)

    with ThreadPoolExecutor(max_workers=1) as pool:
        queue = collections.deque()
        it = iter(todo)
        for layer in it:
            queue.append((layer, pool.submit(load, layer)))
            if len(queue) > prefetch:
                break
        while queue:
            layer, future = queue.popleft()
            placed = future.result()
            if check_finite and (bad := nonfinite_report(layer.name, names, placed)):
                raise NonFiniteError(bad)
            yield layer, placed
            del placed  # Released before the next read starts: at most 1 + prefetch layers live.
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(load, nxt)))


def iter_model_blocks(layer: DenseLayer, mesh: Mesh, *, block_models: int):
    """Yields `(x_block, n_valid)`: `block_models` models at a time, all blocks one padded size.

    For `kernels.streaming_mode_grams`: memory holds one block, whatever N is.
    """
    d = mesh.devices.size
    size = -(-block_models // d) * d
    m, k = layer.shape
    for start in range(0, len(layer.refs), size):
        refs = layer.refs[start : start + size]

        def read(i, refs=refs):
            return None if i >= len(refs) else _as(refs[i].read(), (m, k), layer.dtype, refs[i])

        yield _stack((size, m, k), layer.dtype, mesh, read), len(refs)
