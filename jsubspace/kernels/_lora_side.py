"""Mode matrices of a large LoRA population in side space: memory that does not grow with `N^2`.

`kernels.lora_grams` works in factor space, with `(Nr) x (Nr)` cross-Grams: the right choice while
`Nr` is shorter than the sides. Past them (N > 256 adapters of rank 16 on 4096-wide modules) those
Grams grow as `N^2` and their eigenproblems as `N^3`, while the side-space matrices stay
`m x m` and `n x n`. Here model blocks of the stacks are visited in a loop, so besides the stored
factors only side-sized accumulators and one or two blocks are ever live:
  * rows: `sum_i X_i X_i^T = sum_j s_j^2 B_j (A_j A_j^T) B_j^T - N mu mu^T`, with the mean update
    `mu = (1/N) sum_j s_j B_j A_j` (`m x n`) accumulated in the same pass; `center='none'` drops
    the mean term;
  * cols: the same for the transposed updates `A_j^T B_j^T`;
  * models: `K0[j, k] = s_j s_k <B_j^T B_k, A_j A_k^T>` from pairs of model blocks (each pair
    once: the Gram is symmetric), passed around the device ring as `ring_cross_gram` does, and
    centred as `H K0 H`. The same pairs give `<A_j, A_k>` for the lineage control.
The rows / cols sums subtract the mean term after the products, the one-pass form that
`kernels.mode_grams` avoids for dense models: it cancels in float32 when the models sit close to
their mean. Such populations (`spectra` decides from the models Gram's two traces) are first
shifted by a rank-r update that centring removes again (`shift=True`); the tests hold both forms
to float64 on a population whose mean carries 4700x the centred energy.

Blocks are read from the stored stacks (`dtype[N_pad, ...]`, the real factors or the null's drawn
ones) and converted to float32 one block at a time. The loop over blocks runs on the host, one
jitted step per block with the accumulators donated: inside one jitted loop XLA hoists the
conversion of the whole stack out of the loop (measured: a float32 copy of every factor), which is
the memory this module exists to avoid. Each device works on its own models; the per-device
accumulators are added at the end. `side_block_terms` / `side_block_factors` hand a block's
terms to a host accumulation instead (`spectra._factored.side_matrix`, the CPU backend's route).

The factor statistic (`lora='factors'`, the PCA of the stacked A rows and B columns) has its side
form here too (`factor_covariance`), and `shifted_lora` gives the factor-space kernels the
shifted population as whole stacks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jsubspace.kernels._gram import HIGHEST
from jsubspace.kernels._gram import matmul
from jsubspace.kernels._lora import centering_matrix
from jsubspace.sharding._mesh import MODELS
from jsubspace.sharding._mesh import stacked_sharding

# Models per block: blocks of about this many factor rows keep every product a large GEMM.
BLOCK_ROWS = 512


class SideModels(NamedTuple):
    """The models mode of a LoRA population computed from pairs of model blocks.

    Attributes:
        models: `f32[N, N]`, the centred models Gram.
        uncentred: `f32[N, N]`, `<dW_i, dW_j>` before centring.
        a_gram: `f32[N, N]`, `<A_i, A_j>` of the unscaled A factors (lineage).
        total_energy: `f32[]`, the trace every mode shares.
    """

    models: jax.Array
    uncentred: jax.Array
    a_gram: jax.Array
    total_energy: jax.Array


def uses_side_space(*, n_pad: int, rank: int, m: int, n: int) -> bool:
    """Whether `Nr` exceeds both sides, so that side-space matrices are the smaller ones."""
    return n_pad * rank > max(m, n)


def side_block_models(n_local: int, rank: int) -> int:
    """Models per block for a device holding `n_local` of them."""
    return max(1, min(n_local, BLOCK_ROWS // max(rank, 1)))


def _starts(j, size: int, n_local: int):
    """Block j's first model and the weights of its models: blocks are `size` long, so the last
    one is moved back to end at `n_local`, and its models counted before get weight 0."""
    start = jnp.minimum(j * size, n_local - size)
    return start, (start + jnp.arange(size) >= j * size).astype(jnp.float32)


def _factors(stack, start, size: int, *, first, n_models: int, means=None, weight=None):
    """Block `start:start + size` of a device's stored stack `(a, b, scales)` whose first model
    is model `first` of the population, in float32: `(A [size, r, n], s B [size, m, r])`, zero
    for padding models; the rank-2r shifted factors when `means = (Abar, Bbar)` (see
    `side_mode_matrix`); `weight` multiplies each model's update."""
    a, b, s = (lax.dynamic_slice_in_dim(x, start, size, axis=0) for x in stack)
    keep = (first + start + jnp.arange(size) < n_models).astype(jnp.float32)
    if weight is not None:
        keep = keep * weight
    a, b = a.astype(jnp.float32), b.astype(jnp.float32) * (s * keep)[:, None, None]
    if means is None:
        return a, b
    a_bar, b_bar = means
    b = jnp.concatenate([b - b_bar * keep[:, None, None], b_bar * keep[:, None, None]], axis=2)
    return jnp.concatenate([a, a - a_bar], axis=1), b


