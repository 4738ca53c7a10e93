"""Merging task models given a base: mean, task arithmetic, TIES, DARE and subspace merges.

Parameter names follow mergekit where it has them: `weight` (per model), `density` (the kept
fraction in TIES / DARE), `lambda` (the scale of the merged task vector; `lam` in Python).
All functions are pure and jittable on stacked task vectors `tau: [N, ...]`.

The subspace merge projects each task vector on the universal basis, combines the coefficients
and maps back. With *centred* coefficients (task vectors minus their mean) the average is zero
by construction, so "subspace merge" of centred coefficients is exactly the mean merge: an
identity the tests check, and the reason the uncentred variants exist.

References:
  G. Ilharco et al., "Editing models with task arithmetic", ICLR 2023.
  P. Yadav et al., "TIES-Merging: resolving interference when merging models", NeurIPS 2023.
  L. Yu et al., "Language models are Super Mario: absorbing abilities from homologous models
  as a free lunch" (DARE), ICML 2024.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsubspace.kernels import HIGHEST
from jsubspace.kernels import matmul

METHODS = ("mean", "task_arithmetic", "ties", "dare_linear", "dare_ties", "subspace")


def _weights(tau, weight):
    n = tau.shape[0]
    w = jnp.ones(n, jnp.float32) if weight is None else jnp.asarray(weight, jnp.float32)
    return w.reshape((n,) + (1,) * (tau.ndim - 1))


def mean_merge(base, tau):
    """`base + mean_i tau_i` (the entry-wise mean of the models)."""
    return base + jnp.mean(tau, axis=0)


def task_arithmetic(base, tau, *, weight=None, lam: float = 1.0):
    """`base + lambda * sum_i weight_i tau_i`."""
    return base + lam * jnp.sum(_weights(tau, weight) * tau, axis=0)


def trim(tau, density: float):
    """Keeps the `density` fraction of largest-magnitude entries of each task vector."""
    n = tau.shape[0]
    flat = jnp.abs(tau.reshape(n, -1))
    keep = max(1, int(round(density * flat.shape[1])))
    threshold = -jnp.sort(-flat, axis=1)[:, keep - 1 : keep]
    return jnp.where((flat >= threshold).reshape(tau.shape), tau, 0.0)


def _sign_elect_mean(tau, w):
    """TIES: per entry, the sign of the weighted sum; the mean over models that agree with it."""
    weighted = w * tau
    sign = jnp.sign(jnp.sum(weighted, axis=0))
    agree = (jnp.sign(tau) == sign) & (tau != 0)
    total = jnp.sum(jnp.where(agree, weighted, 0.0), axis=0)
    count = jnp.sum(jnp.where(agree, w, 0.0), axis=0)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def ties(base, tau, *, density: float = 0.2, weight=None, lam: float = 1.0):
    """TIES-merging: trim to `density`, elect signs, disjoint (weighted) mean, scale by lambda."""
    return base + lam * _sign_elect_mean(trim(tau, density), _weights(tau, weight))


def dare(tau, *, density: float, key: jax.Array):
    """DARE: drops each entry with probability `1 - density`, rescales the rest by `1/density`
    (unbiased: the expectation is `tau`)."""
    keep = jax.random.bernoulli(key, density, tau.shape)
    return jnp.where(keep, tau / density, 0.0)


def dare_linear(base, tau, *, density: float = 0.5, key: jax.Array, weight=None, lam: float = 1.0):
    return task_arithmetic(base, dare(tau, density=density, key=key), weight=weight, lam=lam)


def dare_ties(base, tau, *, density: float = 0.5, key: jax.Array, weight=None, lam: float = 1.0):
    dropped = dare(tau, density=density, key=key)
    return base + lam * _sign_elect_mean(dropped, _weights(tau, weight))


def subspace_merge(
    base,
    tau,
    u,
    v,
    *,
    center: bool = False,
    combine: str = "mean",
    weight=None,
    lam: float = 1.0,
    density: float = 1.0,
):
    """Merge in the universal basis: `base + lambda * U combine_i(C_i) V^T`.

    Args:
        base: `[m, n]`.
        tau: `[N, m, n]` task vectors.
        u, v: `[m, k]`, `[n, k]` basis with orthonormal columns.
        center: use centred coefficients `U^T (tau_i - mean tau) V` (plus the mean task vector
            back): this is the mean merge exactly, whatever the basis.
        combine: 'mean', 'sum' or 'ties' (per-direction sign election over coefficients,
            after keeping the `density` fraction of each model's largest coefficients).
    """
    mean_tau = jnp.mean(tau, axis=0)
    x = tau - mean_tau if center else tau
    coeff = jnp.einsum("mk,imn,nl->ikl", u, x, v, precision=HIGHEST)
    w = _weights(coeff, weight)
    if combine == "mean":
        merged = jnp.sum(w * coeff, axis=0) / jnp.sum(w)
    elif combine == "sum":
        merged = jnp.sum(w * coeff, axis=0)
    elif combine == "ties":
        merged = _sign_elect_mean(trim(coeff, density), w)
    else:
        raise ValueError(f"combine must be mean, sum or ties, got {combine!r}")
    update = matmul(matmul(u, merged), v.T)
    if center:
        update = update + mean_tau
    return base + lam * update


def merge(method: str, base, models, *, key: jax.Array | None = None, **params):
    """Merges stacked models `[N, ...]` onto `base` with one of METHODS (task vectors inside)."""
    weight = params.get("weight")
    if weight is not None and len(weight) != len(models):
        raise ValueError(f"weights: {len(weight)} given for {len(models)} models (one per model)")
    density = params.get("density")
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    tau = jnp.asarray(models, jnp.float32) - jnp.asarray(base, jnp.float32)
    base = jnp.asarray(base, jnp.float32)
    if method == "mean":
        return mean_merge(base, tau)
    if method == "task_arithmetic":
        return task_arithmetic(base, tau, **params)
    if method == "ties":
        return ties(base, tau, **params)
    if method in ("dare_linear", "dare_ties"):
        if key is None:
            raise ValueError(f"{method} needs an explicit PRNG key (its drops are random)")
        fn = dare_linear if method == "dare_linear" else dare_ties
        return fn(base, tau, key=key, **params)
    if method == "subspace":
        return subspace_merge(base, tau, **params)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
