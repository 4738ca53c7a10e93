"""Bases of a LoRA layer's controls from the factor Grams its spectra computed: no second pass
over the factors, no side-length vector.

Notation of `kernels._lora`: `Bs = [B_1 .. B_N]` (`m x Nr`), `As = [A_1; ..; A_N]` (`Nr x n`),
`G^B = Bs^T Bs` and `G^A = As As^T` (`r x r` blocks), scales `s`. The models of a subset `T`
(weights `t`), centred on their mean, have the rows matrix `S = Bs Mid Bs^T` with
`Mid[j,k] = H_jk s_j s_k G^A[j,k]` and `H = diag(t) - t t^T / |T|` (`diag(t)` uncentred): the
full population's `Mid` with the other models' terms taken out. Every eigenvector of `S` with a
nonzero eigenvalue lies in the span of the B columns, `u = Bs c`; then

  `S u = Bs (Mid G^B c)`   and   `u^T u' = c^T G^B c'`,

so the block Krylov solver (`kernels.randomized_eigh`'s algorithm) runs on coefficient vectors
with the `G^B` inner product: one product costs `2 (|T| r)^2 l` flops instead of the factors'
`4 N r (m + n) l`, and the orthonormalisations are `l x l` eigen-solves instead of QRs of
`side x l` blocks. The `cols` mode exchanges A and B. Everything the controls need then comes
from the Grams as well: a held-out update `D = [s_h B_h, -s_c B_c] [A_h; A_c]` has
`U^T D V = (C_r^T G^B[:, P] Sigma) (G^A[P, :] C_c)`, and two bases' principal angles are the
singular values of `C_1^T G C_2`.

Host float64 throughout (the matrices are at most `Nr x Nr`, and `Nr` is at most the longer side
on the factor route); the GEMMs go through scipy's BLAS, as the spectra's LAPACK calls do, so no
second BLAS thread pool spins beside them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg
from scipy.linalg import blas


class FactorGrams:
    """A LoRA layer's factor cross-Grams on the host (`LayerSpectra.factor_grams`).

    Attributes:
        a: `f32[N_pad, r, N_pad, r]`, `A_j A_k^T`.
        b: `f32[N_pad, r, N_pad, r]`, `B_j^T B_k`.
        scales: `f64[N_pad]`, zero for padding models.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, scales: np.ndarray):
        self.a, self.b = a, b
        self.scales = np.asarray(scales, np.float64)
        self._flat = {}

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def flat(self, name: str) -> np.ndarray:
        """`f64[N_pad r, N_pad r]` of the Gram `name` ('a' or 'b'), converted once."""
        if name not in self._flat:
            g4 = getattr(self, name)
            self._flat[name] = g4.reshape(g4.shape[0] * g4.shape[1], -1).astype(np.float64)
        return self._flat[name]

    def own_other(self, mode: str) -> tuple[str, str]:
        """The Gram a mode's vectors are orthonormal in, and the one its middle matrix holds."""
        if mode == "rows":
            return "b", "a"
        if mode == "cols":
            return "a", "b"
        raise ValueError(f"mode must be 'rows' or 'cols', got {mode!r}")


class Basis(NamedTuple):
    """Top-k eigenvectors `Bs @ coef` (rows) or `As^T @ coef` (cols) of one set of models.

    Attributes:
        coef: `f64[N_pad r, k]`, zero outside the set's factor columns; orthonormal in the mode's
            own Gram (`coef^T G coef = I`).
        values: `f64[k]`, descending eigenvalues.
        residual: the largest `||S u - lambda u|| / lambda_1` of the k pairs.
    """

    coef: np.ndarray
    values: np.ndarray
    residual: float


def _mm(x: np.ndarray, y: np.ndarray, *, trans: bool = False) -> np.ndarray:
    """`x @ y` (or `x^T @ y`) by scipy's dgemm; Fortran-ordered operands are not copied."""
    return blas.dgemm(1.0, x, y, trans_a=trans)