def _first(n_local: int, owner=None):
    """The population index of the first model on device `owner` (this one by default)."""
    return (lax.axis_index(MODELS) if owner is None else owner) * n_local


def _local(x):
    """This device's slice of a `[d, ...]` per-device accumulator (inside shard_map)."""
    return x[0]


STACK = (P(MODELS), P(MODELS), P(MODELS))


@functools.partial(jax.jit, static_argnames=("mesh", "size", "n_models"), donate_argnums=(0, 1))
def _means_step(a_sum, b_sum, stack, j, *, mesh, size, n_models):
    def body(a_acc, b_acc, j, *local):
        n_local = local[0].shape[0]
        start, fresh = _starts(j, size, n_local)
        a_blk, b_blk = _factors(
            local, start, size, first=_first(n_local), n_models=n_models, weight=fresh
        )
        # A_j counts for every real model whatever its scale.
        keep = fresh * (_first(n_local) + start + jnp.arange(size) < n_models)
        return (
            (_local(a_acc) + jnp.einsum("i,irn->rn", keep, a_blk, precision=HIGHEST))[None],
            (_local(b_acc) + b_blk.sum(0))[None],
        )

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(MODELS), P(MODELS), P(), *STACK),
        out_specs=(P(MODELS),) * 2,
    )(a_sum, b_sum, j, *stack)


def _side_factors(local, means, j, *, size: int, n_models: int, mode: str):
    """Block j of this device as `(L [b, p, w], R [b, w, q])` with `X_i = L_i R_i` (the model
    for rows, its transpose for cols); models counted in an earlier block weigh zero."""
    n_local = local[0].shape[0]
    start, fresh = _starts(j, size, n_local)
    a_blk, b_blk = _factors(
        local, start, size, first=_first(n_local), n_models=n_models, means=means, weight=fresh
    )
    if mode == "rows":  # X_i = (s_i B_i) A_i
        return b_blk, a_blk
    return jnp.swapaxes(a_blk, 1, 2), jnp.swapaxes(b_blk, 1, 2)  # X_i^T = A_i^T (s_i B_i)^T


@functools.partial(
    jax.jit, static_argnames=("mesh", "size", "n_models", "mode"), donate_argnums=(0, 1)
)
def _side_step(acc, total, stack, means, j, *, mesh, size, n_models, mode):
    """Adds block j's terms of `sum_i L_i (R_i R_i^T) L_i^T` and `sum_i L_i R_i` to the
    per-device accumulators `acc [d, p, p]` and `total [d, p, q]`."""

    def body(acc, total, means, j, *local):
        lft, rgt = _side_factors(local, means, j, size=size, n_models=n_models, mode=mode)
        b, p, w = lft.shape
        inner = jnp.einsum("iaq,icq->iac", rgt, rgt, precision=HIGHEST)  # f32[b, w, w]
        y = jnp.einsum("ipa,iac->ipc", lft, inner, precision=HIGHEST)
        wide = jnp.swapaxes(lft, 0, 1).reshape(p, b * w)
        y = jnp.swapaxes(y, 0, 1).reshape(p, b * w)
        acc = _local(acc) + matmul(y, wide.T)
        total = _local(total) + matmul(wide, rgt.reshape(b * w, -1))
        return acc[None], total[None]

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(MODELS), P(MODELS), P(), P(), *STACK),
        out_specs=(P(MODELS), P(MODELS)),
    )(acc, total, means, j, *stack)


