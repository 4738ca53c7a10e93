"""Mode Gram matrices of a stacked layer, sharded over the `models` mesh axis.

For `X: [N, m, n]` (models split over devices) and centred `X_i = W_i - c`:
  * `models`: `K[i, j] = <X_i, X_j>_F`           (N x N)
  * `rows`:   `sum_i X_i X_i^T`                   (m x m)
  * `cols`:   `sum_i X_i^T X_i`                   (n x n)
All three share the trace `E = sum_i ||X_i||_F^2`.

Math runs in float32 at `precision=HIGHEST` with float32 accumulation, whatever the stored dtype.
The centre is subtracted before any product (never `S2 - N mu mu^T`): populations of fine-tuned
models sit close to their mean, and the one-pass form cancels catastrophically in float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jsubspace.sharding._mesh import MODELS

HIGHEST = lax.Precision.HIGHEST
CENTERS = ("mean", "none", "base")


def matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    """`x @ y` in float32 at `HIGHEST`: the default precision is TF32 on GPUs and bfloat16
    passes on TPUs (every product the engine compiles asks for HIGHEST;
    tests/kernels/test_precision.py checks it)."""
    return jnp.matmul(x, y, precision=HIGHEST)


class ModeGrams(NamedTuple):
    """Gram matrices of the three modes (None where not asked for) and the total energy.

    Attributes:
        models: `f32[N, N]` (padding models removed).
        rows: `f32[m, m]`.
        cols: `f32[n, n]`.
        total_energy: `f32[]`, `sum_i ||X_i||_F^2`.
    """

    models: jax.Array | None
    rows: jax.Array | None
    cols: jax.Array | None
    total_energy: jax.Array


def model_mask(n_local: int, n_models: int) -> jax.Array:
    """`f32[n_local]`: 1 for this shard's real models, 0 for padding (inside shard_map)."""
    first = lax.axis_index(MODELS) * n_local
    return (first + jnp.arange(n_local) < n_models).astype(jnp.float32)


def centered_block(
    x: jax.Array, base: jax.Array | None, *, n_models: int, center: str
) -> jax.Array:
    """Centres this shard's models (inside shard_map over `models`).

    Args:
        x: `dtype[N/d, m, n]`, this shard's models.
        base: `dtype[m, n]` replicated, for `center='base'`.
        n_models: the true N (rows past it are padding).
        center: 'mean', 'none' or 'base'.

    Returns:
        `f32[N/d, m, n]`, centred, padding rows zero.

    Padding rows of a stack are zero (placement and the null draws write them so), so the sum
    over the shard needs no mask and the centre is subtracted as `x - mask c`: one fused
    elementwise pass, and the only `f32[N/d, m, n]` temporary XLA allocates (`(x - c) * mask`
    allocated three on the CPU backend, 1.1 GB beside a 375 MB vocabulary-embedding stack).
    """
    c = shard_centre(x, base, n_models=n_models, center=center)
    if center == "none":
        return x.astype(jnp.float32)
    return centred_chunk(x, c, 0, x.shape[0], n_models)


def shard_centre(
    x: jax.Array, base, *, n_models: int, center: str, chunk: int | None = None
) -> jax.Array:
    """`f32[m, n]`, the centre `centered_block` subtracts (inside shard_map; zeros for 'none'),
    the mean summed `chunk` models at a time (`model_chunks`)."""
    if center not in CENTERS:
        raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
    if center == "mean":
        total = model_chunks(lambda _, xs: models_sum(xs), x, chunk=chunk)
        return lax.psum(total, MODELS) / n_models
    if center == "base":
        return base.astype(jnp.float32)
    return jnp.zeros(x.shape[1:], jnp.float32)