def _square(flat: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`f64[d, d]` (Fortran order): the symmetric `flat` between the factor columns `idx` (the
    transpose of the C-ordered gather, which is the same matrix)."""
    return flat[np.ix_(idx, idx)].T


def _weights(scales: np.ndarray, n_set: int, center: str) -> np.ndarray:
    """`f64[p, p]`: `H_jk s_j s_k` over the set's `p` models (`H` idempotent, so `H^T H = H`)."""
    h = np.eye(n_set)
    if center == "mean":
        h = h - 1.0 / n_set
    elif center not in ("none", "base"):
        raise ValueError(f"center must be 'mean', 'none' or 'base', got {center!r}")
    return h * np.outer(scales, scales)


def _orthonormal(y: np.ndarray, gram: np.ndarray, basis=None, image=None, *, passes: int = 2):
    """The columns of `y` made orthonormal in the inner product `gram`, and orthogonal to the
    orthonormal `basis` (whose `image = gram @ basis` is given), by two passes of projection and
    an `l x l` eigen-solve. One product by `gram` in all: the projections and normalisations
    update `gram @ y` through `image`. Directions left with less than `1e-12` of the block's
    largest squared norm before the projection are dropped: once the Krylov space holds the
    operator's whole range, what remains is rounding, and a rank-deficient block shrinks
    instead.

    Returns:
        `(q, gram @ q)`.
    """
    gy = _mm(gram, y)
    scale = None
    for _ in range(passes):
        removed = 0.0
        if basis is not None:
            along = _mm(image, y, trans=True)
            y = y - _mm(basis, along)
            gy = gy - _mm(image, along)
            removed = np.einsum("ik,ik->k", along, along)
        small = _mm(y, gy, trans=True)
        if scale is None:  # the squared norms before the projection
            scale = float(np.max(np.diag(small) + removed, initial=0.0))
        w, v = scipy.linalg.eigh((small + small.T) / 2, check_finite=False)
        keep = w > scale * 1e-12
        if not keep.any():
            return y[:, :0], gy[:, :0]
        t = np.asfortranarray(v[:, keep] / np.sqrt(w[keep]))
        y, gy = _mm(y, t), _mm(gy, t)
        scale = 1.0  # the columns are now of unit norm
    return y, gy


def _krylov(mid, gram, start, k, *, iterations):
    """Top-k eigenpairs of `mid @ gram` (self-adjoint in `gram`'s inner product: the set's
    matrix `F mid F^T` on coefficients) by block Krylov from `start` (`d x l`): Rayleigh-Ritz
    over `[Q_0, .., Q_iterations]`. Each block costs two `d x d` products: the operator on its
    Gram image (kept from its orthonormalisation), and the next block's Gram image."""
    basis, image = _orthonormal(start, gram)
    seen, applied = image, []
    for step in range(iterations + 1):
        # The operator's image of each block (`mid @ gram @ Q`): the next block's start, and
        # the Rayleigh-Ritz product of the whole space, column block by column block.
        applied.append(_mm(mid, seen))
        if step == iterations:
            break
        block, seen = _orthonormal(applied[-1], gram, basis, image)
        if block.shape[1] == 0:  # the space holds the operator's whole range
            break
        basis = np.concatenate([basis, block], axis=1)
        image = np.concatenate([image, seen], axis=1)
    applied = np.concatenate(applied, axis=1)
    small = _mm(image, applied, trans=True)
    w, v = scipy.linalg.eigh((small + small.T) / 2, check_finite=False)
    top = np.asfortranarray(v[:, np.argsort(w)[::-1][:k]])
    values = np.clip(np.sort(w)[::-1][:k], 0.0, None)
    coef = _mm(basis, top)
    # Residuals ||S u - lambda u|| = ||Bs (T c - lambda c)||, in the Gram's norm.
    diff = _mm(applied, top) - coef * values
    # abs: a Gram singular to rounding can give a tiny negative squared norm.
    norms = np.sqrt(np.abs(np.einsum("ik,ik->k", diff, _mm(gram, diff))))
    residual = float(norms.max() / values[0]) if len(values) and values[0] > 0 else 0.0
    return coef, values, residual


def pencil(grams: FactorGrams, chosen: np.ndarray, *, mode: str, center: str):
    """The set's matrix `S = F Mid F^T` in factor form, from the population's Grams: the
    mode's factor columns `idx` of the models `chosen` (`bool[N_pad]`), their Gram
    `F^T F` (`f64[d, d]`) and the middle matrix `Mid` (`f64[d, d]`; both Fortran order), the
    population's with the other models' terms taken out and centred on the set's mean
    (`center='mean'`) or not ('none' / 'base')."""
    own, other = (grams.flat(name) for name in grams.own_other(mode))
    r = grams.rank
    models = np.flatnonzero(chosen)
    idx = (models[:, None] * r + np.arange(r)).ravel()
    weights = _weights(grams.scales[models], len(models), center)
    p, d = len(models), len(idx)
    mid = other[np.ix_(idx, idx)].reshape(p, r, p, r) * weights[:, None, :, None]
    # Symmetric: its transpose is the Fortran-ordered matrix itself.
    return idx, _square(own, idx), mid.reshape(d, d).T


def set_basis(
    grams: FactorGrams,
    chosen: np.ndarray,
    *,
    mode: str,
    k: int,
    center: str,
    rng: np.random.Generator,
    iterations: int = 4,
    oversample: int = 10,
    warm: Basis | None = None,
) -> Basis:
    """The top-k `rows` / `cols` eigenvectors of the models `chosen` (`bool[N_pad]`), centred on
    their mean (`center='mean'`) or taken as they are ('none' / 'base'), from the Grams.

    `warm`: a basis of a superset (the full population's), whose directions start the Krylov
    space beside the random block: a fold differs from the population by a few models, so its
    leading directions are close to the population's.
    """
    idx, gram, mid = pencil(grams, chosen, mode=mode, center=center)
    own = grams.flat(grams.own_other(mode)[0])
    d = len(idx)
    width = min(k + oversample, d)
    if warm is None:
        start = rng.standard_normal((d, width))
    else:
        # The superset's directions in this set's coefficients, `S u` for `u = Bs c` (one power
        # step, which also maps them into the set's span), and `oversample` random ones.
        extra = min(oversample, width)
        seen = _mm(own[idx], warm.coef[:, : width - extra])
        start = np.concatenate(
            [_mm(mid, np.asfortranarray(seen)), rng.standard_normal((d, extra))], axis=1
        )

    coef, values, residual = _krylov(
        mid, gram, np.asfortranarray(start), min(k, d), iterations=iterations
    )
    full = np.zeros((own.shape[0], k))
    full[idx, : coef.shape[1]] = coef
    padded = np.zeros(k)
    padded[: len(values)] = values
    return Basis(full, padded, residual)


def cross(grams: FactorGrams, one: Basis, other: Basis, *, mode: str) -> np.ndarray:
    """`f64[k1, k2]`: `U_1^T U_2` of two bases of the same mode, from its Gram."""
    flat = grams.flat(grams.own_other(mode)[0])
    return _mm(one.coef, _mm(flat, other.coef), trans=True)


def held_captures(
    grams: FactorGrams,
    held: np.ndarray,
    centre: np.ndarray | None,
    rows: Basis,
    cols: Basis,
) -> tuple[np.ndarray, ...]:
    """Captured energies of the held-out updates `D_i = s_h B_h A_h - s_c B_c A_c` (`centre`
    the centring models `c`, or None: `D_i = s_h B_h A_h`) under the bases, from the Grams.

    Returns:
        `(two_sided f64[p, k], rows f64[p, k], cols f64[p, k], energy f64[p])`: cumulative in k,
        as `_holdout.held_captures`, and `||D_i||^2`.
    """
    r = grams.rank
    parts = [held] if centre is None else [held, centre]
    # Per held-out model its 1 or 2 factor blocks P and signed scales Sigma.
    models = np.stack(parts, axis=1)  # [p, q]
    signs = np.ones(models.shape[1])
    if centre is not None:
        signs[1] = -1.0
    sigma = grams.scales[models] * signs  # [p, q]
    sigma = np.repeat(sigma, r, axis=1)  # [p, q r]
    idx = (models[:, :, None] * r + np.arange(r)).reshape(len(held), -1)  # [p, q r]
    gb, ga = grams.flat("b"), grams.flat("a")
    # U^T B' Sigma: [p, q r, k]; A' V: [p, q r, k].
    ub = _mm(gb[idx.ravel()], rows.coef).reshape(*idx.shape, -1)
    ub = ub * sigma[:, :, None]
    av = _mm(ga[idx.ravel()], cols.coef).reshape(*idx.shape, -1)
    ga_pp = ga[idx[:, :, None], idx[:, None, :]]  # [p, q r, q r]
    gb_pp = gb[idx[:, :, None], idx[:, None, :]]
    gb_pp = gb_pp * sigma[:, :, None] * sigma[:, None, :]
    z = np.einsum("pak,pal->pkl", ub, av)  # U^T D V
    two = np.diagonal(np.cumsum(np.cumsum(z * z, axis=1), axis=2), axis1=1, axis2=2)
    row = np.cumsum(np.einsum("pak,pab,pbk->pk", ub, ga_pp, ub), axis=-1)
    col = np.cumsum(np.einsum("pak,pab,pbk->pk", av, gb_pp, av), axis=-1)
    energy = np.einsum("pab,pab->p", gb_pp, ga_pp)
    return two, np.maximum(row, 0.0), np.maximum(col, 0.0), energy
