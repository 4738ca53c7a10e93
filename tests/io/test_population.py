"""Sources, formats and alignment: real files in, aligned layers (headers only) out."""

import json
import math
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from jsubspace import CheckpointError
from jsubspace import PopulationError
from jsubspace import io
from jsubspace import testing


def _dense_models(tmp_path, n=3, seed=0):
    rng = np.random.default_rng(seed)
    models = []
    for i in range(n):
        t = {
            "layer.0.weight": rng.standard_normal((4, 6)).astype(np.float32),
            "layer.0.bias": rng.standard_normal(4).astype(np.float32),
            "conv.kernel": rng.standard_normal((3, 2, 2, 5)).astype(np.float32),
        }
        testing.write_safetensors(tmp_path / f"m{i}.safetensors", t)
        models.append(t)
    return models


def test_directory_of_safetensors_files(tmp_path):
    models = _dense_models(tmp_path)
    pop = io.open_population(str(tmp_path))
    assert pop.names == ["m0", "m1", "m2"]
    by_name = {layer.name: layer for layer in pop.layers}
    assert set(by_name) == {"layer.0.weight", "conv.kernel"}  # rank >= 2 only
    conv = by_name["conv.kernel"]
    assert conv.shape == (3, 20) and conv.stored_shape == (3, 2, 2, 5)
    np.testing.assert_array_equal(conv.refs[1].read(), models[1]["conv.kernel"])


def test_glob_list_file_include_exclude(tmp_path):
    _dense_models(tmp_path, n=4)
    pop = io.open_population(str(tmp_path / "m[12].safetensors"))
    assert pop.names == ["m1", "m2"]
    listing = tmp_path / "models.txt"
    listing.write_text("# a comment\nm3.safetensors\n\nm0.safetensors\n")
    pop = io.open_population(f"@{listing}", include=r"weight$")
    assert pop.names == ["m3", "m0"]
    assert [layer.name for layer in pop.layers] == ["layer.0.weight"]
    pop = io.open_population(
        [str(tmp_path / "m0.safetensors"), str(tmp_path / "m1.safetensors")], exclude="conv"
    )
    assert [layer.name for layer in pop.layers] == ["layer.0.weight"]


def test_sharded_index_directory(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        w1, w2 = rng.standard_normal((3, 4)), rng.standard_normal((5, 3))
        save_file({"x.weight": w1.astype(np.float32)}, str(d / "model-00001-of-00002.safetensors"))
        save_file({"y.weight": w2.astype(np.float32)}, str(d / "model-00002-of-00002.safetensors"))
        (d / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "metadata": {"total_size": 0},
                    "weight_map": {
                        "x.weight": "model-00001-of-00002.safetensors",
                        "y.weight": "model-00002-of-00002.safetensors",
                    },
                }
            )
        )
    pop = io.open_population(str(tmp_path))
    assert pop.names == ["a", "b"]
    assert {layer.name: layer.shape for layer in pop.layers} == {
        "x.weight": (3, 4),
        "y.weight": (5, 3),
    }


def test_sharded_index_cannot_leave_its_directory(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    save_file({"x": np.ones((2, 2), np.float32)}, str(tmp_path / "outside.safetensors"))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../outside.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="points outside"):
        io.load_model(str(d))


def test_a_shard_linked_outside_is_refused_except_into_its_hub_cache_blobs(tmp_path):
    """A shard that is a symlink leaving the model directory is refused, by name or by link;
    the one exception is a Hugging Face cache snapshot's links into its own repo's blobs."""
    save_file({"x": np.ones((2, 2), np.float32)}, str(tmp_path / "outside.safetensors"))
    index = json.dumps({"weight_map": {"x": "model-1.safetensors"}})
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors.index.json").write_text(index)
    os.symlink(tmp_path / "outside.safetensors", plain / "model-1.safetensors")
    with pytest.raises(CheckpointError, match="points outside"):
        io.load_model(str(plain))
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    save_file({"x": np.full((2, 2), 3.0, np.float32)}, str(repo / "blobs" / "f00d"))
    (snapshot / "model.safetensors.index.json").write_text(index)
    os.symlink("../../blobs/f00d", snapshot / "model-1.safetensors")
    np.testing.assert_array_equal(io.load_model(str(snapshot)).tensors["x"].read(), 3.0)
    # ... but not into another repository's blobs, or anywhere else.
    os.remove(snapshot / "model-1.safetensors")
    os.symlink(tmp_path / "outside.safetensors", snapshot / "model-1.safetensors")
    with pytest.raises(CheckpointError, match="points outside"):
        io.load_model(str(snapshot))


def test_model_safetensors_directory_and_npz(tmp_path):
    rng = np.random.default_rng(3)
    w = [rng.standard_normal((4, 5)).astype(np.float32) for _ in range(2)]
    (tmp_path / "hf").mkdir()
    save_file({"w": w[0]}, str(tmp_path / "hf" / "model.safetensors"))
    np.savez(tmp_path / "np.npz", w=w[1], b=np.zeros(3))
    pop = io.open_population([str(tmp_path / "hf"), str(tmp_path / "np.npz")])
    assert pop.names == ["hf", "np"]
    (layer,) = pop.layers
    np.testing.assert_array_equal(layer.refs[0].read(), w[0])
    np.testing.assert_array_equal(layer.refs[1].read(), w[1])


