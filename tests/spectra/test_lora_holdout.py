"""The holdout control of LoRA layers from their factors, against float64 on materialised
updates, and its place in `analyze_layer` for layers too large to materialise."""

import jax
import numpy as np
import pytest

from jsubspace import kernels
from jsubspace import spectra
from jsubspace import testing
from jsubspace.sharding import models_mesh
from jsubspace.spectra import _holdout
from jsubspace.spectra import _plan


def _factored(placed, holdout, *, shift=False):
    real = spectra.layer_spectra(
        placed, mesh=placed.a.sharding.mesh, config=spectra.SpectraConfig(), key=jax.random.key(0)
    )
    factors = placed[:3]
    if shift:
        factors = kernels.shifted_lora(
            *factors, mesh=placed.a.sharding.mesh, n_models=placed.n_models, split="rows"
        )
    return _holdout.lora_holdout_control(
        factors,
        placed.n_models,
        mesh=placed.a.sharding.mesh,
        holdout=holdout,
        seed=3,
        models_gram=real.models_gram,
        energies=np.diag(real.uncentred),
        key=jax.random.key(1),
    )


def _check(record, dw, holdout, *, rtol):
    folds = _holdout.fold_assignment(len(dw), holdout, 3)
    kmax = max(record["ks"])
    want = _holdout._record(
        *testing.holdout64(dw, folds, kmax, 3),
        m=dw.shape[1],
        n=dw.shape[2],
        kmax=kmax,
        folds=int(folds.max()) + 1,
        holdout=holdout,
        center="mean",
        note=None,
    )
    assert record["ks"] == want["ks"] and record["scheme"] == want["scheme"]
    for field in ("two_sided", "rows_one_sided", "cols_one_sided", "mean_plus_basis"):
        np.testing.assert_allclose(record[field], want[field], rtol=rtol, atol=rtol)
    for field in ("two_sided", "rows_one_sided", "cols_one_sided"):
        np.testing.assert_allclose(
            record[f"per_model_{field}"], want[f"per_model_{field}"], atol=rtol
        )
    assert record["mean_only"] == pytest.approx(want["mean_only"], abs=rtol)


@pytest.mark.parametrize("holdout", ["loo", 4])
def test_factored_holdout_equals_float64(mesh, holdout):
    # Sides of 20 / 24: the Krylov basis spans them, so the bases are the exact eigenvectors
    # (shared A group, ranks padded from 4 to 2).
    placed = testing.place_lora(*testing.mixed_lora_population(0), mesh)
    record = _factored(placed, holdout)
    # k up to half the shorter side, and below the models of the smallest fold's basis (13
    # less 2 x 4 held-out / centring models for 4 folds).
    assert record["ks"] == ([1, 2, 4, 8] if holdout == "loo" else [1, 2, 4])
    _check(record, testing.lora_updates64(placed), holdout, rtol=2e-5)


def test_factored_holdout_keeps_float32_accuracy_when_the_mean_dominates():
    # ~5000x the centred energy in the mean: the captures are taken of the shifted population.
    mesh = models_mesh(2)
    placed = testing.place_lora(*testing.near_one_update(8, 12, 80, 96, 3, 0.01), mesh)
    dw = testing.lora_updates64(placed)
    # Errors ~1e-7 shifted, 3-5e-5 of the held-out energy without the shift.
    _check(_factored(placed, 3, shift=True), dw, 3, rtol=2e-6)
    with pytest.raises(AssertionError):
        _check(_factored(placed, 3), dw, 3, rtol=2e-6)


def _population_dir(root, seed, shape):
    a, b = testing.lora_population(seed, n_models=12, shape=shape, rank=4)
    for i in range(len(a)):
        testing.write_peft_adapter(
            root / f"a{i:02d}", {"model.q_proj": (a[i], b[i])}, r=4, lora_alpha=8
        )
    return str(root)


# 12 x 4 factor rows beside sides of 40 / 36 (side space: the controls run through the factors)
# and of 60 / 56 (factor route: from the factor Grams the spectra computed).
@pytest.mark.parametrize("shape", [(40, 36), (60, 56)], ids=["side", "factor"])
def test_analyze_layer_takes_the_controls_from_the_factors_for_layers_too_large_to_materialise(
    tmp_path, monkeypatch, shape
):
    from jsubspace import io

    population = io.open_population([_population_dir(tmp_path / "one", 5, shape)])
    other = io.open_population([_population_dir(tmp_path / "two", 6, shape)])
    (layer,) = population.layers
    (other_layer,) = other.layers
    mesh = models_mesh(2)

    def record(split_half=True):
        return spectra.analyze_layer(
            layer,
            io.place_layer(layer, mesh),
            population.names,
            mesh=mesh,
            spectra_config=spectra.SpectraConfig(),
            control_config=spectra.ControlConfig(null_draws=0, holdout=4, split_half=split_half),
            key=jax.random.key(0),
            other=(other_layer, io.place_layer(other_layer, mesh)),
        ).to_json()

    materialised = record()
    monkeypatch.setattr(_plan, "MATERIALISE_LIMIT", 0)
    factored = record()
    ours, theirs = factored["holdout"], materialised["holdout"]
    grams = shape == (60, 56)
    assert ("bases" in ours) == grams and ("bases" in factored["compare"]["split_half"]) == grams
    # 9 training models, 3 of them centring held-out ones: a basis of 6 models, k <= 5.
    assert ours["ks"] == theirs["ks"] == [1, 2, 4]
    for field in ("two_sided", "rows_one_sided", "cols_one_sided", "mean_plus_basis"):
        np.testing.assert_allclose(ours[field], theirs[field], rtol=1e-3)
    assert ours["mean_only"] == pytest.approx(theirs["mean_only"], abs=1e-5)
    # Split halves and the second population: the same principal angles (k = 5 and 11).
    for part in ("split_half", "other"):
        ours, theirs = factored["compare"][part], materialised["compare"][part]
        assert ours["k"] == theirs["k"]
        for field in ("rows_cosines", "cols_cosines"):
            np.testing.assert_allclose(ours[field], theirs[field], atol=1e-4)
    assert factored["verdict"]["label"] == materialised["verdict"]["label"]
    assert list(record(split_half=False)["compare"]) == ["other"]  # --nosplit_half
