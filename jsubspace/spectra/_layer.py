"""Per-layer mode spectra: which kernel runs for which mode, and what it found.

The choice between exact and randomized eigen-solvers is made here by cost, can be forced, and is
recorded beside every spectrum.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jsubspace import kernels
from jsubspace.config import LORA_SPACES
from jsubspace.config import MODES
from jsubspace.config import SpectraConfig
from jsubspace.io import PlacedDense
from jsubspace.io import PlacedLora
from jsubspace.sharding import host_array
from jsubspace.sharding import stacked_sharding
from jsubspace.spectra import _factored
from jsubspace.spectra import _gram_bases

# Under method='auto' a side no longer than exact_limit is solved exactly unless the exact solve
# costs more than this many flops (a few seconds on one CPU core) and the randomized one is at
# least RANDOMIZED_GAIN times cheaper: the top-`rank` eigenvalues of a randomized solve leave
# `k_at` and the effective rank open and are less accurate on flat spectra, which is no bargain
# for a 768-wide layer whose exact eigh takes a fraction of a second.
EXACT_FLOPS = 1e11
RANDOMIZED_GAIN = 4.0
# Side-space LoRA sums are shifted first when the uncentred energy exceeds the centred one by
# more than this (see `kernels.side_mode_matrix`).
SHIFT_RATIO = 8.0
FACTOR_MODES = ("lora_A", "lora_B")


@dataclasses.dataclass
class ModeResult:
    """One mode's eigenvalues (descending, float64) and how they were obtained."""

    eigenvalues: np.ndarray
    method: str
    side: int
    residual: float | None = None
    iterations: int | None = None
    total_energy: float | None = None  # set where the mode has its own trace (factor PCA)
    flops: float | None = None  # the solver's estimated cost, which decided exact vs randomized


@dataclasses.dataclass
class LayerSpectra:
    """Spectra of one layer: per mode, and the exact total energy they share."""

    modes: dict[str, ModeResult]
    total_energy: float
    norms: np.ndarray  # f64[N], ||X_i||_F^2 of each centred model
    uncentred: np.ndarray | None  # f64[N, N], <W_i, W_j> before centring (lineage)
    factor_gram: np.ndarray | None = None  # f64[N, N], <A_i, A_j> of LoRA A factors
    models_gram: np.ndarray | None = None  # f64[N, N], the models Gram (LoRA; config.center)
    # The mean-centred rows / cols Grams on the devices (dense, exact sides), for the holdout's
    # fold downdates: one pass over the stack feeds both. Dropped once the holdout has run.
    grams: object | None = None
    # A LoRA layer's factor cross-Grams on the host (`spectra._gram_bases.FactorGrams`; factor
    # route, unshifted), from which its holdout and split-half bases come. Dropped likewise.
    factor_grams: object | None = None


def solver_costs(n_models: int, m: int, n: int, *, mode: str, rank: int, iterations: int) -> dict:
    """Estimated flops of the exact and randomized solvers for the rows / cols mode.

    Exact: the side x side Gram (`2 N m n side`) plus its eigh (~`9 side^3`). Randomized block
    Krylov: `iterations + 1` operator products of `4 N m n l` each (l = rank + 10) plus the
    re-orthogonalisations and the Rayleigh–Ritz step of a `side x (iterations + 1) l` basis.
    """
    side = m if mode == "rows" else n
    width = rank + 10
    exact = 2.0 * n_models * m * n * side + 9.0 * side**3
    block = (iterations + 1) * width
    randomized = (iterations + 1) * 4.0 * n_models * m * n * width + 8.0 * side * block**2
    return {"exact": exact, "randomized": randomized}


@jax.jit
def _descending_eigvalsh(gram: jax.Array) -> jax.Array:
    return jnp.linalg.eigvalsh(gram)[::-1]


