"""Eigen-solvers for PSD Gram operators: exact `eigh`, and randomized top-k without the Gram.

The randomized solvers (Halko, Martinsson & Tropp 2011; Musco & Musco 2015) only need the
operator as a product `Y = A @ Q`. For the `rows` mode of a stacked layer that product is
`sum_i X_i (X_i^T Q)`, one pass over the models with a `psum`; the `m x m` Gram is never formed.

Re-orthonormalisation uses a rank-revealing CholeskyQR2: the `l x l` Gram `Y^T Y` is
eigendecomposed (instead of Cholesky-factored), directions below `eps * l * ||Y||^2` are dropped
and the survivors whitened, twice. It needs only Grams of the sketch (an all-reduce when the sketch
is sharded), and unlike plain CholeskyQR it does not break on rank-deficient sketches, which
populations of low-rank adapters produce all the time.

References:
  N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness", SIAM Review 2011.
  C. Musco, C. Musco, "Randomized block Krylov methods for stronger and faster approximate
  singular value decomposition", NeurIPS 2015.
  T. Fukaya et al., "Shifted Cholesky QR for computing the QR factorization of ill-conditioned
  matrices", SIAM J. Sci. Comput. 2020.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jsubspace.kernels._gram import HIGHEST
from jsubspace.kernels._gram import centered_block
from jsubspace.kernels._gram import centred_chunk
from jsubspace.kernels._gram import chunkable_jit
from jsubspace.kernels._gram import matmul
from jsubspace.kernels._gram import mode_product
from jsubspace.kernels._gram import model_chunks
from jsubspace.kernels._gram import shard_centre
from jsubspace.kernels._gram import t_matmul
from jsubspace.sharding._mesh import MODELS

METHODS = ("subspace", "krylov")


class Eig(NamedTuple):
    """Top eigenpairs of a PSD operator, descending.

    Attributes:
        values: `f32[k]`.
        vectors: `f32[dim, k]`, orthonormal columns.
        residuals: `f32[k]`, `||A v - lambda v|| / lambda_1` per pair: the solver's own error.
    """

    values: jax.Array
    vectors: jax.Array
    residuals: jax.Array


def exact_eigh(gram: jax.Array, *, rank: int | None = None) -> Eig:
    """All (or the top `rank`) eigenpairs of a symmetric PSD `f32[d, d]`, descending."""
    evals, evecs = jnp.linalg.eigh(gram)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    if rank is not None:
        evals, evecs = evals[:rank], evecs[:, :rank]
    resid = jnp.linalg.norm(matmul(gram, evecs) - evecs * evals, axis=0) / jnp.maximum(
        evals[0], 1e-30
    )
    return Eig(jnp.clip(evals, 0.0), evecs, resid)


def _tol(y: jax.Array):
    return jnp.finfo(jnp.float32).eps * y.shape[1] * 10


def orthonormalize(y: jax.Array, *, passes: int = 2, floor=0.0) -> jax.Array:
    """Orthonormal basis of the range of `f32[d, l]` (rank-revealing CholeskyQR2).

    Columns for directions the sketch does not span come back as zeros, which is harmless in a
    Rayleigh–Ritz step (they give zero Ritz values): directions whose squared length is below
    `10 eps l` times the largest eigenvalue of `y^T y` and, on the first pass, below `floor` (see
    `_next_block`).
    """
    for step in range(passes):
        gram = jnp.matmul(y.T, y, precision=HIGHEST)
        evals, evecs = jnp.linalg.eigh(gram)
        cutoff = _tol(y) * jnp.max(evals)
        if step == 0:
            cutoff = jnp.maximum(cutoff, floor)
        inv_sqrt = jnp.where(
            evals > cutoff, 1.0 / jnp.sqrt(jnp.where(evals > cutoff, evals, 1.0)), 0.0
        )
        y = jnp.matmul(y, evecs * inv_sqrt, precision=HIGHEST)
    return y


def _next_block(basis: jax.Array, y: jax.Array) -> jax.Array:
    """The part of `y` orthogonal to the orthonormal `basis`, orthonormalised.

    Projected out twice (classical Gram–Schmidt twice is enough), then whitened; directions left
    at the rounding level of `y` (length below `t = 10 eps l` of its longest column) are dropped
    rather than blown up to unit length. Whitening a direction of length `h` magnifies its
    remaining overlap with `basis` to about `eps / h`, so the block is projected once more and
    what is then shorter than `sqrt(t)` (mostly overlap) is dropped too.
    """

    def project(y):
        return y - jnp.matmul(basis, t_matmul(basis, y), precision=HIGHEST)

    t = _tol(y)
    y = orthonormalize(project(project(y)), floor=t * t * jnp.max(jnp.sum(y * y, axis=0)))
    return orthonormalize(project(y), floor=t)


def randomized_eigh(
    matmat: Callable[[jax.Array], jax.Array],
    dim: int,
    *,
    rank: int,
    key: jax.Array,
    oversample: int = 10,
    iterations: int = 3,
    method: str = "krylov",
) -> Eig:
    """Top-`rank` eigenpairs of a PSD operator known only through `matmat`.

    Args:
        matmat: `Q -> A @ Q` for `Q: f32[dim, l]`; traced once per call (use inside jit).
        dim: the operator's side.
        rank: how many eigenpairs to return.
        key: PRNG key for the Gaussian test matrix.
        oversample: extra sketch columns (`l = rank + oversample`).
        iterations: power / Krylov steps; each costs one `matmat`.
        method: 'subspace' (subspace iteration) or 'krylov' (block Krylov, Rayleigh–Ritz on the
            whole block `[Q, AQ, ..., A^q Q]`, more accurate per product on slowly decaying
            spectra).

    Returns:
        Eig with the top `rank` pairs and their residuals.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    width = min(rank + oversample, dim)
    q = orthonormalize(jax.random.normal(key, (dim, width), jnp.float32))
    if method == "subspace":
        for _ in range(iterations):
            q = orthonormalize(matmat(q))
        basis, a_basis = q, matmat(q)
    else:
        # Block Lanczos with full re-orthogonalisation: each new block is orthogonalised against
        # the basis so far (twice), so the basis stays orthonormal and every product `A Q_j` is
        # the operator on a basis block: `A @ basis` for Rayleigh–Ritz needs no extra products
        # (`iterations + 1` in all, instead of `2 iterations + 1`).
        basis, a_basis = q, matmat(q)
        for _ in range(iterations):
            q = _next_block(basis, a_basis[:, -width:])
            basis = jnp.concatenate([basis, q], axis=1)
            a_basis = jnp.concatenate([a_basis, matmat(q)], axis=1)
    small = jnp.matmul(basis.T, a_basis, precision=HIGHEST)
    small = (small + small.T) / 2
    evals, evecs = jnp.linalg.eigh(small)
    evals, evecs = evals[::-1][:rank], evecs[:, ::-1][:, :rank]
    vectors = jnp.matmul(basis, evecs, precision=HIGHEST)
    a_vectors = jnp.matmul(a_basis, evecs, precision=HIGHEST)
    resid = jnp.linalg.norm(a_vectors - vectors * evals, axis=0) / jnp.maximum(evals[0], 1e-30)
    return Eig(jnp.clip(evals, 0.0), vectors, resid)


