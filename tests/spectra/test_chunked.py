"""The chunked dense route (`LayerPlan.chunk`): layers whose float32 stack does not fit the budget
are converted and centred a few models at a time. Same numbers as the whole-stack route and
float64, on 1 to 8 devices; far smaller XLA temporaries; the plan picks it only when needed."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsubspace import io
from jsubspace import kernels
from jsubspace import sharding
from jsubspace import spectra
from jsubspace import testing


def _placed(w, mesh, dtype=np.float32):
    n_pad = sharding.padded_count(len(w), mesh)
    x = np.zeros((n_pad, *w.shape[1:]), dtype)
    x[: len(w)] = w
    return jax.device_put(x, sharding.stacked_sharding(mesh))


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_grams_equal_float64(mesh, chunk):
    # 11 models (padding on 2-8 devices) of 31 x 20 about a large mean: the models Gram by row
    # slices with a remainder slice, the rows / cols Grams by chunks of models.
    w = testing.planted_population(2, n_models=11, shape=(31, 20), rank=3, mean_scale=20.0)
    x = _placed(w, mesh)
    whole = kernels.mode_grams(x, mesh=mesh, n_models=11)
    found = kernels.mode_grams(x, mesh=mesh, n_models=11, chunk=chunk)
    xc = w.astype(np.float64) - w.astype(np.float64).mean(0)
    want = {
        "models": np.einsum("imn,jmn->ij", xc, xc),
        "rows": np.einsum("imn,ikn->mk", xc, xc),
        "cols": np.einsum("imn,imk->nk", xc, xc),
    }
    for mode, expected in want.items():
        scale = np.abs(expected).max()
        got = np.asarray(getattr(found, mode), np.float64)
        np.testing.assert_allclose(got, expected, atol=2e-5 * scale)
        np.testing.assert_allclose(got, np.asarray(getattr(whole, mode)), atol=2e-6 * scale)
    assert float(found.total_energy) == pytest.approx(np.sum(xc**2), rel=1e-5)
    # Uncentred (lineage): the plain inner products.
    raw = kernels.mode_grams(x, mesh=mesh, n_models=11, center="none", modes=("models",), chunk=2)
    w64 = w.astype(np.float64)
    expected = np.einsum("imn,jmn->ij", w64, w64)
    np.testing.assert_allclose(np.asarray(raw.models), expected, rtol=2e-6)


@pytest.mark.parametrize(
    "mode, chunk, center", [("rows", 1, "mean"), ("cols", 2, "mean"), ("rows", 2, "base")]
)
def test_the_chunked_dual_gram_equals_float64(mesh, mode, chunk, center):
    # A tall side's dual cross-Gram (`exact-dual`) by slices of the long side: 5 models (padding
    # on 2-8 devices) whose long side (37) leaves a remainder slice, about a large mean.
    shape = (37, 4) if mode == "rows" else (4, 37)
    w = testing.planted_population(4, n_models=5, shape=shape, rank=2, mean_scale=20.0)
    x = _placed(w, mesh)
    base = jnp.asarray(w[0] * 0.5)
    common = dict(mesh=mesh, n_models=5, center=center, mode=mode)
    whole = kernels.dual_mode_gram(x, base, **common)
    found = kernels.dual_mode_gram(x, base, chunk=chunk, **common)
    w64 = w.astype(np.float64)
    xc = np.zeros((x.shape[0], *shape))
    xc[:5] = w64 - (w64.mean(0) if center == "mean" else w64[0] * 0.5)
    if mode == "cols":
        xc = xc.transpose(0, 2, 1)
    q = xc.shape[2]
    want = np.einsum("ipa,jpb->iajb", xc, xc).reshape(len(xc) * q, len(xc) * q)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(found, np.float64), want, atol=2e-5 * scale)
    np.testing.assert_allclose(np.asarray(found), np.asarray(whole), atol=2e-6 * scale)


def test_the_chunked_dual_gram_holds_slices_not_the_stack():
    # XLA's own buffer accounting, as for the mode Grams: the whole-stack dual keeps a float32
    # centred copy of the stack, the chunked one the centre and a few slices of the long side
    # as large as a model.
    mesh = sharding.models_mesh(1)
    x = jnp.zeros((16, 4096, 8), jnp.bfloat16)
    model = 4096 * 8 * 4

    def temp(**kw):
        lowered = kernels.dual_mode_gram.lower(x, mesh=mesh, n_models=16, mode="rows", **kw)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp(), temp(chunk=1)
    assert whole >= 16 * model, whole
    assert chunked < 6 * model, chunked


@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_chunked_randomized_solver_equals_whole_stack(mode):
    mesh = sharding.models_mesh(2)
    w = testing.planted_population(3, n_models=9, shape=(40, 30), rank=4, mean_scale=5.0)
    x = _placed(w, mesh)
    common = dict(key=jax.random.key(1), mesh=mesh, n_models=9, mode=mode, rank=6, iterations=3)
    whole = kernels.randomized_mode_eigh(x, **common)
    found = kernels.randomized_mode_eigh(x, chunk=2, **common)
    # Equal to float32 rounding of the largest (the tail's Ritz values are not converged).
    np.testing.assert_allclose(found.values, whole.values, atol=1e-6 * float(whole.values[0]))
    xc = w.astype(np.float64) - w.astype(np.float64).mean(0)
    matrix = np.einsum("imn,ikn->mk" if mode == "rows" else "imn,imk->nk", xc, xc)
    top = np.linalg.eigvalsh(matrix)[::-1][:4]
    np.testing.assert_allclose(np.asarray(found.values)[:4], top, rtol=1e-4)


def test_chunked_kernels_hold_chunks_not_the_stack():
    # XLA's own buffer accounting: the whole-stack Grams keep float32 copies of the stack; the
    # chunked ones only of a chunk (and of a row slice for the models Gram).
    mesh = sharding.models_mesh(1)
    x = jnp.zeros((16, 256, 128), jnp.bfloat16)
    model = 256 * 128 * 4

    def temp(**kw):
        lowered = kernels.mode_grams.lower(x, mesh=mesh, n_models=16, **kw)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp(), temp(chunk=2)
    assert whole >= 16 * model, whole
    assert chunked < 10 * model, chunked


@pytest.mark.parametrize(
    "d, chunk, center", [(1, 1, "mean"), (2, 3, "mean"), (4, 1, "none"), (2, 1, "none")]
)
def test_a_chunked_basis_and_its_coefficients_equal_the_whole_stack(d, chunk, center):
    # compress's fit (`dense_basis`) on the chunked route: rows randomized, cols exact; the
    # per-model coefficients and energies come out in model order, padding rows zero. On 2
    # devices 7 models are 4 per device: chunk 3 goes by 2 chunks of 2 (the largest divisor).
    from jsubspace.compress import dense_basis

    mesh = sharding.models_mesh(d)
    w = testing.planted_population(7, n_models=7, shape=(36, 20), rank=3, mean_scale=4.0)
    x = _placed(w, mesh, dtype=jnp.bfloat16)
    common = dict(mesh=mesh, n_models=7, center=center, k=5, solvers=("randomized", "exact"))
    key = jax.random.key(3)
    whole = dense_basis(x, None, key, **common)
    found = dense_basis(x, None, key, chunk=chunk, **common)
    np.testing.assert_allclose(np.asarray(found.center), np.asarray(whole.center), atol=1e-6)
    xc = np.asarray(x, np.float64)[:7]
    if center == "mean":
        xc = xc - xc.mean(0)
    want_centre = np.asarray(x, np.float64)[:7].mean(0) if center == "mean" else 0 * xc[0]
    np.testing.assert_allclose(np.asarray(found.center), want_centre, atol=1e-5)
    np.testing.assert_allclose(np.asarray(found.energies)[:7], np.sum(xc**2, (1, 2)), rtol=1e-5)
    assert np.all(np.asarray(found.energies)[7:] == 0)
    # The coefficients in the found basis are U^T X_i V (float64), and those of the planted
    # rank-3 directions equal the whole stack's up to the bases' signs (the noise directions
    # past them are not determined to rounding).
    u, v = np.asarray(found.u, np.float64), np.asarray(found.v, np.float64)
    want = np.einsum("mk,iml,lj->ikj", u, xc, v)
    np.testing.assert_allclose(
        np.asarray(found.coefficients)[:7], want, atol=1e-5 * np.abs(want).max()
    )
    su = np.sign(np.sum(u * np.asarray(whole.u), 0))[:3]
    sv = np.sign(np.sum(v * np.asarray(whole.v), 0))[:3]
    np.testing.assert_allclose(
        np.asarray(found.coefficients)[:, :3, :3] * su[None, :, None] * sv[None, None, :],
        np.asarray(whole.coefficients)[:, :3, :3],
        atol=1e-4 * np.abs(want).max(),
    )


def test_the_chunked_fit_holds_chunks_not_the_stack():
    from jsubspace.compress import dense_basis

    mesh = sharding.models_mesh(1)
    x = jnp.zeros((16, 256, 128), jnp.bfloat16)
    model = 256 * 128 * 4
    common = dict(mesh=mesh, n_models=16, center="mean", k=8, solvers=("randomized", "exact"))

    def temp(**kw):
        lowered = dense_basis.lower(x, None, jax.random.key(0), **common, **kw)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp(), temp(chunk=2)
    assert whole >= 16 * model, whole
    assert chunked < 10 * model, chunked


def _population(tmp_path, w, dtype=np.float32):
    pop = tmp_path / "pop"
    for i, wi in enumerate(w):
        testing.write_safetensors(pop / f"m{i}.safetensors", {"layer.weight": wi.astype(dtype)})
    return io.open_population([str(pop)])


def _record(population, plan, mesh, config, controls):
    _, record = testing.analyze_only_layer(
        population, mesh, spectra_config=config, control_config=controls, plan=plan, release=True
    )
    return record.to_json()


def test_chunked_layer_record_equals_whole_stack(tmp_path):
    # Every default control on both routes: spectra (rows randomized, cols exact), the null
    # (the same draws, one model at a time), the holdout (exact cols downdated, randomized rows,
    # captures one model at a time), the split halves and the lineage.
    w = testing.planted_population(4, n_models=12, shape=(72, 24), rank=3, mean_scale=10.0)
    population = _population(tmp_path, w)
    (layer,) = population.layers
    mesh = sharding.models_mesh(2)
    config = spectra.SpectraConfig(exact_limit=48, rank=8)
    controls = spectra.ControlConfig(null_draws=2, holdout=4)
    plan = spectra.plan_layer(layer, n_pad=12, spectra=config, controls=controls)
    assert plan.chunk is None and plan.solvers["rows"] == "randomized"
    whole = _record(population, plan, mesh, config, controls)
    chunked = _record(population, dataclasses.replace(plan, chunk=2), mesh, config, controls)
    for mode in ("models", "rows", "cols"):
        got, want = chunked["modes"][mode]["eigenvalues"], whole["modes"][mode]["eigenvalues"]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * want[0])
        np.testing.assert_allclose(
            chunked["null"][mode]["cev_mean"], whole["null"][mode]["cev_mean"], atol=2e-5
        )
    for field in ("per_model_two_sided", "per_model_rows_one_sided", "per_model_cols_one_sided"):
        np.testing.assert_allclose(chunked["holdout"][field], whole["holdout"][field], atol=5e-5)
    assert chunked["holdout"]["mean_only"] == pytest.approx(whole["holdout"]["mean_only"], abs=1e-5)
    halves = chunked["compare"]["split_half"], whole["compare"]["split_half"]
    for side in ("rows", "cols"):
        np.testing.assert_allclose(
            halves[0][f"{side}_cosines"], halves[1][f"{side}_cosines"], atol=1e-4
        )
    # Cosines of near copies (~0.99) summed in another order: float32 rounding, ~1e-6.
    np.testing.assert_allclose(chunked["lineage"]["cosine"], whole["lineage"]["cosine"], atol=1e-5)
    assert chunked["verdict"]["label"] == whole["verdict"]["label"]


def test_a_chunked_tall_layer_takes_its_exact_spectrum_from_the_sliced_dual(tmp_path):
    # A vocabulary-like layer (the long side past `exact_limit`, N n within it) on the chunked
    # route: its rows spectrum and its null's come from the dual by slices, equal to the
    # whole-stack route's and to float64.
    w = testing.planted_population(6, n_models=5, shape=(300, 6), rank=2, mean_scale=5.0)
    population = _population(tmp_path, w)
    (layer,) = population.layers
    mesh = sharding.models_mesh(1)
    config = spectra.SpectraConfig(exact_limit=64)
    controls = spectra.ControlConfig(null_draws=2, holdout=None, split_half=False)
    plan = spectra.plan_layer(layer, n_pad=5, spectra=config, controls=controls)
    assert plan.chunk is None and plan.solvers["rows"] == "exact-dual"
    whole = _record(population, plan, mesh, config, controls)
    chunked = _record(population, dataclasses.replace(plan, chunk=1), mesh, config, controls)
    got, want = chunked["modes"]["rows"], whole["modes"]["rows"]
    assert got["method"] == "exact-dual"
    np.testing.assert_allclose(
        got["eigenvalues"], want["eigenvalues"], rtol=2e-5, atol=1e-6 * want["eigenvalues"][0]
    )
    w64 = w.astype(np.float64)
    exact = testing.mode_spectra64(w64 - w64.mean(0))["rows"][: len(got["eigenvalues"])]
    np.testing.assert_allclose(got["eigenvalues"], exact, rtol=1e-4, atol=1e-5 * exact[0])
    np.testing.assert_allclose(
        chunked["null"]["rows"]["cev_mean"], whole["null"]["rows"]["cev_mean"], atol=2e-5
    )


def test_the_plan_chunks_only_a_layer_over_the_budget(tmp_path):
    w = testing.planted_population(5, n_models=8, shape=(64, 48), rank=2)
    population = _population(tmp_path, w, dtype=np.float16)
    (layer,) = population.layers
    common = dict(n_pad=8, spectra=spectra.SpectraConfig(), controls=spectra.ControlConfig())
    whole = spectra.plan_layer(layer, **common, budget=2**30)
    assert whole.chunk is None
    budget = whole.working_set_bytes - 1
    chunked = spectra.plan_layer(layer, **common, budget=budget, devices=2)
    # The largest chunk per device (of the 4 models each of 2 devices holds) that fits.
    assert chunked.chunk in (1, 2) and chunked.working_set_bytes <= budget
    assert chunked.to_json()["chunk"] == chunked.chunk
    smaller = spectra.plan_layer(layer, **common, budget=chunked.working_set_bytes - 1, devices=2)
    assert smaller.chunk is not None and smaller.chunk < chunked.chunk or chunked.chunk == 1
    # A randomized side converts the stack again at every Krylov product on this route: the
    # estimate counts those passes (spectra, null draws). The holdout's fold bases convert
    # their kept models at every product on both routes (`_holdout._kept_models_sum`).
    common["spectra"] = spectra.SpectraConfig(exact_limit=32, rank=4)
    whole = spectra.plan_layer(layer, **common, budget=2**30)
    chunked = spectra.plan_layer(layer, **common, budget=whole.working_set_bytes - 1)
    assert whole.solvers["rows"] == "randomized" and chunked.chunk is not None
    for part in ("spectra", "null"):
        assert chunked.parts[part] > whole.parts[part], part
    assert chunked.parts["holdout"] == pytest.approx(whole.parts["holdout"])


def test_a_chunked_2_byte_layer_draws_its_null_in_bfloat16(tmp_path):
    from jsubspace.spectra import _null

    mesh = sharding.models_mesh(2)
    norms = np.array([1.0, 2.0, 0.5, 0.0], np.float32)
    norms = jax.device_put(norms, sharding.stacked_sharding(mesh))
    key = jax.random.key(7)
    whole = _null.gaussian_stack(key, norms, mesh=mesh, shape=(30, 20))
    one = _null.gaussian_stack(key, norms, mesh=mesh, shape=(30, 20), one_at_a_time=True)
    np.testing.assert_allclose(np.asarray(one), np.asarray(whole), rtol=1e-6, atol=1e-7)
    half = _null.gaussian_stack(
        key, norms, mesh=mesh, shape=(30, 20), dtype=jnp.bfloat16, one_at_a_time=True
    )
    assert half.dtype == jnp.bfloat16
    got = np.sqrt(np.sum(np.asarray(half, np.float64) ** 2, axis=(1, 2)))
    np.testing.assert_allclose(got, [1.0, 2.0, 0.5, 0.0], rtol=5e-3)
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(whole), atol=4e-3)


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_the_population_sum_adds_each_devices_models_one_at_a_time(devices):
    from jsubspace.spectra import _holdout

    mesh = sharding.models_mesh(devices)
    w = testing.planted_population(6, n_models=7, shape=(12, 10), rank=2, mean_scale=3.0)
    x = _placed(w, mesh, dtype=jnp.bfloat16)
    want = np.asarray(x, np.float64).sum(0)
    got = np.asarray(_holdout._population_sum(x, mesh=mesh, one_at_a_time=True), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    whole = _holdout._population_sum(x, mesh=mesh)
    np.testing.assert_allclose(got, np.asarray(whole), rtol=1e-6, atol=1e-5)
    # Weighted: the groups control's sum of one group and the held-out models.
    chosen = np.array([1, 0, 1, 1, 0, 0, 1], bool)
    weights = _holdout.model_weights(chosen, x.shape[0], sharding.stacked_sharding(mesh))
    some = np.asarray(_holdout._population_sum(x, weights, mesh=mesh), np.float64)
    want = np.asarray(x, np.float64)[: len(chosen)][chosen].sum(0)
    np.testing.assert_allclose(some, want, rtol=1e-6, atol=1e-5)
