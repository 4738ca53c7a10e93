"""The `null` control: the same statistic on a matched Gaussian population.

Each model's `X_i` is replaced by an iid Gaussian matrix of the same Frobenius norm (for LoRA,
Gaussian rank-r factors whose update has the norm of `dW_i`), then centred and analysed exactly
like the real population. Random draws are keyed by model index, not by device, so the numbers
do not depend on the mesh. The Marchenko–Pastur expectation is given beside the draws.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jsubspace import kernels
from jsubspace.io import PlacedDense
from jsubspace.io import PlacedLora
from jsubspace.sharding._mesh import MODELS
from jsubspace.sharding._mesh import host_array
from jsubspace.sharding._mesh import stacked_sharding
from jsubspace.spectra import _layer
from jsubspace.spectra._summary import cev

EXCESS_KS = (1, 2, 4, 8, 16, 32, 64)


def _model_keys(key, n_local):
    first = lax.axis_index(MODELS) * n_local
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(n_local))


@functools.partial(jax.jit, static_argnames=("mesh", "shape"))
def gaussian_stack(key: jax.Array, norms: jax.Array, *, mesh: Mesh, shape) -> jax.Array:
    """`f32[N_pad, *shape]` iid Gaussian models, model i scaled to Frobenius norm `norms[i]`.

    Args:
        key: PRNG key; model i draws from `fold_in(key, i)` whatever the mesh.
        norms: `f32[N_pad]` sharded over `models` (zero for padding).
        mesh: the mesh.
        shape: per-model shape.
    """

    def body(k, nb):
        # nb: f32[N/d]
        keys = _model_keys(k, nb.shape[0])
        z = jax.vmap(lambda kk: jax.random.normal(kk, shape, jnp.float32))(keys)
        size = jnp.sqrt(jnp.sum(z * z, axis=tuple(range(1, z.ndim))))
        return z * (nb / size).reshape((-1,) + (1,) * len(shape))

    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(MODELS)), out_specs=P(MODELS))(
        key, norms
    )


def marchenko_pastur_eigenvalues(p: int, q: int, total_energy: float) -> np.ndarray:
    """Expected descending eigenvalues of `Y Y^T` for `Y: [p, q]` iid with `||Y||_F^2 = E`.

    The Marchenko–Pastur law with ratio `min(p,q)/max(p,q)`, read at the quantiles
    `(j - 1/2) / min(p, q)`; the `|p - q|` trailing eigenvalues are zero. Normalised to sum to E.
    """
    lo, hi = min(p, q), max(p, q)
    y = lo / hi
    a, b = (1 - np.sqrt(y)) ** 2, (1 + np.sqrt(y)) ** 2
    theta = np.linspace(0.0, np.pi, 8193)
    x = a + (b - a) * (1 - np.cos(theta)) / 2  # denser grid near the edges
    dens = np.sqrt(np.clip((b - x) * (x - a), 0, None)) / (2 * np.pi * y * np.maximum(x, 1e-300))
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(x))])
    cdf /= cdf[-1]
    quantiles = np.interp((np.arange(lo) + 0.5) / lo, cdf, x)[::-1]
    out = np.zeros(p)
    out[:lo] = quantiles
    return out * (total_energy / out.sum()) if out.sum() > 0 else out


def _mp_for_mode(mode: str, n_models: int, shape, centred: bool) -> tuple[int, int]:
    # Mean-centring leaves N - 1 independent models.
    m, n = shape
    k = n_models - 1 if centred else n_models
    return {"models": (k, m * n), "rows": (m, k * n), "cols": (n, k * m)}[mode]


@functools.partial(jax.jit, static_argnames=("mesh", "r", "n", "m"))
def _gaussian_factors(key, mask, *, mesh, r, n, m):
    def body(k, mb):
        keys = _model_keys(k, mb.shape[0])
        ka = jax.vmap(lambda kk: jax.random.fold_in(kk, 0))(keys)
        kb = jax.vmap(lambda kk: jax.random.fold_in(kk, 1))(keys)
        a = jax.vmap(lambda kk: jax.random.normal(kk, (r, n), jnp.float32))(ka)
        b = jax.vmap(lambda kk: jax.random.normal(kk, (m, r), jnp.float32))(kb)
        return a * mb, b * jnp.swapaxes(mb, 1, 2)

    return jax.shard_map(
        body, mesh=mesh, in_specs=(P(), P(MODELS)), out_specs=(P(MODELS), P(MODELS))
    )(key, mask)


@jax.jit
def _update_norms(a: jax.Array, b: jax.Array) -> jax.Array:
    """`f32[N_pad]`: `||B_i A_i||_F^2 = tr((B_i^T B_i)(A_i A_i^T))`, per model, in factor space."""
    btb = jnp.einsum("imr,ims->irs", b, b, precision=kernels.HIGHEST)
    aat = jnp.einsum("irn,isn->irs", a, a, precision=kernels.HIGHEST)
    return jnp.einsum("irs,isr->i", btb, aat, precision=kernels.HIGHEST)


def null_population(
    placed, spectra: _layer.LayerSpectra, *, key, mesh, ranks=None, uncentred_norms=None
):
    """One draw of the matched Gaussian population, placed like the real one."""
    if isinstance(placed, PlacedDense):
        n_pad = placed.x.shape[0]
        norms = np.zeros(n_pad, np.float32)
        norms[: placed.n_models] = np.sqrt(np.clip(spectra.norms, 0, None))
        z = gaussian_stack(
            key,
            jax.device_put(norms, stacked_sharding(mesh)),
            mesh=mesh,
            shape=tuple(placed.x.shape[1:]),
        )
        return PlacedDense(z, placed.n_models)
    n_pad, r, n = placed.a.shape
    m = placed.b.shape[1]
    mask = _layer.factor_sample_mask(n_pad, r, ranks).reshape(n_pad, r, 1)
    a, b = _gaussian_factors(
        key, jax.device_put(mask, stacked_sharding(mesh)), mesh=mesh, r=r, n=n, m=m
    )
    null_sq = host_array(_update_norms(a, b)).astype(np.float64)[: placed.n_models]
    scales = np.zeros(n_pad, np.float32)
    scales[: placed.n_models] = np.sqrt(uncentred_norms / np.maximum(null_sq, 1e-30))
    return PlacedLora(a, b, jax.device_put(scales, placed.scales.sharding), placed.n_models)


def null_control(
    placed,
    spectra: _layer.LayerSpectra,
    *,
    mesh: Mesh,
    config: _layer.SpectraConfig,
    key: jax.Array,
    draws: int,
    ranks=None,
    uncentred_norms=None,
) -> dict:
    """The null record of one layer: per mode, null CEV band, MP expectation and the excess.

    Returns:
        `{mode: {"cev_mean": [...], "cev_std": [...], "cev_max": [...], "mp_cev": [...] | None,
        "excess": {k: CEV_obs(k) / CEV_null(k)}}, "draws": R}`.
    """
    if draws <= 0:
        return {"draws": 0}
    per_mode: dict[str, list[np.ndarray]] = {mode: [] for mode in spectra.modes}
    for draw in range(draws):
        sub = jax.random.fold_in(key, draw)
        null = null_population(
            placed, spectra, key=sub, mesh=mesh, ranks=ranks, uncentred_norms=uncentred_norms
        )
        ns = _layer.layer_spectra(
            null, mesh=mesh, config=config, key=sub, ranks=ranks, lineage=False
        )
        for mode, result in ns.modes.items():
            energy = result.total_energy if result.total_energy is not None else ns.total_energy
            per_mode[mode].append(cev(result.eigenvalues, energy))
    out = {"draws": draws}
    if isinstance(placed, PlacedDense):
        shape = tuple(placed.x.shape[1:])
    else:
        shape = (placed.b.shape[1], placed.a.shape[2])
    for mode, curves in per_mode.items():
        width = min(len(c) for c in curves)
        stack = np.stack([c[:width] for c in curves])
        real = spectra.modes[mode]
        real_energy = real.total_energy if real.total_energy is not None else spectra.total_energy
        observed = cev(real.eigenvalues, real_energy)
        mean = stack.mean(0)
        record = {
            "cev_mean": mean.tolist(),
            "cev_std": stack.std(0).tolist(),
            "cev_max": stack.max(0).tolist(),
            "excess": {
                str(k): float(observed[k - 1] / mean[k - 1])
                for k in EXCESS_KS
                if k <= min(width, len(observed)) and mean[k - 1] > 0
            },
        }
        if mode in ("models", "rows", "cols") and isinstance(placed, PlacedDense):
            p, q = _mp_for_mode(mode, placed.n_models, shape, config.center == "mean")
            mp = marchenko_pastur_eigenvalues(p, q, 1.0)
            record["mp_cev"] = np.cumsum(mp)[:width].tolist()
        else:
            record["mp_cev"] = None
        out[mode] = record
    return out
