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
from jsubspace.kernels._lora_side import _check_factor
from jsubspace.kernels._lora_side import factor_mean
from jsubspace.kernels._rsvd import Eig
from jsubspace.kernels._rsvd import randomized_eigh
from jsubspace.sharding._mesh import MODELS


def _einsum(spec, x, y):
    return jnp.einsum(spec, x, y, precision=HIGHEST)


@functools.partial(
    jax.jit,
    static_argnames=("mesh", "n_models", "mode", "rank", "center", "oversample", "iterations"),
)
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
    side = b.shape[1] if mode == "rows" else a.shape[2]

    def body(k, a, b, s):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        # X_i = s_i L_i R_i - M: L_i is [side, r], R_i is [r, other side].
        left, right = (b, a) if mode == "rows" else (jnp.swapaxes(a, 1, 2), jnp.swapaxes(b, 1, 2))
        own = _einsum("irn,isn->irs", right, right)
        weight = s[:, None, None]

        def matmat(q):
            p = _einsum("imr,ml->irl", left, q)
            u = _einsum("irs,isl->irl", own, p) * weight
            if center == "mean":
                zbar = lax.psum(_einsum("irn,irl->nl", right, p * weight), MODELS) / n_models
                u = u - _einsum("irn,nl->irl", right, zbar)
            return lax.psum(_einsum("imr,irl->ml", left, u * weight), MODELS)

        return randomized_eigh(
            matmat, side, rank=rank, key=k, oversample=oversample, iterations=iterations
        )

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(MODELS), P(MODELS), P(MODELS)),
        out_specs=P(),
        check_vma=False,
    )(key, a, b, scales)


@functools.partial(jax.jit, static_argnames=("mesh", "factor", "rank", "oversample", "iterations"))
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
    mean = factor_mean(a, b, mask, mesh=mesh, factor=factor)
    side = a.shape[2] if factor == "A" else b.shape[1]

    def body(mean, k, a, b, mask):
        x = a if factor == "A" else jnp.swapaxes(b, 1, 2)  # [N/d, r, side]: samples are rows
        x = (x.astype(jnp.float32) - mean) * mask[:, :, None]
        trace = lax.psum(jnp.sum(x * x), MODELS)

        def matmat(q):
            return lax.psum(_einsum("irp,irl->pl", x, _einsum("irp,pl->irl", x, q)), MODELS)

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
