"""The `holdout` control: does the basis explain models it was not fitted on?

For each fold: the training mean `mu` and the top-k `rows` / `cols` eigenvectors `U_k`, `V_k` of
the training models centred as the spectra were (`c = mu` for `center='mean'`, the reference
`ref` for 'none' (zeros) and 'base'). For every held-out model, with `X = W - c`:
  * two-sided capture `||U_k^T X V_k||^2 / ||X||^2`, one-sided `||X V_k||^2 / ||X||^2` (cols) and
    `||U_k^T X||^2 / ||X||^2` (rows), beside a random k-subspace (`k^2/(mn)`, `k/n`, `k/m`);
  * the **mean-only** baseline: the fraction of the held-out updates' energy about `ref` that the
    training mean alone explains, energy-weighted over the models so that it is bounded by 1
    and models of larger norm count more: `1 - sum_i ||W_i - mu||^2 / sum_i ||W_i - ref||^2`;
  * mean + basis: the same fraction for `mu + U_k U_k^T X V_k V_k^T`.
One fold is one jit call with a traced training mask, so all folds compile once.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jsubspace import kernels
from jsubspace.kernels import HIGHEST
from jsubspace.kernels._hosvd import EXACT
from jsubspace.sharding._mesh import MODELS
from jsubspace.sharding._mesh import host_array
from jsubspace.sharding._mesh import stacked_sharding
from jsubspace.spectra import _gram_bases
from jsubspace.spectra._null import EXCESS_KS


def side_basis(terms, *, mode: str, solver: str, k: int, key, iterations: int):
    """Inside shard_map: the top-k eigenvectors (`f32[side, k]`, replicated) of the `rows`
    (`sum_i w_i X_i X_i^T`) or `cols` (`sum_i w_i X_i^T X_i`) matrix of this shard's centred
    models `X_i` and weights `w_i` (`terms`, a `_KeptTerms`; summed over devices): by
    `eigh` of the `side x side` matrix (`solver` 'exact'), or by the randomized block-Krylov
    solver through `X_i (w_i X_i^T Q)` products, which never forms it ('randomized'). No
    weighted or transposed copy of the stack is made (`kernels.mode_gram`,
    `kernels.mode_product`)."""
    side = terms.x.shape[1] if mode == "rows" else terms.x.shape[2]
    if solver == "skip":  # solved elsewhere (`downdated_basis`)
        return jnp.zeros((side, k), jnp.float32)
    if solver == "exact":
        matrix = lax.psum(terms.gram(mode), MODELS)
        return jnp.linalg.eigh(matrix)[1][:, ::-1][:, :k]

    def matmat(q):
        return lax.psum(terms.product(q, mode), MODELS)

    eig = kernels.randomized_eigh(matmat, side, rank=k, key=key, iterations=iterations)
    return eig.vectors


class _KeptTerms(NamedTuple):
    """Weighted sums over this shard's models (inside shard_map) of `X_i = x_i - centre`: the
    stored models converted and centred one at a time, those of weight 0 skipped
    (`_kept_models_sum`)."""

    x: jax.Array
    centre: jax.Array
    weights: jax.Array

    def _sum(self, fn):
        return _kept_models_sum(fn, self.x, self.centre, self.weights)

    def gram(self, mode):
        return self._sum(lambda xc, ws: kernels.mode_gram(xc, mode=mode, weights=ws))

    def product(self, q, mode):
        return self._sum(lambda xc, ws: kernels.mode_product(xc, q, mode=mode, weights=ws))


def _kept_models_sum(fn, x, centre, weights):
    """Inside shard_map: `sum_i fn(x_i - centre, w_i)` over this shard's models of nonzero
    weight (`x_i` as `f32[1, m, n]`, `w_i` as `f32[1]`), each model converted and centred alone
    and the others skipped (`lax.cond`): no float32 copy of the stack, and a fold or half costs
    its own models' products, not the whole stack's. On XLA's CPU backend a Krylov product of
    38 of 64 bf16 models of 768 x 3072 took 0.28 s this way, 0.68 s as a converted, centred
    stack of all 64 in one weighted GEMM."""

    def term(i):
        xs = lax.dynamic_slice_in_dim(x, i, 1, 0).astype(jnp.float32) - centre
        return fn(xs, lax.dynamic_slice_in_dim(weights, i, 1, 0))

    shapes = jax.eval_shape(term, 0)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def step(i, acc):
        return lax.cond(
            weights[i] != 0, lambda a: jax.tree.map(jnp.add, a, term(i)), lambda a: a, acc
        )

    return lax.fori_loop(0, x.shape[0], step, zeros)


def _weighted_mean(x, weights):
    """Inside shard_map: the mean of the models with weight 1 (`f32[m, n]`, replicated), summed
    over the models of nonzero weight alone, one at a time (`_kept_models_sum`)."""
    count = lax.psum(jnp.sum(weights), MODELS)

    def weighted(xs, ws):
        return jnp.einsum("i,imn->mn", ws, xs, precision=HIGHEST)

    return lax.psum(_kept_models_sum(weighted, x, 0.0, weights), MODELS) / count


def weighted_bases(
    x: jax.Array,
    weights: jax.Array,
    *,
    kmax: int,
    solvers=EXACT,
    key=None,
    iterations: int = 4,
    ref: jax.Array | None = None,
):
    """Inside shard_map: the chosen models' mean, and their top-k rows / cols eigenvectors.

    Args:
        x: `dtype[N/d, m, n]`, this shard's models, as stored.
        weights: `f32[N/d]`, 1 for the models that define the basis, 0 for the others.
        kmax: how many eigenvectors.
        solvers: `(rows, cols)`, each 'exact' or 'randomized' (`side_basis`): the layer plan's
            `bases`.
        key: replicated PRNG key of the randomized solver (unused when both are exact).
        iterations: block-Krylov steps of the randomized solver.
        ref: `f32[m, n]`, the centre of the spectra when they are not mean-centred (zeros for
            `center='none'`, the base for 'base'); None centres by the chosen models' mean.

    The chosen models are converted and centred one at a time and the others skipped
    (`_kept_models_sum`): no float32 copy of the stack on either route of the layer plan.

    Returns:
        `(u f32[m, kmax], v f32[n, kmax], mu f32[m, n])`: the bases (replicated) of the models
        centred by the chosen models' mean, or by `ref`, and the chosen models' mean.
    """
    mu = _weighted_mean(x, weights)
    centre = mu if ref is None else ref
    terms = _KeptTerms(x, centre, weights)
    keys = jax.random.split(key) if key is not None else (None, None)
    u, v = (
        side_basis(terms, mode=mode, solver=solver, k=kmax, key=sub, iterations=iterations)
        for mode, solver, sub in zip(("rows", "cols"), solvers, keys)
    )
    return u, v, mu


def masked_bases(
    x: jax.Array,
    weights: jax.Array,
    key: jax.Array | None = None,
    ref: jax.Array | None = None,
    *,
    mesh: Mesh,
    kmax: int,
    solvers=EXACT,
    iterations: int = 4,
    chunk: int | None = None,
):
    """Top-k rows / cols eigenvectors `(f32[m, k], f32[n, k])` of the models with weight 1, by
    the plan's `solvers`, centred by their mean, or by `ref` (`f32[m, n]`) when given (see
    `weighted_bases`). `chunk` (the layer plan's) only selects the chunked route's compilation
    (`kernels.CHUNKED_COMPILE`): the kept models are read one at a time on either route.

    On CPU an exact side's matrix is summed on the devices and its k pairs alone are solved on
    the host (`top_eigenvectors`: Lanczos or `?syevr` for a subset), not by XLA's `eigh`, which
    computes every eigenvector."""
    by_mean = ref is None
    if by_mean:
        ref = jnp.zeros(x.shape[1:], jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    solvers = tuple(solvers)
    # A tuple, in mode order: every process must reach the collectives below in one order (a
    # set's order follows each process's string hashing).
    host = tuple(
        mode
        for mode, solver in zip(("rows", "cols"), solvers)
        if solver == "exact" and next(iter(x.devices())).platform == "cpu"
    )
    found = {}
    if len(host) < 2:
        u, v = _masked_bases(
            x,
            weights,
            _solver_key(key, solvers),
            ref,
            mesh=mesh,
            kmax=kmax,
            solvers=tuple(
                "skip" if mode in host else solver
                for mode, solver in zip(("rows", "cols"), solvers)
            ),
            iterations=iterations,
            by_mean=by_mean,
            chunk=chunk,
        )
        found = {"rows": u, "cols": v}
    for mode in host:
        matrix = _masked_matrix(x, weights, ref, mesh=mesh, mode=mode, by_mean=by_mean, chunk=chunk)
        found[mode] = top_eigenvectors(matrix, kmax)
    return found["rows"], found["cols"]


@kernels.chunkable_jit(static_argnames=("mesh", "mode", "by_mean", "chunk"))
def _masked_matrix(x, weights, ref, *, mesh, mode, by_mean, chunk=None):
    """The `rows` / `cols` matrix of the models with weight 1, centred as `weighted_bases`
    centres them (replicated)."""

    def body(xb, wb, rb):
        centre = _weighted_mean(xb, wb) if by_mean else rb
        terms = _KeptTerms(xb, centre, wb)
        return lax.psum(terms.gram(mode), MODELS)

    return jax.shard_map(
        body, mesh=mesh, in_specs=(P(MODELS), P(MODELS), P()), out_specs=P(), check_vma=False
    )(x, weights, ref)


@kernels.chunkable_jit(
    static_argnames=("mesh", "kmax", "solvers", "iterations", "by_mean", "chunk")
)
def _masked_bases(x, weights, key, ref, *, mesh, kmax, solvers, iterations, by_mean, chunk=None):
    def body(xb, wb, kb, rb):
        u, v, _ = weighted_bases(
            xb,
            wb,
            kmax=kmax,
            solvers=solvers,
            key=kb,
            iterations=iterations,
            ref=None if by_mean else rb,
        )
        return u, v

    return jax.shard_map(
        body, mesh=mesh, in_specs=(P(MODELS), P(MODELS), P(), P()), out_specs=P(), check_vma=False
    )(x, weights, key, ref)


def _solver_key(key, solvers) -> jax.Array:
    """The randomized solver's key; exact solvers need none (a fixed one stands in)."""
    if key is None:
        if any(s == "randomized" for s in solvers):
            raise ValueError(f"bases solved {solvers} need a PRNG key")
        key = jax.random.key(0)
    return key


def lora_bases(
    factors,
    weights,
    n_used: int,
    *,
    mesh: Mesh,
    key,
    k: int,
    iterations: int = 4,
    center: str = "mean",
):
    """`masked_bases` of a LoRA population from its factors: the top-k rows / cols eigenvectors
    (`f32[m, k]`, `f32[n, k]`, replicated) of the models with weight 1, centred on their mean
    (`center='mean'`; 'none' / 'base' take the updates as they are), by the randomized solver
    (`kernels.randomized_lora_eigh`, the other models weighted out). `weights` is `f32[N_pad]`
    sharded over models; `n_used` the number of models it keeps."""
    a, b, scales = factors
    bases = []
    for mode in ("rows", "cols"):
        key, sub = jax.random.split(key)
        eig = kernels.randomized_lora_eigh(
            a,
            b,
            scales * weights,
            sub,
            mesh=mesh,
            n_models=n_used,
            mode=mode,
            rank=k,
            iterations=iterations,
            center=center,
        )
        bases.append(eig.vectors)
    return tuple(bases)


def downdated_basis(gram, x, removed, mu, count, *, mesh, mode: str, k: int, chunk=None):
    """The top-k eigenvectors (`f32[side, k]`) of one fold's `rows` / `cols` matrix, as a
    downdate of the whole population's: with `G = sum_i (W_i - mu)(W_i - mu)^T` over all models
    (`gram`, the mean-centred matrix the spectra's kernel gives), the fold's basis models `A`
    (every model but the `removed` ones) have
    `sum_{j in A} (W_j - mu_A)(W_j - mu_A)^T = G - sum_{r removed} (W_r - mu)(W_r - mu)^T
    - |A| d d^T` with `d = mu_A - mu = -sum_r (W_r - mu) / |A|`: `q` models read instead of all
    N (for 5 folds with their centring models, 2N/5; for leave-one-out, 2 of N). Centred about
    the population mean, the matrix keeps its float32 accuracy when the mean dominates.

    Args:
        gram: `f32[side, side]`, the population's centred matrix of `mode`.
        x: `dtype[N_pad, m, n]`, the layer, sharded over `models`; removed: `f32[N_pad]` on the
            same sharding, 1 for the removed models (`model_weights`: every fold has one shape,
            so one compilation serves all); mu: `f32[m, n]` the population mean; count: `|A|`.
        mesh: the mesh `x` lives on.
        chunk: not None on the chunked route (compiled to convert each model alone).
    """
    matrix = _fold_matrix(
        gram, x, removed, mu, count, mesh=mesh, mode=mode, one_at_a_time=chunk is not None
    )
    return top_eigenvectors(matrix, k)


def padded_indices(index: np.ndarray, length: int | None) -> jax.Array:
    """`int32[length]`: `index` followed by -1s (models that weigh nothing), so that folds of
    different sizes share one compiled kernel; `index` itself when `length` is None."""
    if length is None:
        return jnp.asarray(index)
    out = np.full(length, -1, np.int32)
    out[: len(index)] = index
    return jnp.asarray(out)


@kernels.chunkable_jit(static_argnames=("mesh", "mode", "one_at_a_time"), flag="one_at_a_time")
def _fold_matrix(gram, x, removed, mu, count, *, mesh, mode: str, one_at_a_time: bool = False):
    """`downdated_basis`' matrix: the population's less the removed models and the mean shift.

    Each device sums the removed models among its own, one model at a time and only those
    (`_kept_models_sum`), and the sums are added over devices: no device gathers another's
    models, and a fold costs its `q` models' products. (A gather of the removed models and an
    einsum over two contracted axes ran at a fifth of GEMM's rate on the CPU backend: 2.5 s
    against 0.55 s for 26 models of 768 x 3072; under GSPMD a dynamic index into the sharded
    stack gathered the whole stack onto every device.) `one_at_a_time` only selects the
    chunked route's compilation (`CHUNKED_COMPILE`)."""
    del one_at_a_time

    def body(xb, wb, mu):
        def term(r, _):
            return kernels.mode_gram(r, mode=mode), r[0]

        minus, total = _kept_models_sum(term, xb, mu, wb)
        return lax.psum(minus, MODELS), lax.psum(total, MODELS)

    minus, total = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(MODELS), P(MODELS), P()),
        out_specs=(P(), P()),
        check_vma=False,
    )(x, removed, mu)
    d = -total / count
    if mode == "rows":
        outer = jnp.dot(d, d.T, precision=HIGHEST)
    else:
        outer = jnp.dot(d.T, d, precision=HIGHEST)
    return gram - minus - count * outer