def _eigvals(gram) -> np.ndarray:
    """Descending eigenvalues (float64, clipped at zero) of a symmetric `f32[d, d]` jax.Array.

    On CPU the matrix is already in host memory, and LAPACK's `?syevr` without eigenvectors is
    called directly: XLA's CPU eigh always computes the vectors too, which costs 2-3x more for
    the (Nr)^2 matrices of LoRA layers. Accelerators solve on the device.
    """
    if isinstance(gram, jax.Array) and next(iter(gram.devices())).platform == "cpu":
        return _factored.eigvalsh(host_array(gram))
    values = host_array(_descending_eigvalsh(gram))
    return np.clip(values.astype(np.float64), 0.0, None)


def prefers_randomized(costs: dict, side: int, rank: int, config: SpectraConfig) -> bool:
    """The rule of `method='auto'` for one side (`costs` from `solver_costs`): randomized when
    the side is longer than `exact_limit` (its exact eigh would need the `side^2` Gram in
    memory), or when the exact solve is expensive (over `EXACT_FLOPS`) and the randomized one
    `RANDOMIZED_GAIN` times cheaper; in both cases only while `rank` is below half the side."""
    if rank >= side // 2:
        return False
    if side > config.exact_limit:
        return True
    return costs["exact"] > EXACT_FLOPS and costs["randomized"] * RANDOMIZED_GAIN < costs["exact"]


def dense_mode_solvers(n_models: int, m: int, n: int, config: SpectraConfig) -> dict[str, str]:
    """The solver of each mode of a dense `m x n` layer of N models: the randomized solver when
    asked for, or under 'auto' by `prefers_randomized`; but a side past `exact_limit` whose dual
    (`N` times the other side: a vocabulary embedding's `N n`) is within it is solved exactly
    from the dual cross-Gram ('exact-dual', `kernels.dual_mode_gram`), which has the same
    nonzero eigenvalues. The one rule of the spectra (`spectra.plan_layer`); the controls' bases
    follow `prefers_randomized` at their own k."""
    sides = {"models": n_models, "rows": m, "cols": n}
    out = {}
    for mode in config.modes:
        out[mode] = "exact"
        if mode == "models":
            continue
        costs = solver_costs(
            n_models, m, n, mode=mode, rank=config.rank, iterations=config.iterations
        )
        if config.method == "randomized":
            out[mode] = "randomized"
        elif config.method != "auto":
            continue
        elif sides[mode] > config.exact_limit and n_models * (m + n - sides[mode]) <= (
            config.exact_limit
        ):
            out[mode] = "exact-dual"
        elif prefers_randomized(costs, sides[mode], config.rank, config):
            out[mode] = "randomized"
    return out