def test_npz_with_objects_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickle"):
        io.load_model(str(tmp_path / "obj.npz"))


def test_orbax_checkpoint_written_by_orbax(tmp_path):
    rng = np.random.default_rng(4)
    trees = []
    for i in range(2):
        tree = {
            "params": {
                "Dense_0": {
                    "kernel": rng.standard_normal((6, 3)).astype(np.float32),
                    "bias": np.zeros(3, np.float32),
                },
                "Conv_0": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
            }
        }
        testing.write_orbax(tmp_path / f"ckpt{i}", tree)
        trees.append(tree)
    pop = io.open_population(str(tmp_path))
    assert pop.names == ["ckpt0", "ckpt1"]
    by_name = {layer.name: layer for layer in pop.layers}
    assert set(by_name) == {"params.Dense_0.kernel", "params.Conv_0.kernel"}
    assert by_name["params.Conv_0.kernel"].shape == (3, 24)
    np.testing.assert_array_equal(
        by_name["params.Dense_0.kernel"].refs[1].read(), trees[1]["params"]["Dense_0"]["kernel"]
    )


def _adapters(tmp_path, n=3, *, rank_pattern=None, alpha_pattern=None, rslora=False):
    rng = np.random.default_rng(5)
    mods = {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.mlp.down_proj": (5, 8)}
    written = []
    for i in range(n):
        modules = {}
        for name, (m, k) in mods.items():
            r = 4
            for key, value in (rank_pattern or {}).items():
                if name.endswith(key):
                    r = value
            modules[name] = (
                rng.standard_normal((r, k)).astype(np.float32),
                rng.standard_normal((m, r)).astype(np.float32),
            )
        testing.write_peft_adapter(
            tmp_path / f"adapter{i}",
            modules,
            r=4,
            lora_alpha=8,
            use_rslora=rslora,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )
        written.append(modules)
    return written


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapters_become_factored_layers(tmp_path, rslora):
    written = _adapters(
        tmp_path, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 16}, rslora=rslora
    )
    pop = io.open_population(str(tmp_path))
    assert pop.is_lora and pop.names == ["adapter0", "adapter1", "adapter2"]
    layers = {layer.name: layer for layer in pop.layers}
    q = layers["model.layers.0.self_attn.q_proj"]
    down = layers["model.layers.0.mlp.down_proj"]
    assert q.shape == (8, 6) and q.rank == 4 and down.rank == 2
    root = math.sqrt if rslora else (lambda r: r)
    assert q.scales == (16 / root(4),) * 3
    assert down.scales == (8 / root(2),) * 3
    np.testing.assert_array_equal(
        q.a_refs[2].read(), written[2]["model.layers.0.self_attn.q_proj"][0]
    )
    model = pop.models[0]
    assert model.lora.r == 4 and model.lora.target_modules == ("down_proj", "q_proj")


def test_peft_stored_rank_disagreeing_with_config(tmp_path):
    _adapters(tmp_path, n=2)
    cfg_path = tmp_path / "adapter1" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 8
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="stored rank 4 but adapter_config.json gives r=8"):
        io.open_population(str(tmp_path))


def test_pickled_adapter_is_refused(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickles are never loaded"):
        io.load_model(str(d))


@pytest.mark.parametrize(
    "make,problem",
    [
        (lambda p: p.mkdir(), "no known model format"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("hi")), "no known model format"),
        (lambda p: None, "no such file"),
        (lambda p: p.with_suffix(".pt").write_bytes(b"x"), "pickle-based"),
    ],
)
def test_unknown_sources(tmp_path, make, problem):
    target = tmp_path / "thing"
    make(target)
    source = str(target.with_suffix(".pt")) if problem == "pickle-based" else str(target)
    with pytest.raises(CheckpointError, match=problem) as err:
        io.open_population(source)
    assert source in str(err.value)