def models_sum(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """`f32[m, n]`: `sum_i w_i x_i` over the leading (models) axis of `x dtype[b, m, n]`, each
    model converted to float32 and added in turn (`weights f32[b]`, default 1).

    XLA's CPU reduction over the leading axis of a stack runs far below the memory's speed
    (64 bfloat16 models of 768 x 3072: 0.83 s as `jnp.sum(x.astype(f32), 0)`, 0.19 s added one
    at a time), and the layer's mean is taken by every part of an analysis."""

    def term(i):
        xi = lax.dynamic_index_in_dim(x, i, keepdims=False).astype(jnp.float32)
        return xi if weights is None else weights[i] * xi

    # The first term starts the sum (inside shard_map it carries the stack's varying type).
    return lax.fori_loop(1, x.shape[0], lambda i, acc: acc + term(i), term(0))


def centred_chunk(xs: jax.Array, c: jax.Array, first, n_local: int, n_models: int) -> jax.Array:
    """`f32[chunk, m, n]`: the models `first ..` of this shard (`xs`, of `n_local`) less the
    centre `c`, padding models left at zero (inside shard_map)."""
    start = lax.axis_index(MODELS) * n_local + first
    mask = (start + jnp.arange(xs.shape[0]) < n_models).astype(jnp.float32)
    return xs.astype(jnp.float32) - mask[:, None, None] * c


CHUNKED_COMPILE = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
"""XLA options of the chunked route's kernels. XLA's CPU backend computes a dynamic slice of a
16-bit float stack as a slice of the stack converted to float32, and, in a loop, hoists that
conversion out: a float32 copy of the whole stack, the one the chunks exist to avoid. Without
loop-invariant code motion the conversion stays fused with the slice (only the chunk is read)."""


def chunkable_jit(fn=None, *, static_argnames=(), flag: str = "chunk"):
    """`jax.jit`, compiled with `CHUNKED_COMPILE` when called with a true `flag` keyword. Called
    inside another jit (traced arguments), it is the plain one: compiler options belong to the
    outermost compilation, which must then be a chunkable one itself."""
    if fn is None:
        return functools.partial(chunkable_jit, static_argnames=static_argnames, flag=flag)
    plain = jax.jit(fn, static_argnames=static_argnames)
    chunked = jax.jit(fn, static_argnames=static_argnames, compiler_options=CHUNKED_COMPILE)

    def pick(args, kwargs):
        nested = any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((args, kwargs)))
        return chunked if kwargs.get(flag) and not nested else plain

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return pick(args, kwargs)(*args, **kwargs)

    call.lower = lambda *args, **kwargs: pick(args, kwargs).lower(*args, **kwargs)
    call._cache_size = lambda: plain._cache_size() + chunked._cache_size()
    call._clear_cache = lambda: (plain._clear_cache(), chunked._clear_cache())
    return call