@functools.partial(jax.jit, static_argnames=("k",))
def _top_eigenvectors_device(matrix, k: int):
    return jnp.linalg.eigh(matrix)[1][:, ::-1][:, :k]


def top_eigenvectors(matrix: jax.Array, k: int) -> jax.Array | np.ndarray:
    """The top-k eigenvectors (`f32[side, k]`, descending) of a symmetric matrix (on CPU a host
    array, which jitted callers take as a replicated input, in one process or many).

    On CPU the matrix is in host memory already, and the k wanted pairs are computed alone:
    by Lanczos (ARPACK's `eigsh`, to machine precision, from a seeded start) when k is a small
    part of a long side, else by LAPACK's `?syevr` (`subset_by_index`). XLA's CPU `eigh`
    computes every eigenvector: a 1536-wide fold matrix took 0.7 s there, 0.2 s by `?syevr`,
    0.02-0.07 s by Lanczos for k = 3-64 (five folds per layer and side). Accelerators solve on
    the device."""
    if next(iter(matrix.devices())).platform != "cpu":
        return _top_eigenvectors_device(matrix, k)
    import scipy.linalg
    import scipy.sparse.linalg

    host = host_array(matrix)
    side = host.shape[0]
    if not np.all(np.isfinite(host)):
        return np.full((side, k), np.nan, np.float32)
    if side >= LANCZOS_SIDE and k <= side // 8 and np.any(host):
        start = np.random.default_rng([side, k]).standard_normal(side).astype(host.dtype)
        try:
            values, vectors = scipy.sparse.linalg.eigsh(host, k=k, which="LA", tol=0, v0=start)
        except scipy.sparse.linalg.ArpackError:
            pass  # no convergence, or a degenerate start: the direct solver below
        else:
            order = np.argsort(values)[::-1]
            return np.ascontiguousarray(vectors[:, order], np.float32)
    _, vectors = scipy.linalg.eigh(
        host, subset_by_index=[side - k, side - 1], driver="evr", check_finite=False
    )
    return np.ascontiguousarray(vectors[:, ::-1], np.float32)


