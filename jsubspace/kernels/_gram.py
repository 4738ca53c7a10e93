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
    """
    x = x.astype(jnp.float32)
    mask = model_mask(x.shape[0], n_models)[:, None, None]
    if center == "mean":
        c = lax.psum(jnp.sum(x * mask, axis=0), MODELS) / n_models
    elif center == "base":
        c = base.astype(jnp.float32)
    elif center == "none":
        return x * mask
    else:
        raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
    return (x - c) * mask


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
        return jnp.einsum("ipa,jpb->iajb", x, x, precision=HIGHEST)
    rows = jnp.swapaxes(x, 1, 2).reshape(b * q, p)
    # Block boundaries on model boundaries, as even as possible.
    edges = [round(k * b / chunks) * q for k in range(chunks + 1)]
    parts = [rows[lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]
    grid = [[None] * chunks for _ in range(chunks)]
    for i in range(chunks):
        for j in range(i, chunks):
            block = jnp.matmul(parts[i], parts[j].T, precision=HIGHEST)
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
            block = jnp.einsum("ipa,jpb->iajb", x, other, precision=HIGHEST)
        start = ((me - step) % num_devices) * b
        gram = lax.dynamic_update_slice(gram, block, (0, 0, start, 0))
        if step + 1 < num_devices:
            other = lax.ppermute(other, MODELS, perm)
    return gram


@functools.partial(jax.jit, static_argnames=("mesh", "n_models", "center", "modes"))
def mode_grams(
    x: jax.Array,
    base: jax.Array | None = None,
    *,
    mesh: Mesh,
    n_models: int,
    center: str = "mean",
    modes: tuple[str, ...] = ("models", "rows", "cols"),
) -> ModeGrams:
    """Gram matrices of the requested modes of a stacked layer.

    Args:
        x: `dtype[N_pad, m, n]` sharded over `models` (zero padding past `n_models`).
        base: `dtype[m, n]` for `center='base'`, else None.
        mesh: the mesh `x` lives on.
        n_models: the true N.
        center: 'mean', 'none' or 'base'.
        modes: any of 'models', 'rows', 'cols'.

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
        xc = centered_block(xb, cb, n_models=n_models, center=center)
        energy = lax.psum(jnp.sum(xc * xc), MODELS)
        out = {}
        if "models" in modes:
            flat = xc.reshape(xc.shape[0], -1, 1)
            out["models"] = ring_cross_gram(flat, num_devices=d)[:, 0, :, 0]
        if "rows" in modes:
            out["rows"] = lax.psum(jnp.einsum("imn,ikn->mk", xc, xc, precision=HIGHEST), MODELS)
        if "cols" in modes:
            out["cols"] = lax.psum(jnp.einsum("imn,imk->nk", xc, xc, precision=HIGHEST), MODELS)
        return out, energy

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
        mask = _block_mask(xb.shape[0], nv)[:, None, None]
        return lax.psum(jnp.sum(xb.astype(jnp.float32) * mask, axis=0), MODELS)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(MODELS), P()), out_specs=P())(x, n_valid)


@functools.partial(jax.jit, static_argnames=("mesh", "modes"), donate_argnums=(0,))
def _block_update(state, x, c, n_valid, *, mesh, modes):
    def body(st, xb, cb, nv):
        # xb: dtype[B/d, m, n], one block of models; cb: f32[m, n] the centre.
        mask = _block_mask(xb.shape[0], nv)[:, None, None]
        xc = (xb.astype(jnp.float32) - cb) * mask
        rows, cols, energy = st
        energy = energy + lax.psum(jnp.sum(xc * xc), MODELS)
        if "rows" in modes:
            rows = rows + lax.psum(jnp.einsum("imn,ikn->mk", xc, xc, precision=HIGHEST), MODELS)
        if "cols" in modes:
            cols = cols + lax.psum(jnp.einsum("imn,imk->nk", xc, xc, precision=HIGHEST), MODELS)
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
