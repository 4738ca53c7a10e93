"""The `holdout` control: does the basis explain models it was not fitted on?

For each fold: the training mean `mu` and the top-k `rows` / `cols` eigenvectors `U_k`, `V_k` of
the training models centred by `mu`. For every held-out model, with `X = W - mu`:
  * two-sided capture `||U_k^T X V_k||^2 / ||X||^2`, one-sided `||X V_k||^2 / ||X||^2` (cols) and
    `||U_k^T X||^2 / ||X||^2` (rows), beside a random k-subspace (`k^2/(mn)`, `k/n`, `k/m`);
  * the **mean-only** baseline: the fraction of the uncentred update `W - ref` (ref = base for
    `center='base'`, else 0) that `mu - ref` alone explains, `1 - ||W - mu||^2 / ||W - ref||^2`;
  * mean + basis: the same fraction for `mu + U_k U_k^T X V_k V_k^T`.
One fold is one jit call with a traced training mask, so all folds compile once.
"""

from __future__ import annotations

import functools

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
from jsubspace.spectra._null import EXCESS_KS


def side_basis(xc, weights, *, mode: str, solver: str, k: int, key, iterations: int):
    """Inside shard_map: the top-k eigenvectors (`f32[side, k]`, replicated) of the `rows`
    (`sum_i w_i X_i X_i^T`) or `cols` (`sum_i w_i X_i^T X_i`) matrix of this shard's models
    `xc` (`f32[N/d, m, n]`, weights `f32[N/d]`, summed over devices): by `eigh` of the
    `side x side` matrix (`solver` 'exact'), or by the randomized block-Krylov solver through
    `X_i (w_i X_i^T Q)` products, which never forms it ('randomized'). No weighted or
    transposed copy of the stack is made (`kernels.mode_gram`, `kernels.mode_product`)."""
    if solver == "exact":
        matrix = lax.psum(kernels.mode_gram(xc, mode=mode, weights=weights), MODELS)
        return jnp.linalg.eigh(matrix)[1][:, ::-1][:, :k]

    def matmat(q):
        return lax.psum(kernels.mode_product(xc, q, mode=mode, weights=weights), MODELS)

    side = xc.shape[1] if mode == "rows" else xc.shape[2]
    eig = kernels.randomized_eigh(matmat, side, rank=k, key=key, iterations=iterations)
    return eig.vectors


def weighted_bases(
    xf: jax.Array, weights: jax.Array, *, kmax: int, solvers=EXACT, key=None, iterations: int = 4
):
    """Inside shard_map: the chosen models' mean, and their top-k rows / cols eigenvectors.

    Args:
        xf: `f32[N/d, m, n]`, this shard's models.
        weights: `f32[N/d]`, 1 for the models that define the basis, 0 for the others.
        kmax: how many eigenvectors.
        solvers: `(rows, cols)`, each 'exact' or 'randomized' (`side_basis`): the layer plan's
            `bases`.
        key: replicated PRNG key of the randomized solver (unused when both are exact).
        iterations: block-Krylov steps of the randomized solver.

    Returns:
        `(xc f32[N/d, m, n], u f32[m, kmax], v f32[n, kmax])`: every model of the shard centred
        by the chosen models' mean, and the bases (replicated).
    """
    count = lax.psum(jnp.sum(weights), MODELS)
    mu = lax.psum(jnp.einsum("i,imn->mn", weights, xf, precision=HIGHEST), MODELS) / count
    xc = xf - mu
    keys = jax.random.split(key) if key is not None else (None, None)
    u, v = (
        side_basis(xc, weights, mode=mode, solver=solver, k=kmax, key=sub, iterations=iterations)
        for mode, solver, sub in zip(("rows", "cols"), solvers, keys)
    )
    return xc, u, v


@functools.partial(jax.jit, static_argnames=("mesh", "kmax", "solvers", "iterations"))
def masked_bases(
    x: jax.Array,
    weights: jax.Array,
    key: jax.Array | None = None,
    *,
    mesh: Mesh,
    kmax: int,
    solvers=EXACT,
    iterations: int = 4,
):
    """Top-k rows / cols eigenvectors `(f32[m, k], f32[n, k])` of the models with weight 1, by
    the plan's `solvers` (see `weighted_bases`)."""

    def body(xb, wb, kb):
        _, u, v = weighted_bases(
            xb.astype(jnp.float32), wb, kmax=kmax, solvers=solvers, key=kb, iterations=iterations
        )
        return u, v

    key = _solver_key(key, solvers)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(P(MODELS), P(MODELS), P()), out_specs=P(), check_vma=False
    )(x, weights, key)