LANCZOS_SIDE = 256
"""From this side length on (with k at most an eighth of it), CPU fold bases come from Lanczos."""


@kernels.chunkable_jit(static_argnames=("mesh", "one_at_a_time"), flag="one_at_a_time")
def _population_sum(x, weights=None, *, mesh: Mesh, one_at_a_time: bool = False):
    """`f32[m, n]`: the sum of the models (padding rows of `x` are zeros), weighted by
    `weights` (`f32[N_pad]`, sharded like `x`) when given. Each device adds its own models one
    at a time (`kernels.models_sum`) and a `psum` adds the devices': no float32 copy of the
    stack (XLA's CPU backend converts a whole 16-bit stack to float32 first for a reduction
    over its models: a 7.5 GB copy for 32 LLaMA-8B MLP projections) and no slow reduction over
    the leading axis. `one_at_a_time` (the chunked route) only compiles it with
    `kernels.CHUNKED_COMPILE`."""
    del one_at_a_time  # chooses the compilation (`chunkable_jit`)

    def body(xb, *wb):
        return lax.psum(kernels.models_sum(xb, *wb), MODELS)

    args = (x,) if weights is None else (x, weights)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(MODELS),) * len(args), out_specs=P())(*args)


def centre_models(folds: np.ndarray, seed: int) -> np.ndarray:
    """`int[N]`: for each model, the model that centres it when it is held out: always from
    another fold (so it is a training model, left out of that fold's basis), and every model
    centres exactly one other.

    Why one model each: a held-out model centred by the mean of the models its basis was fitted
    on carries minus that mean, which lies in their span and is captured (for populations of
    low-rank models, about `1/T` of the energy above a random subspace's capture with T training
    models); and a mean shared by the fold's held-out models makes their captures correlated.
    `W_i - W_c` with `c` outside the basis is independent of the basis, so with no shared
    subspace its expected capture is exactly a random subspace's; and since signal and noise
    both double, the expected fractions are those of `W_i - mean`. As every model enters two
    differences (its own and the one it centres), the verdict counts the captures' spread twice
    (`spectra._verdict.holdout_criteria`).
    """
    rng = np.random.default_rng([seed, 1])
    # Models in fold order (shuffled within folds), each centred by the one a largest fold
    # further on: never in its own fold, and a permutation.
    order = np.lexsort((rng.random(len(folds)), folds))
    shift = int(np.bincount(folds).max())
    centre = np.empty(len(folds), int)
    centre[order] = order[(np.arange(len(folds)) + shift) % len(folds)]
    # Only possible with a fold of more than half the models (two unequal folds): those take
    # a model of another fold that already centres one.
    for i in np.flatnonzero(folds[centre] == folds):
        centre[i] = rng.choice(np.flatnonzero(folds != folds[i]))
    return centre


