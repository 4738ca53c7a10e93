"""Mode Grams of a LoRA population in factor space: no update `dW_i = s_i B_i A_i` is formed.

With `B_i: [m, r]`, `A_i: [r, n]` and the centring matrix `H` (`I - 11^T/N` for `mean`, `I` for
`none`), the centred updates are `X_i = sum_j H_ij s_j B_j A_j`. Let `G^B[j,k] = B_j^T B_k` and
`G^A[j,k] = A_j A_k^T` (both `r x r` blocks of an `Nr x Nr` matrix) and `M = H^T H`. Then
  * models: `K = H K0 H` with `K0[j,k] = s_j s_k sum(G^B[j,k] * G^A[j,k])`;
  * rows:   `sum_i X_i X_i^T = Bs Mid_A Bs^T` with `Bs = [B_1 .. B_N]` and
    `Mid_A[j,k] = M_jk s_j s_k G^A[j,k]`;
    its nonzero eigenvalues are those of `F Mid_A F^T` for any `F` with `F^T F = G^B`;
  * cols:   the same with the roles of A and B exchanged.
`F` is whichever is shorter: `Bs` itself (`m x Nr`, when `m < Nr`), or a square root of `G^B`
(`Nr x Nr`): its Cholesky factor, or, when `G^B` is singular (adapters sharing one `A`
initialisation, say), the rank-revealing root `Lambda^{1/2} V^T` of its eigendecomposition.
Every product costs `O((m + n) (Nr)^2)`; the largest array is `Nr x Nr` (or `m x Nr`), never an
`m x n` update per model. Once `Nr` exceeds both sides, `kernels._lora_side` builds the side-space
matrices from blocks of models instead.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jsubspace.kernels._gram import HIGHEST
from jsubspace.kernels._gram import matmul
from jsubspace.kernels._gram import sharded_cross_gram
from jsubspace.sharding._mesh import MODELS


class LoraGrams(NamedTuple):
    """Symmetric PSD matrices whose nonzero eigenvalues are the mode spectra of `{X_i}`.

    Attributes:
        models: `f32[N, N]`, the centred models Gram itself.
        rows: `f32[min(m, Nr), min(m, Nr)]`, same nonzero eigenvalues as `sum_i X_i X_i^T`.
        cols: `f32[min(n, Nr), min(n, Nr)]`, same nonzero eigenvalues as `sum_i X_i^T X_i`.
        total_energy: `f32[]`.
        factor_a: `f32[N, r, N, r]`, the cross-Gram `A_j A_k^T` (unscaled).
        factor_b: `f32[N, r, N, r]`, the cross-Gram `B_j^T B_k` (unscaled).
        uncentred: `f32[N, N]`, `<dW_i, dW_j>` before centring (for lineage).
        scales: `f32[N_pad]`, the per-model scales `s_i` used.
    """

    models: jax.Array
    rows: jax.Array | None
    cols: jax.Array | None
    total_energy: jax.Array
    factor_a: jax.Array
    factor_b: jax.Array
    uncentred: jax.Array
    scales: jax.Array


def centering_matrix(n_pad: int, n_models: int, center: str) -> jax.Array:
    """`f32[N_pad, N_pad]`: `X = H @ W` over models; padding rows and columns are zero."""
    mask = (jnp.arange(n_pad) < n_models).astype(jnp.float32)
    if center == "mean":
        return jnp.diag(mask) - jnp.outer(mask, mask) / n_models
    if center in ("none", "base"):
        # For adapters `dW` already is the update from the base model.
        return jnp.diag(mask)
    raise ValueError(f"center must be 'mean', 'none' or 'base', got {center!r}")


def psd_root(gram: jax.Array) -> jax.Array:
    """`R` with `R^T R = gram` (rank-revealing; negative rounding noise clipped to zero)."""
    evals, evecs = jnp.linalg.eigh(gram)
    return jnp.sqrt(jnp.clip(evals, 0.0))[:, None] * evecs.T


def factor_root(gram: jax.Array) -> jax.Array:
    """`R` with `R^T R = gram`: the Cholesky factor, or `psd_root` when Cholesky breaks down.

    Rows and columns that are exactly zero (ranks zero-padded to the population's largest, padding
    models) get a unit pivot for the factorisation and a zero column in `R`, so they alone never
    force the (Nr)^3 eigendecomposition. A singular remainder (several adapters sharing one
    factor) makes Cholesky produce NaNs; then the eigen root is taken instead.
    """
    zero = jnp.diag(gram) == 0
    chol = jnp.linalg.cholesky(gram + jnp.diag(zero.astype(gram.dtype)))
    ok = jnp.all(jnp.isfinite(chol))
    return lax.cond(ok, lambda: chol.T * (~zero)[None, :], lambda: psd_root(gram))


def _sandwich(f: jax.Array, mid: jax.Array) -> jax.Array:
    out = matmul(matmul(f, mid), f.T)
    return (out + out.T) / 2


def mode_matrices(
    ga: jax.Array,
    gb: jax.Array,
    scales: jax.Array,
    *,
    n_models: int,
    center: str,
    root_a: jax.Array | None = None,
    root_b: jax.Array | None = None,
) -> LoraGrams:
    """The three mode matrices from the factor cross-Grams (replicated arrays; inside jit).

    Args:
        ga: `f32[Nr, Nr]`, `A_j A_k^T` blocks; gb: `f32[Nr, Nr]`, `B_j^T B_k` blocks.
        scales: `f32[N_pad]`, zero for padding models.
        n_models: the true N.
        center: 'mean', 'none' or 'base'.
        root_a: `F_A` with `F_A^T F_A = ga` (for 'cols'; None skips the mode).
        root_b: `F_B` with `F_B^T F_B = gb` (for 'rows'; None skips the mode).
    """
    n_pad = scales.shape[0]
    nr = ga.shape[0]
    r = nr // n_pad
    ga4 = ga.reshape(n_pad, r, n_pad, r)
    gb4 = gb.reshape(n_pad, r, n_pad, r)
    s = scales.astype(jnp.float32)
    h = centering_matrix(n_pad, n_models, center)
    mm = matmul(h.T, h)
    k0 = jnp.einsum("j,k,jakc,jakc->jk", s, s, ga4, gb4, precision=HIGHEST)
    models = matmul(matmul(h, k0), h.T)[:n_models, :n_models]
    weight = (mm * jnp.outer(s, s))[:, None, :, None]
    rows = cols = None
    if root_b is not None:
        rows = _sandwich(root_b, (weight * ga4).reshape(nr, nr))
    if root_a is not None:
        cols = _sandwich(root_a, (weight * gb4).reshape(nr, nr))
    return LoraGrams(models, rows, cols, jnp.trace(models), ga4, gb4, k0[:n_models, :n_models], s)


@functools.partial(jax.jit, static_argnames=("mesh", "n_models", "center", "modes"))
def lora_grams(
    a: jax.Array,
    b: jax.Array,
    scales: jax.Array,
    *,
    mesh: Mesh,
    n_models: int,
    center: str = "mean",
    modes: tuple[str, ...] = ("models", "rows", "cols"),
) -> LoraGrams:
    """Factor-space Grams of the three modes of `{s_i B_i A_i}`.

    Args:
        a: `dtype[N_pad, r, n]` sharded over `models`.
        b: `dtype[N_pad, m, r]` sharded over `models`.
        scales: `f32[N_pad]`, zero for padding models.
        mesh: the mesh the factors live on.
        n_models: the true N.
        center: 'mean' or 'none' ('base' means 'none': adapters are updates from their base).
        modes: which of 'rows' / 'cols' to build ('models' and the cross-Grams always are).

    Returns:
        LoraGrams.
    """
    d = mesh.devices.size
    n_pad, r, n = a.shape
    m = b.shape[1]

    def body(ab, bb):
        # ab: dtype[N/d, r, n]; bb: dtype[N/d, m, r]
        ga = sharded_cross_gram(jnp.swapaxes(ab.astype(jnp.float32), 1, 2), num_devices=d)
        gb = sharded_cross_gram(bb.astype(jnp.float32), num_devices=d)
        return ga, gb  # f32[N/d, r, N, r] each

    ga, gb = jax.shard_map(
        body, mesh=mesh, in_specs=(P(MODELS), P(MODELS)), out_specs=(P(MODELS), P(MODELS))
    )(a, b)
    nr = n_pad * r
    ga, gb = ga.reshape(nr, nr), gb.reshape(nr, nr)
    # The shorter of the stacked factors (side < Nr) and a root of their Gram.
    root_a = root_b = None
    if "rows" in modes:
        stacked = jnp.transpose(b, (1, 0, 2)).reshape(m, nr).astype(jnp.float32)
        root_b = stacked if m < nr else factor_root(gb)
    if "cols" in modes:
        stacked = jnp.transpose(a, (2, 0, 1)).reshape(n, nr).astype(jnp.float32)
        root_a = stacked if n < nr else factor_root(ga)
    return mode_matrices(
        ga, gb, scales, n_models=n_models, center=center, root_a=root_a, root_b=root_b
    )


def materialized_updates(a, b, scales) -> jax.Array:
    """`f32[N, m, n]` updates `s_i B_i A_i`: for tests and small populations only."""
    return jnp.einsum(
        "i,imr,irn->imn",
        scales.astype(jnp.float32),
        b.astype(jnp.float32),
        a.astype(jnp.float32),
        precision=HIGHEST,
    )
