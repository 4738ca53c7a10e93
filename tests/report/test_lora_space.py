"""Where LoRA layers are computed (factor or side space): forced by `lora_space`, or chosen by
the memory budget, with the same spectra either way."""

import numpy as np
import pytest

import jsubspace
from jsubspace import io
from jsubspace import sharding
from jsubspace import spectra
from jsubspace import testing


def _adapters(root, n_models, shape, rank, seed=0):
    a, b = testing.lora_population(seed, n_models=n_models, shape=shape, rank=rank)
    for i in range(n_models):
        testing.write_peft_adapter(
            root / f"a{i:03d}", {"model.q_proj": (a[i], b[i])}, r=rank, lora_alpha=2 * rank
        )
    return str(root)


OPTIONS = dict(null_draws=1, holdout=None, num_devices=2, quiet=True, plots=False)


@pytest.mark.parametrize("lora", ["delta", "factors"])
def test_forced_spaces_give_the_same_spectra(tmp_path, lora):
    # Nr = 40 below both sides: factor space by default.
    pop = _adapters(tmp_path / "pop", 10, (48, 56), 4)
    found = {
        space: jsubspace.analyze(
            [pop], str(tmp_path / space), lora=lora, lora_space=space, **OPTIONS
        )
        for space in ("auto", "factor", "side")
    }
    auto, factor, side = (found[s]["layers"][0] for s in ("auto", "factor", "side"))
    assert found["side"]["config"]["lora_space"] == "side"
    assert "lora_space" not in found["auto"]["config"]
    for mode, rec in side["modes"].items():
        assert rec["method"].endswith("side")
        assert auto["modes"][mode]["method"] == factor["modes"][mode]["method"]
        assert not factor["modes"][mode]["method"].endswith("side")
        ours, theirs = (
            np.asarray(rec["eigenvalues"]),
            np.asarray(factor["modes"][mode]["eigenvalues"]),
        )
        k = min(len(ours), len(theirs))
        np.testing.assert_allclose(ours[:k], theirs[:k], rtol=1e-4, atol=1e-6 * theirs[0])
    assert side["total_energy"] == pytest.approx(factor["total_energy"], rel=1e-5)


def _plan(layer, mesh, config, budget=None):
    n_pad = sharding.padded_count(spectra.layer_models(layer), mesh)
    return spectra.plan_layer(
        layer, n_pad=n_pad, spectra=config, controls=spectra.ControlConfig(), budget=budget
    )


def test_auto_space_goes_to_side_space_where_only_it_fits_the_budget(tmp_path):
    # N r = 1000 just below the 1024-wide sides: factor space is the default and the larger.
    pop = _adapters(tmp_path / "pop", 250, (1024, 1024), 4)
    (layer,) = io.open_population([pop]).layers
    mesh = sharding.models_mesh(2)
    config = spectra.SpectraConfig()
    factor = _plan(layer, mesh, spectra.SpectraConfig(lora_space="factor")).working_set_bytes
    side = _plan(layer, mesh, spectra.SpectraConfig(lora_space="side")).working_set_bytes
    assert side < factor
    assert _plan(layer, mesh, config, 10 * factor).lora_space == "auto"  # the default rule
    budget = (side + factor) // 2
    assert _plan(layer, mesh, config, budget).route == "lora-side"
    forced = spectra.SpectraConfig(lora_space="factor")
    assert _plan(layer, mesh, forced, budget).route == "lora-factor"
    with pytest.raises(jsubspace.PopulationError, match="over the memory budget"):
        jsubspace.analyze(
            [pop], str(tmp_path / "refused"), lora_space="factor", memory_budget=budget, **OPTIONS
        )
    options = dict(OPTIONS, modes=("models", "rows"))
    fits = jsubspace.analyze([pop], str(tmp_path / "fits"), memory_budget=budget, **options)
    free = jsubspace.analyze([pop], str(tmp_path / "free"), **options)
    ours, theirs = fits["layers"][0]["modes"], free["layers"][0]["modes"]
    assert ours["rows"]["method"] == "exact-side" and theirs["rows"]["method"] != "exact-side"
    for mode in ("models", "rows"):
        top = theirs[mode]["eigenvalues"][0]
        np.testing.assert_allclose(
            ours[mode]["eigenvalues"][:20], theirs[mode]["eigenvalues"][:20], atol=1e-4 * top
        )


def test_budget_counts_the_randomized_modes_without_their_side_matrix(tmp_path):
    # A 6000-long side in side space: exactly, its 6000^2 matrix (144 MB) is the working set;
    # under 'auto' it is solved randomized (longer than exact_limit), with no such matrix.
    pop = _adapters(tmp_path / "pop", 10, (6000, 64), 4)
    (layer,) = io.open_population([pop]).layers
    mesh = sharding.models_mesh(2)
    auto = _plan(layer, mesh, spectra.SpectraConfig(lora_space="side")).working_set_bytes
    exact = _plan(
        layer, mesh, spectra.SpectraConfig(lora_space="side", method="exact")
    ).working_set_bytes
    assert exact - auto > 100e6  # its 144 MB matrix, less the solver's basis and factors
    options = dict(OPTIONS, lora_space="side", memory_budget=(auto + exact) // 2)
    with pytest.raises(jsubspace.PopulationError, match="over the memory budget"):
        jsubspace.analyze([pop], str(tmp_path / "exact"), method="exact", **options)
    found = jsubspace.analyze([pop], str(tmp_path / "auto"), **options)
    modes = found["layers"][0]["modes"]
    assert (
        modes["rows"]["method"] == "randomized-factored" and len(modes["rows"]["eigenvalues"]) == 64
    )
    assert modes["cols"]["method"] == "exact-side"


@pytest.mark.parametrize("lora", ["delta", "factors"])
def test_randomized_method_reaches_lora_layers(tmp_path, lora):
    # `method` used to be ignored for LoRA layers (always exact): now it gives the top `rank`
    # eigenvalues by the randomized route, recorded as such, with the exact totals.
    pop = _adapters(tmp_path / "pop", 10, (48, 56), 4)
    exact = jsubspace.analyze([pop], str(tmp_path / "exact"), lora=lora, **OPTIONS)
    fast = jsubspace.analyze(
        [pop], str(tmp_path / "fast"), lora=lora, method="randomized", rank=8, **OPTIONS
    )
    want, got = exact["layers"][0], fast["layers"][0]
    assert got["total_energy"] == pytest.approx(want["total_energy"], rel=1e-5)
    for mode, rec in got["modes"].items():
        theirs = np.asarray(want["modes"][mode]["eigenvalues"])
        if mode == "models":
            np.testing.assert_allclose(rec["eigenvalues"], theirs, rtol=1e-5, atol=1e-6 * theirs[0])
            continue
        assert rec["method"].startswith("randomized") and rec["residual"] >= 0
        assert len(rec["eigenvalues"]) == 8
        np.testing.assert_allclose(rec["eigenvalues"][:3], theirs[:3], rtol=2e-3)
        # EVR is over the exact total: the same as the exact run's for the same eigenvalue.
        np.testing.assert_allclose(
            np.asarray(rec["evr"]) / np.asarray(rec["eigenvalues"]),
            want["modes"][mode]["evr"][0] / theirs[0],
            rtol=1e-5,
        )
        assert rec["k_at"]["0.99"] is None  # 8 of ~36 directions cannot hold 99%
        assert len(got["null"][mode]["cev_mean"]) == 8