def held_captures(
    x, held, centre, ref, total, n_models, u, v, *, by_mean=True, mesh=None, chunk=None, p=None
):
    """Captured energies of the held-out models under the bases `u` (`f32[m, k]`), `v`
    (`f32[n, k]`).

    On one device, the held-out (and centring) models are taken out of the stack at once. On a
    mesh of several (`mesh`), they are not gathered to every device: blocks of `p/d` of them go
    to one device each (`_spread_captures`), so a device holds a `d`-th of them, not `2p`
    float32 models (at N = 500 a fold of 100 embedding copies would be 429 GB per device).
    Same arithmetic either way; the padded block rows are dropped. On the chunked route
    (`chunk` not None) they are taken one model at a time (`_one_by_one_captures`).
    `held` / `centre` may be padded with -1 (`padded_indices`, one compilation for folds of
    different sizes): `p` is then the number of real ones, and only their rows come back.

    Returns:
        `(two_sided f32[p, k], rows f32[p, k], cols f32[p, k], centred f32[p], resid f32[p],
        raw f32[p])`: cumulative captured energies of the centred held-out models, and the
        energies of the centred models, of `W - mu_train` and of `W - ref`.
    """
    p = held.shape[0] if p is None else p
    if chunk is not None:
        found = _one_by_one_captures(x, held, centre, ref, total, n_models, u, v, by_mean=by_mean)
    elif mesh is None or mesh.devices.size == 1:
        found = _gathered_captures(x, held, centre, ref, total, n_models, u, v, by_mean=by_mean)
    else:
        found = _spread_captures(
            x, held, centre, ref, total, n_models, u, v, mesh=mesh, by_mean=by_mean
        )
    return tuple(f[:p] for f in found)


def _captures(w, d, ref, total, n_models, count, u, v):
    """The captures of held-out models `w f32[p, m, n]` centred as `d`, the training mean being
    `(total - sum of all held) / (n_models - count)` (`total` here already less that sum)."""
    xv = jnp.einsum("imn,nk->imk", d, v, precision=HIGHEST)  # D_i V
    core = jnp.einsum("mk,iml->ikl", u, xv, precision=HIGHEST) ** 2  # (U^T D_i V)^2
    two = jnp.diagonal(jnp.cumsum(jnp.cumsum(core, axis=1), axis=2), axis1=1, axis2=2)
    cols = jnp.cumsum(jnp.sum(xv * xv, axis=1), axis=-1)
    # U^T D_i, batched over the models (`f32[p, k, n]`): as `D_i^T U` XLA's CPU backend ran
    # the product at two thirds of the rate (13 models of 768 x 3072: 0.105 -> 0.077 s).
    uu = jnp.broadcast_to(u, (d.shape[0], *u.shape))
    ux = lax.dot_general(uu, d, (((1,), (1,)), ((0,), (0,))), precision=HIGHEST)
    rows = jnp.cumsum(jnp.sum(ux * ux, axis=2), axis=-1)
    mu = total / (n_models - count)
    resid = jnp.sum((w - mu) ** 2, axis=(1, 2))
    raw = jnp.sum((w - ref) ** 2, axis=(1, 2))
    return two, rows, cols, jnp.sum(d * d, axis=(1, 2)), resid, raw


