"""LoRA spectra in side space (populations with more factor rows than sides): the kernels and the
null against float64 on 1-8 devices, the route against the factor-space route."""

import jax
import numpy as np
import pytest

from jsubspace import kernels
from jsubspace import spectra
from jsubspace import testing
from jsubspace.io import PlacedLora
from jsubspace.kernels import _lora_side
from jsubspace.sharding import models_mesh
from jsubspace.sharding import padded_count
from jsubspace.sharding import stacked_sharding
from jsubspace.spectra import _factored
from jsubspace.spectra import _layer
from jsubspace.spectra import _null


@pytest.fixture
def small_blocks(monkeypatch):
    # Blocks of 3 models: several per device, the last one moved back over its neighbour.
    monkeypatch.setattr(_lora_side, "BLOCK_ROWS", 12)


@pytest.mark.parametrize("center", ["mean", "none"])
def test_side_matrices_equal_float64(mesh, center, small_blocks):
    placed = testing.place_lora(*testing.mixed_lora_population(0), mesh)
    dw = testing.lora_updates64(placed)
    x = dw - dw.mean(0) if center == "mean" else dw
    common = dict(mesh=mesh, n_models=placed.n_models, center=center)
    rows = kernels.side_mode_matrix(*placed[:3], mode="rows", **common)
    cols = kernels.side_mode_matrix(*placed[:3], mode="cols", **common)
    for shift in (False, True):
        # The host (BLAS) accumulation holds the lower triangle.
        host = _factored.side_matrix(*placed[:3], mode="rows", shift=shift, **common)
        np.testing.assert_allclose(np.tril(host), np.tril(rows), atol=2e-6 * np.abs(rows).max())
        host = _factored.side_matrix(*placed[:3], mode="cols", shift=shift, **common)
        np.testing.assert_allclose(np.tril(host), np.tril(cols), atol=2e-6 * np.abs(rows).max())
    shifted = kernels.side_mode_matrix(*placed[:3], mode="rows", shift=True, **common)
    np.testing.assert_allclose(shifted, rows, atol=2e-6 * np.abs(rows).max())
    found = kernels.side_models(*placed[:3], **common)
    want_rows = np.einsum("imn,ikn->mk", x, x)
    scale = np.abs(want_rows).max()
    np.testing.assert_allclose(rows, want_rows, atol=2e-6 * scale)
    np.testing.assert_allclose(cols, np.einsum("imn,imk->nk", x, x), atol=2e-6 * scale)
    np.testing.assert_allclose(found.models, np.einsum("imn,jmn->ij", x, x), atol=2e-6 * scale)
    np.testing.assert_allclose(
        found.uncentred, np.einsum("imn,jmn->ij", dw, dw), atol=2e-6 * np.abs(dw).max() ** 2 * 480
    )
    a = np.asarray(placed.a, np.float64)[: placed.n_models]
    np.testing.assert_allclose(found.a_gram, np.einsum("irn,jrn->ij", a, a), rtol=1e-5, atol=1e-6)
    # All three modes share one trace.
    for matrix in (rows, cols, found.models):
        assert float(np.trace(np.asarray(matrix, np.float64))) == pytest.approx(
            np.sum(x * x), rel=1e-5
        )


def test_side_route_equals_float64_and_the_factor_route():
    mesh = models_mesh(2)
    placed = testing.place_lora(*testing.mixed_lora_population(1, n_models=11), mesh)
    assert _layer.side_space(placed, spectra.SpectraConfig())
    config = spectra.SpectraConfig()
    side = spectra.layer_spectra(placed, mesh=mesh, config=config, key=jax.random.key(0))
    in_factors = spectra.SpectraConfig(lora_space="factor")
    factored = spectra.layer_spectra(placed, mesh=mesh, config=in_factors, key=jax.random.key(0))
    x = testing.lora_updates64(placed)
    x = x - x.mean(0)
    want = testing.mode_spectra64(x)
    top = want["rows"][0]
    for mode, lam in want.items():
        assert side.modes[mode].method == "exact-side"
        ours = side.modes[mode].eigenvalues
        assert len(ours) == len(lam)
        np.testing.assert_allclose(ours, lam, rtol=1e-4, atol=2e-6 * top)
        theirs = factored.modes[mode].eigenvalues
        np.testing.assert_allclose(ours[: len(theirs)], theirs, rtol=1e-4, atol=2e-6 * top)
    assert side.total_energy == pytest.approx(np.sum(x * x), rel=1e-5)
    np.testing.assert_allclose(side.uncentred, factored.uncentred, rtol=1e-4, atol=1e-6 * top)
    np.testing.assert_allclose(side.factor_gram, factored.factor_gram, rtol=1e-5, atol=1e-6)


