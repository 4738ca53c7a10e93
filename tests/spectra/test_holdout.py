"""The dense holdout against float64: every model's held-out captures, each fold's exact bases
downdated from the population's matrix, on 1 to 8 devices."""

import jax
import numpy as np
import pytest

from jsubspace import sharding
from jsubspace import testing
from jsubspace.spectra import _holdout


def _placed(w, mesh):
    n_pad = sharding.padded_count(len(w), mesh)
    x = np.zeros((n_pad, *w.shape[1:]), np.float32)
    x[: len(w)] = w
    return jax.device_put(x, sharding.stacked_sharding(mesh))


@pytest.mark.parametrize("holdout", ["loo", 4])
@pytest.mark.parametrize("mean_scale", [0.0, 30.0])
def test_dense_holdout_equals_float64(mesh, holdout, mean_scale):
    # 13 models of 20 x 24: a planted rank-3 subspace plus noise; with mean_scale 30 the mean
    # carries ~99% of the energy (the downdate is taken about the population mean).
    w = testing.planted_population(
        0, n_models=13, shape=(20, 24), rank=3, noise=0.3, mean_scale=mean_scale
    )
    record = _holdout.holdout_control(_placed(w, mesh), 13, mesh=mesh, holdout=holdout, seed=3)
    folds = _holdout.fold_assignment(13, holdout, 3)
    kmax = max(record["ks"])
    want = _holdout._record(
        *testing.holdout64(w.astype(np.float64), folds, kmax, 3),
        m=20,
        n=24,
        kmax=kmax,
        folds=int(folds.max()) + 1,
        holdout=holdout,
        center="mean",
        note=None,
    )
    for field in ("two_sided", "rows_one_sided", "cols_one_sided"):
        np.testing.assert_allclose(
            record[f"per_model_{field}"], want[f"per_model_{field}"], atol=2e-5
        )
    assert record["mean_only"] == pytest.approx(want["mean_only"], abs=1e-5)


@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_a_fold_matrix_is_the_downdate_of_the_population_matrix_in_float64(mesh, mode):
    # 11 models (padding on 2-8 devices) about a large mean; 5 removed, spread over devices.
    w = testing.planted_population(2, n_models=11, shape=(18, 14), rank=3, mean_scale=20.0)
    x = _placed(w, mesh)
    w64 = w.astype(np.float64)
    mu = w64.mean(0)
    spec = "imn,ikn->mk" if mode == "rows" else "imn,imk->nk"
    gram = np.einsum(spec, w64 - mu, w64 - mu)
    chosen = np.zeros(11, bool)
    chosen[[0, 3, 4, 8, 10]] = True
    removed = _holdout.model_weights(chosen, x.shape[0], sharding.stacked_sharding(mesh))
    args = (jax.numpy.asarray(gram, np.float32), x, removed, jax.numpy.asarray(mu, np.float32))
    found = _holdout._fold_matrix(*args, 6.0, mesh=mesh, mode=mode)
    kept = w64[~chosen] - w64[~chosen].mean(0)
    want = np.einsum(spec, kept, kept)
    np.testing.assert_allclose(np.asarray(found, np.float64), want, atol=2e-5 * np.abs(gram).max())


def test_a_fold_matrix_reads_each_devices_own_models():
    # XLA's buffers on 8 devices: the removed models are summed where they live (a few models'
    # worth of temporaries per device), not gathered (a dynamic index into the sharded stack
    # made every device hold all 64 models).
    mesh = sharding.models_mesh(8)
    x = jax.device_put(
        jax.numpy.zeros((64, 64, 96), jax.numpy.bfloat16), sharding.stacked_sharding(mesh)
    )
    chosen = np.arange(64) < 26
    removed = _holdout.model_weights(chosen, 64, sharding.stacked_sharding(mesh))
    mu = jax.numpy.zeros((64, 96), np.float32)
    model = 64 * 96 * 4
    for mode, side in (("rows", 64), ("cols", 96)):
        gram = jax.numpy.zeros((side, side), np.float32)
        compiled = _holdout._fold_matrix.lower(gram, x, removed, mu, 38.0, mesh=mesh, mode=mode)
        assert "all-gather" not in compiled.compile().as_text()
        assert compiled.compile().memory_analysis().temp_size_in_bytes < 8 * model


