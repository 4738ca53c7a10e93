"""The universal basis of one layer and every model's coefficients in it.

`U` (top `rows` eigenvectors, m x K) and `V` (top `cols` eigenvectors, n x K) of the centred
population, and `C_i = U^T X_i V` (K x K) for every model. Because `U`, `V` have orthonormal
columns, the leading `k x k` block of `C_i` is model i's coefficient matrix for the rank-k basis,
and `||X_i||^2 - ||C_i[:k, :k]||^2` is exactly its reconstruction error: one fit at `K` serves
every `k <= K`.

Dense layers use the mode Grams (or the randomized solver for long sides). LoRA layers never form
an update: with `G^B = Bs^T Bs = Q_B Lambda Q_B^T`, the columns of `Bs Q_B Lambda^{-1/2}` are an
orthonormal basis of the span of every `B_i`, so the rows eigenvectors are that basis times the
eigenvectors of the small factor-space matrix (and likewise for `V` from the `A` side).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jsubspace import kernels
from jsubspace.kernels import HIGHEST
from jsubspace.sharding._mesh import MODELS


class LayerBasis(NamedTuple):
    """Basis and coefficients of one layer (float32).

    Attributes:
        center: `f32[m, n]`, the centre `c` (zeros for `center='none'`).
        u: `f32[m, K]`.
        v: `f32[n, K]`.
        coefficients: `f32[N_pad, K, K]` sharded over models, `C_i = U^T (W_i - c) V`.
        energies: `f32[N_pad]`, `||W_i - c||_F^2`.
    """

    center: jax.Array
    u: jax.Array
    v: jax.Array
    coefficients: jax.Array
    energies: jax.Array


def _top_vectors(gram: jax.Array, k: int) -> jax.Array:
    return jnp.linalg.eigh(gram)[1][:, ::-1][:, :k]


@kernels.chunkable_jit(
    static_argnames=("mesh", "n_models", "center", "k", "solvers", "iterations", "chunk")
)
def dense_basis(
    x: jax.Array,
    base: jax.Array | None = None,
    key: jax.Array | None = None,
    *,
    mesh: Mesh,
    n_models: int,
    center: str,
    k: int,
    solvers: tuple[str, str] = ("exact", "exact"),
    iterations: int = 4,
    chunk: int | None = None,
) -> LayerBasis:
    """Basis of a dense stack `dtype[N_pad, m, n]`: per side, by the layer plan's solver
    (`spectra.basis_solvers`): eigh of the `rows` / `cols` Gram ('exact'), or the top-k
    eigenvectors from the randomized block-Krylov solver, which never forms the Gram
    ('randomized', `key` seeds it). `chunk`: the layer plan's models per device converted to
    float32 at a time (`spectra.LayerPlan.chunk`), for a stack whose float32 copy does not fit."""
    if base is None:
        base = jnp.zeros(x.shape[1:], x.dtype)
    u, v = kernels.mode_bases(
        x,
        base,
        key,
        mesh=mesh,
        n_models=n_models,
        center=center,
        ranks=(k, k),
        solvers=solvers,
        iterations=iterations,
        chunk=chunk,
    )
    return project_dense(x, base, u, v, mesh=mesh, n_models=n_models, center=center, chunk=chunk)


@kernels.chunkable_jit(static_argnames=("mesh", "n_models", "center", "chunk"))
def project_dense(
    x, base, u, v, *, mesh: Mesh, n_models: int, center: str, chunk: int | None = None
) -> LayerBasis:
    """Coefficients of every model of a dense stack in a given basis `(u, v)` (`chunk` models
    per device centred at a time, as in `dense_basis`)."""
    if base is None:
        base = jnp.zeros(x.shape[1:], x.dtype)

    def body(xb, cb, ub, vb):
        # xb: dtype[N/d, m, n]
        c = kernels.shard_centre(xb, cb, n_models=n_models, center=center, chunk=chunk)

        def part(first, xs):
            xc = kernels.centred_chunk(xs, c, first, xb.shape[0], n_models)
            coeff = jnp.einsum("mk,iml->ikl", ub, kernels.stack_times(xc, vb), precision=HIGHEST)
            return coeff, jnp.sum(xc * xc, axis=(1, 2))

        coeff, energy = kernels.model_chunk_map(part, xb, chunk=chunk)
        return c, coeff, energy

    c, coeff, energy = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(MODELS), P(), P(), P()),
        out_specs=(P(), P(MODELS), P(MODELS)),
    )(x, base, u, v)
    return LayerBasis(c, u, v, coeff, energy)


@functools.partial(jax.jit, static_argnames=("mesh", "n_models", "center", "k"))
def lora_basis(
    a: jax.Array, b: jax.Array, scales: jax.Array, *, mesh: Mesh, n_models: int, center: str, k: int
) -> LayerBasis:
    """Exact basis of a LoRA layer `{s_i B_i A_i}` computed in factor space.

    Args:
        a: `dtype[N_pad, r, n]`, b: `dtype[N_pad, m, r]`, scales: `f32[N_pad]`, all sharded.
        mesh, n_models, center: as in `kernels.lora_grams`.
        k: basis size (at most `N r`).
    """
    g = kernels.lora_grams(
        a, b, scales, mesh=mesh, n_models=n_models, center=center, modes=("models",)
    )
    n_pad, r, _ = a.shape
    nr = n_pad * r

    def side_vectors(gram_same, gram_other):
        # Orthonormal basis Q = S Q_S Lambda^{-1/2} of the stacked factors S, and the top
        # eigenvectors W of Lambda^{1/2} Q_S^T Mid Q_S Lambda^{1/2}; the mode's eigenvectors are
        # S (Q_S Lambda^{-1/2} W). Returns the (Nr x k) coefficient of S.
        evals, evecs = jnp.linalg.eigh(gram_same.reshape(nr, nr))
        keep = evals > jnp.finfo(jnp.float32).eps * nr * jnp.max(evals)
        inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, evals, 1.0)), 0.0)
        root = jnp.sqrt(jnp.clip(evals, 0.0)) * keep
        h = kernels.centering_matrix(n_pad, n_models, center)
        weight = (kernels.matmul(h.T, h) * jnp.outer(scales, scales))[:, None, :, None]
        mid = (weight * gram_other).reshape(nr, nr)
        small = kernels.matmul(kernels.matmul(root[:, None] * evecs.T, mid), evecs * root[None, :])
        w = _top_vectors((small + small.T) / 2, k)
        return kernels.matmul(evecs, inv_sqrt[:, None] * w)  # f32[Nr, k]

    coef_b = side_vectors(g.factor_b, g.factor_a)  # U = Bs @ coef_b
    coef_a = side_vectors(g.factor_a, g.factor_b)  # V = As^T @ coef_a

    def body(ab, bb, sb, cb, ca):
        # ab: dtype[N/d, r, n]; bb: dtype[N/d, m, r]; cb, ca: f32[N_pad * r, k] replicated
        b_local = bb.shape[0]
        start = lax.axis_index(MODELS) * b_local * r
        cb_local = lax.dynamic_slice_in_dim(cb, start, b_local * r).reshape(b_local, r, -1)
        ca_local = lax.dynamic_slice_in_dim(ca, start, b_local * r).reshape(b_local, r, -1)
        bf, af = bb.astype(jnp.float32), ab.astype(jnp.float32)
        u = lax.psum(jnp.einsum("imr,irk->mk", bf, cb_local, precision=HIGHEST), MODELS)
        v = lax.psum(jnp.einsum("irn,irk->nk", af, ca_local, precision=HIGHEST), MODELS)
        # Uncentred coefficients s_i (U^T B_i)(A_i V) and the mean update, never forming dW_i.
        ub = jnp.einsum("mk,imr->ikr", u, bf, precision=HIGHEST)
        av = jnp.einsum("irn,nl->irl", af, v, precision=HIGHEST)
        coeff = sb[:, None, None] * jnp.einsum("ikr,irl->ikl", ub, av, precision=HIGHEST)
        mean_coeff = lax.psum(jnp.sum(coeff, axis=0), MODELS) / n_models
        mean_update = (
            lax.psum(jnp.einsum("i,imr,irn->mn", sb, bf, af, precision=HIGHEST), MODELS) / n_models
        )
        if center == "mean":
            mask = kernels.model_mask(b_local, n_models)[:, None, None]
            coeff = (coeff - mean_coeff) * mask
            c = mean_update
        else:
            c = jnp.zeros_like(mean_update)
        return c, u, v, coeff

    c, u, v, coeff = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(MODELS), P(MODELS), P(MODELS), P(), P()),
        out_specs=(P(), P(), P(), P(MODELS)),
    )(a, b, scales, coef_b, coef_a)
    energies = jnp.zeros(n_pad, jnp.float32).at[:n_models].set(jnp.diag(g.models))
    return LayerBasis(c, u, v, coeff, energies)