@chunkable_jit(
    static_argnames=(
        "mesh",
        "n_models",
        "center",
        "mode",
        "rank",
        "oversample",
        "iterations",
        "method",
        "chunk",
    ),
)
def randomized_mode_eigh(
    x: jax.Array,
    base: jax.Array | None = None,
    *,
    key: jax.Array,
    mesh: Mesh,
    n_models: int,
    mode: str,
    rank: int,
    center: str = "mean",
    oversample: int = 10,
    iterations: int = 3,
    method: str = "krylov",
    chunk: int | None = None,
) -> Eig:
    """Top-`rank` eigenpairs of the `rows` or `cols` Gram of a stacked layer, never forming it.

    Each operator product is `sum_i X_i (X_i^T Q)` (rows) or `sum_i X_i^T (X_i Q)` (cols): every
    device applies its own models and a `psum` adds them up. Cost per product: `4 N m n l` flops.

    Args:
        x: `dtype[N_pad, m, n]` sharded over `models`.
        base: `dtype[m, n]` for `center='base'`.
        key: PRNG key (the same on every device, so all build the same sketch).
        mesh, n_models, center: as in `mode_grams`.
        mode: 'rows' or 'cols'.
        rank, oversample, iterations, method: as in `randomized_eigh`.
        chunk: models per device converted and centred at a time in each product
            (`kernels.model_chunks`); None: the whole shard, centred once.
    """
    if mode not in ("rows", "cols"):
        raise ValueError(f"mode must be 'rows' or 'cols', got {mode!r}")
    if base is None:
        base = jnp.zeros(x.shape[1:], x.dtype)
    dim = x.shape[1] if mode == "rows" else x.shape[2]

    def body(xb, cb, k):
        # xb: dtype[N/d, m, n]; cb: dtype[m, n]; k: replicated key
        if chunk is not None and chunk < xb.shape[0]:
            c = shard_centre(xb, cb, n_models=n_models, center=center, chunk=chunk)

            def matmat(q):
                def part(first, xs):
                    xc = centred_chunk(xs, c, first, xb.shape[0], n_models)
                    return mode_product(xc, q, mode=mode)

                return lax.psum(model_chunks(part, xb, chunk=chunk), MODELS)

        else:
            xc = centered_block(xb, cb, n_models=n_models, center=center)

            def matmat(q):
                return lax.psum(mode_product(xc, q, mode=mode), MODELS)

        return randomized_eigh(
            matmat,
            dim,
            rank=rank,
            key=k,
            oversample=oversample,
            iterations=iterations,
            method=method,
        )

    return jax.shard_map(
        body, mesh=mesh, in_specs=(P(MODELS), P(), P()), out_specs=P(), check_vma=False
    )(x, base, key)