def test_fold_bases_read_the_kept_models_one_at_a_time():
    # XLA's buffers for one fold's randomized bases of 16 bf16 models (10 kept): the kept
    # models converted and centred one at a time, never a float32 copy of the stack (which the
    # bases took before: the converted stack and its centred copy, 32 models' worth).
    mesh = sharding.models_mesh(1)
    x = jax.device_put(
        jax.numpy.zeros((16, 256, 384), jax.numpy.bfloat16), sharding.stacked_sharding(mesh)
    )
    weights = _holdout.model_weights(np.arange(16) >= 6, 16, sharding.stacked_sharding(mesh))
    lowered = _holdout._masked_bases.lower(
        x,
        weights,
        jax.random.key(0),
        jax.numpy.zeros((256, 384), np.float32),
        mesh=mesh,
        kmax=8,
        solvers=("randomized", "randomized"),
        iterations=3,
        by_mean=True,
    )
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temp < 6 * 256 * 384 * 4, temp


def test_the_holdout_reuses_the_spectra_grams():
    """The spectra's centred rows / cols Grams, handed to the holdout, give the same record as
    the holdout's own pass over the stack (and layer_spectra keeps them for it)."""
    from jsubspace import spectra

    mesh = sharding.models_mesh(4)
    w = testing.planted_population(1, n_models=12, shape=(20, 24), rank=3, noise=0.3)
    x = _placed(w, mesh)
    from jsubspace.io import PlacedDense

    found = spectra.layer_spectra(
        PlacedDense(x, 12), mesh=mesh, config=spectra.SpectraConfig(), key=jax.random.key(0)
    )
    assert found.grams.rows.shape == (20, 20) and found.grams.cols.shape == (24, 24)
    own = _holdout.holdout_control(x, 12, mesh=mesh, holdout=4, seed=3)
    reused = _holdout.holdout_control(x, 12, mesh=mesh, holdout=4, seed=3, grams=found.grams)
    for field in ("per_model_two_sided", "per_model_rows_one_sided", "per_model_cols_one_sided"):
        np.testing.assert_allclose(reused[field], own[field], atol=1e-6)


def test_long_sides_take_their_fold_bases_by_lanczos_and_agree_with_float64():
    """A side of 320 (past `LANCZOS_SIDE`, k a small part of it): the CPU fold bases come from
    Lanczos; the per-model captures still equal the float64 oracle's."""
    assert 320 >= _holdout.LANCZOS_SIDE
    mesh = sharding.models_mesh(2)
    w = testing.planted_population(2, n_models=10, shape=(320, 24), rank=3, noise=0.3)
    record = _holdout.holdout_control(_placed(w, mesh), 10, mesh=mesh, holdout=5, seed=1)
    folds = _holdout.fold_assignment(10, 5, 1)
    kmax = max(record["ks"])
    assert kmax <= 320 // 8
    want = _holdout._record(
        *testing.holdout64(w.astype(np.float64), folds, kmax, 1),
        m=320,
        n=24,
        kmax=kmax,
        folds=5,
        holdout=5,
        center="mean",
        note=None,
    )
    for field in ("two_sided", "rows_one_sided", "cols_one_sided"):
        np.testing.assert_allclose(
            record[f"per_model_{field}"], want[f"per_model_{field}"], atol=2e-5
        )
    # The solver itself: the top eigenvectors of a 320-wide matrix, descending, to float32.
    g = np.cov(np.random.default_rng(0).standard_normal((320, 900))).astype(np.float32)
    got = _holdout.top_eigenvectors(jax.numpy.asarray(g), 6)
    want_v = np.linalg.eigh(g.astype(np.float64))[1][:, ::-1][:, :6]
    np.testing.assert_allclose(np.abs(np.sum(got * want_v, axis=0)), 1.0, atol=1e-5)


def test_a_layer_equal_in_every_model_gets_a_basis_not_a_crash():
    """The fold matrix of a layer all models share is zero: no Lanczos start fails on it."""
    got = _holdout.top_eigenvectors(jax.numpy.zeros((320, 320), jax.numpy.float32), 5)
    assert got.shape == (320, 5) and np.all(np.isfinite(got))
    mesh = sharding.models_mesh(1)
    w = np.repeat(np.random.default_rng(0).standard_normal((1, 320, 24)), 8, axis=0)
    record = _holdout.holdout_control(
        _placed(w.astype(np.float32), mesh), 8, mesh=mesh, holdout=4, seed=0
    )
    assert record["mean_only"] == pytest.approx(1.0)