def _dense_spectra(
    placed: PlacedDense,
    base,
    *,
    mesh,
    config: SpectraConfig,
    key,
    lineage: bool,
    solvers=None,
    chunk: int | None = None,
) -> LayerSpectra:
    n_pad, m, n = placed.x.shape
    sides = {"models": placed.n_models, "rows": m, "cols": n}
    if solvers is None:
        solvers = dense_mode_solvers(placed.n_models, m, n, config)
    randomized = {mode for mode, solver in solvers.items() if solver == "randomized"}
    dual = {mode for mode, solver in solvers.items() if solver == "exact-dual"}
    costs = {
        mode: solver_costs(
            placed.n_models, m, n, mode=mode, rank=config.rank, iterations=config.iterations
        )
        for mode in ("rows", "cols")
        if mode in config.modes
    }
    exact_modes = tuple(
        mo for mo in MODES if mo in config.modes and mo not in randomized and mo not in dual
    )
    # The models Gram is always wanted: its diagonal gives the per-model energies.
    grams = kernels.mode_grams(
        placed.x,
        base,
        mesh=mesh,
        n_models=placed.n_models,
        center=config.center,
        modes=tuple(sorted(set(exact_modes) | {"models"}, key=MODES.index)),
        chunk=chunk,
    )
    out = {}
    for mode in exact_modes:
        out[mode] = ModeResult(
            _eigvals(getattr(grams, mode)),
            "exact",
            sides[mode],
            flops=costs.get(mode, {}).get("exact"),
        )
    for mode in sorted(dual):
        gram = kernels.dual_mode_gram(
            placed.x,
            base,
            mesh=mesh,
            n_models=placed.n_models,
            center=config.center,
            mode=mode,
            chunk=chunk,
        )
        # As many eigenvalues as the dual has (N times the short side); the rest are zero.
        out[mode] = ModeResult(_eigvals(gram)[: sides[mode]], "exact-dual", sides[mode])
        del gram
    for mode in sorted(randomized):
        key, sub = jax.random.split(key)
        eig = kernels.randomized_mode_eigh(
            placed.x,
            base,
            key=sub,
            mesh=mesh,
            n_models=placed.n_models,
            mode=mode,
            rank=min(config.rank, sides[mode]),
            center=config.center,
            iterations=config.iterations,
            chunk=chunk,
        )
        out[mode] = randomized_result(
            eig, "randomized", sides[mode], config, flops=costs[mode]["randomized"]
        )
    models_gram = host_array(grams.models).astype(np.float64)
    norms = np.diag(models_gram).copy()
    if config.center == "none":
        uncentred = models_gram
    elif not lineage:
        uncentred = None
    else:
        uncentred = host_array(
            kernels.mode_grams(
                placed.x,
                mesh=mesh,
                n_models=placed.n_models,
                center="none",
                modes=("models",),
                chunk=chunk,
            ).models
        ).astype(np.float64)
    kept = None
    if config.center == "mean" and (grams.rows is not None or grams.cols is not None):
        kept = grams._replace(models=None)
    return LayerSpectra(out, float(host_array(grams.total_energy)), norms, uncentred, grams=kept)


def factor_sample_mask(n_pad: int, rank: int, ranks) -> np.ndarray:
    """`f32[N_pad * r]`: 1 for factor rows/columns that exist (model real, index < its rank)."""
    mask = np.zeros((n_pad, rank), np.float32)
    for i, r in enumerate(ranks):
        mask[i, :r] = 1.0
    return mask.reshape(-1)


def placed_sample_mask(mesh: Mesh, n_pad: int, rank: int, ranks) -> jax.Array:
    """`factor_sample_mask` as `f32[N_pad, r]`, sharded over models like the factor stacks."""
    mask = factor_sample_mask(n_pad, rank, ranks).reshape(n_pad, rank)
    return jax.device_put(mask, stacked_sharding(mesh))


@jax.jit
def _centred_sample_gram(gram: jax.Array, mask: jax.Array) -> jax.Array:
    # gram: f32[Nr, Nr] inner products of the samples; centre on the mean of the real samples:
    # H G H with H = diag(mask) - mask mask^T / count, as rank-one updates (no (Nr)^3 products).
    count = jnp.sum(mask)
    g = gram * mask[:, None] * mask[None, :]
    # f32[Nr]: each sample's mean inner product
    col = kernels.matmul(g, mask) / count
    return (
        g
        - col[:, None] * mask[None, :]
        - mask[:, None] * col[None, :]
        + (kernels.matmul(mask, col) / count) * jnp.outer(mask, mask)
    )


def factored_on_host(array: jax.Array) -> bool:
    """Whether LoRA rows / cols spectra that need a root of an `(Nr)^2` Gram are solved with host
    LAPACK (`spectra._factored`): on the CPU backend, where host memory is device memory."""
    return next(iter(array.devices())).platform == "cpu"


