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
from jsubspace.spectra._holdout import masked_bases


def principal_cosines(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the column spans of `u` and `v`, descending."""
    qu = np.linalg.qr(np.asarray(u, np.float64))[0]
    qv = np.linalg.qr(np.asarray(v, np.float64))[0]
    return np.clip(np.linalg.svd(qu.T @ qv, compute_uv=False), 0.0, 1.0)


def _angles_record(a, b, shape, k) -> dict:
    m, n = shape
    rows = principal_cosines(a[0], b[0])
    cols = principal_cosines(a[1], b[1])
    return {
        "k": k,
        "rows_cosines": rows.tolist(),
        "cols_cosines": cols.tolist(),
        "rows_overlap": float(np.mean(rows**2)),
        "cols_overlap": float(np.mean(cols**2)),
        "random_rows_overlap": k / m,
        "random_cols_overlap": k / n,
    }


def _bases(x, weights, mesh, k):
    w = jax.device_put(weights.astype(np.float32), stacked_sharding(mesh))
    u, v = masked_bases(x, w, mesh=mesh, kmax=k)
    return host_array(u), host_array(v)


def split_half_compare(x, n_models: int, *, mesh, seed: int, k: int = 16) -> dict:
    """Principal angles between the bases of two seeded random halves of the population."""
    _, m, n = x.shape
    half = n_models // 2
    k = max(1, min(k, m, n, half - 1))
    if half < 2:
        return {"skipped": f"{n_models} models are too few to split in halves"}
    perm = np.random.default_rng(seed + 1).permutation(n_models)
    w1 = np.zeros(x.shape[0])
    w2 = np.zeros(x.shape[0])
    w1[perm[:half]] = 1
    w2[perm[half : 2 * half]] = 1
    return _angles_record(_bases(x, w1, mesh, k), _bases(x, w2, mesh, k), (m, n), k)


def population_compare(x, n_models: int, other, other_models: int, *, mesh, k: int = 16):
    """Principal angles between the bases of two populations of the same layer."""
    _, m, n = x.shape
    k = max(1, min(k, m, n, n_models - 1, other_models - 1))
    w1 = np.zeros(x.shape[0])
    w1[:n_models] = 1
    w2 = np.zeros(other.shape[0])
    w2[:other_models] = 1
    return _angles_record(_bases(x, w1, mesh, k), _bases(other, w2, mesh, k), (m, n), k)
