"""Randomized top-k spectra of a LoRA population through its factors: no Gram, no side matrix.

The randomized solver (`randomized_eigh`) needs the operator only as a product `Y = S Q`. For the
`rows` mode of centred updates `X_i = s_i B_i A_i - M` (`M` their mean) that product is

  `S Q = sum_i X_i X_i^T Q = sum_i s_i B_i (s_i G_i P_i - A_i Zbar)`,

with `P_i = B_i^T Q` (`r x l`), `G_i = A_i A_i^T` (`r x r`) and `Zbar = M^T Q = (1/N) sum_j s_j
A_j^T P_j` (`n x l`, one `psum`): the mean term drops out of the outer sum because the centred
`X_i^T Q` add up to zero. `cols` exchanges the roles of `A^T` and `B`. A product costs
`4 N r (m + n) l` flops as four large GEMMs over the stacked factors, and the working set is the
float32 factors plus a few `side x l` blocks: no `(Nr)^2` matrix (factor space) and no `side^2`
one (side space) is formed, which is what makes it the route for very wide sides and very many
adapters when the top eigenvalues are what is wanted.

The factor statistic (the paper's PCA of the stacked A rows / B columns) is the covariance of the
samples centred on their mean, applied as `Xc^T (Xc Q)` over the centred samples.

Populations close to their mean are passed through `shifted_lora` first by the caller (as the
exact routes are), so the centred products do not cancel in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jsubspace.kernels._gram import HIGHEST
from jsubspace.kernels._gram import matmul
from jsubspace.kernels._gram import t_matmul
from jsubspace.kernels._lora_side import _check_factor
from jsubspace.kernels._lora_side import factor_mean
from jsubspace.kernels._rsvd import Eig
from jsubspace.kernels._rsvd import randomized_eigh
from jsubspace.sharding._mesh import MODELS


def _einsum(spec, x, y):
    return jnp.einsum(spec, x, y, precision=HIGHEST)


def randomized_lora_eigh(
    a: jax.Array,
    b: jax.Array,
    scales: jax.Array,
    key: jax.Array,
    *,
    mesh: Mesh,
    n_models: int,
    mode: str,
    rank: int,
    center: str = "mean",
    oversample: int = 10,
    iterations: int = 4,
) -> Eig:
    """Top-`rank` eigenpairs of the `rows` or `cols` matrix of the updates `s_i B_i A_i`.

    Args:
        a: `dtype[N_pad, r, n]`, b: `dtype[N_pad, m, r]`, scales: `f32[N_pad]` (zero for
            padding models), sharded over `models`.
        key: PRNG key (replicated: every device builds the same sketch).
        mesh, n_models: the mesh and the true N.
        mode: 'rows' (`sum_i X_i X_i^T`, side m) or 'cols' (`sum_i X_i^T X_i`, side n).
        rank, oversample, iterations: as in `randomized_eigh` (block Krylov).
        center: 'mean' subtracts the mean update; 'none' / 'base' take the updates as they are.

    Returns:
        Eig (values descending, vectors `f32[side, rank]`, the solver's residuals).
    """
    if mode not in ("rows", "cols"):
        raise ValueError(f"mode must be 'rows' or 'cols', got {mode!r}")
    # The r x r Grams of the other factor in a jitted call of their own: in the solver's, XLA
    # would convert that factor to float32 a second time for them.
    own = _own_grams(a, b, mesh=mesh, factor="A" if mode == "rows" else "B")
    return _lora_eigh(
        a,
        b,
        scales,
        own,
        key,
        mesh=mesh,
        n_models=n_models,
        mode=mode,
        rank=rank,
        center=center,
        oversample=oversample,
        iterations=iterations,
    )


@functools.partial(jax.jit, static_argnames=("mesh", "factor"))
def _own_grams(a, b, *, mesh, factor):
    """`f32[N_pad, r, r]`: `A_i A_i^T` or `B_i^T B_i` per model, sharded over `models`."""

    def body(a, b):
        if factor == "A":
            x = a.astype(jnp.float32)
            return _einsum("irn,isn->irs", x, x)
        x = b.astype(jnp.float32)
        return _einsum("imr,ims->irs", x, x)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(MODELS),) * 2, out_specs=P(MODELS))(a, b)


@functools.partial(
    jax.jit,
    static_argnames=("mesh", "n_models", "mode", "rank", "center", "oversample", "iterations"),
)
def _lora_eigh(
    a, b, scales, own, key, *, mesh, n_models, mode, rank, center, oversample, iterations
):
    side = b.shape[1] if mode == "rows" else a.shape[2]

    def body(k, a, b, s, own):
        n_local, r = a.shape[:2]
        # Each factor as one float32 `[N r, side]` matrix (B transposed once): every product
        # below is then a plain 2-D GEMM, which XLA runs without copying its operands.
        xa = a.astype(jnp.float32).reshape(n_local * r, -1)
        xb = jnp.swapaxes(b, 1, 2).astype(jnp.float32).reshape(n_local * r, -1)
        # X_i = s_i L_i^T R_i - M with L the factor along the mode's side, R the other one, and
        # own_i = R_i R_i^T.
        left, right = (xb, xa) if mode == "rows" else (xa, xb)
        weight = jnp.repeat(s, r)[:, None]

        def matmat(q):
            p = matmul(left, q)  # [N r, l]: L_i q per model
            u = _einsum("irs,isl->irl", own, p.reshape(n_local, r, -1)).reshape(p.shape) * weight
            if center == "mean":
                zbar = lax.psum(t_matmul(right, p * weight), MODELS) / n_models  # M^T q
                u = u - matmul(right, zbar)
            return lax.psum(t_matmul(left, u * weight), MODELS)

        return randomized_eigh(
            matmat, side, rank=rank, key=k, oversample=oversample, iterations=iterations
        )

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), *(P(MODELS),) * 4),
        out_specs=P(),
        check_vma=False,
    )(key, a, b, scales, own)


def randomized_factor_pca(
    a: jax.Array,
    b: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    *,
    mesh: Mesh,
    factor: str,
    rank: int,
    oversample: int = 10,
    iterations: int = 4,
) -> tuple[Eig, jax.Array]:
    """Top-`rank` eigenpairs of the centred covariance of one factor's samples, and its trace.

    The operator is `kernels.factor_covariance` (A rows, side n; B columns, side m; unscaled,
    `mask` `f32[N_pad, r]` marking the rank slots that exist) without forming it.

    Returns:
        `(Eig, trace f32[])`: the trace is exact, the total variance of the samples.
    """
    _check_factor(factor)
    # The mean in a jitted call of its own: in the solver's, XLA would keep a float32 copy of the
    # whole stack for the reduction beside the centred one.
    mean = factor_mean(a, b, mask, mesh=mesh, factor=factor)
    return _factor_pca(
        a,
        b,
        mask,
        mean,
        key,
        mesh=mesh,
        factor=factor,
        rank=rank,
        oversample=oversample,
        iterations=iterations,
    )


@functools.partial(jax.jit, static_argnames=("mesh", "factor", "rank", "oversample", "iterations"))
def _factor_pca(a, b, mask, mean, key, *, mesh, factor, rank, oversample, iterations):
    side = a.shape[2] if factor == "A" else b.shape[1]

    def body(mean, k, a, b, mask):
        x = a if factor == "A" else jnp.swapaxes(b, 1, 2)  # [N/d, r, side]: samples are rows
        x = ((x.astype(jnp.float32) - mean) * mask[:, :, None]).reshape(-1, side)
        trace = lax.psum(jnp.sum(x * x), MODELS)

        def matmat(q):
            return lax.psum(t_matmul(x, matmul(x, q)), MODELS)

        eig = randomized_eigh(
            matmat, side, rank=rank, key=k, oversample=oversample, iterations=iterations
        )
        return eig, trace

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(), *(P(MODELS),) * 3),
        out_specs=P(),
        check_vma=False,
    )(mean, key, a, b, mask)
