"""The subspace store: exact energy identities, k by tau and by budget, export, bad input."""

import json
import os
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from jsubspace import io
from jsubspace import testing
from jsubspace.compress import StoreError
from jsubspace.compress import SubspaceStore
from jsubspace.compress import export_all
from jsubspace.compress import export_model
from jsubspace.compress import fit_store
from jsubspace.compress._store import FILES


def _dense_population(path, n=8, dtype=np.float32):
    a = testing.planted_population(0, n_models=n, shape=(40, 30), rank=3, noise=0.05)
    b = testing.planted_population(1, n_models=n, shape=(12, 20), rank=2, noise=0.2)
    values = {"a.weight": a.astype(dtype), "conv.kernel": b.reshape(n, 12, 4, 5).astype(dtype)}
    for i in range(n):
        testing.write_safetensors(
            path / f"m{i}.safetensors",
            {
                "a.weight": values["a.weight"][i],
                "conv.kernel": values["conv.kernel"][i],
                "a.bias": np.full(40, i, dtype),
            },
        )
    return values


def _reconstruction_error(store, values, name, shape):
    x = np.stack([v.reshape(shape) for v in values]).astype(np.float64)
    centre = x.mean(0) if store.manifest["center"] == "mean" else 0.0
    err = sum(
        np.sum((x[i] - store.reconstruct(m, name).astype(np.float64)) ** 2)
        for i, m in enumerate(store.models)
    )
    return err / np.sum((x - centre) ** 2)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_reconstruction_error_is_one_minus_captured_energy(tmp_path, k):
    values = _dense_population(tmp_path / "pop")
    store = fit_store(str(tmp_path / "pop"), str(tmp_path / "store"), k=k, num_devices=4)
    for name, shape in (("a.weight", (40, 30)), ("conv.kernel", (12, 20))):
        entry = store.layers[name]
        assert entry["k"] == k
        error = _reconstruction_error(store, values[name], name, shape)
        assert error == pytest.approx(1 - entry["captured"], abs=2e-5)


def test_a_layer_over_the_memory_budget_is_fitted_by_chunks_of_models(tmp_path, monkeypatch):
    # A bf16 population whose float32 stack does not fit the budget goes by the analysis's
    # chunked route (a few models converted at a time): the same store as the whole-stack fit,
    # the reconstruction identity held; a budget not even one model fits is refused before
    # anything is fitted or written.
    from jsubspace.compress import _store

    values = _dense_population(tmp_path / "pop", n=8, dtype=ml_dtypes.bfloat16)
    used = []
    real = _store.dense_basis

    def spy(*args, **kwargs):
        used.append(kwargs.get("chunk"))
        return real(*args, **kwargs)

    monkeypatch.setattr(_store, "dense_basis", spy)
    pop = str(tmp_path / "pop")
    whole = fit_store(pop, str(tmp_path / "whole"), k=4, num_devices=2)
    assert used == [None, None]
    (layer,) = [x for x in io.open_population(pop).layers if x.name == "a.weight"]
    config = _store.spectra.SpectraConfig()
    bases = _store.spectra.basis_solvers(8, 40, 30, 30, config)
    _, fits = _store.spectra.dense_chunk(layer, 8, config, budget=None, bases=[bases])
    used.clear()
    chunked = fit_store(pop, str(tmp_path / "chunked"), k=4, num_devices=2, memory_budget=fits - 1)
    assert used[0] in (1, 2, 3) and used[1] is None  # only the layer over the budget
    for name, shape in (("a.weight", (40, 30)), ("conv.kernel", (12, 20))):
        assert chunked.layers[name]["captured"] == pytest.approx(
            whole.layers[name]["captured"], abs=1e-6
        )
        for model in whole.models:
            np.testing.assert_allclose(
                chunked.reconstruct(model, name).astype(np.float32),
                whole.reconstruct(model, name).astype(np.float32),
                atol=2e-2 * float(np.abs(values[name].astype(np.float32)).max()),
            )
        error = _reconstruction_error(chunked, values[name], name, shape)
        assert error == pytest.approx(1 - chunked.layers[name]["captured"], abs=1e-4)
    # Refused before anything is fitted: the layer over the budget is the last one read, and
    # the one before it fits.
    for i in range(4):
        testing.write_safetensors(
            tmp_path / "two" / f"m{i}.safetensors",
            {
                "a.small": np.full((4, 3), i, np.float32),
                "b.large": np.arange(4000, dtype=np.float32).reshape(80, 50) * (i + 1),
            },
        )
    small, large = sorted(io.open_population(str(tmp_path / "two")).layers, key=lambda x: x.name)
    needs = [
        _store.spectra.dense_chunk(
            x,
            4,
            config,
            budget=1,
            bases=[_store.spectra.basis_solvers(4, *x.shape, min(x.shape), config)],
        )[1]
        for x in (small, large)
    ]
    assert needs[1] > needs[0]
    used.clear()
    with pytest.raises(StoreError, match=r"layer 'b.large' \(80 x 50, 4 models\).*budget"):
        fit_store(
            str(tmp_path / "two"),
            str(tmp_path / "none"),
            k=2,
            num_devices=1,
            memory_budget=needs[0] + 1,
        )
    assert used == [] and not (tmp_path / "none").exists()


