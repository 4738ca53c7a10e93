"""LoRA rows / cols spectra through host LAPACK (pivoted Cholesky + congruence + syevr), the
device roots, and the null drawn as Gram factors: numbers against float64 and laws."""

import jax
import numpy as np
import pytest

from jsubspace import kernels
from jsubspace import spectra
from jsubspace import testing
from jsubspace.io import PlacedLora
from jsubspace.sharding import models_mesh
from jsubspace.sharding import padded_count
from jsubspace.sharding import stacked_sharding
from jsubspace.spectra import _factored
from jsubspace.spectra import _layer
from jsubspace.spectra import _null


def _sandwich64(f, mid):
    f = np.asarray(f, np.float64)
    return np.linalg.eigvalsh(f @ np.asarray(mid, np.float64) @ f.T)[::-1]


def _psd(rng, d, rank=None, scale=1.0):
    y = rng.standard_normal((d, rank or 2 * d))
    return (scale * y @ y.T / y.shape[1]).astype(np.float32)


@pytest.mark.parametrize("case", ["full", "shared_blocks", "zero_rows"])
def test_sandwich_eigenvalues_equal_float64(case):
    rng = np.random.default_rng(0)
    n, r, p = 12, 4, 200
    f = rng.standard_normal((p, n * r)).astype(np.float32)  # F^T F = G, p > Nr
    if case == "shared_blocks":
        f[:, r : 4 * r] = np.tile(f[:, :r], 3)  # models 1-3 repeat model 0's factor
    if case == "zero_rows":
        f[:, 5 * r + 2 : 6 * r] = 0.0  # a rank zero-padded from 4 to 2
    gram = f.T @ f
    mid = _psd(rng, n * r)
    got = _factored.sandwich_eigvalsh(mid, gram=gram)
    want = _sandwich64(f, mid)
    rank = np.linalg.matrix_rank(gram.astype(np.float64))
    # Pivoted Cholesky returns the rank's worth; zero rows cost nothing and give zeros.
    assert len(got) == (rank if case == "shared_blocks" else n * r)
    np.testing.assert_allclose(got, want[: len(got)], rtol=1e-4, atol=1e-5 * want[0])
    assert np.all(np.abs(want[rank:]) < 1e-5 * want[0])


def test_sandwich_with_a_triangular_root():
    rng = np.random.default_rng(1)
    root = np.triu(rng.standard_normal((30, 30))).astype(np.float32)
    root[:, 7] = 0.0  # a masked rank slot
    mid = _psd(rng, 30)
    np.testing.assert_allclose(
        _factored.sandwich_eigvalsh(mid, root=root), _sandwich64(root, mid), rtol=1e-4, atol=1e-4
    )


def test_non_finite_gram_gives_nans_not_an_exception():
    gram = np.eye(4, dtype=np.float32)
    gram[1, 1] = np.nan
    assert np.all(np.isnan(_factored.sandwich_eigvalsh(np.eye(4, dtype=np.float32), gram=gram)))


@pytest.mark.parametrize("kind", ["definite", "singular", "zero_rows"])
def test_device_factor_root(kind):
    rng = np.random.default_rng(2)
    f = rng.standard_normal((50, 20)).astype(np.float32)
    if kind == "singular":
        f[:, 10:15] = f[:, :5]
    if kind == "zero_rows":
        f[:, 3] = 0.0
    gram = f.T @ f
    root = np.asarray(kernels.factor_root(jax.numpy.asarray(gram)), np.float64)
    np.testing.assert_allclose(root.T @ root, gram, atol=2e-4 * np.abs(gram).max())
    if kind != "singular":  # Cholesky held: the root is upper triangular
        assert np.all(root[np.tril_indices(20, -1)] == 0)


def test_gram_factor_follows_the_wishart_law():
    # E[W] = dof I, E[W_ij^2] = dof (i != j), E[W_ii^2] = dof (dof + 2) for W ~ Wishart(dof, I).
    dim, dof, draws = 6, 9, 4000
    keys = jax.random.split(jax.random.key(0), draws)
    f = jax.vmap(lambda k: _null.gram_factor(k, dim, dof))(keys)
    w = np.asarray(jax.numpy.einsum("kai,kaj->kij", f, f), np.float64)
    assert f.shape == (draws, dim, dim) and np.all(np.asarray(f)[:, 1, 0] == 0)
    np.testing.assert_allclose(w.mean(0), dof * np.eye(dim), atol=0.25)
    sq = (w**2).mean(0)
    off = sq[~np.eye(dim, dtype=bool)]
    assert off.mean() == pytest.approx(dof, rel=0.05)
    assert np.diag(sq).mean() == pytest.approx(dof * (dof + 2), rel=0.05)
    # Fewer degrees of freedom than dimensions: the Gaussian matrix itself.
    assert _null.gram_factor(jax.random.key(1), 10, 4).shape == (4, 10)