def model_chunks(fn, x: jax.Array, *rest: jax.Array, chunk: int | None):
    """Inside shard_map: `sum_j fn(first_j, x[first_j : first_j + chunk], *rest sliced alike)`
    over consecutive chunks of `chunk` of this shard's models; a single `fn(0, x, *rest)` when
    `chunk` is None or covers the shard.

    The chunked layers' route (`spectra.LayerPlan.chunk`): a float32 copy of `chunk` models per
    device at a time, never of the whole stack, for layers whose float32 stack would not fit
    (in kernels compiled by `chunkable_jit`).
    """
    b = x.shape[0]
    if chunk is None or chunk >= b:
        return fn(0, x, *rest)
    # Equal chunks: the largest divisor of the shard's size up to `chunk`.
    chunk = max(c for c in range(1, chunk + 1) if b % c == 0)

    def part(j):
        first = j * chunk
        return fn(first, *(lax.dynamic_slice_in_dim(a, first, chunk, 0) for a in (x, *rest)))

    # The first chunk starts the sum (inside shard_map it carries the stack's varying type).
    return lax.fori_loop(1, b // chunk, lambda j, acc: jax.tree.map(jnp.add, acc, part(j)), part(0))


def model_chunk_map(fn, x: jax.Array, *rest: jax.Array, chunk: int | None):
    """Inside shard_map: `fn(first_j, x[first_j : first_j + chunk], *rest sliced alike)` over
    consecutive chunks of this shard's models, its per-model outputs (each leaf's leading axis
    of `chunk`) put back in model order; a single `fn(0, x, *rest)` when `chunk` is None or
    covers the shard. `model_chunks` for outputs that are per model, not summed."""
    b = x.shape[0]
    if chunk is None or chunk >= b:
        return fn(0, x, *rest)
    chunk = max(c for c in range(1, chunk + 1) if b % c == 0)

    def part(j):
        first = j * chunk
        return fn(first, *(lax.dynamic_slice_in_dim(a, first, chunk, 0) for a in (x, *rest)))

    out = lax.map(part, jnp.arange(b // chunk))
    return jax.tree.map(lambda a: a.reshape(b, *a.shape[2:]), out)


def sliced_models_gram(x: jax.Array, c: jax.Array, *, n_models: int, chunk: int, d: int):
    """Inside shard_map: this shard's rows of the models Gram of `x - c` (`f32[N/d, N_pad]`),
    summed over slices of the rows holding as many entries as `chunk` models, each slice
    converted and centred on its own: the chunked route's models Gram, which pairs every model
    with every other and so is not a sum over chunks of models."""
    gram = sliced_cross_gram(x, c, n_models=n_models, chunk=chunk, d=d, axis=1, flat=True)
    return gram[:, 0, :, 0]


def sliced_cross_gram(
    x: jax.Array, c: jax.Array, *, n_models: int, chunk: int, d: int, axis: int, flat=False
) -> jax.Array:
    """Inside shard_map: this shard's rows `f32[N/d, q, N_pad, q]` of the cross-Gram of the
    models `x - c` contracted over `axis` (1: the rows, q = n; 2: the columns, q = m), summed
    over slices of that axis holding as many entries as `chunk` models, each slice converted
    and centred on its own (`flat`: contracted over every entry, q = 1: the models Gram). The
    chunked route's pairings of every model with every other, which are not sums over chunks
    of models."""
    b = x.shape[0]
    length = x.shape[axis]
    size = max(1, min(length, chunk * length // b))
    full, rest = divmod(length, size)
    mask = model_mask(b, n_models)[:, None, None]

    def piece(start, count):
        xs = lax.dynamic_slice_in_dim(x, start, count, axis).astype(jnp.float32)
        xc = xs - mask * lax.dynamic_slice_in_dim(c, start, count, axis - 1)
        if flat:
            xc = xc.reshape(b, -1, 1)
        elif axis == 2:
            xc = jnp.swapaxes(xc, 1, 2)
        return sharded_cross_gram(xc, num_devices=d)

    gram = lax.fori_loop(1, full, lambda s, acc: acc + piece(s * size, size), piece(0, size))
    if rest:
        gram = gram + piece(full * size, rest)
    return gram


# The products below are written as `lax.dot_general` on layouts XLA can hand to GEMM as they
# are: `jnp.einsum` over a stacked `[N, m, n]` with the contraction across two axes (or over the
# middle one) first copies the whole stack into a transposed layout, a 375 MB temporary per
# product for 8 copies of a 30522 x 384 vocabulary embedding.


def _dot(x, y, contract, batch=((), ())):
    return lax.dot_general(x, y, (contract, batch), precision=HIGHEST)


# Entries of the contraction per product of `long_dot` on CPU.
LONG_DOT_SLICE = 8192


def long_dot(x: jax.Array, y: jax.Array) -> jax.Array:
    """`x f32[a, p] y f32[b, p]^T` for a long contraction `p` and a small output (a dense models
    Gram: N x N from N x mn entries).

    On CPU the contraction is cut into slices of `LONG_DOT_SLICE` entries whose products are
    summed: XLA's CPU dot runs such a product at a fraction of its GEMM rate (64 models of
    768 x 3072: 0.61 s whole, 0.23 s in slices, numpy's 0.25 s; 16 models: 0.10 -> 0.03 s).
    Other platforms take the one product (a GPU splits a long contraction itself)."""
    p = x.shape[1]

    def whole(x, y):
        return _dot(x, y, ((1,), (1,)))

    if p < 4 * LONG_DOT_SLICE:
        return whole(x, y)

    def sliced(x, y):
        full, rest = divmod(p, LONG_DOT_SLICE)

        def piece(start, size):
            part = lambda v: lax.dynamic_slice_in_dim(v, start, size, 1)  # noqa: E731
            return whole(part(x), part(y))

        step = lambda s, acc: acc + piece(s * LONG_DOT_SLICE, LONG_DOT_SLICE)  # noqa: E731
        acc = lax.fori_loop(1, full, step, piece(0, LONG_DOT_SLICE))
        return acc + piece(full * LONG_DOT_SLICE, rest) if rest else acc

    return lax.platform_dependent(x, y, cpu=sliced, default=whole)


def t_matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    """`x^T y` for `x f32[p, a]` and `y f32[p, b]` contracted over their (long) leading axis:
    a stacked factor or basis against a sketch block.

    When `x` is the wider (`a > b`), XLA's CPU dot runs the product in the layout of its
    `[a, b]` output at under half its GEMM rate (an `8000 x 4096` stacked factor against 74
    columns: 74 ms, against 28 ms as below; `benchmarks/xla_cpu_patterns.py --n=500 --m=16
    --cols=4096`); on CPU it is taken as `(y^T x)^T` instead, the
    barrier keeping XLA from folding the small output's transpose back into the dot. Other
    platforms take the one product."""

    def plain(x, y):
        return _dot(x, y, ((0,), (0,)))

    if x.shape[1] <= y.shape[1]:
        return plain(x, y)

    def swapped(x, y):
        return lax.optimization_barrier(_dot(y, x, ((0,), (0,)))).T

    return lax.platform_dependent(x, y, cpu=swapped, default=plain)


def cross_gram(x: jax.Array, y: jax.Array) -> jax.Array:
    """`G[i, a, j, b] = sum_p x[i, p, a] y[j, p, b]` for `x f32[b1, p, q]`, `y f32[b2, p, q]`.

    With `q = 1` (dense models flattened) it is the plain `[b1, p] x [b2, p]^T` product
    (`long_dot`): XLA copies a `[b, p, 1]` operand into another layout first, a 2D one it takes
    as it is."""
    if x.shape[2] == 1:
        return long_dot(x[..., 0], y[..., 0])[:, None, :, None]
    return _dot(x, y, ((1,), (1,)))


def stack_times(x: jax.Array, v: jax.Array) -> jax.Array:
    """`X_i V` for every model: `f32[b, m, n] x f32[n, l] -> f32[b, m, l]` (one GEMM)."""
    b, m, n = x.shape
    return _dot(x.reshape(b * m, n), v, ((1,), (0,))).reshape(b, m, v.shape[1])


def stack_t_times(x: jax.Array, u: jax.Array) -> jax.Array:
    """`X_i^T U` for every model: `f32[b, m, n] x f32[m, l] -> f32[b, n, l]` (batched GEMM)."""
    return jnp.swapaxes(_u_t_stack(x, u), 1, 2)


def _u_t_stack(x: jax.Array, u: jax.Array) -> jax.Array:
    """`U^T X_i` for every model: `f32[b, m, n] x f32[m, l] -> f32[b, l, n]` (batched GEMM)."""
    ub = jnp.broadcast_to(u, (x.shape[0], *u.shape))
    return _dot(ub, x, ((1,), (1,)), ((0,), (0,)))


def mode_product(x: jax.Array, q: jax.Array, *, mode: str, weights=None) -> jax.Array:
    """This shard's part of the `rows` (`sum_i w_i X_i X_i^T Q`, `q f32[m, l]`) or `cols`
    (`sum_i w_i X_i^T X_i Q`, `q f32[n, l]`) operator of `x f32[b, m, n]`, without a transposed
    copy of the stack (`weights f32[b]`, default 1)."""
    b, m, n = x.shape
    if mode == "rows":
        # `X_i (Q^T X_i)^T`: the inner product kept as `f32[b, l, n]` and contracted over its
        # last axis. Kept as `X_i^T Q` (`[b, n, l]`), XLA's CPU dot ran the outer product about
        # 1.35x slower (64 models of 768 x 3072, 74 columns: 0.52 -> 0.39 s per product,
        # `benchmarks/xla_cpu_patterns.py`).
        inner = _u_t_stack(x, q)  # f32[b, l, n]
        if weights is not None:
            inner = inner * weights[:, None, None]
        return models_sum(_dot(x, inner, ((2,), (2,)), ((0,), (0,))))
    inner = stack_times(x, q)  # f32[b, m, l]
    if weights is not None:
        inner = inner * weights[:, None, None]
    # `inner_i^T X_i` batched over the models (`f32[b, l, n]`, a sketch's size per model) and
    # added in turn: as one product of the stack seen as `[(b m), n]`, contracted over its long
    # leading axis, XLA's CPU dot ran at half its GEMM rate (64 models of 768 x 3072, 74
    # columns: 0.36 -> 0.20 s).
    return models_sum(_dot(inner, x, ((1,), (1,)), ((0,), (0,)))).T


def mode_gram(x: jax.Array, *, mode: str, weights=None) -> jax.Array:
    """This shard's part of the `rows` (`sum_i w_i X_i X_i^T`, `f32[m, m]`) or `cols`
    (`sum_i w_i X_i^T X_i`, `f32[n, n]`) matrix of `x f32[b, m, n]`: the unweighted cols matrix
    as one GEMM of the stack seen as `[(b m), n]`, the others one model at a time, so that no
    transposed or weighted copy of the stack is made."""
    b, m, n = x.shape
    if mode == "cols" and weights is None:
        flat = x.reshape(b * m, n)
        return _dot(flat, flat, ((0,), (0,)))
    contract = ((1,), (1,)) if mode == "rows" else ((0,), (0,))

    def term(i):
        xi = lax.dynamic_index_in_dim(x, i, keepdims=False)
        product = _dot(xi, xi, contract)
        return product if weights is None else weights[i] * product

    # The first term starts the sum (inside shard_map it carries the stack's varying type).
    return lax.fori_loop(1, b, lambda i, acc: acc + term(i), term(0))


def self_gram(x: jax.Array, *, min_rows: int = 256) -> jax.Array:
    """`einsum("ipa,jpb->iajb", x, x)` computing each pair of row blocks once.

    The Gram is symmetric, so with the `b q` rows split into `c` blocks only the `c (c + 1) / 2`
    blocks on and above the diagonal are multiplied (up to 4 blocks of at least `min_rows` rows:
    62% of the flops, each product still a large GEMM); the others are transposes.

    Args:
        x: `f32[b, p, q]`.

    Returns:
        `f32[b, q, b, q]`.
    """
    b, p, q = x.shape
    chunks = max(1, min(4, (b * q) // min_rows, b))
    if chunks == 1:
        return cross_gram(x, x)
    rows = jnp.swapaxes(x, 1, 2).reshape(b * q, p)
    # Block boundaries on model boundaries, as even as possible.
    edges = [round(k * b / chunks) * q for k in range(chunks + 1)]
    parts = [rows[lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]
    grid = [[None] * chunks for _ in range(chunks)]
    for i in range(chunks):
        for j in range(i, chunks):
            block = long_dot(parts[i], parts[j])
            grid[i][j] = block
            if j != i:
                grid[j][i] = block.T
    full = jnp.concatenate([jnp.concatenate(row, axis=1) for row in grid], axis=0)
    return full.reshape(b, q, b, q)


def ring_cross_gram(x: jax.Array, *, num_devices: int) -> jax.Array:
    """All cross-Grams `G[i, a, j, b] = sum_p x_i[p, a] x_j[p, b]` of a models-sharded stack.

    Runs inside shard_map: each device keeps its block of rows of G and passes its slice of `x`
    around a ring with `ppermute`, so no device ever holds more than two shards of the stack.

    Args:
        x: `f32[N/d, p, q]`, this shard's models.
        num_devices: size of the `models` axis.

    Returns:
        `f32[N/d, q, N, q]`, this shard's rows of the full cross-Gram.
    """
    b, _, q = x.shape
    me = lax.axis_index(MODELS)
    perm = [(i, (i + 1) % num_devices) for i in range(num_devices)]
    gram = jnp.zeros((b, q, num_devices * b, q), jnp.float32)
    other = x
    for step in range(num_devices):
        # other: f32[N/d, p, q], the shard that started on device (me - step) mod d.
        if step == 0:
            block = self_gram(x)
        else:
            block = cross_gram(x, other)
        start = ((me - step) % num_devices) * b
        gram = lax.dynamic_update_slice(gram, block, (0, 0, start, 0))
        if step + 1 < num_devices:
            other = lax.ppermute(other, MODELS, perm)
    return gram


def exchanged_cross_gram(x: jax.Array, *, num_devices: int) -> jax.Array:
    """`ring_cross_gram`'s result by an exchange: shard the contraction instead of the models.

    Runs inside shard_map. One `all_to_all` hands every device a `1/d` slice of the contraction
    axis `p` of every model (`f32[N, p/d, q]`, the size of a shard), each device forms the full
    `N q x N q` Gram of its slice, and a `psum` adds the slices' Grams (each device keeps its
    own rows). Per device it moves `(d-1)/d` of a shard and `2 (d-1)/d` of the Gram, where the
    ring moves `d - 1` shards; for a dense layer's models Gram (`q = 1`, the Gram N x N beside
    a shard of `N/d` whole models) that is about `d` times fewer bytes, and one collective
    instead of `d - 1` (the ring's unrolled steps also grow the program with `d`).

    Args:
        x: `f32[N/d, p, q]`, this shard's models.
        num_devices: size of the `models` axis.

    Returns:
        `f32[N/d, q, N, q]`, this shard's rows of the full cross-Gram.
    """
    b, p, q = x.shape
    pad = -p % num_devices
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    # Received in the order of the sending devices: global model order.
    sliced = lax.all_to_all(x, MODELS, split_axis=1, concat_axis=0, tiled=True)
    gram = self_gram(sliced)  # f32[N, q, N, q], this slice's terms
    # A psum and this device's rows, not `psum_scatter`: across processes on CPU (gloo) a
    # reduce-scatter here stalled the collectives after it (a 768 x 768 layer of 16 models,
    # 2 processes x 2 devices: the holdout run took 236 s instead of 40 s; 4 x 1 over 3 minutes
    # for one layer); the Gram is small beside the shards.
    full = lax.psum(gram, MODELS)
    return lax.dynamic_slice_in_dim(full, lax.axis_index(MODELS) * b, b, axis=0)


def sharded_cross_gram(x: jax.Array, *, num_devices: int) -> jax.Array:
    """The cross-Gram of a models-sharded stack (inside shard_map) by whichever of the ring
    (`ring_cross_gram`) and the exchange (`exchanged_cross_gram`) moves fewer bytes per device:
    the ring `(d-1) b p q` floats, the exchange `(d-1)/d (b p q + 2 (N q)^2)`. Dense models
    Grams take the exchange; LoRA factors, whose `N r` Gram outgrows their short sides,
    mostly the ring. Same values either way (a sum in another order)."""
    b, p, q = x.shape
    d = num_devices
    if d == 1:
        return ring_cross_gram(x, num_devices=1)
    ring = (d - 1) * b * p * q
    exchange = (d - 1) / d * (b * p * q + 2 * (d * b * q) ** 2)
    if exchange < ring:
        return exchanged_cross_gram(x, num_devices=d)
    return ring_cross_gram(x, num_devices=d)


@chunkable_jit(static_argnames=("mesh", "n_models", "center", "modes", "chunk"))
def mode_grams(
    x: jax.Array,
    base: jax.Array | None = None,
    *,
    mesh: Mesh,
    n_models: int,
    center: str = "mean",
    modes: tuple[str, ...] = ("models", "rows", "cols"),
    chunk: int | None = None,
) -> ModeGrams:
    """Gram matrices of the requested modes of a stacked layer.

    Args:
        x: `dtype[N_pad, m, n]` sharded over `models` (zero padding past `n_models`).
        base: `dtype[m, n]` for `center='base'`, else None.
        mesh: the mesh `x` lives on.
        n_models: the true N.
        center: 'mean', 'none' or 'base'.
        modes: any of 'models', 'rows', 'cols'.
        chunk: models per device converted and centred at a time (`model_chunks`; the models
            Gram by row slices, `sliced_models_gram`); None: the whole shard at once.

    Returns:
        ModeGrams; the models Gram has padding removed.

    Example:
        >>> import numpy as np, jax
        >>> from jsubspace import kernels, sharding
        >>> mesh = sharding.models_mesh(1)
        >>> x = jax.numpy.asarray(np.arange(12.0).reshape(3, 2, 2))
        >>> g = kernels.mode_grams(x, mesh=mesh, n_models=3, center="none")
        >>> float(g.total_energy) == float(np.sum(np.arange(12.0) ** 2))
        True
    """
    d = mesh.devices.size
    if base is None:
        base = jnp.zeros(x.shape[1:], x.dtype)

    def body(xb, cb):
        # xb: dtype[N/d, m, n]; cb: dtype[m, n]
        if chunk is not None and chunk < xb.shape[0]:
            return chunked(xb, cb)
        xc = centered_block(xb, cb, n_models=n_models, center=center)
        energy = lax.psum(jnp.sum(xc * xc), MODELS)
        out = {}
        if "models" in modes:
            flat = xc.reshape(xc.shape[0], -1, 1)
            out["models"] = sharded_cross_gram(flat, num_devices=d)[:, 0, :, 0]
        for mode in ("rows", "cols"):
            if mode in modes:
                out[mode] = lax.psum(mode_gram(xc, mode=mode), MODELS)
        return out, energy

    def chunked(xb, cb):
        c = shard_centre(xb, cb, n_models=n_models, center=center, chunk=chunk)
        wanted = [mode for mode in ("rows", "cols") if mode in modes]

        def part(first, xs):
            xc = centred_chunk(xs, c, first, xb.shape[0], n_models)
            return {"energy": jnp.sum(xc * xc), **{mo: mode_gram(xc, mode=mo) for mo in wanted}}

        sums = model_chunks(part, xb, chunk=chunk)
        out = {mode: lax.psum(sums[mode], MODELS) for mode in wanted}
        if "models" in modes:
            out["models"] = sliced_models_gram(xb, c, n_models=n_models, chunk=chunk, d=d)
        return out, lax.psum(sums["energy"], MODELS)

    out_specs = (
        {k: (P(MODELS, None) if k == "models" else P()) for k in modes},
        P(),
    )
    out, energy = jax.shard_map(body, mesh=mesh, in_specs=(P(MODELS), P()), out_specs=out_specs)(
        x, base
    )
    models = out.get("models")
    if models is not None:
        models = models[:n_models, :n_models]
    return ModeGrams(models, out.get("rows"), out.get("cols"), energy)


def _block_mask(n_local: int, n_valid: jax.Array) -> jax.Array:
    first = lax.axis_index(MODELS) * n_local
    return (first + jnp.arange(n_local) < n_valid).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _block_sum(x: jax.Array, n_valid: jax.Array, *, mesh: Mesh) -> jax.Array:
    def body(xb, nv):
        return lax.psum(models_sum(xb, _block_mask(xb.shape[0], nv)), MODELS)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(MODELS), P()), out_specs=P())(x, n_valid)


@functools.partial(jax.jit, static_argnames=("mesh", "modes"), donate_argnums=(0,))
def _block_update(state, x, c, n_valid, *, mesh, modes):
    def body(st, xb, cb, nv):
        # xb: dtype[B/d, m, n], one block of models; cb: f32[m, n] the centre.
        mask = _block_mask(xb.shape[0], nv)[:, None, None]
        xc = (xb.astype(jnp.float32) - cb) * mask
        rows, cols, energy = st
        energy = energy + lax.psum(jnp.sum(xc * xc), MODELS)
        # `mode_gram`, not an einsum over two contracted axes: 1.5x (rows) and 1.16x (cols)
        # faster on XLA's CPU backend for 8 models of 768 x 3072.
        if "rows" in modes:
            rows = rows + lax.psum(mode_gram(xc, mode="rows"), MODELS)
        if "cols" in modes:
            cols = cols + lax.psum(mode_gram(xc, mode="cols"), MODELS)
        return rows, cols, energy

    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(MODELS), P(), P()), out_specs=P())(
        state, x, c, n_valid
    )


def streaming_mode_grams(
    blocks,
    *,
    mesh: Mesh,
    shape: tuple[int, int],
    center: str = "mean",
    base: jax.Array | None = None,
    modes: tuple[str, ...] = ("rows", "cols"),
) -> ModeGrams:
    """`rows` / `cols` Grams accumulated one block of models at a time.

    Memory holds one block and the Grams, whatever N is. Every block must have the same padded
    size (the last one zero-padded), so the update compiles once. With `center='mean'` the
    blocks are read twice: once for the mean, once for the Grams.

    Args:
        blocks: a callable returning a fresh iterable of `(x_block, n_valid)`, with
            `x_block: dtype[B, m, n]` sharded over `models` and `n_valid` its real models.
        mesh: the mesh the blocks live on.
        shape: `(m, n)`.
        center: 'mean', 'none' or 'base'.
        base: `[m, n]` for `center='base'`.
        modes: a subset of ('rows', 'cols'). The `models` Gram needs every pair of blocks and is
            not offered in streaming form.

    Returns:
        ModeGrams with `models=None`.
    """
    if "models" in modes:
        raise ValueError("the models Gram is not available in streaming form; use mode_grams")
    m, n = shape
    if center == "mean":
        total, count = jnp.zeros(shape, jnp.float32), 0
        for xb, nv in blocks():
            total = total + _block_sum(xb, jnp.int32(nv), mesh=mesh)
            count += nv
        c = total / count
    elif center == "base":
        c = jnp.asarray(base, jnp.float32)
    elif center == "none":
        c = jnp.zeros(shape, jnp.float32)
    else:
        raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
    state = (
        jnp.zeros((m, m) if "rows" in modes else (0, 0), jnp.float32),
        jnp.zeros((n, n) if "cols" in modes else (0, 0), jnp.float32),
        jnp.zeros((), jnp.float32),
    )
    for xb, nv in blocks():
        state = _block_update(state, xb, c, jnp.int32(nv), mesh=mesh, modes=tuple(modes))
    rows, cols, energy = state
    return ModeGrams(
        None, rows if "rows" in modes else None, cols if "cols" in modes else None, energy
    )


@chunkable_jit(static_argnames=("mesh", "n_models", "center", "mode", "chunk"))
def dual_mode_gram(
    x: jax.Array,
    base: jax.Array | None = None,
    *,
    mesh: Mesh,
    n_models: int,
    center: str = "mean",
    mode: str = "rows",
    chunk: int | None = None,
) -> jax.Array:
    """The `[N n, N n]` (rows) or `[N m, N m]` (cols) cross-Gram of a centred stack, whose
    nonzero eigenvalues are those of the `rows` (`m x m`) or `cols` (`n x n`) matrix: for a
    tall layer (a vocabulary embedding, `m >> N n`) the exact spectrum of its long side from a
    matrix as small as the stacked short sides.

    `rows`: `K[(i, a), (j, b)] = <X_i[:, a], X_j[:, b]>`, and `sum_i X_i X_i^T` and `K` are
    `Y Y^T` and `Y^T Y` for `Y = [X_1 ... X_N]`. `cols` likewise with the `X_i^T`.

    Args:
        x: `dtype[N_pad, m, n]` sharded over `models` (zero padding past `n_models`).
        base, mesh, n_models, center: as in `mode_grams`.
        mode: 'rows' or 'cols'.
        chunk: models per device converted and centred at a time (the chunked route): the
            matrix summed over slices of the long side as large as `chunk` models
            (`sliced_cross_gram`); None: the whole shard at once.

    Returns:
        `f32[N_pad q, N_pad q]` (q = n for rows, m for cols), replicated.
    """
    if mode not in ("rows", "cols"):
        raise ValueError(f"mode must be 'rows' or 'cols', got {mode!r}")
    d = mesh.devices.size
    if base is None:
        base = jnp.zeros(x.shape[1:], x.dtype)

    def body(xb, cb):
        # xb: dtype[N/d, m, n]; the gram's rows of this shard: f32[N/d, q, N_pad, q]
        if chunk is not None:
            c = shard_centre(xb, cb, n_models=n_models, center=center, chunk=chunk)
            axis = 1 if mode == "rows" else 2
            return sliced_cross_gram(xb, c, n_models=n_models, chunk=chunk, d=d, axis=axis)
        xc = centered_block(xb, cb, n_models=n_models, center=center)
        if mode == "cols":
            xc = jnp.swapaxes(xc, 1, 2)
        return sharded_cross_gram(xc, num_devices=d)

    gram = jax.shard_map(body, mesh=mesh, in_specs=(P(MODELS), P()), out_specs=P(MODELS))(x, base)
    q = gram.shape[1]
    return gram.reshape(x.shape[0] * q, x.shape[0] * q)