@functools.partial(jax.jit, static_argnames=("mesh", "size", "n_models", "mode", "root"))
def side_block_terms(stack, means, j, *, mesh, size: int, n_models: int, mode: str, root: bool):
    """Block j's terms of `sum_i L_i (R_i R_i^T) L_i^T`, for an accumulation outside XLA (host
    BLAS, which adds a product into its output in place, where XLA's CPU backend allocates the
    product apart).

    Returns `(F, L)`, each `[d, p, b w]` (per device): with `root`, `F F^T` is the block's sum
    (`F_i = L_i S_i`, `S_i S_i^T = R_i R_i^T` from a `w x w` eigendecomposition: a rank-k update,
    half the flops); without, `F = L (R R^T)` blockwise and the sum is `(F L^T + L F^T) / 2`.
    The shifted factors (`means`) need the latter: their `R_i` stacks rows of very different
    sizes, whose small eigen-directions a float32 root would not resolve.
    """

    def body(means, j, *local):
        lft, rgt = _side_factors(local, means, j, size=size, n_models=n_models, mode=mode)
        b, p, w = lft.shape
        inner = jnp.einsum("iaq,icq->iac", rgt, rgt, precision=HIGHEST)  # f32[b, w, w]
        if root:
            values, vectors = jnp.linalg.eigh(inner)
            inner = vectors * jnp.sqrt(jnp.clip(values, 0.0))[:, None, :]
        f = jnp.einsum("ipa,iac->pic", lft, inner, precision=HIGHEST).reshape(p, b * w)
        return f[None], jnp.swapaxes(lft, 0, 1).reshape(p, b * w)[None]

    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), *STACK), out_specs=(P(MODELS),) * 2)(
        means, j, *stack
    )


@functools.partial(jax.jit, static_argnames=("mesh", "size", "n_models", "mode"))
def side_block_factors(stack, means, j, *, mesh, size: int, n_models: int, mode: str):
    """Block j as `(L [d, p, b w], R [d, b w, q])` per device, `L R = sum_i L_i R_i` (the sum of
    the block's updates, or of their transposes for cols)."""

    def body(means, j, *local):
        lft, rgt = _side_factors(local, means, j, size=size, n_models=n_models, mode=mode)
        b, p, w = lft.shape
        return jnp.swapaxes(lft, 0, 1).reshape(p, b * w)[None], rgt.reshape(b * w, -1)[None]

    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), *STACK), out_specs=(P(MODELS),) * 2)(
        means, j, *stack
    )


@functools.partial(jax.jit, static_argnames=("n_models", "center"), donate_argnums=(0,))
def _side_finish(acc, total, *, n_models: int, center: str):
    acc = acc[0] if acc.shape[0] == 1 else jnp.sum(acc, axis=0)
    if center == "mean":
        total = total[0] if total.shape[0] == 1 else jnp.sum(total, axis=0)
        acc = acc - matmul(total, total.T) / n_models
    return (acc + acc.T) / 2


def _per_device(mesh, *shape):
    d = mesh.devices.size
    return jax.device_put(jnp.zeros((d, *shape), jnp.float32), stacked_sharding(mesh))