def lora_spectra_from_grams(
    g: kernels.LoraGrams,
    ranks,
    *,
    config: SpectraConfig,
    m: int,
    n: int,
    roots=None,
    lineage: bool = True,
) -> LayerSpectra:
    """Spectra of a LoRA layer from its factor-space Grams (of the real or of a null population).

    Modes whose matrix `g` does not hold (`None`) are solved on the host from the cross-Grams:
    with `roots[mode]`, an upper-triangular `F` with `F^T F` = that mode's own Gram, when given,
    else a pivoted Cholesky factor of the Gram. `lineage=False` (null draws) skips the
    uncentred Gram and the A-factor Gram.
    """
    n_pad, r = g.factor_a.shape[:2]
    nr = n_pad * r
    k = g.models.shape[0]
    out = {}
    # Each cross-Gram is fetched from the device at most once per layer.
    fetched = {}

    def factor(name):
        if name not in fetched:
            fetched[name] = host_array(getattr(g, name))
        return fetched[name]

    if config.lora == "delta":
        sides = {"models": k, "rows": m, "cols": n}
        weights = None
        for mode in config.modes:
            matrix = getattr(g, mode)
            if matrix is not None:
                lam = _eigvals(matrix)
            else:
                if weights is None:
                    weights = _factored.centred_weights(host_array(g.scales), k, config.center)
                own, other = ("factor_b", "factor_a")[:: 1 if mode == "rows" else -1]
                mid = _factored.mid_matrix(factor(other), weights)
                root = (roots or {}).get(mode)
                if root is not None:
                    lam = _factored.sandwich_eigvalsh(mid, root=host_array(root))
                else:
                    lam = _factored.sandwich_eigvalsh(mid, gram=factor(own).reshape(nr, nr))
            lam = lam[: sides[mode]]
            out[mode] = ModeResult(lam, "exact-factored", sides[mode])
    else:
        mask = jnp.asarray(factor_sample_mask(n_pad, r, ranks))
        ga = _centred_sample_gram(g.factor_a.reshape(nr, nr), mask)
        gb = _centred_sample_gram(g.factor_b.reshape(nr, nr), mask)
        # Each factor statistic has its own trace, recorded with its mode.
        energy_a = float(np.trace(host_array(ga).astype(np.float64)))
        energy_b = float(np.trace(host_array(gb).astype(np.float64)))
        out["lora_A"] = ModeResult(_eigvals(ga)[:n], "exact-factor-pca", n, total_energy=energy_a)
        out["lora_B"] = ModeResult(_eigvals(gb)[:m], "exact-factor-pca", m, total_energy=energy_b)
    energy = float(host_array(g.total_energy))
    models = host_array(g.models).astype(np.float64)
    norms = np.diag(models).copy()
    if not lineage:
        return LayerSpectra(out, energy, norms, None, models_gram=models)
    return LayerSpectra(
        out, energy, norms, *_lora_lineage(g, fetched.get("factor_a")), models_gram=models
    )


def _lora_lineage(g: kernels.LoraGrams, factor_a=None) -> tuple[np.ndarray, np.ndarray]:
    """`(<dW_i, dW_j>, <A_i, A_j>)` from the factor-space Grams (for the lineage control); the
    latter is the trace of each `r x r` block of the A cross-Gram (`factor_a`, if fetched)."""
    k = g.models.shape[0]
    factor_a = host_array(g.factor_a) if factor_a is None else factor_a
    a_gram = np.trace(factor_a, axis1=1, axis2=3).astype(np.float64)[:k, :k]
    return host_array(g.uncentred).astype(np.float64), a_gram


def close_to_mean(uncentred: np.ndarray, centred_energy: float) -> bool:
    """Whether mean-centred sums over a LoRA population would cancel in float32: its energy
    before centring (the trace of the uncentred models Gram) exceeds `SHIFT_RATIO` times the
    centred energy. Such populations are taken through `kernels.shifted_lora` first."""
    return bool(np.trace(uncentred) > SHIFT_RATIO * centred_energy)


def _mean_dominated(g: kernels.LoraGrams, config: SpectraConfig) -> bool:
    """`close_to_mean` of the factor-space Grams, for mean-centred whole-update spectra."""
    if config.lora != "delta" or config.center != "mean":
        return False
    uncentred = host_array(g.uncentred).astype(np.float64)
    return close_to_mean(uncentred, float(host_array(g.total_energy)))