def test_side_route_keeps_float32_accuracy_when_the_mean_dominates():
    # Every adapter near one shared update (B_i = B0 + small, A_i = A0 + small): the mean term
    # subtracted after the products is 100x the centred energy.
    rng = np.random.default_rng(2)
    n_models, m, k, r = 40, 24, 20, 4
    a0, b0 = rng.standard_normal((r, k)), rng.standard_normal((m, r))
    a = (a0 + 0.01 * rng.standard_normal((n_models, r, k))).astype(np.float32)
    b = (b0 + 0.01 * rng.standard_normal((n_models, m, r))).astype(np.float32)
    mesh = models_mesh(1)
    placed = testing.place_lora(a, b, np.ones(n_models, np.float32), mesh)
    dw = testing.lora_updates64(placed)
    x = dw - dw.mean(0)
    assert n_models * np.sum(dw.mean(0) ** 2) > 50 * np.sum(x * x)
    got = spectra.layer_spectra(
        placed, mesh=mesh, config=spectra.SpectraConfig(), key=jax.random.key(0)
    )
    for mode, spec in (("rows", "imn,ikn->mk"), ("cols", "imn,imk->nk")):
        lam = np.linalg.eigvalsh(np.einsum(spec, x, x))[::-1]
        np.testing.assert_allclose(got.modes[mode].eigenvalues[:5], lam[:5], rtol=1e-4)


def test_null_factors_are_matched_drawn_by_model_and_gaussian():
    n_models, m, k, r = 10, 16, 12, 4
    energies = np.linspace(1.0, 3.0, n_models).astype(np.float32)
    ranks = [r] * n_models
    ranks[3] = 2
    drawn = []
    for d in (1, 4):
        mesh = models_mesh(d)
        n_pad = padded_count(n_models, mesh)
        mask = _layer.factor_sample_mask(n_pad, r, ranks + [0] * (n_pad - n_models))
        put = lambda x: jax.device_put(x, stacked_sharding(mesh))  # noqa: E731
        padded = np.zeros(n_pad, np.float32)
        padded[:n_models] = energies
        a, b, s = _null.null_lora_factors(
            jax.random.key(7),
            put(mask.reshape(n_pad, r)),
            put(padded),
            mesh=mesh,
            m=m,
            n=k,
            dtype=jax.numpy.bfloat16,
        )
        assert a.dtype == b.dtype == jax.numpy.bfloat16  # stored like the real factors
        placed = PlacedLora(a, b, s, n_models)
        dw = testing.lora_updates64(placed)
        np.testing.assert_allclose(np.sum(dw * dw, axis=(1, 2)), energies, rtol=1e-5)
        assert not np.any(np.asarray(a, np.float32)[3, 2:]) and not np.any(
            np.asarray(b, np.float32)[3, :, 2:]
        )
        drawn.append(dw)
    np.testing.assert_array_equal(drawn[0], drawn[1])  # whatever the mesh


def test_side_null_matches_explicit_gaussian_factors():
    from tests.spectra.test_factored import _explicit_null_cev

    n_models, m, k, r = 8, 20, 16, 3
    energies = np.linspace(1.0, 3.0, n_models)
    mesh = models_mesh(1)
    mask = _layer.factor_sample_mask(n_models, r, [r] * n_models).reshape(n_models, r)
    config = spectra.SpectraConfig(modes=("rows",))
    curves = []
    for draw in range(40):
        a, b, s = _null.null_lora_factors(
            jax.random.key(draw),
            mask,
            energies.astype(np.float32),
            mesh=mesh,
            m=m,
            n=k,
            dtype=np.float32,
        )
        got = _layer.side_lora_spectra(a, b, s, n_models, mesh=mesh, config=config, lineage=False)
        lam = got.modes["rows"].eigenvalues
        curves.append(np.cumsum(lam) / lam.sum())
    ours = np.mean(curves, 0)[:16]
    theirs = _explicit_null_cev((n_models, r, k), (n_models, m, r), energies, 40, seed=5)[:16]
    np.testing.assert_allclose(ours, theirs, atol=0.02)
    assert not np.allclose(ours, np.arange(1, 17) / 16)


@pytest.mark.parametrize(
    "lora, modes", [("delta", ("models", "rows", "cols")), ("factors", ("lora_A", "lora_B"))]
)
def test_layer_null_control_uses_the_side_route(lora, modes):
    mesh = models_mesh(2)
    placed = testing.place_lora(*testing.mixed_lora_population(3), mesh)
    config = spectra.SpectraConfig(lora=lora)
    ranks = [4] * 9 + [2] + [4] * 3
    key = jax.random.key(0)
    real = spectra.layer_spectra(placed, mesh=mesh, config=config, key=key, ranks=ranks)
    null = _null.null_control(
        placed,
        real,
        mesh=mesh,
        config=config,
        key=jax.random.key(1),
        draws=2,
        ranks=ranks,
        uncentred_norms=np.diag(real.uncentred),
    )
    assert null["draws"] == 2
    for mode in modes:
        cev = np.asarray(null[mode]["cev_mean"])
        assert np.all(np.diff(cev) >= -1e-6) and cev[-1] == pytest.approx(1.0, abs=1e-4)
        assert null[mode]["cev_std"][0] > 0  # two different draws