def side_means(stack, *, mesh, n_models: int):
    """`(Abar, Bbar)`: the means of `A_j` and `s_j B_j` over the real models (replicated)."""
    n_local = stack[0].shape[0] // mesh.devices.size
    r, n = stack[0].shape[1:]
    m = stack[1].shape[1]
    size = side_block_models(n_local, r)
    a_sum, b_sum = _per_device(mesh, r, n), _per_device(mesh, m, r)
    for j in range(-(-n_local // size)):
        a_sum, b_sum = _means_step(
            a_sum, b_sum, stack, jnp.int32(j), mesh=mesh, size=size, n_models=n_models
        )
    replicated = NamedSharding(mesh, P())
    return tuple(jax.device_put(jnp.sum(x, axis=0) / n_models, replicated) for x in (a_sum, b_sum))


def side_mode_matrix(
    a: jax.Array,
    b: jax.Array,
    scales: jax.Array,
    *,
    mesh: Mesh,
    n_models: int,
    center: str,
    mode: str,
    shift: bool = False,
) -> jax.Array:
    """`f32[p, p]`: the rows (`p = m`) or cols (`p = n`) matrix `sum_i X_i X_i^T` itself.

    Args:
        a: `dtype[N_pad, r, n]` sharded over `models`.
        b: `dtype[N_pad, m, r]` sharded over `models`.
        scales: `f32[N_pad]` sharded over `models`, zero for padding models.
        mesh: the mesh.
        n_models: the true N.
        center: 'mean', 'none' or 'base' (the latter two: no centring, as in `lora_grams`).
        mode: 'rows' or 'cols'.
        shift: for 'mean' populations that sit close to their mean (the mean term subtracted after
            the products would cancel most of the sum in float32): first subtract the rank-r
            update `Bbar Abar` (`Bbar` the mean of `s_j B_j`, `Abar` of `A_j`), which centring
            removes again, from every model. `s_j B_j A_j - Bbar Abar` has the rank-2r factors
            `[s_j B_j - Bbar, Bbar] [A_j; A_j - Abar]` and a mean that is small (second order in
            the spread of the factors); the products cost twice as much.
    """
    if mode not in ("rows", "cols"):
        raise ValueError(f"mode must be 'rows' or 'cols', got {mode!r}")
    if center not in ("mean", "none", "base"):
        raise ValueError(f"center must be 'mean', 'none' or 'base', got {center!r}")
    stack = (a, b, scales)
    means = side_means(stack, mesh=mesh, n_models=n_models) if shift and center == "mean" else None
    n_local = a.shape[0] // mesh.devices.size
    m, n = b.shape[1], a.shape[2]
    p, q = (m, n) if mode == "rows" else (n, m)
    size = side_block_models(n_local, a.shape[1])
    acc, total = _per_device(mesh, p, p), _per_device(mesh, p, q)
    for j in range(-(-n_local // size)):
        acc, total = _side_step(
            acc,
            total,
            stack,
            means,
            jnp.int32(j),
            mesh=mesh,
            size=size,
            n_models=n_models,
            mode=mode,
        )
    return _side_finish(acc, total, n_models=n_models, center=center)


@functools.partial(
    jax.jit,
    static_argnames=("mesh", "size", "n_models", "symmetric"),
    donate_argnums=(0, 1),
)
def _pair_step(k0, a_gram, mine, theirs, means, step, j, k, *, mesh, size, n_models, symmetric):
    """Writes `s_i s_l <B_i^T B_l, A_i A_l^T>` and `<A_i, A_l>` for this device's block j and
    block k of `theirs`, the shard that started on device `(me - step) mod d`, into this
    device's rows `k0 [N/d, N_pad]`, `a_gram` (and their mirror images when `symmetric`)."""
    d = mesh.devices.size

    def body(k0, a_gram, means, step, j, k, *stacks):
        mine, theirs = stacks[:3], stacks[3:]
        n_local = mine[0].shape[0]
        me = lax.axis_index(MODELS)
        owner = (me - step) % d
        sj, _ = _starts(j, size, n_local)
        sk, _ = _starts(k, size, n_local)
        col = owner * n_local
        aj, bj = _factors(mine, sj, size, first=_first(n_local), n_models=n_models, means=means)
        ak, bk = _factors(
            theirs, sk, size, first=_first(n_local, owner), n_models=n_models, means=means
        )
        w = aj.shape[1]
        ga = matmul(aj.reshape(size * w, -1), ak.reshape(size * w, -1).T)
        gb = matmul(
            jnp.swapaxes(bj, 1, 2).reshape(size * w, -1),
            jnp.swapaxes(bk, 1, 2).reshape(size * w, -1).T,
        )
        ga, gb = ga.reshape(size, w, size, w), gb.reshape(size, w, size, w)
        # Blocks that overlap (the last one is moved back) write the same values twice.
        t = jnp.einsum("iakc,iakc->ik", ga, gb, precision=HIGHEST)
        tr = jnp.einsum("iaka->ik", ga)
        k0 = lax.dynamic_update_slice(k0, t, (sj, col + sk))
        a_gram = lax.dynamic_update_slice(a_gram, tr, (sj, col + sk))
        if symmetric:
            k0 = lax.dynamic_update_slice(k0, t.T, (sk, col + sj))
            a_gram = lax.dynamic_update_slice(a_gram, tr.T, (sk, col + sj))
        return k0, a_gram

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(MODELS), P(MODELS), P(), P(), P(), P(), *STACK, *STACK),
        out_specs=(P(MODELS), P(MODELS)),
    )(k0, a_gram, means, step, j, k, *mine, *theirs)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _pass_on(stack, *, mesh):
    """Each device's shard to the next device of the ring."""
    d = mesh.devices.size
    perm = [(i, (i + 1) % d) for i in range(d)]
    return jax.shard_map(
        lambda *xs: tuple(lax.ppermute(x, MODELS, perm) for x in xs),
        mesh=mesh,
        in_specs=STACK,
        out_specs=STACK,
    )(*stack)


@functools.partial(jax.jit, static_argnames=("n_models", "center"))
def _models_finish(k0, a_gram, *, n_models: int, center: str) -> SideModels:
    h = centering_matrix(k0.shape[0], n_models, center)
    models = matmul(matmul(h, k0), h.T)[:n_models, :n_models]
    return SideModels(
        models, k0[:n_models, :n_models], a_gram[:n_models, :n_models], jnp.trace(models)
    )


def side_models(
    a: jax.Array,
    b: jax.Array,
    scales: jax.Array,
    *,
    mesh: Mesh,
    n_models: int,
    center: str,
    shift: bool = False,
) -> SideModels:
    """The models mode from pairs of model blocks (arguments as in `side_mode_matrix`; with
    `shift`, `uncentred` and `a_gram` are those of the shifted models and factors, and only
    `models` and `total_energy` mean what they say).

    Each device keeps its rows of the `N x N` Gram and passes its stored factors around a ring
    (`ppermute`), so no device holds more than two shards of the stacks.
    """
    if center not in ("mean", "none", "base"):
        raise ValueError(f"center must be 'mean', 'none' or 'base', got {center!r}")
    d = mesh.devices.size
    n_pad = a.shape[0]
    n_local = n_pad // d
    stack = (a, b, scales)
    means = side_means(stack, mesh=mesh, n_models=n_models) if shift and center == "mean" else None
    size = side_block_models(n_local, a.shape[1])
    blocks = -(-n_local // size)
    sharded = stacked_sharding(mesh)
    k0 = jax.device_put(jnp.zeros((n_pad, n_pad), jnp.float32), sharded)
    a_gram = jax.device_put(jnp.zeros((n_pad, n_pad), jnp.float32), sharded)
    theirs = stack
    for step in range(d):
        for j in range(blocks):
            for k in range(j if step == 0 else 0, blocks):
                k0, a_gram = _pair_step(
                    k0,
                    a_gram,
                    stack,
                    theirs,
                    means,
                    jnp.int32(step),
                    jnp.int32(j),
                    jnp.int32(k),
                    mesh=mesh,
                    size=size,
                    n_models=n_models,
                    symmetric=step == 0,
                )
        if step + 1 < d:
            theirs = _pass_on(theirs, mesh=mesh)
    return _models_finish(k0, a_gram, n_models=n_models, center=center)


# --- The factor statistic (`lora='factors'`) in side space -------------------------------------
#
# The paper's statistic is the PCA of the stacked A rows (samples in `n` dimensions) and of the
# stacked B columns (in `m` dimensions), each centred on the mean of its real samples. Its
# factor-space form is the `Nr x Nr` Gram of the samples; past the sides, the `n x n` / `m x m`
# covariance is the smaller one, with the same nonzero eigenvalues. The mean is taken first, so
# each block's samples are centred before their products: no mean term cancels afterwards.

FACTORS = ("A", "B")


def _factor_samples(local, mask, mean, j, *, size: int, factor: str):
    """Block j of this device's samples of `factor`, centred on `mean` and weighted by `mask`
    (zero for rank slots a model lacks, padding models, and models counted in an earlier
    block): `f32[p, size * r]`."""
    a, b = local
    n_local, r = mask.shape
    start, fresh = _starts(j, size, n_local)
    x = lax.dynamic_slice_in_dim(a if factor == "A" else b, start, size, axis=0)
    w = lax.dynamic_slice_in_dim(mask, start, size, axis=0) * fresh[:, None]
    x = jnp.swapaxes(x, 1, 2) if factor == "A" else x  # [size, p, r]: samples are columns
    x = (x.astype(jnp.float32) - mean[None, :, None]) * w[:, None, :]
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[1], size * r)


def _check_factor(factor: str) -> None:
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")


@functools.partial(jax.jit, static_argnames=("mesh", "factor"))
def factor_mean(a: jax.Array, b: jax.Array, mask: jax.Array, *, mesh: Mesh, factor: str):
    """`f32[p]`: the mean of the real samples of `factor` (A rows, `p = n`; B columns, `p = m`),
    replicated. `mask` is `f32[N_pad, r]` (1 for rank slots that exist), sharded like the stacks.
    An elementwise reduction, which XLA fuses with the conversion of the stored dtype."""
    _check_factor(factor)

    def body(a, b, mask):
        if factor == "A":
            total = jnp.sum(a.astype(jnp.float32) * mask[:, :, None], axis=(0, 1))
        else:
            total = jnp.sum(b.astype(jnp.float32) * mask[:, None, :], axis=(0, 2))
        return lax.psum(total, MODELS) / lax.psum(jnp.sum(mask), MODELS)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(MODELS),) * 3, out_specs=P())(a, b, mask)


