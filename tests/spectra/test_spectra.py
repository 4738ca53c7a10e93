"""Spectra summaries, solver choice, the null's Marchenko–Pastur law, holdout folds, lineage."""

import logging

import jax
import numpy as np
import pytest

from jsubspace import spectra
from jsubspace import testing
from jsubspace.io import PlacedDense
from jsubspace.sharding import models_mesh
from jsubspace.sharding import padded_count
from jsubspace.sharding import stacked_sharding


def test_summary_numbers():
    lam = np.array([6.0, 3.0, 1.0])
    rec = spectra.summarize(lam, 10.0)
    np.testing.assert_allclose(rec["evr"], [0.6, 0.3, 0.1])
    np.testing.assert_allclose(rec["cev"], [0.6, 0.9, 1.0])
    assert rec["k_at"] == {"0.5": 1, "0.8": 2, "0.9": 2, "0.99": 3}
    p = lam / 10
    assert rec["effective_rank"] == pytest.approx(np.exp(-np.sum(p * np.log(p))))
    # Top eigenvalues only: EVR stays exact, k_at(0.99) and the effective rank are unknown.
    part = spectra.summarize(lam[:2], 10.0)
    assert part["k_at"]["0.99"] is None and part["effective_rank"] is None
    assert part["cev"] == pytest.approx([0.6, 0.9])


def _placed(values, mesh):
    n = values.shape[0]
    padded = np.zeros((padded_count(n, mesh), *values.shape[1:]), np.float32)
    padded[:n] = values
    return PlacedDense(jax.device_put(padded, stacked_sharding(mesh)), n)


def test_auto_solver_choice_is_by_side_and_cost_and_recorded(monkeypatch):
    mesh = models_mesh(2)
    values = testing.planted_population(0, n_models=20, shape=(600, 500), rank=6, noise=0.02)
    placed = _placed(values, mesh)
    # rows: 600 past the exact limit, randomized; cols: 500 within it and cheap, exact.
    cfg = spectra.SpectraConfig(rank=8, iterations=4, exact_limit=512)
    costs = spectra._layer.solver_costs(20, 600, 500, mode="rows", rank=8, iterations=4)
    assert costs["randomized"] < costs["exact"] < spectra._layer.EXACT_FLOPS
    got = spectra.layer_spectra(placed, mesh=mesh, config=cfg, key=jax.random.key(0))
    assert got.modes["rows"].method == "randomized" and got.modes["models"].method == "exact"
    assert got.modes["cols"].method == "exact"
    # Within the limit, an exact solve that is both expensive and 4x dearer goes randomized.
    monkeypatch.setattr(spectra._layer, "EXACT_FLOPS", 1e9)
    wide = spectra.SpectraConfig(rank=2, iterations=2)
    assert spectra._layer.dense_mode_solvers(20, 600, 500, wide)["cols"] == "randomized"
    monkeypatch.setattr(spectra._layer, "EXACT_FLOPS", 1e11)
    assert spectra._layer.dense_mode_solvers(20, 600, 500, wide)["cols"] == "exact"
    assert got.modes["rows"].flops == costs["randomized"]
    exact = spectra.layer_spectra(
        placed, mesh=mesh, config=spectra.SpectraConfig(method="exact"), key=jax.random.key(0)
    )
    top = exact.modes["rows"].eigenvalues[:8]
    # Documented accuracy: 1e-4 of lambda_1 (the planted top 6 to 1e-4 relative each).
    np.testing.assert_allclose(got.modes["rows"].eigenvalues, top, atol=1e-4 * top[0])
    np.testing.assert_allclose(got.modes["rows"].eigenvalues[:6], top[:6], rtol=1e-4)
    assert got.modes["rows"].residual < 1e-3
    # The exact total energy keeps EVR exact for the randomized top-8.
    assert got.total_energy == pytest.approx(exact.total_energy, rel=1e-6)
    small = spectra.layer_spectra(
        _placed(values[:, :40, :30], mesh), mesh=mesh, config=cfg, key=jax.random.key(0)
    )
    assert small.modes["rows"].method == "exact"


def test_marchenko_pastur_matches_a_large_gaussian_matrix():
    rng = np.random.default_rng(1)
    p, q = 200, 800
    y = rng.standard_normal((p, q))
    lam = np.linalg.eigvalsh(y @ y.T)[::-1]
    mp = spectra.marchenko_pastur_eigenvalues(p, q, float(np.sum(lam)))
    assert mp.sum() == pytest.approx(np.sum(lam))
    np.testing.assert_allclose(np.cumsum(mp) / mp.sum(), np.cumsum(lam) / lam.sum(), atol=0.01)
    wide = spectra.marchenko_pastur_eigenvalues(300, 100, 1.0)
    assert np.all(wide[100:] == 0) and np.all(wide[:100] > 0)