@pytest.mark.parametrize("release", [False, True])
def test_analyze_layer_releases_side_space_factors_before_the_null(tmp_path, release):
    from jsubspace import io

    a, b, _ = testing.mixed_lora_population(4)
    for i in range(len(a)):
        testing.write_peft_adapter(
            tmp_path / f"a{i:02d}", {"model.q_proj": (a[i], b[i])}, r=4, lora_alpha=8
        )
    population = io.open_population([str(tmp_path)])
    layer = population.layers[0]
    mesh = models_mesh(2)
    placed = io.place_layer(layer, mesh)
    config = spectra.SpectraConfig()
    assert _layer.side_space(placed, config)
    record = spectra.analyze_layer(
        layer,
        placed,
        population.names,
        mesh=mesh,
        spectra_config=config,
        control_config=spectra.ControlConfig(null_draws=2, holdout=None),
        key=jax.random.key(0),
        release=release,
    ).to_json()
    assert placed.a.is_deleted() == placed.b.is_deleted() == release
    assert record["null"]["draws"] == 2 and record["lineage"]["lora_A"]["fraction_shared"] > 0
    assert list(record).index("null") < list(record).index("holdout")  # its place in the file


def test_factor_covariance_equals_float64(mesh, small_blocks):
    a, b, scales = testing.mixed_lora_population(5)
    # Samples far from the origin: centring before the products keeps float32 accuracy.
    a = (a + 30.0).astype(np.float32)
    ranks = [4] * 9 + [2] + [4] * 3
    placed = testing.place_lora(a, b, scales, mesh)
    n_pad = placed.a.shape[0]
    mask = _layer.factor_sample_mask(n_pad, 4, ranks).reshape(n_pad, 4)
    mask = jax.device_put(mask, stacked_sharding(mesh))
    want = testing.factor_pca64(a, b, ranks)
    for factor in ("A", "B"):
        x = a if factor == "A" else b
        samples = (
            np.concatenate([x[i, :k] for i, k in enumerate(ranks)])
            if factor == "A"
            else np.concatenate([x[i, :, :k].T for i, k in enumerate(ranks)])
        ).astype(np.float64)
        mean = kernels.factor_mean(placed.a, placed.b, mask, mesh=mesh, factor=factor)
        np.testing.assert_allclose(mean, samples.mean(0), rtol=1e-6, atol=1e-6)
        centred = samples - samples.mean(0)
        cov64 = centred.T @ centred
        device = kernels.factor_covariance(placed.a, placed.b, mask, mesh=mesh, factor=factor)
        host = _factored.factor_covariance_matrix(
            placed.a, placed.b, mask, mesh=mesh, factor=factor
        )
        scale = np.abs(cov64).max()
        np.testing.assert_allclose(device, cov64, atol=2e-6 * scale)
        np.testing.assert_allclose(np.tril(host), np.tril(cov64), atol=2e-6 * scale)
        lam = _factored.eigvalsh(host, lower=True)
        np.testing.assert_allclose(lam, want[factor], rtol=1e-4, atol=2e-6 * want[factor][0])
    with pytest.raises(ValueError, match="factor must be one of"):
        kernels.factor_covariance(placed.a, placed.b, mask, mesh=mesh, factor="C")


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_factor_statistic_side_route_equals_the_factor_route(monkeypatch, host):
    if not host:  # The accelerators' route: matrices and eigenvalues from the device kernels.
        monkeypatch.setattr(_layer, "factored_on_host", lambda _: False)
    mesh = models_mesh(2)
    a, b, scales = testing.mixed_lora_population(6, n_models=11)
    ranks = [4] * 9 + [2] + [4]
    placed = testing.place_lora(a, b, scales, mesh)
    config = spectra.SpectraConfig(lora="factors")
    assert _layer.side_space(placed, config)
    key = jax.random.key(0)
    side = spectra.layer_spectra(placed, mesh=mesh, config=config, key=key, ranks=ranks)
    in_factors = spectra.SpectraConfig(lora="factors", lora_space="factor")
    factored = spectra.layer_spectra(placed, mesh=mesh, config=in_factors, key=key, ranks=ranks)
    want = testing.factor_pca64(a, b, ranks)
    for name, factor in (("lora_A", "A"), ("lora_B", "B")):
        ours, theirs = side.modes[name], factored.modes[name]
        assert ours.method == "exact-factor-pca-side" and ours.side == theirs.side
        top = want[factor][0]
        np.testing.assert_allclose(ours.eigenvalues, want[factor], rtol=1e-4, atol=2e-6 * top)
        np.testing.assert_allclose(
            ours.eigenvalues, theirs.eigenvalues[: ours.side], rtol=1e-4, atol=2e-6 * top
        )
        # Each statistic's own trace: the sum of its eigenvalues.
        assert ours.total_energy == pytest.approx(np.sum(want[factor]), rel=1e-5)
        assert ours.total_energy == pytest.approx(theirs.total_energy, rel=1e-5)
    assert side.total_energy == pytest.approx(factored.total_energy, rel=1e-5)
    np.testing.assert_allclose(side.norms, factored.norms, rtol=1e-5)
    np.testing.assert_allclose(side.factor_gram, factored.factor_gram, rtol=1e-5, atol=1e-6)


