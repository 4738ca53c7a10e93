"""Mode Grams of a LoRA population in factor space: no update `dW_i = s_i B_i A_i` is formed.

With `B_i: [m, r]`, `A_i: [r, n]` and the centring matrix `H` (`I - 11^T/N` for `mean`, `I` for
`none`), the centred updates are `X_i = sum_j H_ij s_j B_j A_j`. Let `G^B[j,k] = B_j^T B_k` and
`G^A[j,k] = A_j A_k^T` (both `r x r` blocks of an `Nr x Nr` matrix) and `M = H^T H`. Then
  * models: `K = H K0 H` with `K0[j,k] = s_j s_k sum(G^B[j,k] * G^A[j,k])`;
  * rows:   `sum_i X_i X_i^T = Bs Mid_A Bs^T` with `Bs = [B_1 .. B_N]` and
    `Mid_A[j,k] = M_jk s_j s_k G^A[j,k]`;
    its nonzero eigenvalues are those of `R Mid_A R^T` for any `R` with `R^T R = G^B = Bs^T Bs`;
  * cols:   the same with the roles of A and B exchanged.
`R = Lambda^{1/2} V^T` from the eigendecomposition of `G^B`: the rank-revealing form of the R factor
of a QR of `Bs`. Unlike Cholesky it does not break when factors are rank-deficient (e.g. many
adapters sharing one `A` initialisation). Every product costs `O((m + n) (Nr)^2)`; the largest
array is `Nr x Nr`, never `m x n` per model.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jsubspace.kernels._gram import HIGHEST
from jsubspace.kernels._gram import ring_cross_gram
from jsubspace.sharding._mesh import MODELS


class LoraGrams(NamedTuple):
    """Symmetric PSD matrices whose nonzero eigenvalues are the mode spectra of `{X_i}`.

    Attributes:
        models: `f32[N, N]`, the centred models Gram itself.
        rows: `f32[Nr, Nr]`, same nonzero eigenvalues as `sum_i X_i X_i^T` (m x m).
        cols: `f32[Nr, Nr]`, same nonzero eigenvalues as `sum_i X_i^T X_i` (n x n).
        total_energy: `f32[]`.
        factor_a: `f32[N, r, N, r]`, the cross-Gram `A_j A_k^T` (unscaled).
        factor_b: `f32[N, r, N, r]`, the cross-Gram `B_j^T B_k` (unscaled).
        uncentred: `f32[N, N]`, `<dW_i, dW_j>` before centring (for lineage).
    """

    models: jax.Array
    rows: jax.Array
    cols: jax.Array
    total_energy: jax.Array
    factor_a: jax.Array
    factor_b: jax.Array
    uncentred: jax.Array


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
    n_pad, r, _ = a.shape

    def body(ab, bb):
        # ab: dtype[N/d, r, n]; bb: dtype[N/d, m, r]
        ga = ring_cross_gram(jnp.swapaxes(ab.astype(jnp.float32), 1, 2), num_devices=d)
        gb = ring_cross_gram(bb.astype(jnp.float32), num_devices=d)
        return ga, gb  # f32[N/d, r, N, r] each

    ga, gb = jax.shard_map(
        body, mesh=mesh, in_specs=(P(MODELS), P(MODELS)), out_specs=(P(MODELS), P(MODELS))
    )(a, b)
    s = scales.astype(jnp.float32)
    h = centering_matrix(n_pad, n_models, center)
    mm = h.T @ h
    k0 = jnp.einsum("j,k,jakc,jakc->jk", s, s, ga, gb, precision=HIGHEST)
    models = (h @ k0 @ h.T)[:n_models, :n_models]
    weight = (mm * jnp.outer(s, s))[:, None, :, None]
    nr = n_pad * r
    rows = cols = None
    # The rows / cols matrices need an (Nr)^3 eigendecomposition each; skip them when unused
    # (the factor statistic and lineage need only the cross-Grams).
    if "rows" in modes:
        root_b = psd_root(gb.reshape(nr, nr))
        rows = root_b @ (weight * ga).reshape(nr, nr) @ root_b.T
        rows = (rows + rows.T) / 2
    if "cols" in modes:
        root_a = psd_root(ga.reshape(nr, nr))
        cols = root_a @ (weight * gb).reshape(nr, nr) @ root_a.T
        cols = (cols + cols.T) / 2
    return LoraGrams(models, rows, cols, jnp.trace(models), ga, gb, k0[:n_models, :n_models])


def materialized_updates(a, b, scales) -> jax.Array:
    """`f32[N, m, n]` updates `s_i B_i A_i`: for tests and small populations only."""
    return jnp.einsum(
        "i,imr,irn->imn",
        scales.astype(jnp.float32),
        b.astype(jnp.float32),
        a.astype(jnp.float32),
        precision=HIGHEST,
    )
