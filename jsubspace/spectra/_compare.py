"""The `compare` control: principal angles between two bases of one layer.

Two populations (or two random halves of one) give top-k `rows` and `cols` bases; their principal
angles say whether the "universal" directions are shared or an accident of one sample. A random
k-subspace of an m-dimensional space overlaps another by `k/m` on average (mean squared cosine),
the reference printed beside every overlap.
"""

from __future__ import annotations

import jax
import numpy as np

from jsubspace.sharding._mesh import host_array
from jsubspace.sharding._mesh import stacked_sharding
from jsubspace.spectra import _gram_bases
from jsubspace.spectra._holdout import EXACT
from jsubspace.spectra._holdout import lora_bases
from jsubspace.spectra._holdout import masked_bases


def principal_cosines(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the column spans of `u` and `v`, descending."""
    qu = np.linalg.qr(np.asarray(u, np.float64))[0]
    qv = np.linalg.qr(np.asarray(v, np.float64))[0]
    return np.clip(np.linalg.svd(qu.T @ qv, compute_uv=False), 0.0, 1.0)


OVERLAP_KS = (1, 2, 4, 8, 16)


def _angles_record(a, b, shape, k, cosines=(principal_cosines, principal_cosines)) -> dict:
    """Principal angles between the bases `a` and `b` (`(rows f32[m, k], cols f32[n, k])`,
    columns by descending eigenvalue), at k and at each smaller k of `OVERLAP_KS` (the leading
    columns: a shared subspace of low rank stands out at its own k, not only at the largest).
    `cosines`: the rows' and the cols' `principal_cosines` (bases held as Gram coefficients
    bring their own)."""
    m, n = shape
    rows = cosines[0](a[0], b[0])
    cols = cosines[1](a[1], b[1])
    ks = sorted({j for j in OVERLAP_KS if j < k} | {k})
    return {
        "k": k,
        "rows_cosines": rows.tolist(),
        "cols_cosines": cols.tolist(),
        "rows_overlap": float(np.mean(rows**2)),
        "cols_overlap": float(np.mean(cols**2)),
        "random_rows_overlap": k / m,
        "random_cols_overlap": k / n,
        "ks": ks,
        "rows_overlap_at": [_overlap(a[0][:, :j], b[0][:, :j], cosines[0]) for j in ks],
        "cols_overlap_at": [_overlap(a[1][:, :j], b[1][:, :j], cosines[1]) for j in ks],
    }


def _overlap(u, v, cosines=principal_cosines) -> float:
    return float(np.mean(cosines(u, v) ** 2))


def _gram_cosines(grams: _gram_bases.FactorGrams, mode: str):
    """`principal_cosines` of two bases held as Gram coefficients (orthonormal in the mode's
    Gram, so `U_1^T U_2 = C_1^T G C_2` needs no QR)."""

    def cosines(c1, c2):
        one = _gram_bases.Basis(c1, None, 0.0)
        other = _gram_bases.Basis(c2, None, 0.0)
        found = _gram_bases.cross(grams, one, other, mode=mode)
        return np.clip(np.linalg.svd(found, compute_uv=False), 0.0, 1.0)

    return cosines


def _bases(x, weights, mesh, k, solvers=EXACT, key=None, iterations=4, ref=None, chunk=None):
    w = jax.device_put(weights.astype(np.float32), stacked_sharding(mesh))
    u, v = masked_bases(
        x,
        w,
        key,
        ref,
        mesh=mesh,
        kmax=k,
        solvers=tuple(solvers),
        iterations=iterations,
        chunk=chunk,
    )
    return host_array(u), host_array(v)


def _halves(n_models: int, n_pad: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights `f64[N_pad]` of two seeded random halves of the models."""
    half = n_models // 2
    perm = np.random.default_rng(seed + 1).permutation(n_models)
    w1 = np.zeros(n_pad)
    w2 = np.zeros(n_pad)
    w1[perm[:half]] = 1
    w2[perm[half : 2 * half]] = 1
    return w1, w2


MIN_MODELS = 4
"""The fewest models the split half judges from: two halves of two, each one direction once
centred."""


def split_half_compare(
    x,
    n_models: int,
    *,
    mesh,
    seed: int,
    k: int = 16,
    solvers=EXACT,
    key=None,
    iterations=4,
    ref=None,
    chunk=None,
) -> dict:
    """Principal angles between the bases of two seeded random halves of the population (bases
    by the plan's `solvers`, `(rows, cols)`; `key` for the randomized one), each half centred by
    its mean, or by `ref` (`f32[m, n]`: zeros or the base, as the spectra were) when given.
    `chunk`: the layer plan's models converted at a time (`LayerPlan.chunk`)."""
    _, m, n = x.shape
    half = n_models // 2
    k = max(1, min(k, m, n, half - 1))
    if half < 2:
        return {"skipped": f"{n_models} models are too few to split in halves"}
    w1, w2 = _halves(n_models, x.shape[0], seed)
    keys = jax.random.split(key) if key is not None else (None, None)
    common = dict(solvers=solvers, iterations=iterations, ref=ref, chunk=chunk)
    return _angles_record(
        _bases(x, w1, mesh, k, key=keys[0], **common),
        _bases(x, w2, mesh, k, key=keys[1], **common),
        (m, n),
        k,
    )


def _lora_bases(factors, weights, n_used, *, mesh, key, k, iterations, center="mean"):
    w = jax.device_put(np.asarray(weights, np.float32), stacked_sharding(mesh))
    found = lora_bases(
        factors, w, n_used, mesh=mesh, key=key, k=k, iterations=iterations, center=center
    )
    return tuple(host_array(x) for x in found)


def lora_split_half_compare(
    factors,
    n_models: int,
    *,
    mesh,
    seed: int,
    key,
    k: int = 16,
    iterations: int = 4,
    center: str = "mean",
    grams: _gram_bases.FactorGrams | None = None,
) -> dict:
    """`split_half_compare` of a LoRA population from its factors (`(a, b, scales)`), with
    bases from the randomized solver (k up to half the shorter side), centred as the spectra
    were (`center`). With `grams` (`LayerSpectra.factor_grams` of the same, unshifted factors)
    both halves' bases and their angles come from the Grams (`spectra._gram_bases`), with no
    pass over the factors."""
    a, b, _ = factors
    m, n = b.shape[1], a.shape[2]
    half = n_models // 2
    k = max(1, min(k, m // 2, n // 2, half - 1))
    if half < 2:
        return {"skipped": f"{n_models} models are too few to split in halves"}
    w1, w2 = _halves(n_models, a.shape[0], seed)
    if grams is not None:
        rng = np.random.default_rng([seed, 3])
        found = [
            tuple(
                _gram_bases.set_basis(
                    grams, w > 0, mode=mode, k=k, center=center, rng=rng, iterations=iterations
                )
                for mode in ("rows", "cols")
            )
            for w in (w1, w2)
        ]
        record = _angles_record(
            *(tuple(basis.coef for basis in bases) for bases in found),
            (m, n),
            k,
            cosines=(_gram_cosines(grams, "rows"), _gram_cosines(grams, "cols")),
        )
        residual = max(basis.residual for bases in found for basis in bases)
        record["bases"] = {
            "from": "grams",
            "solver": "block-krylov",
            "iterations": iterations,
            "residual": residual,
        }
        return record
    k1, k2 = jax.random.split(key)
    common = dict(mesh=mesh, k=k, iterations=iterations, center=center)
    return _angles_record(
        _lora_bases(factors, w1, half, key=k1, **common),
        _lora_bases(factors, w2, half, key=k2, **common),
        (m, n),
        k,
    )


def lora_population_compare(
    factors, n_models: int, other, other_models: int, *, mesh, key, k=16, iterations=4
) -> dict:
    """`population_compare` of two LoRA populations from their factors."""
    a, b, _ = factors
    m, n = b.shape[1], a.shape[2]
    k = max(1, min(k, m // 2, n // 2, n_models - 1, other_models - 1))
    k1, k2 = jax.random.split(key)
    common = dict(mesh=mesh, k=k, iterations=iterations)
    mine = np.zeros(a.shape[0])
    mine[:n_models] = 1
    theirs = np.zeros(other[0].shape[0])
    theirs[:other_models] = 1
    return _angles_record(
        _lora_bases(factors, mine, n_models, key=k1, **common),
        _lora_bases(other, theirs, other_models, key=k2, **common),
        (m, n),
        k,
    )


def population_compare(
    x,
    n_models: int,
    other,
    other_models: int,
    *,
    mesh,
    k=16,
    solvers=EXACT,
    key=None,
    iterations=4,
    chunk=None,
):
    """Principal angles between the bases of two populations of the same layer (bases by the
    plan's `solvers`; `key` for the randomized one)."""
    _, m, n = x.shape
    k = max(1, min(k, m, n, n_models - 1, other_models - 1))
    w1 = np.zeros(x.shape[0])
    w1[:n_models] = 1
    w2 = np.zeros(other.shape[0])
    w2[:other_models] = 1
    keys = jax.random.split(key) if key is not None else (None, None)
    common = dict(solvers=solvers, iterations=iterations, chunk=chunk)
    return _angles_record(
        _bases(x, w1, mesh, k, key=keys[0], **common),
        _bases(other, w2, mesh, k, key=keys[1], **common),
        (m, n),
        k,
    )