def _solver_key(key, solvers) -> jax.Array:
    """The randomized solver's key; exact solvers need none (a fixed one stands in)."""
    if key is None:
        if any(s != "exact" for s in solvers):
            raise ValueError(f"bases solved {solvers} need a PRNG key")
        key = jax.random.key(0)
    return key


def lora_bases(factors, weights, n_used: int, *, mesh: Mesh, key, k: int, iterations: int = 4):
    """`masked_bases` of a LoRA population from its factors: the top-k rows / cols eigenvectors
    (`f32[m, k]`, `f32[n, k]`, replicated) of the models with weight 1, centred on their mean, by
    the randomized solver (`kernels.randomized_lora_eigh`, the other models weighted out).
    `weights` is `f32[N_pad]` sharded over models; `n_used` the number of models it keeps."""
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
        )
        bases.append(eig.vectors)
    return tuple(bases)


@functools.partial(jax.jit, static_argnames=("mesh", "kmax", "solvers", "iterations"))
def fold_capture(x, train, ref, key=None, *, mesh: Mesh, kmax: int, solvers=EXACT, iterations=4):
    """Captured energies of every model under the basis fitted on `train` (by the plan's
    `solvers`, see `weighted_bases`; `key` for the randomized one).

    Args:
        x: `dtype[N_pad, m, n]` sharded over models.
        train: `f32[N_pad]` 1 for training models (sharded like x).
        ref: `f32[m, n]` the reference of the uncentred update (base or zeros).
        mesh: the mesh.
        kmax: the largest k.

    Returns:
        `(two_sided f32[N_pad, kmax], rows f32[N_pad, kmax], cols f32[N_pad, kmax],
        centred f32[N_pad], raw f32[N_pad])`: cumulative captured energies and the energies of
        `W - mu` and `W - ref`.
    """

    def body(xb, tb, rb, kb):
        xf = xb.astype(jnp.float32)
        xc, u, v = weighted_bases(xf, tb, kmax=kmax, solvers=solvers, key=kb, iterations=iterations)
        xv = kernels.stack_times(xc, v)  # f32[N/d, m, k]: X_i V
        core = jnp.einsum("mk,iml->ikl", u, xv, precision=HIGHEST) ** 2  # (U^T X_i V)^2
        two = jnp.cumsum(jnp.cumsum(core, axis=1), axis=2)
        two = jnp.diagonal(two, axis1=1, axis2=2)
        cols_one = jnp.cumsum(jnp.sum(xv * xv, axis=1), axis=-1)
        ux = kernels.stack_t_times(xc, u)  # f32[N/d, n, k]: (U^T X_i)^T
        rows_one = jnp.cumsum(jnp.sum(ux * ux, axis=1), axis=-1)
        centred = jnp.sum(xc * xc, axis=(1, 2))
        raw = jnp.sum((xf - rb) ** 2, axis=(1, 2))
        return two, rows_one, cols_one, centred, raw

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(MODELS), P(MODELS), P(), P()),
        out_specs=P(MODELS),
        check_vma=False,
    )(x, train, ref, _solver_key(key, solvers))


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