def test_empty_and_single_model_populations(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(PopulationError, match="no models"):
        io.open_population(f"@{tmp_path / 'empty.txt'}")
    _dense_models(tmp_path, n=1)
    with pytest.raises(PopulationError, match="at least 2"):
        io.open_population(str(tmp_path / "m0.safetensors"))


def test_mismatched_layers_listed_or_skipped(tmp_path):
    _dense_models(tmp_path, n=3)
    testing.write_safetensors(
        tmp_path / "odd.safetensors",
        {
            "layer.0.weight": np.zeros((4, 7), np.float32),  # wrong shape
            "conv.kernel": np.zeros((3, 2, 2, 5), np.float32),
            "extra.weight": np.zeros((2, 2), np.float32),  # missing elsewhere
        },
    )
    with pytest.raises(PopulationError) as err:
        io.open_population(str(tmp_path))
    message = str(err.value)
    assert "'layer.0.weight': shapes differ" in message and "odd" in message
    assert "'extra.weight': missing in 3 model(s)" in message
    pop = io.open_population(str(tmp_path), skip_mismatched=True)
    assert [layer.name for layer in pop.layers] == ["conv.kernel"]
    assert {name for name, _ in pop.skipped} == {"layer.0.weight", "extra.weight"}


def test_bad_regex_and_nothing_selected(tmp_path):
    _dense_models(tmp_path)
    with pytest.raises(PopulationError, match="bad layer regex"):
        io.open_population(str(tmp_path), include="(")
    with pytest.raises(PopulationError, match="no layers to analyse"):
        io.open_population(str(tmp_path), include="nothing-matches")


def test_mixed_formats_refused(tmp_path):
    _dense_models(tmp_path, n=2)
    _adapters(tmp_path / "ad", n=1)
    with pytest.raises(PopulationError, match="mixes PEFT adapters"):
        io.open_population(
            [
                str(tmp_path / "m0.safetensors"),
                str(tmp_path / "m1.safetensors"),
                str(tmp_path / "ad" / "adapter0"),
            ]
        )


def test_indexing_reads_no_tensor_bytes(tmp_path, monkeypatch):
    # 16 models of 4 MB each; count every byte read through open() while indexing.
    rng = np.random.default_rng(6)
    for i in range(16):
        testing.write_safetensors(
            tmp_path / f"m{i:02d}.safetensors",
            {"w": rng.standard_normal((1024, 1024)).astype(np.float32)},
        )
    import builtins

    real_open = builtins.open
    counted = []

    class Counting:
        def __init__(self, f):
            self._f = f

        def read(self, *a):
            out = self._f.read(*a)
            counted.append(len(out))
            return out

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(builtins, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    monkeypatch.setattr(np, "memmap", None)  # any data access would now fail
    pop = io.open_population(str(tmp_path))
    monkeypatch.undo()
    assert len(pop.names) == 16
    assert sum(counted) < 16 * 200, sum(counted)  # headers only: ~100 bytes each
    size = os.path.getsize(tmp_path / "m00.safetensors")
    assert size > 4 * 1024 * 1024


def test_progress_is_reported_while_reading_headers(tmp_path):
    _dense_models(tmp_path, n=3)
    seen = []
    io.open_population(str(tmp_path), progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_a_pickled_model_among_safetensors_ones_is_named_not_skipped(tmp_path):
    w = np.ones((3, 2), np.float32)
    for i in range(3):
        save_file({"w": w * i}, str(tmp_path / f"m{i}.safetensors"))
    (tmp_path / "optimizer.pt").write_bytes(b"training state, not a model")
    assert len(io.open_population([str(tmp_path)]).models) == 3
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match=r"1 model\(s\) here are pickles \(pytorch_model"):
        io.open_population([str(tmp_path)])


def test_a_directory_holding_only_pytorch_model_bin_gets_the_conversion_hint(tmp_path):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    for source in (model, tmp_path):  # the model directory, or a directory of models
        with pytest.raises(CheckpointError, match="safetensors.torch.save_file"):
            io.open_population([str(source)])


def _mixed_directory(tmp_path):
    """Two safetensors model directories and one holding only `pytorch_model.bin`."""
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    for i in range(2):
        (tmp_path / f"model_{i}").mkdir()
        save_file({"w": w * (i + 1)}, str(tmp_path / f"model_{i}" / "model.safetensors"))
    (tmp_path / "model_bin").mkdir()
    (tmp_path / "model_bin" / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    return tmp_path


def test_a_mixed_directory_names_the_bin_entry_and_skips_it_only_when_asked(tmp_path):
    source = str(_mixed_directory(tmp_path))
    with pytest.raises(CheckpointError, match=r"model_bin.*--skip_unreadable"):
        io.open_population([source])
    population = io.open_population([source], skip_unreadable=True)
    assert population.names == ["model_0", "model_1"]
    ((path, reason),) = population.unreadable
    assert path == os.path.join(source, "model_bin") and "pickle" in reason


def test_a_corrupt_model_is_skipped_with_its_reason_when_asked(tmp_path):
    w = np.ones((3, 2), np.float32)
    for i in range(3):
        save_file({"w": w * i}, str(tmp_path / f"m{i}.safetensors"))
    (tmp_path / "m3.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="m3.safetensors"):
        io.open_population([str(tmp_path)])
    population = io.open_population([str(tmp_path)], skip_unreadable=True)
    assert len(population.models) == 3
    assert [os.path.basename(p) for p, _ in population.unreadable] == ["m3.safetensors"]


def test_a_blobs_folder_that_is_a_link_grants_nothing(tmp_path):
    """A crafted `models--x/blobs` linking elsewhere does not widen what a snapshot may read."""
    save_file({"x": np.ones((2, 2), np.float32)}, str(tmp_path / "secret.safetensors"))
    repo = tmp_path / "hub" / "models--org--evil"
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    os.symlink(tmp_path, repo / "blobs")
    (snapshot / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-1.safetensors"}})
    )
    os.symlink("../../blobs/secret.safetensors", snapshot / "model-1.safetensors")
    with pytest.raises(CheckpointError, match="points outside"):
        io.load_model(str(snapshot))