def device_modes(wanted, *, m: int, n: int, nr: int, host: bool) -> tuple[str, ...]:
    """The rows / cols modes the jitted kernel builds: all of them off CPU; on CPU those whose
    side is shorter than `Nr` (no root needed), the others go to host LAPACK."""
    sides = {"rows": m, "cols": n}
    return tuple(mode for mode in wanted if not host or sides[mode] < nr)


def dispatch_lora(placed: PlacedLora, *, mesh, config: SpectraConfig) -> kernels.LoraGrams:
    """Starts the device work of a LoRA layer's spectra (`lora_spectra_from_grams` finishes it)."""
    wanted = tuple(m for m in config.modes if m != "models") if config.lora == "delta" else ()
    n_pad, r, n = placed.a.shape
    m = placed.b.shape[1]
    return kernels.lora_grams(
        placed.a,
        placed.b,
        placed.scales,
        mesh=mesh,
        n_models=placed.n_models,
        center=config.center,
        modes=("models",)
        + device_modes(wanted, m=m, n=n, nr=n_pad * r, host=factored_on_host(placed.a)),
    )


def lora_side_space(*, n_pad: int, rank: int, m: int, n: int, space: str = "auto") -> bool:
    """Whether a LoRA layer is analysed in side space (`side_lora_spectra`): asked for
    (`space='side'`), or by default (`'auto'`) when its `Nr` factor rows outnumber both sides,
    for the whole updates (`kernels.side_mode_matrix`) and for the factor statistic
    (`kernels.factor_covariance`) alike. The one rule, for placed layers (`side_space`) and for
    layers not yet read."""
    if space not in LORA_SPACES:
        raise ValueError(f"space must be one of {LORA_SPACES}, got {space!r}")
    if space != "auto":
        return space == "side"
    return kernels.uses_side_space(n_pad=n_pad, rank=rank, m=m, n=n)


def side_space(placed: PlacedLora, config: SpectraConfig) -> bool:
    """`lora_side_space` of a placed layer."""
    n_pad, r, n = placed.a.shape
    m = placed.b.shape[1]
    return lora_side_space(n_pad=n_pad, rank=r, m=m, n=n, space=config.lora_space)


def _factor_pca(a, b, mask, *, mesh, factor: str) -> tuple[np.ndarray, float]:
    """Eigenvalues and trace of the centred covariance of one factor's samples
    (`kernels.factor_covariance`); on a single-process CPU backend accumulated and solved in
    host memory, in place."""
    if factored_on_host(a) and jax.process_count() == 1:
        matrix = _factored.factor_covariance_matrix(a, b, mask, mesh=mesh, factor=factor)
    else:
        matrix = kernels.factor_covariance(a, b, mask, mesh=mesh, factor=factor)
    if isinstance(matrix, np.ndarray):
        energy = float(np.sum(np.diag(matrix), dtype=np.float64))
        return _factored.eigvalsh(matrix, lower=True, overwrite=True), energy
    return _eigvals(matrix), float(host_array(jnp.trace(matrix)))


def _side_eigvals(a, b, scales, *, mesh, mode: str, **kwargs) -> np.ndarray:
    """Eigenvalues of a side-space rows / cols matrix; on a single-process CPU backend the
    matrix is accumulated and solved in host memory (`_factored.side_matrix`), in place."""
    if factored_on_host(a) and jax.process_count() == 1:
        matrix = _factored.side_matrix(a, b, scales, mesh=mesh, mode=mode, **kwargs)
        return _factored.eigvalsh(matrix, lower=True, overwrite=True)
    return _eigvals(kernels.side_mode_matrix(a, b, scales, mesh=mesh, mode=mode, **kwargs))


