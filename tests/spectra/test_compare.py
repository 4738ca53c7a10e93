"""The compare control: shared bases overlap, unrelated ones sit at the random expectation."""

import jax
import numpy as np
import pytest

import jsubspace
from jsubspace import testing
from jsubspace.sharding import models_mesh
from jsubspace.sharding import padded_count
from jsubspace.sharding import stacked_sharding
from jsubspace.spectra import _compare


def _place(values, mesh):
    n = values.shape[0]
    padded = np.zeros((padded_count(n, mesh), *values.shape[1:]), np.float32)
    padded[:n] = values
    return jax.device_put(padded, stacked_sharding(mesh))


def test_principal_cosines_known_case():
    e = np.eye(4)
    cos = _compare.principal_cosines(e[:, :2], np.stack([e[:, 0], (e[:, 1] + e[:, 2]) / 2**0.5], 1))
    np.testing.assert_allclose(cos, [1.0, 2**-0.5], atol=1e-12)


@pytest.mark.parametrize("d", [1, 4])
def test_split_half_shared_vs_noise(d):
    mesh = models_mesh(d)
    planted = testing.planted_population(0, n_models=20, shape=(60, 50), rank=3, noise=0.02)
    rec = _compare.split_half_compare(_place(planted, mesh), 20, mesh=mesh, seed=0, k=3)
    assert rec["k"] == 3 and rec["rows_overlap"] > 0.99 and rec["cols_overlap"] > 0.99
    noise = np.random.default_rng(1).standard_normal((20, 60, 50)).astype(np.float32)
    rec = _compare.split_half_compare(_place(noise, mesh), 20, mesh=mesh, seed=0, k=3)
    assert rec["rows_overlap"] < 10 * rec["random_rows_overlap"] < 1


def test_compare_to_another_population(tmp_path):
    a = testing.planted_population(0, n_models=10, shape=(40, 30), rank=2, noise=0.01)
    same, _, _ = testing.planted_population(
        0, n_models=20, shape=(40, 30), rank=2, noise=0.01, return_basis=True
    )
    other = testing.planted_population(5, n_models=10, shape=(40, 30), rank=2, noise=0.01)
    for i in range(10):
        testing.write_safetensors(tmp_path / "a" / f"m{i}.safetensors", {"w": a[i]})
        testing.write_safetensors(tmp_path / "b" / f"m{i}.safetensors", {"w": same[10 + i]})
        testing.write_safetensors(tmp_path / "c" / f"m{i}.safetensors", {"w": other[i]})
    opts = dict(null_draws=0, holdout=None, num_devices=2, quiet=True, plots=False)
    shared = jsubspace.analyze(
        [str(tmp_path / "a")], str(tmp_path / "o1"), compare_to=[str(tmp_path / "b")], **opts
    )
    apart = jsubspace.analyze(
        [str(tmp_path / "a")], str(tmp_path / "o2"), compare_to=[str(tmp_path / "c")], **opts
    )
    s = shared["layers"][0]["compare"]["other"]
    o = apart["layers"][0]["compare"]["other"]
    assert s["rows_cosines"][0] > 0.999 and s["rows_cosines"][1] > 0.99
    assert o["rows_overlap"] < 0.3


@pytest.mark.parametrize("d", [1, 2])
def test_split_half_angles_equal_float64(d):
    # Exact sides: on CPU each half's matrix is summed on the devices and its top k vectors come
    # from host LAPACK / Lanczos (`_holdout.top_eigenvectors`), not XLA's full eigh.
    mesh = models_mesh(d)
    x = testing.planted_population(3, n_models=18, shape=(300, 40), rank=4, noise=0.3)
    rec = _compare.split_half_compare(_place(x, mesh), 18, mesh=mesh, seed=0, k=6)
    w1, w2 = _compare._halves(18, 18, 0)
    x64 = x.astype(np.float64)
    for mode, spec in (("rows", "imn,ikn->mk"), ("cols", "imn,imk->nk")):
        bases = []
        for w in (w1, w2):
            half = x64[w > 0] - x64[w > 0].mean(0)
            bases.append(np.linalg.eigh(np.einsum(spec, half, half))[1][:, ::-1][:, :6])
        want = _compare.principal_cosines(*bases)
        np.testing.assert_allclose(rec[f"{mode}_cosines"], want, atol=1e-4)