@functools.partial(jax.jit, static_argnames=("mesh", "size", "factor"))
def factor_block_samples(a, b, mask, mean, j, *, mesh, size: int, factor: str):
    """Block j's centred samples of `factor` per device, `f32[d, p, size * r]`, for an
    accumulation outside XLA (`spectra._factored.factor_covariance_matrix`)."""

    def body(mean, j, a, b, mask):
        return _factor_samples((a, b), mask, mean, j, size=size, factor=factor)[None]

    return jax.shard_map(
        body, mesh=mesh, in_specs=(P(), P(), *(P(MODELS),) * 3), out_specs=P(MODELS)
    )(mean, j, a, b, mask)


@functools.partial(jax.jit, static_argnames=("mesh", "size", "factor"), donate_argnums=(0,))
def _covariance_step(acc, a, b, mask, mean, j, *, mesh, size: int, factor: str):
    def body(acc, mean, j, a, b, mask):
        x = _factor_samples((a, b), mask, mean, j, size=size, factor=factor)
        return (_local(acc) + matmul(x, x.T))[None]

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(MODELS), P(), P(), *(P(MODELS),) * 3),
        out_specs=P(MODELS),
    )(acc, mean, j, a, b, mask)


@jax.jit
def _covariance_finish(acc):
    acc = jnp.sum(acc, axis=0)
    return (acc + acc.T) / 2