def side_lora_spectra(
    a: jax.Array,
    b: jax.Array,
    scales: jax.Array,
    n_models: int,
    *,
    mesh: Mesh,
    config: SpectraConfig,
    mask: jax.Array | None = None,
    lineage: bool = True,
) -> LayerSpectra:
    """Spectra of a LoRA population (real or null) from side-space matrices: the whole updates'
    modes, or with `config.lora='factors'` the factor statistic (`mask`, `f32[N_pad, r]` sharded
    like the stacks, marks the rank slots that exist; all of them by default).

    One mode matrix lives at a time: each is built, solved and released before the next, so the
    working set is the stored factors plus one `max(m, n)^2` matrix, the summed update (a
    quarter of it on the CPU backend, `_factored.side_matrix`) and two model blocks.
    """
    m, n = b.shape[1], a.shape[2]
    sides = {"models": n_models, "rows": m, "cols": n}
    common = dict(mesh=mesh, n_models=n_models, center=config.center)
    found = kernels.side_models(a, b, scales, **common)
    energy = float(host_array(found.total_energy))
    uncentred = host_array(found.uncentred).astype(np.float64)
    # Close to their mean, the updates' sums would cancel in float32: shift them first.
    shift = close_to_mean(uncentred, energy)
    lineage_found = found
    if shift:
        found = kernels.side_models(a, b, scales, shift=True, **common)
        energy = float(host_array(found.total_energy))
    out = {}
    if config.lora == "factors":
        if mask is None:
            mask = placed_sample_mask(mesh, *a.shape[:2], [a.shape[1]] * n_models)
        for name, factor, side in (("lora_A", "A", n), ("lora_B", "B", m)):
            lam, own = _factor_pca(a, b, mask, mesh=mesh, factor=factor)
            out[name] = ModeResult(lam[:side], "exact-factor-pca-side", side, total_energy=own)
    else:
        for mode in config.modes:
            if mode == "models":
                lam = _eigvals(found.models)
            else:
                lam = _side_eigvals(a, b, scales, mode=mode, shift=shift, **common)
            out[mode] = ModeResult(lam[: sides[mode]], "exact-side", sides[mode])
    models = host_array(found.models).astype(np.float64)
    norms = np.diag(models).copy()
    if not lineage:
        return LayerSpectra(out, energy, norms, None, models_gram=models)
    a_gram = host_array(lineage_found.a_gram).astype(np.float64)
    return LayerSpectra(out, energy, norms, uncentred, a_gram, models)


def lora_randomized_modes(config: SpectraConfig, *, m: int, n: int, side: bool) -> tuple[str, ...]:
    """The modes of an `m x n` LoRA layer (analysed in side space if `side`) whose top
    `config.rank` eigenvalues come from the randomized solver through the factors
    (`kernels.randomized_lora_eigh`, `randomized_factor_pca`): rows / cols for the whole updates,
    `lora_A` (side n) / `lora_B` (side m) for the factor statistic.

    `method='randomized'` asks for all of them. Under 'auto', a side longer than `exact_limit`
    is solved randomized in side space (where exact spectra need a `side^2` matrix and its
    `O(side^3)` eigen-solve) when `rank` is below half of it; factor space is always exact, its
    matrices being `Nr` long whatever the sides. The one rule, for placed layers
    (`randomized_lora_modes`) and for layers not yet read.
    """
    if config.method == "exact":
        return ()
    if config.lora == "delta":
        sides = {mo: {"rows": m, "cols": n}[mo] for mo in config.modes if mo != "models"}
    else:
        sides = {"lora_A": n, "lora_B": m}
    if config.method == "randomized":
        return tuple(sides)
    if not side:
        return ()
    return tuple(
        mo
        for mo, length in sides.items()
        if length > config.exact_limit and config.rank < length // 2
    )


def randomized_lora_modes(placed: PlacedLora, config: SpectraConfig) -> tuple[str, ...]:
    """`lora_randomized_modes` of a placed layer."""
    m, n = placed.b.shape[1], placed.a.shape[2]
    return lora_randomized_modes(config, m=m, n=n, side=side_space(placed, config))


