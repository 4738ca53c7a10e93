"""The store is self-contained: compress, delete the sources, reconstruct gives the same tensors.

Also: every untouched tensor comes back bit-exact, shared ones are stored once, the accounting
counts the files on disk, a budget covers all of them, and a store of another version or with
files of another run is refused.
"""

import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import pytest

from jsubspace import io
from jsubspace import testing
from jsubspace.compress import StoreError
from jsubspace.compress import SubspaceStore
from jsubspace.compress import export_all
from jsubspace.compress import fit_store
from jsubspace.compress._store import FILES

N = 5


def _tensors(path) -> list[tuple[str, str, tuple, bytes]]:
    """Every tensor of a safetensors file, in file order, with its raw bytes."""
    header = io.read_header(path)
    return [
        (
            name,
            str(info.dtype),
            info.shape,
            np.ascontiguousarray(io.read_tensor(path, info)).tobytes(),
        )
        for name, info in header.tensors.items()
    ]


def _tree(directory) -> dict[str, object]:
    """Every file under `directory`: safetensors as `_tensors`, others as text."""
    out = {}
    for here, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(here, name)
            rel = os.path.relpath(path, directory)
            if name.endswith(".safetensors"):
                out[rel] = (_tensors(path), io.read_header(path).metadata)
            else:
                with open(path, encoding="utf-8") as f:
                    out[rel] = f.read()
    return out


def _dense_sources(path):
    """N models: two fitted layers; per-model bias, int step and an excluded 2-D head; a shared
    norm, embedding (excluded) and bool mask; and a tensor only model 0 has."""
    rng = np.random.default_rng(7)
    a = testing.planted_population(0, n_models=N, shape=(40, 30), rank=3, noise=0.05)
    b = testing.planted_population(1, n_models=N, shape=(12, 20), rank=2, noise=0.2)
    shared = {
        "emb.weight": rng.standard_normal((50, 16)).astype(ml_dtypes.bfloat16),
        "norm.weight": (1 + rng.standard_normal(30)).astype(np.float32),
        "mask": rng.random((3, 4)) > 0.5,
    }
    for i in range(N):
        tensors = {
            "a.weight": a[i].astype(ml_dtypes.bfloat16),
            "a.bias": rng.standard_normal(40).astype(ml_dtypes.bfloat16),
            "conv.kernel": b[i].reshape(12, 4, 5).astype(np.float16),
            "head.weight": rng.standard_normal((6, 30)).astype(np.float32),
            "step": np.array([1000 + i], np.int64),
            **shared,
        }
        if i == 0:
            tensors["extra.scale"] = np.array([np.nan, -0.0, 1.5], np.float32)
        testing.write_safetensors(path / f"m{i}.safetensors", tensors, {"note": f"model {i}"})


def _check_accounting(store, sources: dict[str, list]):
    """The accounting against the files: sources' tensor bytes, the store's files on disk."""
    acc = store.accounting()
    on_disk = {name: os.path.getsize(os.path.join(store.directory, name)) for name in FILES}
    assert sorted(os.listdir(store.directory)) == sorted(FILES)
    assert acc["files"] == on_disk
    assert acc["store_bytes"] == sum(on_disk.values())
    source_bytes = sum(len(t[3]) for tensors in sources.values() for t in tensors)
    assert acc["original_bytes"] == source_bytes
    assert acc["ratio"] == pytest.approx(source_bytes / acc["store_bytes"])
    layers = acc["layers"].values()
    assert acc["factored"]["bytes"] == sum(e["total"] for e in layers)
    assert acc["factored"]["original_bytes"] == sum(e["original_bytes"] for e in layers)
    kept = io.read_header(os.path.join(store.directory, "kept.safetensors"))
    assert acc["kept"]["bytes"] == sum(i.nbytes for i in kept.tensors.values())
    assert acc["kept"]["unique"] == len(kept.tensors)
    assert acc["factored"]["original_bytes"] + acc["kept"]["original_bytes"] == source_bytes
    assert (
        acc["overhead_bytes"]
        == acc["store_bytes"] - acc["factored"]["bytes"] - acc["kept"]["bytes"]
        > 0
    )
    stored = io.read_header(os.path.join(store.directory, "store.safetensors"))
    assert acc["factored"]["bytes"] == sum(i.nbytes for i in stored.tensors.values())
    return acc


