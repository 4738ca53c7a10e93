"""Rows / cols spectra of LoRA layers from their factor Grams, with host LAPACK (CPU backend).

The rows spectrum is that of `F Mid F^T` for any `F` with `F^T F = G` (see `kernels.lora_grams`),
i.e. of the symmetric-definite pencil `(Mid, G)`. On CPU the arrays already live in host memory and
LAPACK has the three steps as single calls: a pivoted Cholesky factor of `G` (`?pstrf`, rank-
revealing, so adapters sharing one factor need no eigendecomposition), the congruence
`U Mid U^T` exploiting symmetry and triangularity (`?sygst`, a quarter of the flops of two GEMMs)
and the eigenvalues alone (`?syevr`). Accelerators run the jitted kernel instead.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import scipy.linalg
from scipy.linalg import blas
from scipy.linalg import lapack

from jsubspace import kernels


def centred_weights(scales: np.ndarray, n_models: int, center: str) -> np.ndarray:
    """`f32[N_pad, N_pad]`: `M_jk s_j s_k` with `M = H^T H` (host twin of the kernel's weights).

    `H` is symmetric and idempotent for both centres, so `M = H`: no matrix product (a numpy
    BLAS call here would leave numpy's own OpenBLAS threads spinning beside scipy's LAPACK).
    """
    n_pad = len(scales)
    mask = (np.arange(n_pad) < n_models).astype(np.float64)
    if center == "mean":
        h = np.diag(mask) - np.outer(mask, mask) / n_models
    elif center in ("none", "base"):
        h = np.diag(mask)
    else:
        raise ValueError(f"center must be 'mean', 'none' or 'base', got {center!r}")
    s = np.asarray(scales, np.float64)
    return (h * np.outer(s, s)).astype(np.float32)


def mid_matrix(other: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`f32[Nr, Nr]`: the other factor's cross-Gram `[N, r, N, r]` weighted block-wise."""
    n_pad, r = other.shape[:2]
    mid = np.asarray(other, np.float32) * weights[:, None, :, None]
    return mid.reshape(n_pad * r, n_pad * r)


def eigvalsh(a: np.ndarray, *, lower: bool = True, overwrite: bool = False) -> np.ndarray:
    """Descending eigenvalues (float64, clipped at zero) of a symmetric host matrix, by LAPACK's
    `?syevr` without eigenvectors; NaNs when `a` is not finite, as the device solvers give."""
    if not np.all(np.isfinite(a)):
        return np.full(a.shape[0], np.nan)
    values = scipy.linalg.eigh(
        a, lower=lower, eigvals_only=True, driver="evr", check_finite=False, overwrite_a=overwrite
    )
    return np.clip(values[::-1].astype(np.float64), 0.0, None)


def sandwich_eigvalsh(
    mid: np.ndarray, *, gram: np.ndarray | None = None, root: np.ndarray | None = None
) -> np.ndarray:
    """Descending eigenvalues of `F mid F^T` where `F^T F = gram`, or `F = root`.

    Args:
        mid: `f32[d, d]` symmetric PSD.
        gram: `f32[d, d]` symmetric PSD, possibly singular; or
        root: `f32[d, d]` upper triangular (a Bartlett factor, say).

    Returns:
        float64, clipped at zero; as many eigenvalues as the numerical rank of `gram` (d for
        `root`). NaNs when an input is not finite, as the device solvers give.
    """
    mid = np.asarray(mid, np.float32)
    d = len(mid)
    if root is None:
        gram = np.asarray(gram, np.float32)
        if not (np.all(np.isfinite(gram)) and np.all(np.isfinite(mid))):
            return np.full(d, np.nan)
        # Plain Cholesky when G is definite (zero rows of padded ranks get a unit pivot and a
        # zero row in U); pivoted Cholesky, P^T G P = U^T U with only the leading `rank` rows of
        # U meaningful, when it is not (adapters sharing one factor).
        zero = np.diag(gram) == 0
        shifted = gram + np.diag(zero.astype(np.float32)) if zero.any() else gram
        u, info = lapack.spotrf(shifted, lower=0, clean=0)
        if info == 0:
            root, rank = u, d
            root[zero] = 0.0
        else:
            u, piv, rank, info = lapack.spstrf(gram, tol=-1.0, lower=0)
            if info < 0:
                raise ValueError(f"?pstrf: argument {-info} is invalid")
            root = u
            root[rank:] = 0.0
            perm = piv - 1
            mid = mid[np.ix_(perm, perm)]
    else:
        root = np.asarray(root, np.float32)
        rank = d
    # U (P^T mid P) U^T (?sygst reads the upper triangle of U only): zero outside its leading
    # rank x rank block.
    out, info = lapack.ssygst(mid, root, itype=2, lower=0)
    if info != 0:
        raise ValueError(f"?sygst failed with info={info}")
    return eigvalsh(out[:rank, :rank], lower=False, overwrite=True)


def side_matrix(
    a,
    b,
    scales,
    *,
    mesh,
    n_models: int,
    center: str,
    mode: str,
    shift: bool = False,
    panels: int = 4,
) -> np.ndarray:
    """The rows / cols matrix of `kernels.side_mode_matrix`, accumulated in host memory.

    Each model block's terms come from the jitted `kernels.side_block_terms` / `_factors`; BLAS
    adds them into one Fortran-ordered accumulator in place (`?syrk` on the lower triangle, half
    the flops of a product, or `?syr2k` for shifted factors), where XLA's CPU backend would
    allocate each `p x p` product beside its accumulator. The mean term is subtracted a panel of
    the summed update's columns at a time (`?gemm`, then `?syrk`), so only a `p x q / panels`
    slice of it is ever held; each panel reads the blocks again. Single-process CPU backend only.

    Returns:
        `f32[p, p]`, Fortran order, its lower triangle holding the matrix (for `eigvalsh`).
    """
    d = mesh.devices.size
    n_local = a.shape[0] // d
    m, n = b.shape[1], a.shape[2]
    p, q = (m, n) if mode == "rows" else (n, m)
    stack = (a, b, scales)
    centred = center == "mean"
    means = kernels.side_means(stack, mesh=mesh, n_models=n_models) if shift and centred else None
    size = kernels.side_block_models(n_local, a.shape[1])

    common = dict(mesh=mesh, size=size, n_models=n_models, mode=mode)

    def blocks(terms):
        # Per device; transposed views of C-ordered blocks are Fortran-ordered: no copies.
        for j in range(-(-n_local // size)):
            arrays = [np.asarray(x) for x in terms(stack, means, jnp.int32(j), **common)]
            yield from (tuple(x[k].T for x in arrays) for k in range(d))

    acc = np.zeros((p, p), np.float32, order="F")
    for f, wide in blocks(functools.partial(kernels.side_block_terms, root=means is None)):
        if means is None:
            acc = blas.ssyrk(1.0, f, beta=1.0, c=acc, trans=1, lower=1, overwrite_c=1)
        else:
            acc = blas.ssyr2k(0.5, f, wide, beta=1.0, c=acc, trans=1, lower=1, overwrite_c=1)
    if not centred:
        return acc
    edges = [q * i // panels for i in range(panels + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        total = np.zeros((p, hi - lo), np.float32, order="F")
        for wide, rgt in blocks(kernels.side_block_factors):
            total = blas.sgemm(
                1.0, wide, rgt[lo:hi], beta=1.0, c=total, trans_a=1, trans_b=1, overwrite_c=1
            )
        acc = blas.ssyrk(-1.0 / n_models, total, beta=1.0, c=acc, lower=1, overwrite_c=1)
    return acc


def factor_covariance_matrix(a, b, mask, *, mesh, factor: str) -> np.ndarray:
    """The covariance of `kernels.factor_covariance`, accumulated in host memory by `?syrk`
    (half the flops of a product, added in place) from the jitted blocks of centred samples.
    Single-process CPU backend only.

    Returns:
        `f32[p, p]`, Fortran order, its lower triangle holding the matrix (for `eigvalsh`).
    """
    if factor not in kernels.FACTORS:
        raise ValueError(f"factor must be one of {kernels.FACTORS}, got {factor!r}")
    mean = kernels.factor_mean(a, b, mask, mesh=mesh, factor=factor)
    d = mesh.devices.size
    n_local, r = a.shape[0] // d, a.shape[1]
    p = a.shape[2] if factor == "A" else b.shape[1]
    size = kernels.side_block_models(n_local, r)
    acc = np.zeros((p, p), np.float32, order="F")
    for j in range(-(-n_local // size)):
        x = np.asarray(
            kernels.factor_block_samples(
                a, b, mask, mean, jnp.int32(j), mesh=mesh, size=size, factor=factor
            )
        )
        for k in range(d):
            # x[k] is C-ordered [p, s]: its transpose is a Fortran-ordered [s, p], no copy.
            acc = blas.ssyrk(1.0, x[k].T, beta=1.0, c=acc, trans=1, lower=1, overwrite_c=1)
    return acc