@functools.partial(jax.jit, static_argnames=("mesh", "by_mean"))
def _spread_captures(x, held, centre, ref, total, n_models, u, v, *, mesh, by_mean):
    """`held_captures` on a mesh: step t of d sends the t-th block of `s = ceil(p / d)` held-out
    models (and their centring models) to device t, by a `psum` to which only their owners add
    anything; each device keeps its own block and computes its rows. Memory per device: a few
    `s`-model blocks. Returns `f32[d s, ...]` (rows past p are padding)."""
    d = mesh.devices.size
    p = held.shape[0]
    s = -(-p // d)
    pad = jnp.full((d * s - p,), -1, held.dtype)
    held_p = jnp.concatenate([held, pad])
    centre_p = jnp.concatenate([centre.astype(held.dtype), pad])
    m, n = x.shape[1:]

    def body(xb, held_p, centre_p, ref, total, u, v):
        b = xb.shape[0]
        me = lax.axis_index(MODELS)
        first = me * b

        def owned(index):
            # f32[s, m, n]: the rows of this device's models among `index`, zeros elsewhere.
            inside = (index >= first) & (index < first + b)
            rows = jnp.take(xb, jnp.clip(index - first, 0, b - 1), axis=0).astype(jnp.float32)
            return rows * inside.astype(jnp.float32)[:, None, None]

        def step(t, carry):
            block = lax.dynamic_slice_in_dim(held_p, t * s, s)
            w = lax.psum(owned(block), MODELS)
            c = carry[1]
            if by_mean:
                c = lax.psum(owned(lax.dynamic_slice_in_dim(centre_p, t * s, s)), MODELS)
            keep = t == me
            return jnp.where(keep, w, carry[0]), jnp.where(keep, c, carry[1])

        # The carry is per device (varying over the models axis), as the blocks it keeps.
        zeros = lax.pcast(jnp.zeros((s, m, n), jnp.float32), MODELS, to="varying")
        w, c = lax.fori_loop(0, d, step, (zeros, zeros))
        # The sum of every held-out model, for the training mean.
        mine = jnp.isin(first + jnp.arange(b), held_p).astype(xb.dtype)
        local = jnp.einsum(
            "i,imn->mn", mine, xb, preferred_element_type=jnp.float32, precision=HIGHEST
        )
        held_sum = lax.psum(local, MODELS)
        dev = w - (c if by_mean else ref)
        count = jnp.sum(held_p >= 0)  # the held-out models, less any -1 pads
        return _captures(w, dev, ref, total - held_sum, n_models, count, u, v)

    spec = P(MODELS)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(spec, P(), P(), P(), P(), P(), P()),
        out_specs=(spec,) * 6,
    )(x, held_p, centre_p, ref, total, u, v)


@functools.partial(jax.jit, static_argnames=("by_mean",))
def _gathered_captures(x, held, centre, ref, total, n_models, u, v, *, by_mean: bool = True):
    """`held_captures` with the held-out models taken out of the stack at once (one device).

    Args:
        x: `dtype[N_pad, m, n]`, the layer (sharded over models).
        held: `int[p]`, the held-out models; centre: `int[p]`, the model centring each
            (`centre_models`; unused when `by_mean` is False).
        ref: `f32[m, n]`, the reference of the uncentred update (base or zeros), and the centre
            when `by_mean` is False (spectra with `center='none'` / 'base').
        total: `f32[m, n]`, the sum of every model, and n_models the true N: the fold's training
            mean (the mean-only baseline's) is `(total - sum of the held-out) / (N - p)`, with
            no pass over the stack per fold.

    Returns:
        `(two_sided f32[p, k], rows f32[p, k], cols f32[p, k], centred f32[p], resid f32[p],
        raw f32[p])`: cumulative captured energies of the centred held-out models, and the
        energies of the centred models, of `W - mu_train` and of `W - ref`.
    """
    # -1 pads (`padded_indices`): zero models whose rows the caller drops.
    valid = (held >= 0).astype(jnp.float32)[:, None, None]
    w = jnp.take(x, jnp.maximum(held, 0), axis=0).astype(jnp.float32) * valid
    c = jnp.take(x, jnp.maximum(centre, 0), axis=0).astype(jnp.float32) * valid
    d = w - (c if by_mean else ref)
    count = jnp.sum(held >= 0)
    return _captures(w, d, ref, total - kernels.models_sum(w), n_models, count, u, v)


@functools.partial(jax.jit, static_argnames=("by_mean",), compiler_options=kernels.CHUNKED_COMPILE)
def _one_by_one_captures(x, held, centre, ref, total, n_models, u, v, *, by_mean: bool = True):
    """`_gathered_captures` holding one held-out model (and its centring model) in float32 at
    a time: the chunked route's, for layers whose float32 models do not fit many at once."""

    def model(i):
        # -1 pads (`padded_indices`) weigh nothing; their rows are dropped by the caller.
        one = lax.dynamic_index_in_dim(x, jnp.maximum(i, 0), keepdims=False)
        return one.astype(jnp.float32) * (i >= 0)

    held_sum = lax.fori_loop(1, held.shape[0], lambda j, acc: acc + model(held[j]), model(held[0]))
    rest = total - held_sum
    p = jnp.sum(held >= 0)

    def one(pair):
        h, c = pair
        w = model(h)[None]
        d = w - (model(c)[None] if by_mean else ref)
        return tuple(o[0] for o in _captures(w, d, ref, rest, n_models, p, u, v))

    return lax.map(one, (held, centre))


MIN_MODELS = 4
"""The fewest models a holdout judges from: leave-one-out then fits each basis on three models
(two independent directions once centred) and has four held-out captures to bootstrap."""


def fold_scheme(n_models: int, holdout: str | int) -> tuple[str | int, str | None]:
    """The scheme that runs, and why it is not the one asked for: K-fold with more folds than
    models falls back to leave-one-out."""
    if holdout != "loo" and int(holdout) > n_models:
        return "loo", (
            f"{holdout}-fold asked with {n_models} models: leave-one-out ({n_models} folds) instead"
        )
    return holdout, None


def fold_assignment(n_models: int, holdout: str | int, seed: int) -> np.ndarray:
    """Fold index of each model: 'loo' gives N folds, an int K gives K seeded random folds."""
    if holdout == "loo":
        return np.arange(n_models)
    k = int(holdout)
    if not 2 <= k <= n_models:
        raise ValueError(f"holdout folds must be in [2, N={n_models}], got {k}")
    perm = np.random.default_rng(seed).permutation(n_models)
    folds = np.empty(n_models, int)
    folds[perm] = np.arange(n_models) % k
    return folds


def model_weights(chosen: np.ndarray, n_pad: int, sharding) -> jax.Array:
    """`f32[N_pad]` on the models' sharding: 1 for the `chosen` models (`bool[N]`), 0 for the
    others and for padding."""
    w = np.zeros(n_pad, np.float32)
    w[: len(chosen)] = chosen
    return jax.device_put(w, sharding)


def _smallest_basis(n_models: int, folds: np.ndarray, center: str) -> int:
    """The fewest models any fold's basis is fitted on (the centring models are left out)."""
    largest = max(np.bincount(folds))
    return n_models - 2 * largest if center == "mean" else n_models - largest


