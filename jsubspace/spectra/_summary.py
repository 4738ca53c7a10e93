"""Headline numbers of one spectrum: EVR, CEV, k_at(tau), effective rank.

The total energy `E` is always exact (the trace of the Gram), so EVR = lambda_j / E and CEV stay
exact even when only the top eigenvalues were computed.
"""

from __future__ import annotations

import numpy as np

TAUS = (0.5, 0.8, 0.9, 0.99)


def cev(eigenvalues: np.ndarray, total_energy: float) -> np.ndarray:
    """Cumulative explained variance `CEV(k)`, k = 1..len(eigenvalues)."""
    if total_energy <= 0:
        return np.zeros(len(eigenvalues))
    return np.minimum(np.cumsum(np.asarray(eigenvalues, np.float64)) / total_energy, 1.0)


def k_at(eigenvalues: np.ndarray, total_energy: float, tau: float) -> int | None:
    """Smallest k with CEV(k) >= tau, or None when the computed eigenvalues do not reach tau."""
    c = cev(eigenvalues, total_energy)
    hit = np.nonzero(c >= tau - 1e-12)[0]
    return int(hit[0]) + 1 if len(hit) else None


def effective_rank(eigenvalues: np.ndarray, total_energy: float) -> float | None:
    """`exp(entropy(EVR))`; None when the computed eigenvalues miss part of the energy."""
    lam = np.clip(np.asarray(eigenvalues, np.float64), 0.0, None)
    if total_energy <= 0:
        return 0.0
    if lam.sum() < total_energy * (1 - 1e-4):
        return None
    p = lam / lam.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def summarize(eigenvalues: np.ndarray, total_energy: float) -> dict:
    """The JSON record of one mode's spectrum (without the method fields)."""
    lam = np.clip(np.asarray(eigenvalues, np.float64), 0.0, None)
    evr = lam / total_energy if total_energy > 0 else np.zeros_like(lam)
    return {
        "eigenvalues": lam.tolist(),
        "evr": evr.tolist(),
        "cev": cev(lam, total_energy).tolist(),
        "k_at": {str(t): k_at(lam, total_energy, t) for t in TAUS},
        "effective_rank": effective_rank(lam, total_energy),
    }