def test_dense_store_rebuilds_every_model_with_the_sources_deleted(tmp_path):
    _dense_sources(tmp_path / "pop")
    sources = {f"m{i}": _tensors(tmp_path / "pop" / f"m{i}.safetensors") for i in range(N)}
    store = fit_store(str(tmp_path / "pop"), str(tmp_path / "store"), k=3, exclude=r"^(emb|head)\.")
    assert set(store.layers) == {"a.weight", "conv.kernel"}
    export_all(store, str(tmp_path / "out"))
    before = _tree(tmp_path / "out")

    acc = _check_accounting(store, sources)
    # Kept: per model a.bias, head.weight, step (3 N); shared once: emb, norm, mask; extra once.
    assert acc["kept"]["tensors"] == 6 * N + 1
    assert acc["kept"]["unique"] == 3 * N + 4
    contents = store.contents("m3")
    kept = {t["name"]: t["kept"] for t in contents["tensors"] if "kept" in t}
    assert kept["emb.weight"] == "m0::emb.weight" and kept["a.bias"] == "m3::a.bias"
    assert contents["metadata"] == {"m3.safetensors": {"note": "model 3"}}

    shutil.rmtree(tmp_path / "pop")
    assert not (tmp_path / "pop").exists()
    reopened = SubspaceStore(str(tmp_path / "store"))
    export_all(reopened, str(tmp_path / "again"))
    after = _tree(tmp_path / "again")
    assert after == before  # bit-identical: names, order, dtypes, shapes, bytes, metadata

    for i in range(N):
        (rebuilt, metadata), original = after[f"m{i}.safetensors"], sources[f"m{i}"]
        assert metadata == {"format": "pt", "source": "jsubspace"}
        assert [t[:3] for t in rebuilt] == [t[:3] for t in original]  # names, dtypes, shapes
        untouched = [(t, o) for t, o in zip(rebuilt, original) if t[0] not in store.layers]
        assert len(untouched) == (7 if i == 0 else 6)
        for t, o in untouched:
            assert t == o, t[0]  # bit-exact, NaN and -0.0 included
        for t, o in zip(rebuilt, original):
            if t[0] in store.layers:  # rebuilt from the basis alone, in the source's dtype
                want = reopened.reconstruct(f"m{i}", t[0]).reshape(o[2]).astype(np.dtype(o[1]))
                assert t[3] == want.tobytes() != o[3]


def _lora_sources(path):
    """N adapters of two modules plus a `modules_to_save` tensor, one module shared by all."""
    a, b = testing.lora_population(3, n_models=N, shape=(16, 12), rank=2)
    a2, b2 = testing.lora_population(4, n_models=N, shape=(8, 12), rank=3)
    saved = np.random.default_rng(1).standard_normal((12, 16)).astype(np.float32)
    for i in range(N):
        directory = path / f"ad{i}"
        testing.write_peft_adapter(
            directory,
            {"model.q_proj": (a[i], b[i]), "model.v_proj": (a2[i], b2[i])},
            r=2,
            lora_alpha=6,
            rank_pattern={"v_proj": 3},
        )
        file = directory / "adapter_model.safetensors"
        tensors = {
            name: np.asarray(io.read_tensor(file, info))
            for name, info in io.read_header(file).tensors.items()
        }
        tensors["base_model.model.model.down_proj.modules_to_save.default.weight"] = saved
        testing.write_safetensors(file, tensors, {"format": "pt"})


def test_peft_store_rebuilds_adapters_with_the_sources_deleted(tmp_path):
    _lora_sources(tmp_path / "pop")
    sources = {
        f"ad{i}": _tensors(tmp_path / "pop" / f"ad{i}" / "adapter_model.safetensors")
        for i in range(N)
    }
    configs = {
        f"ad{i}": json.loads((tmp_path / "pop" / f"ad{i}" / "adapter_config.json").read_text())
        for i in range(N)
    }
    store = fit_store(str(tmp_path / "pop"), str(tmp_path / "store"), k=10, exclude="v_proj")
    assert set(store.layers) == {"model.q_proj"}
    export_all(store, str(tmp_path / "out"))
    before = _tree(tmp_path / "out")
    acc = _check_accounting(store, sources)
    # Kept: v_proj's A and B per adapter, the modules_to_save weight once.
    assert (acc["kept"]["tensors"], acc["kept"]["unique"]) == (3 * N, 2 * N + 1)
    assert store.contents("ad2")["adapter_config"] == configs["ad2"]

    shutil.rmtree(tmp_path / "pop")
    export_all(SubspaceStore(str(tmp_path / "store")), str(tmp_path / "again"))
    after = _tree(tmp_path / "again")
    assert after == before

    for i in range(N):
        rebuilt = {t[0]: t for t in after[f"ad{i}/adapter_model.safetensors"][0]}
        original = {t[0]: t for t in sources[f"ad{i}"]}
        for name in (
            "base_model.model.model.v_proj.lora_A.weight",
            "base_model.model.model.v_proj.lora_B.weight",
            "base_model.model.model.down_proj.modules_to_save.default.weight",
        ):
            assert rebuilt[name] == original[name]
        config = json.loads(after[f"ad{i}/adapter_config.json"])
        assert (config["r"], config["lora_alpha"]) == (2, 2.0)  # q_proj rebuilt at scale 1
        assert config["rank_pattern"] == {"model.v_proj": 3}
        assert config["alpha_pattern"] == {"model.v_proj": 6.0}
        model = io.load_model(str(tmp_path / "again" / f"ad{i}"))
        q = model.lora_modules["model.q_proj"]
        got = q.scale * q.b.read().astype(np.float64) @ q.a.read()
        np.testing.assert_allclose(got, store.reconstruct(f"ad{i}", "model.q_proj"), atol=1e-5)