def holdout_control(
    x: jax.Array,
    n_models: int,
    *,
    mesh: Mesh,
    holdout: str | int,
    seed: int,
    ref: jax.Array | None = None,
    center: str = "mean",
    solvers=EXACT,
    key: jax.Array | None = None,
    iterations: int = 4,
    grams=None,
    chunk: int | None = None,
) -> dict:
    """The holdout record of one layer (dense stack; LoRA callers pass materialised updates).

    `grams` (`kernels.ModeGrams`), when given, are the population's mean-centred rows / cols
    Grams the spectra already computed: the fold downdates start from them instead of a pass
    over the stack of their own.

    Per fold: the bases of the training models (less one centring model per held-out model,
    see `centre_models`) from the plan's `solvers` (`(rows, cols)`, 'exact' or 'randomized';
    `key` seeds the randomized one, folded with the fold index), so a long side is never formed
    as a `side x side` matrix; then each held-out model's captures (`held_captures`). With
    `center` 'none' / 'base' the models are centred by `ref` (zeros / the base), as the spectra
    were, and every training model fits the basis. `chunk`: the layer plan's (`LayerPlan.chunk`),
    models converted to float32 at a time.
    """
    n_pad, m, n = x.shape
    holdout, note = fold_scheme(n_models, holdout)
    folds = fold_assignment(n_models, holdout, seed)
    n_folds = int(folds.max()) + 1
    by_mean = center == "mean"
    smallest = _smallest_basis(n_models, folds, center)
    kmax = max(1, min(64, m, n, smallest - 1 if by_mean else smallest))
    ref = jnp.zeros((m, n), jnp.float32) if ref is None else jnp.asarray(ref, jnp.float32)
    out = [np.zeros((n_models, kmax)) for _ in range(3)] + [np.zeros(n_models) for _ in range(3)]
    sharded = stacked_sharding(mesh)
    centres = centre_models(folds, seed)

    def weights(chosen):
        return model_weights(chosen, n_pad, sharded)

    # Exact sides of a mean-centred holdout: each fold's matrix is a downdate of the
    # population's (`downdated_basis`), instead of a pass over every model per fold.
    # In mode order (not a set): the downdates' collectives run in one order on every process.
    exact = tuple(mode for mode, solver in zip(("rows", "cols"), solvers) if solver == "exact")
    downdate = by_mean and exact
    total = _population_sum(x, mesh=mesh, one_at_a_time=chunk is not None)
    if downdate:
        if grams is None or any(getattr(grams, mode) is None for mode in exact):
            grams = kernels.mode_grams(
                x, mesh=mesh, n_models=n_models, modes=tuple(sorted(exact)), chunk=chunk
            )
        mu = total / n_models
    skip = tuple(
        "skip" if downdate and mode in exact else solver
        for mode, solver in zip(("rows", "cols"), solvers)
    )
    fold_sets = []
    for f in range(n_folds):
        held = folds == f
        centre = centres[held] if by_mean else np.flatnonzero(held)
        basis = ~held
        basis[centre] = basis[centre] & (not by_mean)
        fold_sets.append((held, centre, basis))
    # Every fold's held-out sets padded to one length (and its removed set a weight per model):
    # one compilation of the captures and of each mode's downdate for all folds (XLA compiles
    # a GPU kernel in seconds).
    held_length = max(int(held.sum()) for held, _, _ in fold_sets)
    for f, (held, centre, basis) in enumerate(fold_sets):
        if all(solver == "skip" for solver in skip):
            u = v = None
        else:
            u, v = masked_bases(
                x,
                weights(basis),
                None if key is None else jax.random.fold_in(key, f),
                None if by_mean else ref,
                mesh=mesh,
                kmax=kmax,
                solvers=skip,
                iterations=iterations,
                chunk=chunk,
            )
        if downdate:
            removed = weights(~basis[:n_models])
            found = {
                mode: downdated_basis(
                    getattr(grams, mode),
                    x,
                    removed,
                    mu,
                    float(basis.sum()),
                    mesh=mesh,
                    mode=mode,
                    k=kmax,
                    chunk=chunk,
                )
                for mode in exact
            }
            u, v = found.get("rows", u), found.get("cols", v)
        found = held_captures(
            x,
            padded_indices(np.flatnonzero(held), held_length),
            padded_indices(centre, held_length),
            ref,
            total,
            float(n_models),
            u,
            v,
            by_mean=by_mean,
            mesh=mesh,
            chunk=chunk,
            p=int(held.sum()),
        )
        for j, o in enumerate(found):
            out[j][held] = host_array(o).astype(np.float64)
    return _record(
        *out,
        m=m,
        n=n,
        kmax=kmax,
        folds=n_folds,
        holdout=holdout,
        center=center,
        note=note,
    )


def _record(
    two, rows, cols, centred, resid, raw, *, m, n, kmax, folds, holdout, center, note
) -> dict:
    """The holdout record from every model's held-out captured energies (cumulative in k)."""
    safe = np.maximum(centred, 1e-30)[:, None]
    two_f, rows_f, cols_f = two / safe, rows / safe, cols / safe
    mean_only = 1.0 - resid.sum() / max(raw.sum(), 1e-30)
    ks = [k for k in EXCESS_KS if k <= kmax]
    idx = [k - 1 for k in ks]
    record = {
        "folds": folds,
        "scheme": (
            "loo"
            if holdout == "loo"
            else "leave-one-group-out"
            if holdout == "groups"
            else f"{folds}-fold"
        ),
        "center": center,
        "ks": ks,
        "two_sided": two_f[:, idx].mean(0).tolist(),
        "rows_one_sided": rows_f[:, idx].mean(0).tolist(),
        "cols_one_sided": cols_f[:, idx].mean(0).tolist(),
        "random": {
            "two_sided": [k * k / (m * n) for k in ks],
            "rows_one_sided": [k / m for k in ks],
            "cols_one_sided": [k / n for k in ks],
        },
        "mean_only": float(mean_only),
        "per_model_two_sided": two_f[:, idx].tolist(),
        "per_model_rows_one_sided": rows_f[:, idx].tolist(),
        "per_model_cols_one_sided": cols_f[:, idx].tolist(),
    }
    if center == "mean":
        # The mean plus the basis: the fraction of `W - ref` that `mu + U U^T X V V^T` explains.
        per_model = 1.0 - resid / np.maximum(raw, 1e-30)
        with_basis = per_model[:, None] + (1.0 - per_model[:, None]) * two_f
        record["mean_plus_basis"] = with_basis[:, idx].mean(0).tolist()
    if note:
        record["note"] = note
    return record