def test_factor_statistic_null_has_one_law_on_both_routes():
    # The side route draws Gaussian factors, the factor route Bartlett Gram factors: the same
    # matched null, so the mean CEV curves of the factor statistic agree.
    mesh = models_mesh(1)
    placed = testing.place_lora(*testing.mixed_lora_population(7), mesh)
    config = spectra.SpectraConfig(lora="factors")
    ranks = [4] * 13
    real = spectra.layer_spectra(
        placed, mesh=mesh, config=config, key=jax.random.key(0), ranks=ranks
    )

    def null(space):
        return _null.null_control(
            placed,
            real,
            mesh=mesh,
            config=spectra.SpectraConfig(lora="factors", lora_space=space),
            key=jax.random.key(1),
            draws=30,
            ranks=ranks,
            uncentred_norms=np.diag(real.uncentred),
        )

    side, factored = null("auto"), null("factor")
    for name in ("lora_A", "lora_B"):
        ours, theirs = np.asarray(side[name]["cev_mean"]), np.asarray(factored[name]["cev_mean"])
        np.testing.assert_allclose(ours[:12], theirs[:12], atol=0.02)
        assert not np.allclose(ours[:12], theirs[:12], atol=1e-7)  # two different draws


@pytest.mark.parametrize("d", [1, 2])
def test_factor_route_keeps_float32_accuracy_when_the_mean_dominates(monkeypatch, d):
    # Nr = 36 below both sides (factor route), 2Nr = 72 too; the mean carries ~5000x the
    # centred energy. Without the shift the top eigenvalues are off by ~1e-3.
    mesh = models_mesh(d)
    placed = testing.place_lora(*testing.near_one_update(8, 12, 80, 96, 3, 0.01), mesh)
    config = spectra.SpectraConfig()
    assert not _layer.side_space(placed, config)
    dw = testing.lora_updates64(placed)
    x = dw - dw.mean(0)
    assert np.sum(dw * dw) > 1000 * np.sum(x * x)
    want = testing.mode_spectra64(x)

    def worst(got):
        return max(
            np.max(np.abs(got.modes[mo].eigenvalues[:5] - lam[:5]) / lam[:5])
            for mo, lam in want.items()
        )

    got = spectra.layer_spectra(placed, mesh=mesh, config=config, key=jax.random.key(0))
    assert {got.modes[mo].method for mo in want} == {"exact-factored"}
    assert worst(got) < 1e-5
    assert got.total_energy == pytest.approx(np.sum(x * x), rel=1e-5)
    # Lineage keeps the unshifted updates' Gram.
    np.testing.assert_allclose(got.uncentred, np.einsum("imn,jmn->ij", dw, dw), rtol=1e-5)
    monkeypatch.setattr(_layer, "SHIFT_RATIO", np.inf)
    unshifted = spectra.layer_spectra(placed, mesh=mesh, config=config, key=jax.random.key(0))
    assert worst(unshifted) > 1e-4


def test_mean_dominated_layer_goes_to_side_space_when_shifted_rows_outnumber_the_sides():
    # Nr = 60 is below the sides (64, 48), 2Nr = 120 is not: the side route shifts instead.
    mesh = models_mesh(1)
    placed = testing.place_lora(*testing.near_one_update(9, 20, 64, 48, 3, 0.01), mesh)
    config = spectra.SpectraConfig()
    assert not _layer.side_space(placed, config)
    got = spectra.layer_spectra(placed, mesh=mesh, config=config, key=jax.random.key(0))
    x = testing.lora_updates64(placed)
    x = x - x.mean(0)
    for mode, lam in testing.mode_spectra64(x).items():
        assert got.modes[mode].method == "exact-side"
        np.testing.assert_allclose(got.modes[mode].eigenvalues[:5], lam[:5], rtol=1e-5)
