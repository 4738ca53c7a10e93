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


def _factored(placed, holdout, *, shift=False, grams=False):
    """The holdout through the factors, or from the spectra's factor Grams (`grams`)."""
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
        grams=real.factor_grams if grams else None,
    )


def _check(record, dw, holdout, *, rtol):
    testing.assert_holdout64(record, dw, holdout, seed=3, tol=rtol)


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


# Sides longer than the 13 x 4 factor rows: the factor route, whose Grams the spectra keep for the
# controls (`spectra._gram_bases`).
@pytest.mark.parametrize("holdout", ["loo", 4])
def test_holdout_from_the_grams_equals_float64(mesh, holdout):
    placed = testing.place_lora(*testing.mixed_lora_population(0, m=60, k=72), mesh)
    record = _factored(placed, holdout, grams=True)
    assert record["bases"]["from"] == "grams" and record["bases"]["fold_iterations"] == 2
    assert record["bases"]["residual"] < 1e-4  # the Krylov space spans these short sides
    _check(record, testing.lora_updates64(placed), holdout, rtol=2e-5)


def test_warm_started_folds_stay_close_to_the_exact_bases_where_krylov_does_not_span():
    # 24 adapters of rank 8 (d = 8 x 12 = 96 coefficients per fold basis): the fold solves'
    # 2 warm-started steps span 3 x 18 of them, not all; a planted shared B subspace.
    rng = np.random.default_rng(7)
    a, b = testing.lora_population(7, n_models=24, shape=(256, 200), rank=8)
    b = b + 0.5 * (rng.standard_normal((256, 3)) @ rng.standard_normal((3, 8)))[None]
    placed = testing.place_lora(a, b, np.ones(24, np.float32), models_mesh(2))
    record = _factored(placed, 4, grams=True)
    assert max(record["ks"]) == 8 and record["bases"]["residual"] < 0.02  # 4.5e-3 here
    # Every captured fraction within 2e-4 of the exact bases' (7e-5 here, 2e-5 on the means).
    _check(record, testing.lora_updates64(placed), 4, rtol=2e-4)
    # Against the factors' own randomized route (4 cold steps per fold): the same numbers.
    theirs = _factored(placed, 4)
    for field in ("two_sided", "rows_one_sided", "cols_one_sided"):
        np.testing.assert_allclose(record[field], theirs[field], atol=1e-4)


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


def test_adapters_close_to_their_mean_take_their_controls_from_the_shifted_factors(
    tmp_path, monkeypatch
):
    # 12 fine-tunes of one rank-3 adapter (1% spread: the mean holds ~5000x the centred energy)
    # with sides of 100 / 96 beside 36 factor rows: the factor route, mean-dominated, so the
    # spectra and the controls are taken of the shifted population and the factor Grams (which
    # cancel in float32 here) are not used for the holdout. Too large to materialise (limit 0):
    # the holdout runs through the shifted factors, and equals float64 on the updates.
    from jsubspace import io

    a, b, _ = testing.near_one_update(4, 12, 100, 96, 3, 0.01)
    for i in range(12):
        testing.write_peft_adapter(
            tmp_path / "pop" / f"a{i:02d}", {"model.q_proj": (a[i], b[i])}, r=3, lora_alpha=6
        )
    population = io.open_population([str(tmp_path / "pop")])
    mesh = models_mesh(2)
    monkeypatch.setattr(_plan, "MATERIALISE_LIMIT", 0)
    _, record = testing.analyze_only_layer(
        population,
        mesh,
        spectra_config=spectra.SpectraConfig(),
        control_config=spectra.ControlConfig(null_draws=0, holdout=4, split_half=False),
    )
    record = record.to_json()
    assert record["plan"]["route"] == "lora-factor"
    assert "bases" not in record["holdout"]  # not from the factor Grams
    dw = 2.0 * np.einsum("imr,irn->imn", b.astype(np.float64), a.astype(np.float64))
    testing.assert_holdout64(record["holdout"], dw, 4, seed=0, tol=5e-6)
    centred = dw - dw.mean(0)
    want = testing.mode_spectra64(centred)
    for mode in ("rows", "cols", "models"):
        got = np.asarray(record["modes"][mode]["eigenvalues"][:5])
        np.testing.assert_allclose(got, want[mode][:5], atol=1e-5 * want[mode][0])