def _one_sided(c, x, w, n_train):
    """Inside shard_map: `||c_i x_i - mean||^2` per row, `f32[N/d, k]`, for coefficients
    `c f32[N/d, k, r]` of factors `x f32[N/d, r, p]`, `mean = sum_j w_j c_j x_j / n_train` over
    the training models (`w`); from the `r x r` Grams of the factors, no `k x p` product per
    model."""
    mean = lax.psum(jnp.einsum("ikr,irp->kp", c * w[:, None, None], x, precision=HIGHEST), MODELS)
    mean = mean / n_train
    gram = jnp.einsum("irp,isp->irs", x, x, precision=HIGHEST)
    cross = jnp.einsum("irp,kp->irk", x, mean, precision=HIGHEST)
    return (
        jnp.einsum("ikr,irs,iks->ik", c, gram, c, precision=HIGHEST)
        - 2 * jnp.einsum("ikr,irk->ik", c, cross, precision=HIGHEST)
        + jnp.sum(mean * mean, axis=1)
    )


@functools.partial(jax.jit, static_argnames=("mesh", "n_train"))
def lora_fold_capture(a, b, scales, train, u, v, *, mesh: Mesh, n_train: int):
    """`fold_capture` of a LoRA population from its factors, no update formed.

    With `P_i = s_i U^T B_i` (`k x r`) and `Q_i = A_i V` (`r x k`): `U^T W_i V = P_i Q_i`;
    `||U^T W_i||^2` and `||W_i V||^2` per basis vector from the `r x r` Grams of the factors; the
    training mean enters as `U^T mu V`, `U^T mu` (`k x n`) and `mu V` (`m x k`), sums over the
    training models. Cost `O(N r (m + n) k)`.

    Args:
        a, b, scales: the factors (`kernels.shifted_lora`'s for populations close to their mean),
            sharded over models.
        train: `f32[N_pad]`, 1 for the training models.
        u, v: `f32[m, k]`, `f32[n, k]`, the training models' top rows / cols eigenvectors.
        mesh: the mesh; n_train: the number of training models.

    Returns:
        `(two_sided, rows, cols)`, each `f32[N_pad, k]`: the cumulative captured energies of
        `W_i - mu` for every model.
    """

    def body(a, b, s, w, u, v):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        p = jnp.einsum("mk,imr->ikr", u, b, precision=HIGHEST) * s[:, None, None]
        q = jnp.einsum("irn,nl->irl", a, v, precision=HIGHEST)
        z = jnp.einsum("ikr,irl->ikl", p, q, precision=HIGHEST)  # U^T W_i V
        zbar = lax.psum(jnp.einsum("i,ikl->kl", w, z, precision=HIGHEST), MODELS) / n_train
        two = jnp.cumsum(jnp.cumsum((z - zbar) ** 2, axis=1), axis=2)
        two = jnp.diagonal(two, axis1=1, axis2=2)
        # Rows: U^T W_i = P_i A_i. Cols: (W_i V)^T = (s_i Q_i)^T B_i^T.
        rows = _one_sided(p, a, w, n_train)
        cols = _one_sided(
            jnp.swapaxes(q * s[:, None, None], 1, 2), jnp.swapaxes(b, 1, 2), w, n_train
        )
        return two, jnp.cumsum(rows, axis=-1), jnp.cumsum(cols, axis=-1)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(*(P(MODELS),) * 4, P(), P()),
        out_specs=P(MODELS),
        check_vma=False,
    )(a, b, scales, train, u, v)