def test_real_peft_adapters_rebuild_and_load_with_the_sources_deleted(tmp_path, tiny_torch_model):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    def deltas(model):
        out = {}
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                out[name.removeprefix("base_model.model.")] = (
                    module.get_delta_weight("default").detach().numpy().astype(np.float64)
                )
        return out

    originals = []
    for seed in range(3):
        torch.manual_seed(seed)
        config = peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["down_proj"],
            init_lora_weights=False,
        )
        model = peft.get_peft_model(tiny_torch_model(), config)
        with torch.no_grad():  # a trained modules_to_save copy, unlike the base's
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.5 + seed)
        model.save_pretrained(str(tmp_path / "pop" / f"adapter{seed}"))
        originals.append(deltas(model))
    sources = {
        f"adapter{i}": _tensors(tmp_path / "pop" / f"adapter{i}" / "adapter_model.safetensors")
        for i in range(3)
    }
    # layers.1.v_proj is left out: PEFT must load its original factors from the store.
    store = fit_store(
        str(tmp_path / "pop"), str(tmp_path / "store"), k=6, exclude=r"layers\.1\.v_proj"
    )
    export_all(store, str(tmp_path / "out"))
    before = _tree(tmp_path / "out")
    _check_accounting(store, sources)
    shutil.rmtree(tmp_path / "pop")
    paths = export_all(SubspaceStore(str(tmp_path / "store")), str(tmp_path / "again"))
    assert _tree(tmp_path / "again") == before
    for i, path in enumerate(paths):
        torch.manual_seed(0)
        loaded = peft.PeftModel.from_pretrained(tiny_torch_model(), path)
        got = deltas(loaded)
        assert set(got) == set(originals[i])
        for name, delta in originals[i].items():
            np.testing.assert_allclose(got[name], delta, atol=1e-5 * np.abs(delta).max() + 1e-7)
        rebuilt = {t[0]: t for t in before[f"adapter{i}/adapter_model.safetensors"][0]}
        saved = [t for t in sources[f"adapter{i}"] if "down_proj" in t[0]]
        assert len(saved) == 2 and all(rebuilt[t[0]] == t for t in saved)


def test_budget_covers_every_file_of_the_store(tmp_path):
    _dense_sources(tmp_path / "pop")
    with pytest.raises(StoreError, match="alone need") as error:
        fit_store(
            str(tmp_path / "pop"), str(tmp_path / "tiny"), budget_bytes=10000
        )  # as many digits as the floor
    floor = int(re.search(r"alone need (\d+) bytes", str(error.value))[1])
    # Exactly the floor: no direction fits, and the store is exactly that many bytes on disk.
    store = fit_store(str(tmp_path / "pop"), str(tmp_path / "floor"), budget_bytes=floor)
    assert all(e["k"] == 0 for e in store.layers.values())
    disk = sum(os.path.getsize(os.path.join(store.directory, f)) for f in FILES)
    assert store.accounting()["store_bytes"] == disk == floor
    with pytest.raises(StoreError, match="alone need"):
        fit_store(str(tmp_path / "pop"), str(tmp_path / "under"), budget_bytes=floor - 1)
    total_k = []
    for extra in (500, 2000, 8000):
        store = fit_store(
            str(tmp_path / "pop"), str(tmp_path / f"b{extra}"), budget_bytes=floor + extra
        )
        disk = sum(os.path.getsize(os.path.join(store.directory, f)) for f in FILES)
        assert store.accounting()["store_bytes"] == disk <= floor + extra
        total_k.append(sum(e["k"] for e in store.layers.values()))
    assert 0 < total_k[0] < total_k[1] < total_k[2]


def test_old_or_mixed_stores_are_refused(tmp_path):
    _dense_sources(tmp_path / "pop")
    one = fit_store(str(tmp_path / "pop"), str(tmp_path / "one"), k=2)
    two = fit_store(str(tmp_path / "pop"), str(tmp_path / "two"), k=2)
    # Files of another compress run beside the manifest (an interrupted re-compress).
    shutil.copy(
        os.path.join(two.directory, "kept.safetensors"),
        os.path.join(one.directory, "kept.safetensors"),
    )
    with pytest.raises(StoreError, match="another compress run"):
        SubspaceStore(one.directory)
    os.remove(os.path.join(two.directory, "kept.safetensors"))
    with pytest.raises(StoreError, match="kept.safetensors"):
        SubspaceStore(two.directory)
    # A version-1 store (it re-read the sources on export): named, with what to do.
    three = fit_store(str(tmp_path / "pop"), str(tmp_path / "three"), k=2)
    path = os.path.join(three.directory, "store.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["version"] = "1"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    with pytest.raises(
        StoreError, match=re.escape(three.directory) + ".*re-run `jsubspace compress`"
    ):
        SubspaceStore(three.directory)