@pytest.mark.parametrize("by_mean", [True, False])
def test_held_captures_on_a_mesh_keep_a_block_per_device_and_equal_the_gather(by_mean):
    # 16 models of 96 x 80 on 4 devices, 11 held out (blocks of 3, one padding row): the spread
    # captures equal the single-device gather, and no device holds the 11 held-out and 11
    # centring models (the gather's all-reduce of both sets): XLA's temporary bytes drop.
    mesh = sharding.models_mesh(4)
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 96, 80)).astype(np.float32)
    x = _placed(w, mesh)
    held = jax.numpy.asarray([0, 1, 3, 4, 5, 8, 9, 11, 12, 14, 15])
    centre = jax.numpy.asarray([2, 6, 7, 10, 13, 0, 1, 3, 4, 5, 8])
    ref = jax.numpy.zeros((96, 80), np.float32)
    total = jax.numpy.asarray(w.sum(0))
    u = jax.numpy.asarray(np.linalg.qr(rng.standard_normal((96, 6)))[0].astype(np.float32))
    v = jax.numpy.asarray(np.linalg.qr(rng.standard_normal((80, 6)))[0].astype(np.float32))
    args = (x, held, centre, ref, total, 16.0, u, v)
    spread = _holdout.held_captures(*args, by_mean=by_mean, mesh=mesh)
    gathered = _holdout._gathered_captures(*args, by_mean=by_mean)
    for a, b in zip(spread, gathered, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
    # The energies against float64: W_i - W_c (or - ref), and W_i about the training mean.
    w64 = w.astype(np.float64)
    d64 = w64[np.asarray(held)] - (w64[np.asarray(centre)] if by_mean else 0.0)
    np.testing.assert_allclose(np.asarray(spread[3]), np.sum(d64**2, axis=(1, 2)), rtol=1e-5)
    mu = (w64.sum(0) - w64[np.asarray(held)].sum(0)) / (16 - 11)
    resid = np.sum((w64[np.asarray(held)] - mu) ** 2, axis=(1, 2))
    np.testing.assert_allclose(np.asarray(spread[4]), resid, rtol=1e-5)

    def temp_bytes(fn, **kw):
        return fn.lower(*args, by_mean=by_mean, **kw).compile().memory_analysis().temp_size_in_bytes

    spread_bytes = temp_bytes(_holdout._spread_captures, mesh=mesh)
    gathered_bytes = temp_bytes(_holdout._gathered_captures)
    model = 96 * 80 * 4
    assert gathered_bytes >= 22 * model  # both sets of 11, on the device
    assert spread_bytes <= gathered_bytes / 2  # a few blocks of 3


def test_folds_of_different_sizes_share_one_compilation():
    # 13 models in 4 folds (4, 3, 3, 3 held out; 6 to 8 removed with their centring models):
    # padded to one length, every fold runs the same compiled downdate (one per mode) and
    # captures. Each distinct size cost a compilation before: 4-12 s each on an H200.
    mesh = sharding.models_mesh(1)
    w = testing.planted_population(0, n_models=13, shape=(20, 24), rank=3, noise=0.3)
    folds = _holdout.fold_assignment(13, 4, 3)
    assert len(set(np.bincount(folds))) > 1
    _holdout._fold_matrix._clear_cache()
    _holdout._gathered_captures._clear_cache()
    _holdout.holdout_control(_placed(w, mesh), 13, mesh=mesh, holdout=4, seed=3)
    assert _holdout._fold_matrix._cache_size() == 2  # rows and cols
    assert _holdout._gathered_captures._cache_size() == 1


@pytest.mark.parametrize("route", ["gathered", "spread", "chunked"])
def test_padded_held_sets_give_the_captures_of_the_unpadded(route):
    mesh = sharding.models_mesh(4 if route == "spread" else 1)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((12, 20, 24)).astype(np.float32)
    x = _placed(w, mesh)
    held, centre = np.array([0, 3, 7]), np.array([1, 4, 8])
    u = jax.numpy.asarray(np.linalg.qr(rng.standard_normal((20, 5)))[0].astype(np.float32))
    v = jax.numpy.asarray(np.linalg.qr(rng.standard_normal((24, 5)))[0].astype(np.float32))
    common = dict(mesh=mesh, chunk=1 if route == "chunked" else None)
    rest = (jax.numpy.zeros((20, 24)), jax.numpy.asarray(w.sum(0)), 12.0, u, v)
    plain = _holdout.held_captures(
        x, jax.numpy.asarray(held), jax.numpy.asarray(centre), *rest, **common
    )
    padded = _holdout.held_captures(
        x,
        _holdout.padded_indices(held, 5),
        _holdout.padded_indices(centre, 5),
        *rest,
        p=3,
        **common,
    )
    for a, b in zip(padded, plain, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # The training mean leaves out the 3 held-out models only, not the pads.
    w64 = w.astype(np.float64)
    mu = (w64.sum(0) - w64[held].sum(0)) / 9
    np.testing.assert_allclose(
        np.asarray(padded[4]), np.sum((w64[held] - mu) ** 2, axis=(1, 2)), rtol=1e-5
    )