def _randomized_lora_spectra(
    placed: PlacedLora, ranks, fast, *, mesh, config: SpectraConfig, key, lineage: bool
) -> LayerSpectra:
    """`lora_layer_spectra` with the modes `fast` (`randomized_lora_modes`) solved randomized; the
    models Gram, the energies, lineage and any exact mode come from the exact route."""
    m, n = placed.b.shape[1], placed.a.shape[2]
    sides = {"rows": m, "cols": n, "lora_A": n, "lora_B": m}
    # The exact route for the rest: the whole updates' other modes, or just the models Gram.
    rest = tuple(mo for mo in config.modes if mo not in fast) if config.lora == "delta" else ()
    exact = dataclasses.replace(config, lora="delta", modes=rest or ("models",))
    found = lora_layer_spectra(placed, ranks, mesh=mesh, config=exact)
    out = {mo: found.modes[mo] for mo in rest}
    common = dict(mesh=mesh, iterations=config.iterations)
    if config.lora == "delta":
        factors = placed[:3]
        if config.center == "mean" and close_to_mean(found.uncentred, found.total_energy):
            factors = kernels.shifted_lora(
                *factors, mesh=mesh, n_models=placed.n_models, split="rows"
            )
        for mode in fast:
            key, sub = jax.random.split(key)
            eig = kernels.randomized_lora_eigh(
                *factors,
                sub,
                n_models=placed.n_models,
                mode=mode,
                rank=min(config.rank, sides[mode]),
                center=config.center,
                **common,
            )
            out[mode] = randomized_result(eig, "randomized-factored", sides[mode], config)
        del factors
    else:
        mask = placed_sample_mask(mesh, *placed.a.shape[:2], ranks)
        for name, factor in zip(FACTOR_MODES, kernels.FACTORS):
            if name in fast:
                key, sub = jax.random.split(key)
                eig, trace = kernels.randomized_factor_pca(
                    placed.a,
                    placed.b,
                    mask,
                    sub,
                    factor=factor,
                    rank=min(config.rank, sides[name]),
                    **common,
                )
                out[name] = randomized_result(
                    eig, "randomized-factor-pca", sides[name], config, float(host_array(trace))
                )
            else:
                lam, own = _factor_pca(placed.a, placed.b, mask, mesh=mesh, factor=factor)
                out[name] = ModeResult(
                    lam[: sides[name]], "exact-factor-pca-side", sides[name], total_energy=own
                )
    found = dataclasses.replace(found, modes={mo: out[mo] for mo in _ordered(out)})
    if not lineage:
        return dataclasses.replace(found, uncentred=None, factor_gram=None)
    return found


def _ordered(modes) -> list[str]:
    order = MODES + FACTOR_MODES
    return sorted(modes, key=order.index)


def randomized_result(
    eig: kernels.Eig, method: str, side: int, config, energy=None, flops=None
) -> ModeResult:
    """The ModeResult of a randomized solve: its eigenvalues, largest residual and steps."""
    return ModeResult(
        np.clip(host_array(eig.values).astype(np.float64), 0.0, None),
        method,
        side,
        residual=float(np.max(host_array(eig.residuals))),
        iterations=config.iterations,
        total_energy=energy,
        flops=flops,
    )