def test_tau_past_a_layer_s_limit_keeps_its_largest_basis_and_says_so(tmp_path):
    # A two-sided basis of a 12 x 20 layer has at most 12 directions: tau = 0.999999 cannot be
    # met there, whatever kmax; the store keeps k = 12 and records that tau was not reached.
    _dense_population(tmp_path / "pop")
    store = fit_store(str(tmp_path / "pop"), str(tmp_path / "s"), tau=0.999999)
    short = [e for e in store.layers.values() if e["tau_reached"] is False]
    assert short and all(e["k"] == min(e["shape"]) and e["captured"] < 0.999999 for e in short)
    assert all(e["captured"] >= 0.999999 - 1e-9 for e in store.layers.values() if e["tau_reached"])


def test_tau_is_met_on_every_layer_and_budget_never_exceeded(tmp_path):
    _dense_population(tmp_path / "pop")
    for tau in (0.5, 0.9, 0.95):
        store = fit_store(str(tmp_path / "pop"), str(tmp_path / f"t{tau}"), tau=tau)
        for entry in store.layers.values():
            assert entry["captured"] >= tau - 1e-9
        # ... with the smallest such k: one direction fewer misses tau.
        for name, entry in store.layers.items():
            if entry["k"] > 1:
                fewer = fit_store(
                    str(tmp_path / "pop"),
                    str(tmp_path / "tmp"),
                    k=entry["k"] - 1,
                    include="^" + name.replace(".", r"\.") + "$",
                )
                assert fewer.layers[name]["captured"] < tau
    # The budget covers the whole store: centres and bases, the kept biases, headers, manifest.
    with pytest.raises(StoreError, match="alone need") as error:
        fit_store(str(tmp_path / "pop"), str(tmp_path / "tiny"), budget_bytes=10000)
    floor = int(re.search(r"alone need (\d+) bytes", str(error.value))[1])
    assert floor > 40 * 30 * 4 + 12 * 20 * 4 + 8 * 40 * 4  # centres and biases, and more
    for extra in (240, 3240, 14240):
        budget = floor + extra
        store = fit_store(str(tmp_path / "pop"), str(tmp_path / f"b{budget}"), budget_bytes=budget)
        acc = store.accounting()
        assert acc["store_bytes"] <= budget
        on_disk = sum(os.path.getsize(os.path.join(store.directory, f)) for f in FILES)
        assert on_disk == acc["store_bytes"]  # the accounting is what is on disk
        tensor_bytes = sum(
            i.nbytes
            for i in io.read_header(
                os.path.join(store.directory, "store.safetensors")
            ).tensors.values()
        )
        assert tensor_bytes == acc["factored"]["bytes"]