def factor_covariance(
    a: jax.Array, b: jax.Array, mask: jax.Array, *, mesh: Mesh, factor: str
) -> jax.Array:
    """`f32[p, p]`: the centred covariance (unnormalised) of the samples of `factor`.

    Args:
        a: `dtype[N_pad, r, n]`, b: `dtype[N_pad, m, r]`, sharded over `models`.
        mask: `f32[N_pad, r]` sharded over `models`: 1 for the rank slots that exist.
        mesh: the mesh.
        factor: 'A' (the rows of every `A_i`, `p = n`) or 'B' (the columns of every `B_i`,
            `p = m`); unscaled, as the paper's statistic takes them.

    Returns:
        `sum_s (x_s - xbar)(x_s - xbar)^T` over the real samples `x_s`: its nonzero eigenvalues
        are those of the centred `Nr x Nr` sample Gram.
    """
    _check_factor(factor)
    mean = factor_mean(a, b, mask, mesh=mesh, factor=factor)
    n_local, r = a.shape[0] // mesh.devices.size, a.shape[1]
    p = a.shape[2] if factor == "A" else b.shape[1]
    size = side_block_models(n_local, r)
    acc = _per_device(mesh, p, p)
    for j in range(-(-n_local // size)):
        acc = _covariance_step(
            acc, a, b, mask, mean, jnp.int32(j), mesh=mesh, size=size, factor=factor
        )
    return _covariance_finish(acc)


@functools.partial(jax.jit, static_argnames=("mesh", "n_models", "split"))
def _shifted(stack, means, *, mesh, n_models: int, split: str):
    def body(means, *local):
        n_local = local[0].shape[0]
        first = _first(n_local)
        if split == "rows":
            a, b = _factors(local, 0, n_local, first=first, n_models=n_models, means=means)
        else:
            a, b = _factors(local, 0, n_local, first=first, n_models=n_models)
            keep = (first + jnp.arange(n_local) < n_models).astype(jnp.float32)[:, None, None]
            a_bar, b_bar = means
            a = jnp.concatenate([a - a_bar, jnp.broadcast_to(a_bar, a.shape)], axis=1) * keep
            b = jnp.concatenate([b, b - b_bar * keep], axis=2)
        keep = (first + jnp.arange(n_local) < n_models).astype(jnp.float32)
        return a, b, keep

    return jax.shard_map(body, mesh=mesh, in_specs=(P(), *STACK), out_specs=STACK)(means, *stack)


def shifted_lora(
    a: jax.Array,
    b: jax.Array,
    scales: jax.Array,
    *,
    mesh: Mesh,
    n_models: int,
    split: str,
    means=None,
):
    """The population shifted by `Bbar Abar` (see `side_mode_matrix`) as whole float32 stacks of
    rank 2r, for the factor-space kernels: `(a' f32[N_pad, 2r, n], b' f32[N_pad, m, 2r],
    scales' f32[N_pad])` with `scales'_i b'_i a'_i = s_i B_i A_i - Bbar Abar` (scales' is 1 for
    real models, 0 for padding). Its mean-centred spectra are those of the population.

    The factor route takes a root of one factor's Gram (`B'` for rows, `A'` for cols), which is
    accurate when that factor's columns (rows) are either small and distinct or exact repeats,
    not large and nearly parallel. So `split='rows'` gives `B'_j = [s_j B_j - Bbar, Bbar]`,
    `A'_j = [A_j; A_j - Abar]`, and `split='cols'` gives `B'_j = [s_j B_j, s_j B_j - Bbar]`,
    `A'_j = [A_j - Abar; Abar]`. `means` is `side_means` of the population, if already taken.
    """
    if split not in ("rows", "cols"):
        raise ValueError(f"split must be 'rows' or 'cols', got {split!r}")
    stack = (a, b, scales)
    if means is None:
        means = side_means(stack, mesh=mesh, n_models=n_models)
    return _shifted(stack, means, mesh=mesh, n_models=n_models, split=split)
