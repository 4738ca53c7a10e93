"""Factored LoRA spectra equal the materialised-dW spectra, and never allocate an update."""

import jax
import numpy as np
import pytest

from jsubspace import kernels
from jsubspace import sharding
from jsubspace import testing


def _place(values, mesh):
    n = values.shape[0]
    padded = np.zeros((sharding.padded_count(n, mesh), *values.shape[1:]), values.dtype)
    padded[:n] = values
    return jax.device_put(padded, sharding.stacked_sharding(mesh))


def _spectra64(x):
    x = np.asarray(x, np.float64)
    return {
        "models": np.linalg.eigvalsh(np.einsum("imn,jmn->ij", x, x))[::-1],
        "rows": np.linalg.eigvalsh(np.einsum("imn,ikn->mk", x, x))[::-1],
        "cols": np.linalg.eigvalsh(np.einsum("imn,imk->nk", x, x))[::-1],
    }


def _eig(g):
    return np.linalg.eigvalsh(np.asarray(g, np.float64))[::-1]


@pytest.mark.parametrize("center", ["mean", "none"])
@pytest.mark.parametrize("shared_a", [0.0, 0.5])
def test_factored_spectra_equal_materialised(mesh, center, shared_a):
    n, m, k, r = 7, 24, 18, 3
    a, b = testing.lora_population(0, n_models=n, shape=(m, k), rank=r, shared_a_fraction=shared_a)
    scales = np.linspace(1.0, 2.0, n).astype(np.float32)
    g = kernels.lora_grams(
        _place(a, mesh), _place(b, mesh), _place(scales, mesh), mesh=mesh, n_models=n, center=center
    )
    dw = np.einsum("i,imr,irn->imn", scales.astype(np.float64), b, a)
    x = dw - dw.mean(0) if center == "mean" else dw
    want = _spectra64(x)
    top = want["models"][0]
    for mode in ("models", "rows", "cols"):
        got = _eig(getattr(g, mode))
        width = min(len(got), len(want[mode]))
        np.testing.assert_allclose(got[:width], want[mode][:width], atol=2e-6 * top, rtol=1e-4)
        # Whatever the factor space holds beyond the true side is zero.
        assert np.all(np.abs(got[width:]) < 1e-5 * top)
    np.testing.assert_allclose(float(g.total_energy), np.sum(x * x), rtol=1e-5)


def test_padding_to_max_rank_leaves_updates_unchanged():
    mesh = sharding.models_mesh(2)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 3, 10)).astype(np.float32)
    b = rng.standard_normal((4, 8, 3)).astype(np.float32)
    a[1, 2:], b[1, :, 2:] = 0, 0  # model 1 has rank 2, zero-padded to 3
    s = np.ones(4, np.float32)
    g = kernels.lora_grams(_place(a, mesh), _place(b, mesh), _place(s, mesh), mesh=mesh, n_models=4)
    dw = np.einsum("imr,irn->imn", b.astype(np.float64), a)
    want = _spectra64(dw - dw.mean(0))
    np.testing.assert_allclose(_eig(g.rows)[:8], want["rows"][:8], rtol=1e-5, atol=1e-4)


def test_mistral_shaped_module_never_allocates_an_update():
    # q_proj of Mistral-7B: 4096 x 4096, rank 16, N = 100 adapters, on 4 devices.
    mesh = sharding.models_mesh(4)
    n, m, k, r = 100, 4096, 4096, 16
    spec = jax.ShapeDtypeStruct
    shard = sharding.stacked_sharding(mesh)
    lowered = kernels.lora_grams.lower(
        spec((n, r, k), np.float32, sharding=shard),
        spec((n, m, r), np.float32, sharding=shard),
        spec((n,), np.float32, sharding=shard),
        mesh=mesh,
        n_models=n,
    )
    stats = lowered.compile().memory_analysis()
    one_update = m * k * 4
    # Everything the kernel allocates beyond its inputs and outputs, across all devices, stays
    # below the size of ONE update (N updates would be 100x that).
    assert stats.temp_size_in_bytes < one_update, stats
    assert stats.output_size_in_bytes < one_update, stats


def test_mistral_shaped_module_runs_and_matches_trace():
    mesh = sharding.models_mesh(4)
    n, m, k, r = 100, 4096, 4096, 16
    a, b = testing.lora_population(2, n_models=n, shape=(m, k), rank=r)
    s = np.full(n, 2.0, np.float32)
    g = kernels.lora_grams(
        _place(a, mesh), _place(b, mesh), _place(s, mesh), mesh=mesh, n_models=n, center="none"
    )
    # ||s B A||_F^2 = s^2 tr(B^T B A A^T), in float64 from the factors.
    want = sum(
        4.0 * np.trace((b[i].T.astype(np.float64) @ b[i]) @ (a[i] @ a[i].T)) for i in range(n)
    )
    np.testing.assert_allclose(float(g.total_energy), want, rtol=1e-4)
    np.testing.assert_allclose(np.trace(np.asarray(g.rows, np.float64)), want, rtol=1e-4)