def test_null_draws_do_not_depend_on_the_mesh():
    values = testing.planted_population(2, n_models=5, shape=(8, 6), rank=2)
    norms = np.zeros(8, np.float32)
    norms[:5] = np.arange(1, 6)
    stacks = []
    for d in (1, 4):
        mesh = models_mesh(d)
        z = spectra.gaussian_stack(
            jax.random.key(3),
            jax.device_put(norms, stacked_sharding(mesh)),
            mesh=mesh,
            shape=(8, 6),
        )
        stacks.append(np.asarray(z))
    np.testing.assert_array_equal(stacks[0][:5], stacks[1][:5])
    np.testing.assert_allclose(
        np.linalg.norm(stacks[0][:5].reshape(5, -1), axis=1), np.arange(1, 6), rtol=1e-5
    )
    del values


def test_a_bfloat16_layers_null_is_drawn_in_bfloat16_and_runs_its_compiled_kernels(caplog):
    # Drawn in float32, a bfloat16 layer's null took twice the real stack's bytes and compiled
    # its own Gram kernel (5 compilations of a dense layer's on an H200, 25 s). Drawn in
    # bfloat16, one model at a time, the draws are the float32 ones rounded: the same null to
    # rounding, and the kernel the real layer compiled serves every draw.
    mesh = models_mesh(1)
    w = testing.planted_population(4, n_models=10, shape=(24, 32), rank=3, noise=0.3)
    x = np.zeros((padded_count(10, mesh), 24, 32), np.float32)
    x[:10] = w
    config = spectra.SpectraConfig()
    records = {}
    for dtype in (jax.numpy.bfloat16, jax.numpy.float32):
        placed = PlacedDense(
            jax.device_put(jax.numpy.asarray(x, dtype), stacked_sharding(mesh)), 10
        )
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            real = spectra.layer_spectra(
                placed, mesh=mesh, config=config, key=jax.random.key(0), lineage=False
            )
            records[dtype] = spectra.null_control(
                placed, real, mesh=mesh, config=config, key=jax.random.key(1), draws=3
            )
        compiled = [r for r in caplog.messages if "compilation of jit(mode_grams)" in r]
        if dtype == jax.numpy.bfloat16:
            # At most the real layer's one (none when an earlier test compiled this shape).
            assert len(compiled) <= 1, compiled
    for mode in ("models", "rows", "cols"):
        half, full = (np.asarray(records[d][mode]["cev_mean"]) for d in records)
        np.testing.assert_allclose(half, full, atol=2e-3)
        # Not the same draws by accident of the mesh or key: the draws differ by rounding.
        assert 0 < np.abs(half - full).max()


def test_fold_assignment():
    assert list(spectra.fold_assignment(4, "loo", 0)) == [0, 1, 2, 3]
    folds = spectra.fold_assignment(10, 3, seed=1)
    assert sorted(np.bincount(folds)) == [3, 3, 4]
    assert list(folds) == list(spectra.fold_assignment(10, 3, seed=1))
    with pytest.raises(ValueError, match="folds"):
        spectra.fold_assignment(3, 5, 0)


def test_lineage_finds_identical_and_near_identical_models():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((6, 50))
    models = np.stack(
        [base[0], base[0], base[1], base[1] + 1e-3 * rng.standard_normal(50), base[2], base[3]]
    )
    gram = models @ models.T
    prints = models @ rng.standard_normal((50, 4))
    names = [f"m{i}" for i in range(6)]
    rec = spectra.lineage_record(gram, names, prints=prints)
    assert rec["identical_groups"] == [["m0", "m1"]]
    assert rec["near_identical_groups"] == [["m0", "m1"], ["m2", "m3"]]
    assert rec["fraction_near_identical"] == pytest.approx(4 / 6)
    assert len(rec["linkage"]) == 5 and sorted(rec["order"]) == list(range(6))
    np.testing.assert_allclose(np.diag(rec["cosine"]), 1.0)


def test_average_linkage_matches_scipy():
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    from jsubspace.spectra._lineage import average_linkage

    rng = np.random.default_rng(5)
    x = rng.standard_normal((25, 4))
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    ours, order = average_linkage(dist)
    theirs = linkage(squareform(dist, checks=False), "average")
    np.testing.assert_allclose(ours[:, 2], theirs[:, 2], atol=1e-12)
    np.testing.assert_array_equal(ours[:, 3], theirs[:, 3])
    assert sorted(order) == list(range(25))