def _placed_lora(a, b, scales, mesh):
    n = a.shape[0]
    n_pad = padded_count(n, mesh)

    def put(x):
        out = np.zeros((n_pad, *x.shape[1:]), np.float32)
        out[:n] = x
        return jax.device_put(out, stacked_sharding(mesh))

    return PlacedLora(put(a), put(b), put(scales), n)


@pytest.mark.parametrize("d", [1, 4])
def test_host_lora_spectra_with_shared_factors_equal_float64(d):
    # m, n > Nr and a shared A: the cols mode needs the pivoted (rank-revealing) root.
    mesh = models_mesh(d)
    n_models, m, k, r = 6, 40, 36, 4
    a, b = testing.lora_population(3, n_models=n_models, shape=(m, k), rank=r)
    a[1:3] = a[0]
    scales = np.linspace(1.0, 2.0, n_models).astype(np.float32)
    placed = _placed_lora(a, b, scales, mesh)
    got = spectra.layer_spectra(
        placed, mesh=mesh, config=spectra.SpectraConfig(), key=jax.random.key(0), ranks=[r] * 6
    )
    dw = np.einsum("i,imr,irn->imn", scales.astype(np.float64), b, a)
    x = dw - dw.mean(0)
    want = testing.mode_spectra64(x)
    top = want["rows"][0]
    for mode, lam in want.items():
        ours = got.modes[mode].eigenvalues
        width = min(len(ours), len(lam))
        np.testing.assert_allclose(ours[:width], lam[:width], rtol=1e-4, atol=2e-6 * top)
        assert np.all(lam[width:] < 1e-6 * top)  # whatever was not computed is zero
        assert got.modes[mode].eigenvalues.sum() == pytest.approx(np.sum(x * x), rel=1e-4)


def _explicit_null_cev(a_shape, b_shape, energies, draws, seed):
    # The definition: Gaussian factors, each model scaled to its real update energy, centred.
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(draws):
        a = rng.standard_normal(a_shape)
        b = rng.standard_normal(b_shape)
        dw = np.einsum("imr,irn->imn", b, a)
        dw *= np.sqrt(energies / np.sum(dw * dw, axis=(1, 2)))[:, None, None]
        x = dw - dw.mean(0)
        lam = np.linalg.eigvalsh(np.einsum("imn,ikn->mk", x, x))[::-1]
        curves.append(np.cumsum(lam) / lam.sum())
    return np.mean(curves, 0)


def test_null_drawn_as_gram_factors_matches_explicit_gaussian_factors():
    n_models, m, k, r = 8, 48, 40, 3
    energies = np.linspace(1.0, 3.0, n_models)
    mask = _layer.factor_sample_mask(n_models, r, [r] * n_models)
    curves = []
    for draw in range(40):
        key = jax.random.key(draw)
        g, f_a, f_b = _null.null_lora_grams(
            key,
            mask,
            energies.astype(np.float32),
            _null.null_diagonals(key, nr=n_models * r, m=m, n=k),
            m=m,
            n=k,
            r=r,
            n_pad=n_models,
            n_models=n_models,
            center="mean",
            modes=("rows", "cols"),
        )
        lam = np.linalg.eigvalsh(np.asarray(g.rows, np.float64))[::-1]
        curves.append(np.cumsum(lam) / lam.sum())
        # Each model's update has the real energy.
        np.testing.assert_allclose(np.diag(np.asarray(g.uncentred)), energies, rtol=1e-4)
    ours = np.mean(curves, 0)[:16]
    theirs = _explicit_null_cev((n_models, r, k), (n_models, m, r), energies, 40, seed=5)[:16]
    np.testing.assert_allclose(ours, theirs, atol=0.02)
    assert not np.allclose(ours, np.arange(1, 17) / 16)  # not trivially flat


def test_eigvals_on_cpu_equal_float64():
    rng = np.random.default_rng(4)
    gram = _psd(rng, 64)
    np.testing.assert_allclose(
        _layer._eigvals(jax.numpy.asarray(gram)),
        np.linalg.eigvalsh(gram.astype(np.float64))[::-1],
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize("dim", [300, 301])
def test_gram_of_a_triangular_factor(dim):
    f = _null.gram_factor(jax.random.key(dim), dim, dim + 50)
    got = np.asarray(_null._gram_of_factor(f), np.float64)
    f64 = np.asarray(f, np.float64)
    np.testing.assert_allclose(got, f64.T @ f64, rtol=1e-5, atol=1e-3)