def holdout_control(
    x: jax.Array,
    n_models: int,
    *,
    mesh: Mesh,
    holdout: str | int,
    seed: int,
    ref: jax.Array | None = None,
    solvers=EXACT,
    key: jax.Array | None = None,
    iterations: int = 4,
) -> dict:
    """The holdout record of one layer (dense stack; LoRA callers pass materialised updates).

    Each fold's bases come from the plan's `solvers` (`(rows, cols)`, 'exact' or 'randomized';
    `key` seeds the randomized one, folded with the fold index), so a long side is never
    formed as a `side x side` matrix.
    """
    n_pad, m, n = x.shape
    folds = fold_assignment(n_models, holdout, seed)
    n_folds = int(folds.max()) + 1
    smallest_train = n_models - max(np.bincount(folds))
    kmax = max(1, min(64, m, n, smallest_train - 1 if smallest_train > 1 else 1))
    ref = jnp.zeros((m, n), jnp.float32) if ref is None else jnp.asarray(ref, jnp.float32)
    two = np.zeros((n_models, kmax))
    rows = np.zeros((n_models, kmax))
    cols = np.zeros((n_models, kmax))
    centred = np.zeros(n_models)
    raw = np.zeros(n_models)
    for f in range(n_folds):
        train = np.zeros(n_pad, np.float32)
        train[:n_models] = folds != f
        out = fold_capture(
            x,
            jax.device_put(train, stacked_sharding(mesh)),
            ref,
            None if key is None else jax.random.fold_in(key, f),
            mesh=mesh,
            kmax=kmax,
            solvers=tuple(solvers),
            iterations=iterations,
        )
        t, r, c, ce, ra = (host_array(o).astype(np.float64)[:n_models] for o in out)
        held = folds == f
        two[held], rows[held], cols[held] = t[held], r[held], c[held]
        centred[held], raw[held] = ce[held], ra[held]
    return _record(
        two, rows, cols, centred, raw, m=m, n=n, kmax=kmax, folds=n_folds, holdout=holdout
    )


def _record(two, rows, cols, centred, raw, *, m, n, kmax, folds, holdout) -> dict:
    """The holdout record from every model's held-out captured energies (cumulative in k)."""
    safe = np.maximum(centred, 1e-30)[:, None]
    two_f, rows_f, cols_f = two / safe, rows / safe, cols / safe
    mean_only = 1.0 - centred / np.maximum(raw, 1e-30)
    with_basis = mean_only[:, None] + (1.0 - mean_only[:, None]) * two_f
    ks = [k for k in EXCESS_KS if k <= kmax]
    idx = [k - 1 for k in ks]
    return {
        "folds": folds,
        "scheme": "loo" if holdout == "loo" else f"{folds}-fold",
        "ks": ks,
        "two_sided": two_f[:, idx].mean(0).tolist(),
        "rows_one_sided": rows_f[:, idx].mean(0).tolist(),
        "cols_one_sided": cols_f[:, idx].mean(0).tolist(),
        "random": {
            "two_sided": [k * k / (m * n) for k in ks],
            "rows_one_sided": [k / m for k in ks],
            "cols_one_sided": [k / n for k in ks],
        },
        "mean_only": float(mean_only.mean()),
        "mean_plus_basis": with_basis[:, idx].mean(0).tolist(),
        "per_model_two_sided": two_f[:, idx].tolist(),
    }


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
    """
    a, b, scales = factors
    m, n = b.shape[1], a.shape[2]
    n_pad = a.shape[0]
    folds = fold_assignment(n_models, holdout, seed)
    n_folds = int(folds.max()) + 1
    smallest_train = n_models - max(np.bincount(folds))
    kmax = max(1, min(64, m // 2, n // 2, smallest_train - 1 if smallest_train > 1 else 1))
    sharded = stacked_sharding(mesh)
    two = np.zeros((n_models, kmax))
    rows = np.zeros((n_models, kmax))
    cols = np.zeros((n_models, kmax))
    centred = np.zeros(n_models)
    for f in range(n_folds):
        held = folds == f
        n_train = int(n_models - held.sum())
        train = np.zeros(n_pad, np.float32)
        train[:n_models] = ~held
        train = jax.device_put(train, sharded)
        key, sub = jax.random.split(key)
        bases = lora_bases(
            factors, train, n_train, mesh=mesh, key=sub, k=kmax, iterations=iterations
        )
        out = lora_fold_capture(a, b, scales, train, *bases, mesh=mesh, n_train=n_train)
        t, r, c = (host_array(o).astype(np.float64)[:n_models] for o in out)
        two[held], rows[held], cols[held] = t[held], r[held], c[held]
        # ||W_i - mu_train||^2 with mu_train - mu = -(1/T) sum_{h held} (W_h - mu).
        inside = models_gram[np.ix_(held, held)]
        centred[held] = np.diag(inside) + 2.0 / n_train * inside.sum(1) + inside.sum() / n_train**2
    return _record(
        two,
        np.maximum(rows, 0.0),
        np.maximum(cols, 0.0),
        centred,
        np.asarray(energies, np.float64),
        m=m,
        n=n,
        kmax=kmax,
        folds=n_folds,
        holdout=holdout,
    )
