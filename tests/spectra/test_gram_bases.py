"""The LoRA controls' bases from the spectra's factor Grams (`spectra._gram_bases`), against
float64 on the materialised updates: the fold matrices taken out of the population's Grams, the
Krylov bases, the held-out captures and the split-half angles (the holdout records from the Grams:
`test_lora_holdout.py`)."""

import jax
import numpy as np
import pytest

from jsubspace import spectra
from jsubspace import testing
from jsubspace.sharding import models_mesh
from jsubspace.spectra import _compare
from jsubspace.spectra import _gram_bases

# Sides longer than the 13 x 4 factor rows: the factor route, whose Grams the spectra keep (side
# space has no factor Grams; its controls run through the factors).
_FACTOR_ROUTE = dict(m=60, k=72)


def _grams(placed):
    found = spectra.layer_spectra(
        placed, mesh=placed.a.sharding.mesh, config=spectra.SpectraConfig(), key=jax.random.key(0)
    )
    assert found.factor_grams is not None  # the factor route keeps them for the controls
    return found, found.factor_grams


def _stacked(placed):
    """`Bs f64[m, N_pad r]` and `As f64[N_pad r, n]` (unscaled)."""
    a, b = (np.asarray(x, np.float64) for x in placed[:2])
    n_pad, r, n = a.shape
    return np.transpose(b, (1, 0, 2)).reshape(b.shape[1], n_pad * r), a.reshape(n_pad * r, n)


def _matrix64(dw, chosen, mode, center):
    x = dw[chosen] - (dw[chosen].mean(0) if center == "mean" else 0.0)
    spec = "imn,ikn->mk" if mode == "rows" else "imn,imk->nk"
    return np.einsum(spec, x, x)


@pytest.mark.parametrize("center", ["mean", "none"])
def test_fold_matrices_from_the_population_grams_equal_float64_recomputation(center):
    # The mixed population: a group sharing one A, a rank zero-padded, spread scales.
    placed = testing.place_lora(*testing.mixed_lora_population(0, **_FACTOR_ROUTE), models_mesh(2))
    dw = testing.lora_updates64(placed)
    _, grams = _grams(placed)
    bs, as_ = _stacked(placed)
    rng = np.random.default_rng(0)
    for _ in range(3):
        chosen = np.zeros(len(grams.scales), bool)
        chosen[rng.choice(placed.n_models, 8, replace=False)] = True
        for mode, factor in (("rows", bs), ("cols", as_.T)):
            idx, gram, mid = _gram_bases.pencil(grams, chosen, mode=mode, center=center)
            f = factor[:, idx]
            np.testing.assert_allclose(gram, f.T @ f, rtol=1e-5, atol=1e-5 * np.abs(gram).max())
            want = _matrix64(dw, chosen[: placed.n_models], mode, center)
            got = f @ mid @ f.T
            np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("center", ["mean", "none"])
def test_krylov_bases_are_the_exact_eigenvectors_and_captures_equal_float64(center):
    placed = testing.place_lora(*testing.mixed_lora_population(1, **_FACTOR_ROUTE), models_mesh(1))
    dw = testing.lora_updates64(placed)
    _, grams = _grams(placed)
    bs, as_ = _stacked(placed)
    chosen = np.zeros(len(grams.scales), bool)
    chosen[[0, 2, 3, 4, 6, 8, 9, 11, 12]] = True
    k = 4
    rng = np.random.default_rng(0)
    found = {}
    for mode, factor in (("rows", bs), ("cols", as_.T)):
        basis = _gram_bases.set_basis(grams, chosen, mode=mode, k=k, center=center, rng=rng)
        lam, vec = np.linalg.eigh(_matrix64(dw, chosen[: placed.n_models], mode, center))
        np.testing.assert_allclose(basis.values, lam[::-1][:k], rtol=1e-5)
        u = factor @ basis.coef
        np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-5)
        # The same subspace (the eigenvalues are distinct here).
        cos = np.linalg.svd(u.T @ vec[:, ::-1][:, :k], compute_uv=False)
        np.testing.assert_allclose(cos, 1.0, atol=1e-5)
        assert basis.residual < 1e-4
        found[mode] = (basis, u)
    held, centre = np.array([1, 5, 7]), np.array([10, 1, 5]) if center == "mean" else None
    two, rows, cols, energy = _gram_bases.held_captures(
        grams, held, centre, found["rows"][0], found["cols"][0]
    )
    (_, u), (_, v) = found["rows"], found["cols"]
    d = dw[held] - (dw[centre] if centre is not None else 0.0)
    scale = np.sum(d * d, axis=(1, 2))
    np.testing.assert_allclose(energy, scale, rtol=1e-5)
    core = np.einsum("mk,imn,nl->ikl", u, d, v) ** 2
    want_two = np.diagonal(np.cumsum(np.cumsum(core, 1), 2), axis1=1, axis2=2)
    want_rows = np.cumsum(np.sum(np.einsum("mk,imn->ikn", u, d) ** 2, -1), -1)
    want_cols = np.cumsum(np.sum(np.einsum("imn,nk->imk", d, v) ** 2, 1), -1)
    for got, want in ((two, want_two), (rows, want_rows), (cols, want_cols)):
        np.testing.assert_allclose(got / scale[:, None], want / scale[:, None], atol=1e-5)


def test_split_half_angles_from_the_grams_equal_the_factor_route():
    mesh = models_mesh(2)
    placed = testing.place_lora(
        *testing.mixed_lora_population(2, n_models=16, **_FACTOR_ROUTE), mesh
    )
    _, grams = _grams(placed)
    common = dict(mesh=mesh, seed=0, key=jax.random.key(0), k=4)
    ours = _compare.lora_split_half_compare(placed[:3], 16, grams=grams, **common)
    theirs = _compare.lora_split_half_compare(placed[:3], 16, **common)
    assert ours["bases"]["from"] == "grams" and "bases" not in theirs
    assert ours["k"] == theirs["k"] == 4
    for field in ("rows_cosines", "cols_cosines", "rows_overlap_at", "cols_overlap_at"):
        np.testing.assert_allclose(ours[field], theirs[field], atol=1e-4)
    # And against float64 bases of the two halves.
    dw = testing.lora_updates64(placed)
    w1, w2 = _compare._halves(16, len(grams.scales), 0)
    for mode, field in (("rows", "rows_cosines"), ("cols", "cols_cosines")):
        one, two = (
            np.linalg.eigh(_matrix64(dw, w[:16] > 0, mode, "mean"))[1][:, ::-1][:, :4]
            for w in (w1, w2)
        )
        np.testing.assert_allclose(ours[field], _compare.principal_cosines(one, two), atol=1e-4)