def test_memory_accounting_matches_hand_count(tmp_path):
    _dense_population(tmp_path / "pop")
    store = fit_store(str(tmp_path / "pop"), str(tmp_path / "s"), k=3)
    e = store.accounting()["layers"]["a.weight"]
    assert e["original_bytes"] == 8 * 40 * 30 * 4
    assert e["basis"] == (40 + 30) * 3 * 4
    assert e["coefficients"] == 8 * 3 * 3 * 4
    assert e["center"] == 40 * 30 * 4
    assert e["ratio"] == pytest.approx(e["original_bytes"] / e["total"])
    acc = store.accounting()
    # The biases are the untouched tensors' line: 8 models x 40 float32, none shared.
    assert acc["kept"] == {
        "tensors": 8,
        "unique": 8,
        "original_bytes": 8 * 40 * 4,
        "bytes": 8 * 40 * 4,
    }
    assert acc["original_bytes"] == 8 * (40 * 30 + 12 * 20 + 40) * 4  # the whole sources
    assert acc["factored"]["bytes"] == e["total"] + acc["layers"]["conv.kernel"]["total"]
    assert acc["store_bytes"] == (
        acc["factored"]["bytes"] + acc["kept"]["bytes"] + acc["overhead_bytes"]
    )
    assert acc["ratio"] == pytest.approx(acc["original_bytes"] / acc["store_bytes"])


def test_export_reloads_with_names_dtypes_and_untouched_tensors(tmp_path):
    values = _dense_population(tmp_path / "pop", dtype=ml_dtypes.bfloat16)
    store = fit_store(str(tmp_path / "pop"), str(tmp_path / "s"), k=20)
    paths = export_all(store, str(tmp_path / "out"))
    assert len(paths) == 8
    for i, path in enumerate(paths):
        original = io.read_header(tmp_path / "pop" / f"m{i}.safetensors")
        rebuilt = io.read_header(path)
        assert {n: (t.shape, t.dtype) for n, t in rebuilt.tensors.items()} == {
            n: (t.shape, t.dtype) for n, t in original.tensors.items()
        }
        np.testing.assert_array_equal(
            io.read_tensor(path, rebuilt.tensors["a.bias"]), np.full(40, i, ml_dtypes.bfloat16)
        )
    # The rebuilt weights (stored in bf16) miss exactly the energy the store did not capture.
    for name, shape in (("a.weight", (40, 30)), ("conv.kernel", (12, 20))):
        x = values[name].astype(np.float64).reshape(8, *shape)
        got = np.stack(
            [
                io.read_tensor(p, io.read_header(p).tensors[name]).astype(np.float64).reshape(shape)
                for p in paths
            ]
        )
        error = np.sum((got - x) ** 2) / np.sum((x - x.mean(0)) ** 2)
        assert error == pytest.approx(1 - store.layers[name]["captured"], abs=0.01)


def test_project_a_new_model_and_bad_inputs(tmp_path):
    _dense_population(tmp_path / "pop")
    store = fit_store(str(tmp_path / "pop"), str(tmp_path / "s"), k=4)
    new = testing.planted_population(0, n_models=9, shape=(40, 30), rank=3, noise=0.05)[8]
    c = store.project(new, "a.weight")
    u, v = store.basis("a.weight")
    approx = store.center("a.weight") + u @ c @ v.T
    centred = new - store.center("a.weight")
    assert np.sum((new - approx) ** 2) < 0.1 * np.sum(centred**2)
    with pytest.raises(StoreError, match="another architecture"):
        store.project(np.zeros((7, 7)), "a.weight")
    with pytest.raises(StoreError, match="keeps 4 directions"):
        store.reconstruct("m0", "a.weight", k=9)
    with pytest.raises(StoreError, match="not in the store"):
        store.reconstruct("m0", "nope.weight")
    with pytest.raises(StoreError, match="exactly one of"):
        fit_store(str(tmp_path / "pop"), str(tmp_path / "x"), k=2, tau=0.5)
    with pytest.raises(StoreError, match="raise --kmax"):
        fit_store(str(tmp_path / "pop"), str(tmp_path / "x"), tau=0.999999, kmax=2)
    with pytest.raises(StoreError, match="not a readable store"):
        SubspaceStore(str(tmp_path / "pop"))


