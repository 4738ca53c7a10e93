"""HOSVD / Tucker decomposition of a stacked layer `X: [N, m, n]`.

The factor of each mode is the top eigenvectors of that mode's Gram (`rows` -> `U`, `cols` -> `V`,
`models` -> `S`); the core is `X` contracted with them. `order=2` keeps the model mode whole (the
per-model coefficients `C_i = U^T X_i V` of the universal basis); `order=3` also compresses it.

References:
  L. De Lathauwer, B. De Moor, J. Vandewalle, "A multilinear singular value decomposition",
  SIAM J. Matrix Anal. Appl. 2000.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jsubspace.kernels._gram import HIGHEST
from jsubspace.kernels._gram import mode_grams
from jsubspace.kernels._rsvd import exact_eigh
from jsubspace.kernels._rsvd import randomized_mode_eigh

EXACT = ("exact", "exact")


def mode_bases(
    x: jax.Array,
    base: jax.Array | None = None,
    key: jax.Array | None = None,
    *,
    mesh: Mesh,
    n_models: int,
    center: str,
    ranks: tuple[int, int],
    solvers: tuple[str, str] = EXACT,
    iterations: int = 4,
    chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Top eigenvectors `(U f32[m, k_rows], V f32[n, k_cols])` of the `rows` and `cols` modes of
    a models-sharded stack (the HOSVD factors; the universal basis).

    Each side by its solver (a layer plan's choice, `spectra.basis_solvers`): 'exact' takes the
    eigenvectors of the mode's Gram; 'randomized' takes them from the block-Krylov solver
    (`randomized_mode_eigh`, seeded by `key`), which never forms the `side x side` Gram.
    `chunk`: models per device converted and centred at a time (`model_chunks`; the chunked
    route of layers whose float32 stack does not fit). Call inside jit (static `mesh`,
    `n_models`, `center`, `ranks`, `solvers`, `iterations`, `chunk`; compiled with
    `CHUNKED_COMPILE` when chunked).
    """
    exact = tuple(mode for mode, s in zip(("rows", "cols"), solvers) if s == "exact")
    grams = None
    if exact:
        grams = mode_grams(
            x, base, mesh=mesh, n_models=n_models, center=center, modes=exact, chunk=chunk
        )
    vectors = []
    for mode, solver, k in zip(("rows", "cols"), solvers, ranks):
        if solver == "exact":
            vectors.append(exact_eigh(getattr(grams, mode), rank=k).vectors)
            continue
        key, sub = jax.random.split(key)
        vectors.append(
            randomized_mode_eigh(
                x,
                base,
                key=sub,
                mesh=mesh,
                n_models=n_models,
                mode=mode,
                rank=k,
                center=center,
                iterations=iterations,
                chunk=chunk,
            ).vectors
        )
    return vectors[0], vectors[1]


class Tucker(NamedTuple):
    """`X_i ~ U (sum_t S[i, t] core[t]) V^T`, or with `models_factor=None`: `X_i ~ U core[i] V^T`.

    Attributes:
        core: `f32[N or k_models, k_rows, k_cols]`.
        rows_factor: `f32[m, k_rows]`, orthonormal columns.
        cols_factor: `f32[n, k_cols]`, orthonormal columns.
        models_factor: `f32[N, k_models]` or None (order 2).
        total_energy: `f32[]` of the centred stack; `||core||^2 / total_energy` is the captured
            fraction.
    """

    core: jax.Array
    rows_factor: jax.Array
    cols_factor: jax.Array
    models_factor: jax.Array | None
    total_energy: jax.Array


@functools.partial(jax.jit, static_argnames=("mesh", "n_models", "ranks", "center"))
def hosvd(
    x: jax.Array,
    base: jax.Array | None = None,
    *,
    mesh: Mesh,
    n_models: int,
    ranks: tuple[int, int] | tuple[int, int, int],
    center: str = "mean",
) -> Tucker:
    """Truncated HOSVD of a models-sharded stack.

    Args:
        x: `dtype[N_pad, m, n]` sharded over `models`.
        base, mesh, n_models, center: as in `mode_grams`.
        ranks: `(k_rows, k_cols)` for order 2, `(k_models, k_rows, k_cols)` for order 3.

    Returns:
        Tucker.
    """
    order3 = len(ranks) == 3
    k_rows, k_cols = ranks[-2:]
    u, v = mode_bases(x, base, mesh=mesh, n_models=n_models, center=center, ranks=(k_rows, k_cols))
    xf = x[:n_models].astype(jnp.float32)
    if center == "mean":
        xf = xf - jnp.mean(xf, axis=0)
    elif center == "base":
        xf = xf - base.astype(jnp.float32)
    core = jnp.einsum("mk,imn,nl->ikl", u, xf, v, precision=HIGHEST)
    models_factor = None
    grams = mode_grams(x, base, mesh=mesh, n_models=n_models, center=center, modes=("models",))
    if order3:
        models_factor = exact_eigh(grams.models, rank=ranks[0]).vectors
        core = jnp.einsum("it,ikl->tkl", models_factor, core, precision=HIGHEST)
    return Tucker(core, u, v, models_factor, grams.total_energy)
