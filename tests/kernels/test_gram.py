"""Mode Grams against numpy float64, on 1/2/4/8 devices, for every centre and stored dtype."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jsubspace import kernels
from jsubspace import sharding
from jsubspace import testing

TOL = {np.float32: 2e-5, ml_dtypes.bfloat16: 2e-5, np.float16: 2e-5}


def _place(values, mesh):
    n = values.shape[0]
    padded = np.zeros((sharding.padded_count(n, mesh), *values.shape[1:]), values.dtype)
    padded[:n] = values
    return jax.device_put(padded, sharding.stacked_sharding(mesh))


def _oracle(values, center, base=None):
    w = np.asarray(values, np.float64)
    if center == "mean":
        x = w - w.mean(0)
    elif center == "base":
        x = w - np.asarray(base, np.float64)
    else:
        x = w
    return {
        "models": np.einsum("imn,jmn->ij", x, x),
        "rows": np.einsum("imn,ikn->mk", x, x),
        "cols": np.einsum("imn,imk->nk", x, x),
        "energy": np.sum(x * x),
    }


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("center", ["mean", "none", "base"])
@pytest.mark.parametrize("shape", [(7, 9), (16, 4)])
def test_mode_grams_match_float64(mesh, dtype, center, shape):
    values = testing.planted_population(
        0, n_models=5, shape=shape, rank=3, mean_scale=2.0, dtype=dtype
    )
    base = values[0] if center == "base" else None
    g = kernels.mode_grams(
        _place(values, mesh),
        None if base is None else jnp.asarray(base),
        mesh=mesh,
        n_models=5,
        center=center,
    )
    want = _oracle(values, center, base)
    scale = want["energy"]
    for mode in ("models", "rows", "cols"):
        got = np.asarray(getattr(g, mode), np.float64)
        assert got.shape == want[mode].shape
        np.testing.assert_allclose(got, want[mode], atol=TOL[dtype] * scale)
    np.testing.assert_allclose(float(g.total_energy), scale, rtol=TOL[dtype])
    # All three modes share one trace: the total energy.
    for mode in ("models", "rows", "cols"):
        np.testing.assert_allclose(
            np.trace(np.asarray(getattr(g, mode), np.float64)), scale, rtol=1e-5
        )


def test_centering_is_robust_near_the_mean():
    # Fine-tuned populations sit close to a large common offset; the one-pass formula
    # S2 - N mu mu^T would lose every digit here in float32.
    mesh = sharding.models_mesh(2)
    values = testing.planted_population(
        1, n_models=6, shape=(8, 8), rank=2, noise=0.01, mean_scale=0.0
    )
    values = (1000.0 + values * 1e-2).astype(np.float32)
    g = kernels.mode_grams(_place(values, mesh), mesh=mesh, n_models=6, center="mean")
    want = _oracle(values, "mean")
    np.testing.assert_allclose(float(g.total_energy), want["energy"], rtol=1e-2)
    top = np.linalg.eigvalsh(np.asarray(g.rows, np.float64))[-1]
    np.testing.assert_allclose(top, np.linalg.eigvalsh(want["rows"])[-1], rtol=2e-2)


def test_ring_cross_gram_blocks():
    mesh = sharding.models_mesh(4)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 5, 3)).astype(np.float32)

    def body(xb):
        return kernels.ring_cross_gram(xb, num_devices=4)

    got = jax.shard_map(body, mesh=mesh, in_specs=jax.P("models"), out_specs=jax.P("models"))(
        jax.device_put(x, sharding.stacked_sharding(mesh))
    )
    want = np.einsum("ipa,jpb->iajb", x.astype(np.float64), x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("devices, b, p, q", [(4, 2, 5, 3), (2, 3, 8, 1), (8, 1, 13, 2)])
def test_exchanged_cross_gram_equals_the_ring_and_float64(devices, b, p, q):
    # p = 5 and 13 are not multiples of the device count: the contraction is zero-padded.
    mesh = sharding.models_mesh(devices)
    rng = np.random.default_rng(p)
    x = rng.standard_normal((devices * b, p, q)).astype(np.float32)
    placed = jax.device_put(x, sharding.stacked_sharding(mesh))
    found = {}
    for name in ("ring_cross_gram", "exchanged_cross_gram"):
        kernel = getattr(kernels, name)
        found[name] = np.asarray(
            jax.shard_map(
                lambda xb, kernel=kernel: kernel(xb, num_devices=devices),
                mesh=mesh,
                in_specs=jax.P("models"),
                out_specs=jax.P("models"),
            )(placed)
        )
    want = np.einsum("ipa,jpb->iajb", x.astype(np.float64), x)
    for got in found.values():
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_models_gram_takes_the_exchange_and_lora_factors_the_ring():
    # The chooser compares bytes moved per device; the program shows which collective ran.
    mesh = sharding.models_mesh(4)

    def program(shape):
        x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding.stacked_sharding(mesh))
        return (
            jax.jit(
                jax.shard_map(
                    lambda xb: kernels.sharded_cross_gram(xb, num_devices=4),
                    mesh=mesh,
                    in_specs=jax.P("models"),
                    out_specs=jax.P("models"),
                )
            )
            .lower(x)
            .as_text()
        )

    dense = program((8, 4096, 1))  # flattened models: N q = 8 against p = 4096
    assert "all_to_all" in dense and "collective_permute" not in dense
    assert "reduce_scatter" not in dense  # stalls gloo's collectives across processes
    factor = program((8, 64, 16))  # B factors, rank 16: N r = 128 above p = 64
    assert "collective_permute" in factor and "all_to_all" not in factor


@pytest.mark.parametrize("b, q, min_rows", [(7, 3, 4), (10, 16, 32), (3, 5, 256), (9, 1, 2)])
def test_self_gram_computes_the_symmetric_blocks_once(b, q, min_rows):
    rng = np.random.default_rng(b)
    x = rng.standard_normal((b, 11, q)).astype(np.float32)
    got = np.asarray(kernels.self_gram(jnp.asarray(x), min_rows=min_rows))
    want = np.einsum("ipa,jpb->iajb", x.astype(np.float64), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    flat = got.reshape(b * q, b * q)
    np.testing.assert_allclose(flat, flat.T, rtol=1e-6, atol=1e-6)


def test_same_shaped_layers_compile_once():
    mesh = sharding.models_mesh(4)
    kernels.mode_grams._clear_cache()
    for seed in range(6):
        values = testing.planted_population(seed, n_models=6, shape=(10, 12), rank=2)
        kernels.mode_grams(
            _place(values, mesh), mesh=mesh, n_models=6
        ).total_energy.block_until_ready()
    assert kernels.mode_grams._cache_size() == 1


@pytest.mark.parametrize("center", ["mean", "none"])
def test_streaming_equals_one_shot(mesh, center):
    values = testing.planted_population(4, n_models=11, shape=(9, 7), rank=3, mean_scale=1.0)
    d = mesh.devices.size
    size = -(-3 // d) * d

    def blocks():
        for start in range(0, 11, size):
            chunk = values[start : start + size]
            padded = np.zeros((size, 9, 7), np.float32)
            padded[: len(chunk)] = chunk
            yield jax.device_put(padded, sharding.stacked_sharding(mesh)), len(chunk)

    streamed = kernels.streaming_mode_grams(blocks, mesh=mesh, shape=(9, 7), center=center)
    one_shot = kernels.mode_grams(_place(values, mesh), mesh=mesh, n_models=11, center=center)
    np.testing.assert_allclose(streamed.rows, one_shot.rows, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(streamed.cols, one_shot.cols, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(streamed.total_energy, one_shot.total_energy, rtol=1e-6)
    with pytest.raises(ValueError, match="not available in streaming form"):
        kernels.streaming_mode_grams(blocks, mesh=mesh, shape=(9, 7), modes=("models",))


def test_hosvd_core_energy_and_reconstruction(mesh):
    values = testing.planted_population(5, n_models=6, shape=(12, 10), rank=3, noise=0.0)
    x = _place(values, mesh)
    t = kernels.hosvd(x, mesh=mesh, n_models=6, ranks=(3, 3))
    centred = values.astype(np.float64) - values.mean(0)
    recon = np.einsum("mk,ikl,nl->imn", t.rows_factor, t.core, t.cols_factor)
    np.testing.assert_allclose(recon, centred, atol=1e-3 * np.abs(centred).max())
    captured = float(np.sum(np.asarray(t.core, np.float64) ** 2) / t.total_energy)
    np.testing.assert_allclose(captured, 1.0, rtol=1e-4)
    full = kernels.hosvd(x, mesh=mesh, n_models=6, ranks=(5, 3, 3))
    assert full.core.shape == (5, 3, 3) and full.models_factor.shape == (6, 5)
    # The model mode of centred data has rank N-1 = 5: nothing is lost.
    np.testing.assert_allclose(
        float(np.sum(np.asarray(full.core, np.float64) ** 2)), float(t.total_energy), rtol=1e-4
    )


@pytest.mark.parametrize("extra", [0, 123])
def test_long_dot_sums_its_slices_to_the_whole_product(extra):
    # Past 4 slices the CPU product is a sum over slices of the contraction, with a remainder.
    p = 4 * kernels.LONG_DOT_SLICE + extra
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, p)).astype(np.float32)
    y = rng.standard_normal((3, p)).astype(np.float32)
    got = np.asarray(jax.jit(kernels.long_dot)(jnp.asarray(x), jnp.asarray(y)), np.float64)
    want = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
    np.testing.assert_allclose(got, want, atol=2e-5 * np.sqrt(p))


def test_models_gram_of_a_long_layer_matches_float64(mesh):
    # 256 x 300 = 76800 entries per model: the models Gram goes through long_dot's slices on
    # one device and inside the exchange's shard_map on two (38400 entries per slice of p).
    values = testing.planted_population(
        1, n_models=6, shape=(256, 300), rank=3, mean_scale=2.0, dtype=ml_dtypes.bfloat16
    )
    g = kernels.mode_grams(
        _place(values, mesh), mesh=mesh, n_models=6, center="mean", modes=("models",)
    )
    want = _oracle(values, "mean")
    np.testing.assert_allclose(
        np.asarray(g.models, np.float64), want["models"], atol=2e-6 * want["energy"]
    )
    np.testing.assert_allclose(float(g.total_energy), want["energy"], rtol=2e-6)


def test_models_sum_weighs_each_model():
    x = np.random.default_rng(4).standard_normal((7, 5, 6)).astype(ml_dtypes.bfloat16)
    w = np.array([1, 0, 2, 0.5, 0, 1, 3], np.float32)
    got = np.asarray(jax.jit(kernels.models_sum)(jnp.asarray(x), jnp.asarray(w)))
    want = np.einsum("i,imn->mn", w, np.asarray(x, np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    plain = np.asarray(jax.jit(kernels.models_sum)(jnp.asarray(x)))
    np.testing.assert_allclose(plain, np.asarray(x, np.float64).sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(300, 40, 7), (300, 7, 40), (300, 9, 9)])
def test_t_matmul_matches_float64_in_either_layout(shape):
    # A wider x (40 > 7) is taken as (y^T x)^T on CPU; otherwise the plain product.
    p, a, b = shape
    rng = np.random.default_rng(5)
    x = rng.standard_normal((p, a)).astype(np.float32)
    y = rng.standard_normal((p, b)).astype(np.float32)
    got = np.asarray(jax.jit(kernels.t_matmul)(jnp.asarray(x), jnp.asarray(y)), np.float64)
    assert got.shape == (a, b)
    want = np.asarray(x, np.float64).T @ np.asarray(y, np.float64)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.sqrt(p))


@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_mode_product_matches_float64(mesh, mode):
    # This shard's operator product, summed over the devices, against sum_i w_i X_i X_i^T Q
    # (rows) or sum_i w_i X_i^T X_i Q (cols) in float64.
    values = np.random.default_rng(6).standard_normal((6, 12, 20)).astype(np.float32)
    weights = np.array([1.0, 0.0, 2.0, 0.5, 1.0, 3.0], np.float32)
    side = 12 if mode == "rows" else 20
    q = np.random.default_rng(7).standard_normal((side, 5)).astype(np.float32)
    n_pad = sharding.padded_count(6, mesh)
    w = np.zeros(n_pad, np.float32)
    w[:6] = weights

    def body(x, w, q):
        return jax.lax.psum(kernels.mode_product(x, q, mode=mode, weights=w), sharding.MODELS)

    f = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(jax.P(sharding.MODELS), jax.P(sharding.MODELS), jax.P()),
            out_specs=jax.P(),
        )
    )
    placed_w = jax.device_put(w, sharding.stacked_sharding(mesh))
    got = np.asarray(f(_place(values, mesh), placed_w, jnp.asarray(q)), np.float64)
    x = values.astype(np.float64)
    if mode == "rows":
        want = np.einsum("i,imn,ikn,kl->ml", weights, x, x, q)
    else:
        want = np.einsum("i,imn,imk,kl->nl", weights, x, x, q)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