def test_lora_store_in_factor_space_and_peft_export(tmp_path):
    n, r = 4, 2  # the updates span N r = 8 <= 12 directions per side: k = 8 is exact
    a, b = testing.lora_population(3, n_models=n, shape=(16, 12), rank=r)
    for i in range(n):
        testing.write_peft_adapter(
            tmp_path / "pop" / f"ad{i}", {"model.q_proj": (a[i], b[i])}, r=r, lora_alpha=6
        )
    store = fit_store(str(tmp_path / "pop"), str(tmp_path / "s"), k=8)
    assert store.manifest["center"] == "none"
    entry = store.layers["model.q_proj"]
    assert entry["original_bytes"] == n * r * (16 + 12) * 4
    dw = 3.0 * np.einsum("imr,irn->imn", b.astype(np.float64), a)
    for i in range(n):
        np.testing.assert_allclose(
            store.reconstruct(f"ad{i}", "model.q_proj"), dw[i], atol=1e-4 * np.abs(dw).max()
        )
    out = export_model(store, "ad2", str(tmp_path / "out"))
    model = io.load_model(out)
    (module,) = model.lora_modules.values()
    assert module.rank == r and module.scale == pytest.approx(1.0)
    got = module.scale * module.b.read().astype(np.float64) @ module.a.read()
    np.testing.assert_allclose(got, dw[2], atol=1e-4 * np.abs(dw).max())


def test_cli_compress_and_reconstruct(tmp_path):
    _dense_population(tmp_path / "pop")
    run = [sys.executable, "-m", "jsubspace.cli.main"]
    out = subprocess.run(
        run + ["compress", f"--models={tmp_path / 'pop'}", f"--out={tmp_path / 's'}", "--tau=0.9"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "total" in out.stdout and "ratio" in out.stdout
    manifest = json.loads((tmp_path / "s" / "store.json").read_text())
    assert all(e["captured"] >= 0.9 for e in manifest["layers"])
    out = subprocess.run(
        run + ["reconstruct", f"--store={tmp_path / 's'}", "--model=m3", f"--out={tmp_path / 'r'}"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "r" / "m3.safetensors").exists()
    bad = subprocess.run(
        run
        + ["reconstruct", f"--store={tmp_path / 's'}", "--model=nobody", f"--out={tmp_path / 'r'}"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "jsubspace: error:" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_merge_and_missing_base(tmp_path):
    values = _dense_population(tmp_path / "pop")
    base = {
        "a.weight": np.zeros((40, 30), np.float32),
        "conv.kernel": np.zeros((12, 4, 5), np.float32),
        "a.bias": np.ones(40, np.float32),
    }
    testing.write_safetensors(tmp_path / "base.safetensors", base)
    run = [sys.executable, "-m", "jsubspace.cli.main", "merge", f"--models={tmp_path / 'pop'}"]
    out = subprocess.run(
        run
        + [
            f"--base={tmp_path / 'base.safetensors'}",
            f"--out={tmp_path / 'merged.safetensors'}",
            "--merge_method=task_arithmetic",
            "--lambda=0.5",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    header = io.read_header(tmp_path / "merged.safetensors")
    merged = io.read_tensor(tmp_path / "merged.safetensors", header.tensors["a.weight"])
    np.testing.assert_allclose(merged, 0.5 * values["a.weight"].sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        io.read_tensor(tmp_path / "merged.safetensors", header.tensors["a.bias"]), np.ones(40)
    )
    missing = subprocess.run(
        run + [f"--base={tmp_path / 'nope.safetensors'}", f"--out={tmp_path / 'm2.safetensors'}"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "nope.safetensors: no such file" in missing.stderr
    assert not (tmp_path / "m2.safetensors").exists()