def lora_layer_spectra(
    placed: PlacedLora,
    ranks,
    *,
    mesh,
    config: SpectraConfig,
    key=None,
    lineage: bool = True,
    plan=None,
) -> LayerSpectra:
    """Spectra of a LoRA layer (real, or a null draw with `lineage=False`) by the route of its
    `plan` (`spectra.LayerPlan`; without one, the rule its shapes and `config` call for): factor
    or side space, exact or randomized (`key` for the latter)."""
    if plan is not None:
        config = plan.spectra_config(config)
        fast = plan.randomized_modes()
    else:
        fast = randomized_lora_modes(placed, config)
    if fast:
        if key is None:
            raise ValueError("randomized LoRA spectra need a PRNG key")
        return _randomized_lora_spectra(
            placed, ranks, fast, mesh=mesh, config=config, key=key, lineage=lineage
        )
    side = plan.route == "lora-side" if plan is not None else side_space(placed, config)
    if side:
        mask = placed_sample_mask(mesh, *placed.a.shape[:2], ranks)
        return side_lora_spectra(*placed, mesh=mesh, config=config, mask=mask, lineage=lineage)
    g = dispatch_lora(placed, mesh=mesh, config=config)
    m, n = placed.b.shape[1], placed.a.shape[2]
    if not _mean_dominated(g, config):
        found = lora_spectra_from_grams(g, ranks, config=config, m=m, n=n, lineage=lineage)
        if lineage:  # the real population, whose controls follow
            found.factor_grams = _gram_bases.FactorGrams(
                host_array(g.factor_a),
                host_array(g.factor_b),
                host_array(g.scales).astype(np.float64),
            )
        return found
    # Close to their mean, the factor route's sums cancel in float32 as the side route's do:
    # its spectra are taken of the population shifted by the rank-r update Bbar Abar (rank 2r
    # factors, which centring removes again; split so that the factor whose Gram is rooted is
    # well conditioned: `kernels.shifted_lora`); lineage keeps the unshifted Grams. Where the 2Nr
    # shifted rows outnumber the sides, the side route (which shifts the same way) is smaller.
    n_pad, r = placed.a.shape[:2]
    if config.lora_space == "auto" and kernels.uses_side_space(n_pad=n_pad, rank=2 * r, m=m, n=n):
        return side_lora_spectra(*placed, mesh=mesh, config=config, lineage=lineage)
    found = None
    means = kernels.side_means(placed[:3], mesh=mesh, n_models=placed.n_models)
    for split, modes in (("rows", ("models", "rows")), ("cols", ("cols",))):
        wanted = tuple(mo for mo in config.modes if mo in modes)
        if not wanted:
            continue
        sub = dataclasses.replace(config, modes=wanted)
        shifted = kernels.shifted_lora(
            *placed[:3], mesh=mesh, n_models=placed.n_models, split=split, means=means
        )
        part = lora_spectra_from_grams(
            dispatch_lora(PlacedLora(*shifted, placed.n_models), mesh=mesh, config=sub),
            None,
            config=sub,
            m=m,
            n=n,
            lineage=False,
        )
        del shifted
        if found is None:
            found = part
        else:
            found.modes.update(part.modes)
    if not lineage:
        return found
    uncentred, a_gram = _lora_lineage(g)
    return dataclasses.replace(found, uncentred=uncentred, factor_gram=a_gram)


def layer_spectra(
    placed: PlacedDense | PlacedLora,
    *,
    mesh: Mesh,
    config: SpectraConfig,
    key: jax.Array,
    base: jax.Array | None = None,
    ranks=None,
    lineage: bool = True,
    plan=None,
) -> LayerSpectra:
    """Mode spectra of one placed layer, by the solvers of its `plan` (`spectra.plan_layer`;
    without one, by the same rules applied to the placed shapes).

    Args:
        placed: the layer on the mesh (io.place_layer).
        mesh: its mesh.
        config: modes, centre, solver choice.
        key: PRNG key for randomized solvers.
        base: `[m, n]` base weights for `center='base'` (dense layers).
        ranks: per-model LoRA ranks (LoRA layers with `lora='factors'`).
        lineage: also compute the uncentred models Gram (dense layers; one more pass).

    Returns:
        LayerSpectra.
    """
    if isinstance(placed, PlacedLora):
        return lora_layer_spectra(
            placed,
            ranks or [placed.a.shape[1]] * placed.n_models,
            mesh=mesh,
            config=config,
            key=key,
            plan=plan,
        )
    solvers = plan.solvers if plan is not None else None
    return _dense_spectra(
        placed,
        base,
        mesh=mesh,
        config=config,
        key=key,
        lineage=lineage,
        solvers=solvers,
        chunk=None if plan is None else plan.chunk,
    )