def _held_factors(a, b, scales, held, centre, *, mesh: Mesh):
    """The factors `(A f32[p_pad, r', n], B f32[p_pad, m, r'], scales f32[p_pad])` of the held-out
    updates `held` (`int[p]`), each less the update of its centring model (`centre`, or None for
    none; then `r' = r`, else `2r`), padded to the mesh and sharded over models."""
    sharded = stacked_sharding(mesh)
    size = mesh.devices.size
    p = len(held)
    pad = -(-p // size) * size - p
    take = np.concatenate([held, np.full(pad, held[0])])
    ah, bh = jnp.take(a, take, axis=0), jnp.take(b, take, axis=0)
    sh = jnp.take(scales, take, axis=0) * jnp.asarray(np.r_[np.ones(p), np.zeros(pad)], jnp.float32)
    if centre is None:
        return tuple(jax.device_put(t, sharded) for t in (ah, bh, sh))
    back = np.concatenate([centre, np.full(pad, centre[0])])
    ac, bc = jnp.take(a, back, axis=0), jnp.take(b, back, axis=0)
    sc = jnp.take(scales, back, axis=0)
    pa = jnp.concatenate([ah.astype(jnp.float32), ac.astype(jnp.float32)], axis=1)
    pb = jnp.concatenate(
        [
            bh.astype(jnp.float32) * sh[:, None, None],
            -bc.astype(jnp.float32) * sc[:, None, None] * (sh != 0)[:, None, None],
        ],
        axis=2,
    )
    ones = (sh != 0).astype(jnp.float32)
    return tuple(jax.device_put(t, sharded) for t in (pa, pb, ones))


@jax.jit
def _factor_energies(a, b, scales):
    """`f32[N]`: `||s_i B_i A_i||_F^2 = s_i^2 <B_i^T B_i, A_i A_i^T>` from the factors."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    gb = jnp.einsum("imr,ims->irs", b, b, precision=HIGHEST)
    ga = jnp.einsum("irn,isn->irs", a, a, precision=HIGHEST)
    return scales**2 * jnp.sum(gb * ga, axis=(1, 2))


def _energy_about(gram: np.ndarray, held: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """`||W_i - mu_S||^2` for the models `held`, with `mu_S` the mean of the models `chosen`,
    from the mean-centred models Gram `gram` (`f64[N, N]`)."""
    count = chosen.sum()
    cross = gram[np.ix_(held, chosen)].sum(1)
    inside = gram[np.ix_(chosen, chosen)].sum()
    return np.diag(gram)[held] - 2.0 / count * cross + inside / count**2


def lora_holdout_control(
    factors,
    n_models: int,
    *,
    mesh: Mesh,
    holdout: str | int,
    seed: int,
    models_gram: np.ndarray,
    energies: np.ndarray,
    key: jax.Array,
    iterations: int = 4,
    center: str = "mean",
    grams: _gram_bases.FactorGrams | None = None,
) -> dict:
    """The holdout record of a LoRA layer from its factors (`holdout_control` without forming
    the updates): per fold, the training models' top-k rows / cols eigenvectors by the randomized
    solver through the factors (`kernels.randomized_lora_eigh`, the held-out models weighted
    out), and every held-out model's captured energies (`lora_fold_capture`).

    Args:
        factors: `(a, b, scales)` on the mesh (shifted by the caller when the population sits
            close to its mean).
        n_models: the true N.
        models_gram: `f64[N, N]`, the mean-centred models Gram (`LayerSpectra.models_gram`): a
            held-out model's energy about the training mean is taken from it.
        energies: `f64[N]`, `||dW_i||^2` (the mean-only baseline's uncentred energies).
        key: PRNG key of the randomized solver.
        center: the spectra's centring: 'mean' centres on the training mean; 'none' / 'base'
            take the updates as they are (LoRA updates are already relative to their base).
        grams: the factor cross-Grams the spectra computed (`LayerSpectra.factor_grams`, of
            the same, unshifted factors): when given, every fold's bases and captures come from
            them (`spectra._gram_bases`: block Krylov on coefficient vectors, started from the
            full population's bases), with no pass over the factors; the record's `bases` says
            so, with the solver's largest residual.
    """
    a, b, scales = factors
    m, n = b.shape[1], a.shape[2]
    n_pad = a.shape[0]
    holdout, note = fold_scheme(n_models, holdout)
    folds = fold_assignment(n_models, holdout, seed)
    n_folds = int(folds.max()) + 1
    by_mean = center == "mean"
    smallest = _smallest_basis(n_models, folds, center)
    kmax = max(1, min(64, m // 2, n // 2, smallest - 1 if by_mean else smallest))
    sharded = stacked_sharding(mesh)
    energies = np.asarray(energies, np.float64)
    two = np.zeros((n_models, kmax))
    rows = np.zeros((n_models, kmax))
    cols = np.zeros((n_models, kmax))
    centred = energies.copy()
    resid = np.zeros(n_models)
    centres = centre_models(folds, seed)

    def weights(chosen):
        return model_weights(chosen, n_pad, sharded)

    solved = None
    if grams is not None:
        rng = np.random.default_rng([seed, 2])
        population = np.arange(n_pad) < n_models
        solve = functools.partial(
            _gram_bases.set_basis, grams, k=kmax, center="mean" if by_mean else "none", rng=rng
        )
        # The full population's bases start every fold's Krylov space (a fold differs from it
        # by a few models).
        warm = {
            mode: solve(population, mode=mode, iterations=iterations) for mode in ("rows", "cols")
        }
        fold_steps = max(1, iterations // 2)
        solved = {
            "from": "grams",
            "solver": "block-krylov, folds warm-started from the population's bases",
            "iterations": iterations,
            "fold_iterations": fold_steps,
        }
        residuals = [b.residual for b in warm.values()]

    for f in range(n_folds):
        held = folds == f
        index = np.flatnonzero(held)
        centre = centres[held] if by_mean else None
        basis = ~held
        if by_mean:
            basis[centre] = False
        if grams is not None:
            chosen = np.zeros(n_pad, bool)
            chosen[:n_models] = basis
            # Warm-started: half the population's Krylov steps (the residuals are recorded).
            u, v = (
                solve(chosen, mode=mode, warm=warm[mode], iterations=fold_steps)
                for mode in ("rows", "cols")
            )
            residuals += [u.residual, v.residual]
            t, r, c, e = _gram_bases.held_captures(grams, index, centre, u, v)
            two[held], rows[held], cols[held] = t, r, c
            if by_mean:
                centred[held] = e
            resid[held] = _energy_about(models_gram, held, ~held)
            continue
        key, sub = jax.random.split(key)
        bases = lora_bases(
            factors,
            weights(basis),
            int(basis.sum()),
            mesh=mesh,
            key=sub,
            k=kmax,
            iterations=iterations,
            center="mean" if by_mean else "none",
        )
        # The held-out updates, each less its centring model's, as factors of rank 2r:
        # s_h B_h A_h - s_c B_c A_c = [s_h B_h, -s_c B_c] [A_h; A_c].
        pa, pb, ps = _held_factors(a, b, scales, index, centre, mesh=mesh)
        count = len(index)
        out = lora_fold_capture(pa, pb, ps, jnp.zeros_like(ps), *bases, mesh=mesh, n_train=1)
        t, r, c = (host_array(o).astype(np.float64)[:count] for o in out)
        two[held], rows[held], cols[held] = t, r, c
        if by_mean:
            centred[held] = host_array(_factor_energies(pa, pb, ps)).astype(np.float64)[:count]
        resid[held] = _energy_about(models_gram, held, ~held)
    record = _record(
        two,
        np.maximum(rows, 0.0),
        np.maximum(cols, 0.0),
        centred,
        resid,
        energies,
        m=m,
        n=n,
        kmax=kmax,
        folds=n_folds,
        holdout=holdout,
        center=center,
        note=note,
    )
    if solved is not None:
        record["bases"] = {**solved, "residual": float(max(residuals))}
    return record
