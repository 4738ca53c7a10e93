"""The layer plan: every decision about one layer, made once, before any byte is read.

From the layer's shape, N, dtype, the devices, the memory budget and the configuration, the plan
fixes the route (dense; LoRA in factor or side space), the solver of each mode (exact or
randomized), the solver of each control's bases (exact eigh where the side is short, the
randomized solver where it is long, from the factors where a LoRA layer is too large to
materialise), the working-set bytes and the estimated cost. The spectra, the null, the holdout,
the compare controls and the compress basis all take the plan; none of them decides again. The
plan is written into each layer's record of `spectra.json`, and `jsubspace plan` prints it before
anything runs.

No control builds a `side x side` matrix that the plan did not admit: a side longer than
`SpectraConfig.exact_limit` is solved by the randomized solver in the spectra and in every
control alike.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Mapping
from typing import Literal

import jax
import numpy as np

from jsubspace import kernels
from jsubspace.errors import PopulationError
from jsubspace.spectra._layer import SpectraConfig
from jsubspace.spectra._layer import dense_mode_solvers
from jsubspace.spectra._layer import lora_randomized_modes
from jsubspace.spectra._layer import lora_side_space
from jsubspace.spectra._layer import prefers_randomized
from jsubspace.spectra._layer import solver_costs

Route = Literal["dense", "lora-factor", "lora-side"]
Solver = Literal["exact", "exact-dual", "randomized", "factored"]
# LoRA controls materialise the updates only below this many bytes (N_pad * m * n * 4).
MATERIALISE_LIMIT = 256 * 2**20
HOLDOUT_MODELS = 4
"""The fewest models a holdout runs on: each fold's basis then comes from at least two models,
and one more model centres each held-out one."""

CHUNK_PASS = 0.6
"""What one chunked re-conversion of a dense stack (one per Krylov product on the chunked route,
and per product of the controls' kept-model bases on either route) costs, as a fraction of a
whole-stack centring pass at `MachineRates.stream`: the bf16 -> float32 conversion and centring
of a chunk are fused into the product that reads it. Fitted on 2026-12-05 to the parts of the
LLaMA-8B MLP run (the chunked route; estimated / measured holdout 153 / 161 s, split halves
53 / 51 s) and checked on the GPT-2 shapes (whole-stack route: 69 / 77 s, 23 / 23 s); it was
0.15 while the stream probe timed XLA's slow reduction over the models, 4.5x slower than the
kernels' centring (`benchmarks/README.md`)."""

# Basis sizes the controls fit: holdout up to 64 directions, split-half and compare 16.
HOLDOUT_KMAX = 64
COMPARE_K = 16


@dataclasses.dataclass(frozen=True)
class MachineRates:
    """Measured rates that turn a plan's flops into seconds.

    Attributes:
        gemm: float32 matrix-product rate at `precision=HIGHEST`, flop/s.
        eigh: symmetric eigen-solve rate, flop/s, counting `9 d^3` per `d x d` solve.
        read: bytes/s of reading checkpoint bytes into device arrays.
        overhead: seconds of fixed cost per kernel call (dispatch, host transfers).
        stream: float32 entries/s of a memory-bound pass over a stack (centring, conversion).
        draw: Gaussian entries/s drawn by `jax.random.normal` (the null's populations).
    """

    gemm: float
    eigh: float
    read: float = 1.0e9
    overhead: float = 0.02
    stream: float = 5.0e8
    draw: float = 1.0e8


def rate_kernels() -> dict:
    """`{rate: (jitted kernel, argument, units per call)}`: the kernels whose speed gives
    `MachineRates` (units: flops for 'gemm' and 'eigh', counting `9 d^3` per solve; float32
    entries for 'stream' and 'draw')."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((1024, 1024), jnp.float32) / 1024
    gram = a + jnp.eye(512 * 2, dtype=jnp.float32)
    big = jnp.ones((16, 2**20), jnp.float32)
    return {
        "gemm": (jax.jit(lambda x: jnp.matmul(x, x, precision=kernels.HIGHEST)), a, 2 * 1024**3),
        "eigh": (jax.jit(lambda g: jnp.linalg.eigh(g[:512, :512])[0]), gram, 9 * 512**3),
        # Centring as the kernels do it: the mean summed model by model (`kernels.models_sum`).
        "stream": (jax.jit(lambda x: x - kernels.models_sum(x) / x.shape[0]), big, big.size),
        "draw": (
            jax.jit(lambda k: jax.random.normal(k, (2**22,), jnp.float32)),
            jax.random.key(0),
            2**22,
        ),
    }


@functools.cache
def measure_rates() -> MachineRates:
    """The default device's GEMM and eigh rates, measured once per process (about 0.5 s)."""

    def best(fn, arg, repeats=3):
        fn(arg).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(arg).block_until_ready()
            times.append(time.perf_counter() - start)
        return min(times)

    found = {name: units / best(fn, arg) for name, (fn, arg, units) in rate_kernels().items()}
    return MachineRates(**found)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Every decision about one layer.

    Attributes:
        name, kind, shape, dtype: the layer (`shape` as `(m, n)`).
        n_models: N; n_pad: N padded to the device count.
        rank: the LoRA rank (None for dense layers).
        route: 'dense', 'lora-factor' or 'lora-side'.
        lora_space: the `SpectraConfig.lora_space` the LoRA kernels are given ('auto' unless the
            user forced one or the budget sent the layer to side space).
        solvers: per spectra mode, 'exact' or 'randomized'.
        controls: per control, what runs and how: `{"null": {"draws": R}, "holdout": {"bases":
            {"rows": solver, "cols": solver}, "from": "stack" | "factors" | "grams", "kmax": k,
            ...}, ...}` ("grams": the factor route's bases from the spectra's factor Grams,
            `spectra._gram_bases`, unless the population sits close to its mean);
            a control that does not run says why (`{"skipped": reason}` or `{"off": True}`).
        materialise: LoRA controls work on the materialised updates (else on the factors).
        working_set_bytes: estimated peak bytes of the layer's analysis.
        flops: estimated flops (matrix products and eigen-solves).
        seconds: estimated time at the measured `MachineRates`.
        parts: the estimated seconds of each part (`PARTS`: the spectra and each control), as
            the layer's record times them; they add up to `seconds`.
        chunk: for a dense layer whose float32 stack does not fit the budget, the models per
            device converted to float32 and centred at a time (`kernels.model_chunks`): the
            chunked route, whose kernels never hold a float32 copy of the whole stack and whose
            null is drawn one model at a time, in bfloat16 for a 2-byte layer; None: the whole
            stack at once.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    dtype: str
    n_models: int
    n_pad: int
    rank: int | None
    route: Route
    lora_space: str
    solvers: Mapping[str, Solver]
    controls: Mapping[str, Mapping]
    materialise: bool
    working_set_bytes: int
    flops: float
    seconds: float
    parts: Mapping[str, float] = dataclasses.field(default_factory=dict)
    chunk: int | None = None

    def spectra_config(self, config: SpectraConfig) -> SpectraConfig:
        """`config` with the plan's LoRA space, for the kernels that read it."""
        return dataclasses.replace(config, lora_space=self.lora_space)

    def randomized_modes(self) -> tuple[str, ...]:
        """The modes whose spectra come from the randomized solver."""
        return tuple(mode for mode, solver in self.solvers.items() if solver == "randomized")

    def check_budget(self, budget: int) -> None:
        """Refuses, before anything is read, a layer whose working set exceeds `budget`."""
        if self.working_set_bytes > budget:
            raise PopulationError(
                f"layer {self.name!r} ({list(self.shape)}, {self.dtype}) needs about "
                f"{self.working_set_bytes / 2**30:.1f} GiB, over the memory budget of "
                f"{budget / 2**30:.1f} GiB: use more devices or hosts, fewer models, --exclude "
                "this layer, or raise --memory_budget"
            )

    def to_json(self) -> dict:
        """The plan as JSON types, for `spectra.json` and `jsubspace plan --json`."""
        record = dataclasses.asdict(self)
        record["shape"] = list(self.shape)
        return record


def layer_models(layer) -> int:
    """N of an `io.Layer` (headers only)."""
    return len(layer.refs if layer.kind == "dense" else layer.a_refs)


def default_memory_budget(mesh) -> int:
    """Bytes a layer may use: half the host's RAM on CPU, 80% of the smallest device's memory
    times the device count on accelerators; under several processes the smallest of their
    budgets (a collective: every process calls it at the same point), so that all of them plan
    the same routes (a chunk chosen differently would be a different program, and the
    collectives would hang)."""
    devices = list(mesh.devices.flat)
    if devices[0].platform == "cpu":
        budget = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
    else:
        local = [d for d in devices if d.process_index == jax.process_index()] or devices
        limits = [(d.memory_stats() or {}).get("bytes_limit", 0) for d in local]
        budget = int(0.8 * min(limits) * len(devices)) if all(limits) else 2**62
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        mib = np.int32(min(budget >> 20, 2**31 - 1))  # MiB: JAX's integers are 32-bit here
        budget = int(np.min(multihost_utils.process_allgather(mib))) << 20
    return budget


def basis_solvers(n_models: int, m: int, n: int, k: int, config: SpectraConfig) -> dict:
    """The solver of the top-k rows / cols bases that the controls and compress fit from N
    models: the spectra's rule (`spectra._layer.prefers_randomized`) at the control's own k, so
    no control forms a `side x side` matrix past `exact_limit`; a side past it is solved
    randomized whatever `config.method` says (as the spectra are, unless forced exact)."""
    out = {}
    for mode, side in (("rows", m), ("cols", n)):
        costs = solver_costs(n_models, m, n, mode=mode, rank=k, iterations=config.iterations)
        fast = side > config.exact_limit or (
            config.method != "exact" and prefers_randomized(costs, side, k, config)
        )
        out[mode] = "randomized" if fast else "exact"
    return out


def control_plan(
    n_models: int, m: int, n: int, controls, *, factored: bool, config, route: str = "dense"
) -> dict:
    """What each control runs (see `LayerPlan.controls`)."""

    def bases(count, k):
        if factored:
            return {"rows": "factored", "cols": "factored"}
        return basis_solvers(count, m, n, k, config)

    out = {"null": {"draws": controls.null_draws} if controls.null_draws else {"off": True}}
    source = ("grams" if route == "lora-factor" else "factors") if factored else "stack"
    if controls.holdout is None:
        out["holdout"] = {"off": True}
    elif n_models < HOLDOUT_MODELS:
        out["holdout"] = {
            "skipped": f"{n_models} models are too few for a holdout (it needs {HOLDOUT_MODELS})"
        }
    else:
        # K-fold with more folds than models runs leave-one-out (`_holdout.fold_scheme`).
        folds = n_models if controls.holdout == "loo" else min(int(controls.holdout), n_models)
        largest = -(-n_models // folds)
        # Mean-centred: each held-out model's centring model leaves the basis too.
        by_mean = config.center == "mean"
        train = n_models - (2 if by_mean else 1) * largest
        cap = (m // 2, n // 2) if factored else (m, n)
        kmax = max(1, min(HOLDOUT_KMAX, *cap, train - 1 if by_mean else train))
        out["holdout"] = {
            "folds": folds,
            "largest": largest,
            "kmax": kmax,
            "from": source,
            "bases": bases(train, kmax),
        }
    if not controls.split_half:
        out["split_half"] = {"off": True}
    elif n_models // 2 < 2:
        out["split_half"] = {"skipped": f"{n_models} models are too few to split in halves"}
    else:
        k = max(1, min(COMPARE_K, m, n, n_models // 2 - 1))
        out["split_half"] = {"k": k, "from": source, "bases": bases(n_models // 2, k)}
    out["lineage"] = {} if controls.lineage else {"off": True}
    return out


def plan_layer(
    layer,
    *,
    n_pad: int,
    spectra: SpectraConfig,
    controls,
    budget: int | None = None,
    rates: MachineRates | None = None,
    materialise_limit: int | None = None,
    devices: int = 1,
) -> LayerPlan:
    """The plan of one layer (an `io.Layer`, headers only).

    Args:
        layer: the layer.
        n_pad: N padded to the device count (`sharding.padded_count`).
        spectra: how spectra are computed (`lora_space` 'auto' may be resolved to 'side' here).
        controls: a `ControlConfig`.
        budget: the memory budget in bytes; under `lora_space='auto'`, a LoRA layer whose factor
            space would exceed it goes to side space where that fits.
        rates: measured rates for the estimated seconds (`measure_rates()` by default).
        materialise_limit: LoRA controls use materialised updates up to this many bytes
            (default `MATERIALISE_LIMIT`, and never more than a quarter of the budget).
        devices: the devices the models are sharded over; a dense layer over the budget goes
            by chunks of models (`LayerPlan.chunk`), the largest that fits on each device.
    """
    rates = rates or measure_rates()
    n_models = layer_models(layer)
    m, n = layer.shape
    dtype = np.dtype(layer.dtype)
    rank = None if layer.kind == "dense" else layer.rank
    if layer.kind == "dense":
        route, space = "dense", spectra.lora_space
        solvers = dense_mode_solvers(n_models, m, n, spectra)
        materialise = True
    else:
        space = _lora_space(layer, n_pad, spectra, budget)
        side = lora_side_space(n_pad=n_pad, rank=rank, m=m, n=n, space=space)
        route = "lora-side" if side else "lora-factor"
        fast = lora_randomized_modes(spectra, m=m, n=n, side=side)
        wanted = spectra.modes if spectra.lora == "delta" else ("models", "lora_A", "lora_B")
        solvers = {mo: "randomized" if mo in fast else "exact" for mo in wanted}
        limit = MATERIALISE_LIMIT if materialise_limit is None else materialise_limit
        if budget is not None:
            limit = min(limit, budget // 4)
        materialise = n_pad * m * n * 4 <= limit
    planned = control_plan(
        n_models, m, n, controls, factored=not materialise, config=spectra, route=route
    )
    config = dataclasses.replace(spectra, lora_space=space)
    used = [planned[c]["bases"] for c in ("holdout", "split_half") if "bases" in planned[c]]
    working = working_set(layer, n_pad, config, materialise=materialise, bases=used)
    chunk = None
    if layer.kind == "dense":
        chunk, working = dense_chunk(
            layer, n_pad, config, budget=budget, devices=devices, bases=used
        )
    flops = estimated_flops(layer.kind, n_models, m, n, rank, config, solvers, planned, route=route)
    calls = {
        "spectra": 1 + len(solvers),
        "lineage": 0,
        "null": len(solvers) * controls.null_draws,
        "holdout": 2 * planned["holdout"].get("folds", 0),
        "compare": 4 * ("bases" in planned["split_half"]),
    }
    read = n_models * m * n * dtype.itemsize if layer.kind == "dense" else 0
    if rank is not None:
        read = sum(r * (m + n) for r in layer.ranks) * dtype.itemsize
    passes = memory_passes(
        layer.kind,
        solvers,
        planned,
        krylov_steps=config.iterations + 1 if chunk else 0,
        control_steps=config.iterations + 1,
    )
    entries = n_models * m * n if layer.kind == "dense" else 0
    parts = {}
    for part in PARTS:
        gemm, eigh = flops[part]
        stream, draws = passes[part]
        parts[part] = (
            gemm / rates.gemm
            + eigh / rates.eigh
            + calls[part] * rates.overhead
            + entries * (stream / rates.stream + draws / rates.draw)
        )
    parts["spectra"] += read / rates.read
    return LayerPlan(
        name=layer.name,
        kind=layer.kind,
        shape=(m, n),
        dtype=str(dtype),
        n_models=n_models,
        n_pad=n_pad,
        rank=rank,
        route=route,
        lora_space=space,
        solvers=solvers,
        controls=planned,
        materialise=materialise,
        working_set_bytes=working,
        flops=float(sum(g + e for g, e in flops.values())),
        seconds=float(sum(parts.values())),
        parts={part: float(value) for part, value in parts.items()},
        chunk=chunk,
    )


def dense_chunk(
    layer, n_pad: int, config: SpectraConfig, *, budget: int | None, devices: int = 1, bases=()
) -> tuple[int | None, int]:
    """`(chunk, working set)` of a dense layer: `chunk` None when the whole float32 stack fits
    `budget`, else the largest number of models per device (a divisor of each device's share,
    below it) whose chunked working set fits, or 1 when none does (`LayerPlan.chunk`). `bases`:
    the solvers of the controls' bases (`working_set`)."""
    working = working_set(layer, n_pad, config, bases=bases)
    if budget is None or working <= budget:
        return None, working
    local = max(1, n_pad // max(1, devices))
    sizes = [c for c in range(local - 1, 0, -1) if local % c == 0] or [1]
    for chunk in sizes:
        chunked = working_set(layer, n_pad, config, bases=bases, chunk=chunk * devices)
        if chunked <= budget:
            break
    return chunk, min(working, chunked)


def _lora_space(layer, n_pad: int, config: SpectraConfig, budget: int | None) -> str:
    """`config.lora_space`, except that under 'auto' a LoRA layer whose factor-space `(Nr)^2`
    matrices would exceed the budget, and whose side-space ones would not, goes to 'side'."""
    space = config.lora_space
    m, n = layer.shape
    if space != "auto" or budget is None:
        return space
    if lora_side_space(n_pad=n_pad, rank=layer.rank, m=m, n=n, space="auto"):
        return space
    factor = working_set(layer, n_pad, dataclasses.replace(config, lora_space="factor"))
    side = working_set(layer, n_pad, dataclasses.replace(config, lora_space="side"))
    return "side" if factor > budget >= side else space


def _krylov_bytes(side: int, k: int, config: SpectraConfig) -> int:
    """A randomized solve's float32 Krylov basis and its image: `2 side (iterations + 1) l`."""
    return 4 * 2 * side * (config.iterations + 1) * (k + 10)


def working_set(
    layer, n_pad: int, config: SpectraConfig, *, materialise=False, bases=(), chunk=None
) -> int:
    """Estimated peak bytes of one layer's analysis.

    Dense: the stored stack, its float32 centred copies and temporaries (x3), the prefetched next
    layer, the `side x side` matrices of the modes and control `bases` (their solvers) solved
    exactly, the models Grams, and the randomized solver's Krylov basis where it runs. On the
    chunked route (`chunk` models converted at a time over all devices) the float32 copies are
    of `chunk` models, beside a few float32 models (the centre, the population sum, a fold's
    mean, one held-out model and its centring model, the lineage probe's four). LoRA:
    the factors and the
    matrices of `config.lora_space` (with the randomized solver's float32 factors and Krylov
    basis where it runs), plus the materialised updates of the controls where they are formed.
    """
    m, n = layer.shape
    itemsize = np.dtype(layer.dtype).itemsize
    sides = {"rows": m, "cols": n}
    if layer.kind == "dense":
        spectra = dense_mode_solvers(layer_models(layer), m, n, config)
        solvers = [spectra, *bases]
        exact = {s for s in sides if any(used.get(s) == "exact" for used in solvers)}
        fast = {s for s in sides if any(used.get(s) == "randomized" for used in solvers)}
        krylov = max((_krylov_bytes(sides[s], config.rank, config) for s in fast), default=0)
        stack = n_pad * m * n
        grams = sum(sides[s] ** 2 for s in exact) + n_pad * n_pad
        # The dual cross-Gram of a tall side: (N_pad times the other side)^2.
        grams += sum(
            (n_pad * (m + n - sides[s])) ** 2 for s in sides if spectra.get(s) == "exact-dual"
        )
        if chunk is not None:
            # Four chunk-sized float32 buffers live at once in the holdout's and split
            # halves' randomized bases (XLA's buffer assignment: the converted chunk, the
            # centred chunk for each side's product and its flat copy).
            return int(2 * itemsize * stack + 4 * m * n * (8 + 4 * chunk) + 4 * grams + krylov)
        return int(stack * (2 * itemsize + 3 * 4) + 4 * grams + krylov)
    found = _lora_working_set(layer, n_pad, config)
    if materialise:
        found += 3 * 4 * n_pad * m * n
    return found


def _lora_working_set(layer, n_pad: int, config: SpectraConfig) -> int:
    m, n = layer.shape
    itemsize = np.dtype(layer.dtype).itemsize
    r = layer.rank
    factors = n_pad * r * (m + n)
    side = lora_side_space(n_pad=n_pad, rank=r, m=m, n=n, space=config.lora_space)
    lengths = {"rows": m, "cols": n, "lora_A": n, "lora_B": m}
    fast = lora_randomized_modes(config, m=m, n=n, side=side)
    krylov = 0
    if fast:
        # Float32 factors, or their rank-2r shift, and a side x (iterations + 1) l basis with
        # its image under the operator.
        krylov = 4 * 2 * factors + max(
            _krylov_bytes(lengths[mo], config.rank, config) for mo in fast
        )
    if side:
        # The stored factors and, in their place once they are released, the null's drawn ones
        # (no read-ahead; reading holds a second copy briefly); one side matrix of the modes
        # solved exactly, the sum of the updates (for those of the whole updates), a few float32
        # blocks and the models Grams.
        wanted = config.modes if config.lora == "delta" else ("lora_A", "lora_B")
        exact = [lengths[mo] for mo in wanted if mo in lengths and mo not in fast]
        blocks = 8 * kernels.BLOCK_ROWS * (m + n)
        summed = m * n if config.lora == "delta" and exact else 0
        matrix = max(exact, default=0) ** 2
        return int(
            2 * factors * itemsize + 4 * (matrix + summed + 3 * n_pad**2) + 4 * blocks + krylov
        )
    return int(factors * (2 * itemsize + 3 * 4) + 4 * 6 * (n_pad * r) ** 2 + krylov)


def _basis_flops(n_models, m, n, k, bases, config, *, removed=None) -> tuple[float, float]:
    """`(gemm, eigh)` flops of fitting rows / cols bases of N stacked `m x n` models (exact
    sides downdated from the population's matrix by `removed` models, when given)."""
    gemm = eigh = 0.0
    for mode, side in (("rows", m), ("cols", n)):
        if bases[mode] == "exact":
            gemm += 2.0 * (n_models if removed is None else removed) * m * n * side
            eigh += 9.0 * side**3
        else:
            block = (config.iterations + 1) * (k + 10)
            gemm += (config.iterations + 1) * 4.0 * n_models * m * n * (k + 10)
            gemm += 8.0 * side * block**2
    return gemm, eigh


def _gram_basis_flops(d: int, k: int, iterations: int, *, warm: bool = False) -> float:
    """Flops of one `spectra._gram_bases.set_basis` over `d` factor columns, counted at the
    float32 GEMM rate: each block's operator product (two `d x d` GEMMs), two projection
    passes with a Gram product each, and the Rayleigh-Ritz residuals, in float64 (twice
    the cost); a warm start adds the superset's directions (`d x Nr`, about one more product)."""
    width = k + 10
    blocks = iterations + 1
    flops = blocks * 2 * 2.0 * d * d * width  # the operator
    flops += blocks * 2 * 2.0 * d * d * width  # the orthonormalisations' Gram products
    flops += 2.0 * d * d * width * (2 + warm)  # residuals, warm start
    return 2.0 * flops


PARTS = ("spectra", "lineage", "null", "holdout", "compare")
"""The parts of a layer's analysis its plan estimates and its record times (`seconds`)."""


def estimated_flops(kind, n_models, m, n, rank, config, solvers, controls, *, route) -> dict:
    """`{part: (gemm, eigh)}` flops of a layer's spectra and each control (`PARTS`), by the
    plan's solvers."""
    gemm = eigh = 0.0
    lineage = 0.0
    sides = {"rows": m, "cols": n, "lora_A": n, "lora_B": m}
    width = config.rank + 10
    block = (config.iterations + 1) * width
    if kind == "dense":
        gemm += 2.0 * n_models**2 * m * n
        lineage = 2.0 * n_models**2 * m * n * (controls["lineage"] == {})
        for mode in ("rows", "cols"):
            if mode not in solvers:
                continue
            side = sides[mode]
            if solvers[mode] == "exact":
                gemm += 2.0 * n_models * m * n * side
                eigh += 9.0 * side**3
            elif solvers[mode] == "exact-dual":
                dual = n_models * (m + n - side)
                gemm += 2.0 * side * dual**2
                eigh += 9.0 * dual**3
            else:
                gemm += (config.iterations + 1) * 4.0 * n_models * m * n * width
                gemm += 8.0 * side * block**2
        size = n_models * m * n
    else:
        nr = n_models * rank
        size = nr * (m + n)
        for mode, solver in solvers.items():
            if mode == "models":
                continue
            side = sides[mode]
            if solver == "randomized":
                gemm += (config.iterations + 1) * 4.0 * size * width + 8.0 * side * block**2
            elif route == "lora-side":
                gemm += 2.0 * nr * side**2
                eigh += 9.0 * side**3
            elif side < nr:
                # The stacked factor itself sandwiches the middle matrix; eigenvalues alone.
                gemm += 2.0 * side * nr * nr + 2.0 * side * side * nr
                eigh += 4.0 / 3.0 * side**3
            else:
                # Eigenvalues alone of the (Nr)^2 pencil: Cholesky (1/3), the congruence
                # ?sygst (1) and the tridiagonalisation (4/3), not a full eigh's 9.
                eigh += 8.0 / 3.0 * nr**3
        # The two factor cross-Grams, once for every mode (symmetric: 10 of 16 blocks).
        gemm += 2.0 * nr * nr * (m + n) * 10 / 16
    draws = controls["null"].get("draws", 0)
    parts = {
        "spectra": (gemm, eigh),
        "lineage": (lineage, 0.0),
        "null": (draws * gemm, draws * eigh),
        "holdout": _holdout_flops(
            kind, n_models, m, n, rank, config, controls["holdout"], size, solvers
        ),
        "compare": _compare_flops(n_models, m, n, rank, config, controls["split_half"], size),
    }
    return {part: (float(g), float(e)) for part, (g, e) in parts.items()}


def _holdout_flops(
    kind, n_models, m, n, rank, config, holdout, size, solvers
) -> tuple[float, float]:
    gemm = eigh = 0.0
    if "folds" not in holdout:
        return gemm, eigh
    stack = n_models * m * n
    if kind != "dense" and holdout["from"] == "stack":
        gemm += 2.0 * stack * rank  # the materialised updates
    # Mean-centred exact sides: the population's matrix once (unless the spectra solved that
    # side exactly: their Gram is reused), then a downdate per fold by the held-out and
    # centring models (`_holdout.downdated_basis`).
    removed = None
    if config.center == "mean" and holdout["from"] == "stack":
        removed = 2 * holdout.get("largest", 1)
        for mode, side in (("rows", m), ("cols", n)):
            if holdout["bases"][mode] == "exact" and solvers.get(mode) != "exact":
                gemm += 2.0 * stack * side
    held = holdout.get("largest", 1) * m * n
    # A fold's bases read its kept models alone (`_holdout._kept_models_sum`).
    kept = n_models - holdout.get("largest", 1) * (2 if config.center == "mean" else 1)
    if holdout["from"] == "grams":
        gemm += 2 * _gram_basis_flops(n_models * rank, holdout["kmax"], config.iterations)
    for _ in range(holdout["folds"]):
        if holdout["from"] == "grams":
            train = (n_models - 2 * holdout.get("largest", 1)) * rank
            steps = max(1, config.iterations // 2)
            gemm += 2 * _gram_basis_flops(train, holdout["kmax"], steps, warm=True)
            continue
        if holdout["from"] == "factors":
            g = 2 * (config.iterations + 1) * 4.0 * size * (holdout["kmax"] + 10)
            gemm += g + 4.0 * size * holdout["kmax"]
            continue
        g, e = _basis_flops(kept, m, n, holdout["kmax"], holdout["bases"], config, removed=removed)
        gemm += g + 6.0 * held * holdout["kmax"]
        eigh += e
    return gemm, eigh


def _compare_flops(n_models, m, n, rank, config, half, size) -> tuple[float, float]:
    if "bases" not in half:
        return 0.0, 0.0
    if half["from"] == "grams":
        return 4 * _gram_basis_flops(n_models // 2 * rank, half["k"], config.iterations), 0.0
    if half["from"] == "factors":
        return 2 * 2 * (config.iterations + 1) * 4.0 * size / 2 * (COMPARE_K + 10), 0.0
    g, e = _basis_flops(n_models / 2, m, n, half["k"], half["bases"], config)
    return 2 * g, 2 * e


def memory_passes(
    kind: str, solvers, controls, *, krylov_steps: int = 0, control_steps: int = 0
) -> dict:
    """`{part: (passes, draws)}`: how many memory-bound passes over a dense layer's stack each
    part of its analysis makes (conversion and the finite check at placement, each centring, the
    lineage pass, each fold's and half's mean and centring, each null draw's normalisation and
    spectra) and how many Gaussian stacks the null draws. Matrix products are counted in flops,
    not here. LoRA layers (whose factors are small beside their products): none.

    `krylov_steps`: on the chunked route (`LayerPlan.chunk`) every operator product of a
    randomized solve converts and centres the stack again, chunk by chunk (0: the whole-stack
    route, which centres once per solve). Those conversions ride in the product's own pass over
    the stack, which the flops already time: each counts `CHUNK_PASS` of a centring pass.
    `control_steps`: the Krylov products of the holdout's and split halves' randomized bases,
    which convert their kept models in every product on either route
    (`_holdout._kept_models_sum`); their means and captures make two passes per fold or
    half."""
    if kind != "dense":
        return {part: (0.0, 0.0) for part in PARTS}
    fast = sum(s == "randomized" for s in solvers.values())
    krylov = CHUNK_PASS * krylov_steps
    spectra = 1 + fast * (1 + krylov)
    draws = controls["null"].get("draws", 0)
    folds = controls["holdout"].get("folds", 0)

    def solves(control):
        bases = controls[control].get("bases", {})
        steps = CHUNK_PASS * max(krylov_steps, control_steps)
        return sum(b == "randomized" for b in bases.values()) * steps

    return {
        "spectra": (2.0 + spectra, 0.0),
        "lineage": (float(controls["lineage"] == {}), 0.0),
        "null": (float(draws * (2 + spectra)), float(draws)),
        "holdout": (folds * (2.0 + solves("holdout")), 0.0),
        "compare": (2.0 * (1.0 + solves("split_half")) * ("bases" in controls["split_half"]), 0.0),
    }


def plan_total(plans) -> dict:
    """The run's total: estimated seconds (and of each part) and flops, and the largest working
    set."""
    plans = list(plans)
    return {
        "layers": len(plans),
        "seconds": float(sum(p.seconds for p in plans)),
        "parts": {part: float(sum(p.parts.get(part, 0.0) for p in plans)) for part in PARTS},
        "flops": float(sum(p.flops for p in plans)),
        "working_set_bytes": max((p.working_set_bytes for p in plans), default=0),
    }


def exact_sides(plan: LayerPlan) -> set[int]:
    """The `side x side` matrices the plan admits: the sides of the modes and control bases
    solved exactly (what `tests` check XLA's buffers against)."""
    m, n = plan.shape
    sides = {"rows": m, "cols": n, "lora_A": n, "lora_B": m}
    found = {sides[mo] for mo, s in plan.solvers.items() if mo in sides and s == "exact"}
    found |= {
        plan.n_pad * (m + n - sides[mo]) for mo, s in plan.solvers.items() if s == "exact-dual"
    }
    for control in plan.controls.values():
        found |= {sides[mo] for mo, s in control.get("bases", {}).items() if s == "exact"}
    return found
