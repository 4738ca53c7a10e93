"""`hf://` sources, against a Hugging Face cache built in huggingface_hub's own layout.

Offline throughout (HF_HUB_OFFLINE=1), except the download tests, which replace the two calls
that would reach the network (`snapshot_download` online, `HfApi.list_repo_files`) with a fake
Hub that writes into the cache as the library does.
"""

import hashlib
import json
import os
import types

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import constants

from jsubspace import CheckpointError
from jsubspace import io
from jsubspace import testing
from jsubspace.io import _formats
from jsubspace.io import _hub

MAIN = "a" * 40
V1 = "b" * 40


def _bytes(tensors) -> bytes:
    """A real safetensors file's bytes."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = testing.write_safetensors(os.path.join(d, "x.safetensors"), tensors)
        with open(path, "rb") as f:
            return f.read()


def _adapter_files(seed: int) -> dict[str, bytes]:
    """A PEFT adapter folder as `save_pretrained` writes it, as {file name: bytes}."""
    import tempfile

    rng = np.random.default_rng(seed)
    modules = {
        "model.layers.0.self_attn.q_proj": (
            rng.standard_normal((2, 6)).astype(np.float32),
            rng.standard_normal((5, 2)).astype(np.float32),
        )
    }
    with tempfile.TemporaryDirectory() as d:
        testing.write_peft_adapter(d, modules, r=2, lora_alpha=4)
        out = {}
        for name in os.listdir(d):
            with open(os.path.join(d, name), "rb") as f:
                out[name] = f.read()
    return out


def _dense(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer.0.weight": rng.standard_normal((4, 6)).astype(np.float32),
        "layer.1.weight": rng.standard_normal((3, 4)).astype(np.float32),
    }


def cache_repo(cache, repo_id, files, *, commit=MAIN, refs=("main",)):
    """Writes one revision of a model repository as huggingface_hub caches it: content in
    `blobs/<sha256>`, `snapshots/<commit>/<path>` relative symlinks to the blobs, and
    `refs/<name>` holding the commit hash (no newline)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        pointer = snapshot.joinpath(*rel.split("/"))
        pointer.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path, offline. huggingface_hub reads its environment once, at
    import, so its constants are set as well as the variables."""
    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the named links
    return cache


@pytest.fixture
def zoo(hub, tmp_path):
    """Three dense repositories (org/model-0 with a v1 tag on another commit), one of adapters in
    subfolders, one unrelated; the same files also written as local paths."""
    local = tmp_path / "local"
    for i in range(3):
        tensors = _dense(i)
        testing.write_safetensors(local / f"m{i}.safetensors", tensors)
        cache_repo(
            hub, f"org/model-{i}", {"model.safetensors": _bytes(tensors), "config.json": b"{}"}
        )
    testing.write_safetensors(local / "m0-v1.safetensors", _dense(10))
    cache_repo(
        hub, "org/model-0", {"model.safetensors": _bytes(_dense(10))}, commit=V1, refs=["v1"]
    )
    files = {"README.md": b"adapters"}
    for j in (1, 2):
        adapter = _adapter_files(j)
        (local / f"a{j}").mkdir()
        for name, data in adapter.items():
            (local / f"a{j}" / name).write_bytes(data)
            files[f"lora/a{j}/{name}"] = data
    cache_repo(hub, "org/adapters", files)
    cache_repo(hub, "other/model-9", {"model.safetensors": _bytes(_dense(9))})
    return local


def _arrays(pop):
    return [[ref.read() for ref in layer.refs] for layer in pop.layers]


def test_the_cache_is_huggingface_hubs_own(zoo, hub):
    info = huggingface_hub.scan_cache_dir(hub)
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {
        "org/model-0",
        "org/model-1",
        "org/model-2",
        "org/adapters",
        "other/model-9",
    }
    assert set(repos["org/model-0"].refs) == {"main", "v1"}
    assert repos["org/model-0"].refs["v1"].commit_hash == V1
    cached = huggingface_hub.try_to_load_from_cache(
        "org/model-0", "model.safetensors", revision="v1"
    )
    assert cached == str(hub / "models--org--model-0" / "snapshots" / V1 / "model.safetensors")
    snapshot = huggingface_hub.snapshot_download("org/adapters", local_files_only=True)
    assert os.path.isfile(os.path.join(snapshot, "lora", "a1", "adapter_model.safetensors"))


def test_ids_resolve_offline_with_revisions_and_subfolders(zoo, hub):
    paths = io.resolve_sources(
        [
            "hf://org/model-0",
            "hf://org/model-0@v1",
            f"hf://org/model-0@{V1}",
            "hf://org/adapters/lora/a2",
        ]
    )
    names = [os.path.basename(p) for p in paths]
    assert names == ["org--model-0", "org--model-0@v1", "org--adapters--lora--a2"]  # @V1 is @v1
    snapshots = hub / "models--org--model-0" / "snapshots"
    assert os.path.samefile(os.readlink(paths[0]), snapshots / MAIN)
    assert os.path.samefile(os.readlink(paths[1]), snapshots / V1)
    assert io.load_model(paths[2]).format == "peft"
    model = io.load_model(io.resolve_sources(f"hf://org/model-0@{V1}")[0])
    assert model.name == f"org--model-0@{V1[:12]}"
    np.testing.assert_array_equal(
        model.tensors["layer.0.weight"].read(), _dense(10)["layer.0.weight"]
    )
    # A folder of models is its models, as a local directory is.
    lora = [io.load_model(p).name for p in io.resolve_sources("hf://org/adapters/lora")]
    assert lora == ["org--adapters--lora--a1", "org--adapters--lora--a2"]
    # Resolving again reuses the links.
    assert io.resolve_sources("hf://org/model-0@v1") == [paths[1]]


def test_hub_population_reads_the_same_tensors_as_local_paths(zoo):
    hub_pop = io.open_population("hf://org/model-0,hf://org/model-1,hf://org/model-2")
    local_pop = io.open_population([str(zoo / f"m{i}.safetensors") for i in range(3)])
    assert hub_pop.names == ["org--model-0", "org--model-1", "org--model-2"]
    assert [layer.name for layer in hub_pop.layers] == [layer.name for layer in local_pop.layers]
    for got, want in zip(_arrays(hub_pop), _arrays(local_pop)):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    lora_hub = io.open_population("hf://org/adapters/lora/*")
    lora_local = io.open_population([str(zoo / "a1"), str(zoo / "a2")])
    assert lora_hub.is_lora and lora_hub.names == [
        "org--adapters--lora--a1",
        "org--adapters--lora--a2",
    ]
    for h, w in zip(lora_hub.layers, lora_local.layers):
        assert h.scales == w.scales and h.ranks == w.ranks
        for x, y in zip(h.a_refs + h.b_refs, w.a_refs + w.b_refs):
            np.testing.assert_array_equal(x.read(), y.read())


def test_globs_over_repositories_and_subfolders(zoo):
    names = [os.path.basename(p) for p in io.resolve_sources("hf://org/model-*")]
    assert names == ["org--model-0", "org--model-1", "org--model-2"]  # not other/model-9
    names = [os.path.basename(p) for p in io.resolve_sources("hf://*/model-[09]")]
    assert names == ["org--model-0", "other--model-9"]
    names = [os.path.basename(p) for p in io.resolve_sources("hf://org/adapters/*/a*")]
    assert names == ["org--adapters--lora--a1", "org--adapters--lora--a2"]
    with pytest.raises(CheckpointError, match="matches no model repository in the Hugging Face"):
        io.resolve_sources("hf://org/nothing-*")
    with pytest.raises(CheckpointError, match="subfolder glob 'lora/b\\*' matches no safetensors"):
        io.resolve_sources("hf://org/adapters/lora/b*")


def test_glob_over_repositories_lacking_the_revision_fails(zoo):
    with pytest.raises(CheckpointError, match="revision 'v1' of org/model-1 is not in the"):
        io.resolve_sources("hf://org/model-[01]@v1")


def test_list_file_mixes_hub_ids_and_paths(zoo, tmp_path):
    listing = zoo / "models.txt"
    listing.write_text(
        "# hub and local\nhf://org/model-1\nm2.safetensors\n\nhf://org/model-0@v1\n"
        "hf://org/model-1@main\n"  # the same snapshot as hf://org/model-1: counted once
    )
    pop = io.open_population(f"@{listing}")
    assert pop.names == ["org--model-1", "m2", "org--model-0@v1"]
    local = io.open_population(
        [str(zoo / n) for n in ("m1.safetensors", "m2.safetensors", "m0-v1.safetensors")]
    )
    for got, want in zip(_arrays(pop), _arrays(local)):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_same_repository_name_in_two_organisations_gives_two_names(hub, tmp_path):
    cache_repo(hub, "alice/x", {"model.safetensors": _bytes(_dense(1))})
    cache_repo(hub, "bob/x", {"model.safetensors": _bytes(_dense(2))})
    cache_repo(hub, "alice/y", {"run/final/model.safetensors": _bytes(_dense(3))})
    cache_repo(hub, "bob/y", {"run/final/model.safetensors": _bytes(_dense(4))})
    pop = io.open_population("hf://alice/x,hf://bob/x,hf://alice/y/run/final,hf://bob/y/run/final")
    assert pop.names == ["alice--x", "bob--x", "alice--y--run--final", "bob--y--run--final"]


def test_file_in_a_subfolder(hub):
    cache_repo(hub, "org/files", {f"ckpt/step-{s}.safetensors": _bytes(_dense(s)) for s in (1, 2)})
    pop = io.open_population("hf://org/files/ckpt/*.safetensors")
    assert pop.names == ["org--files--ckpt--step-1", "org--files--ckpt--step-2"]
    np.testing.assert_array_equal(pop.layers[0].refs[1].read(), _dense(2)["layer.0.weight"])


def test_uncached_id_offline_says_how_to_download(zoo):
    with pytest.raises(CheckpointError) as e:
        io.resolve_sources("hf://org/missing")
    msg = str(e.value)
    assert msg.startswith("hf://org/missing: org/missing is not in the Hugging Face cache")
    assert "hf download org/missing --include '*.safetensors'" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(CheckpointError) as e:
        io.resolve_sources("hf://org/model-0@nope")
    msg = str(e.value)
    assert "revision 'nope' of org/model-0 is not in the Hugging Face cache" in msg
    assert "cached: main, v1" in msg and "--revision nope" in msg


def test_bad_subfolder_and_bad_ids(zoo):
    with pytest.raises(
        CheckpointError, match=r"no file or folder 'lora/a3' in the repository \(README"
    ):
        io.resolve_sources("hf://org/adapters/lora/a3")
    with pytest.raises(CheckpointError, match="holds no safetensors model"):
        io.resolve_sources("hf://org/adapters")  # lora/ is a folder of folders
    for bad, match in [
        ("hf://gpt2", "expected hf://ORG/NAME"),
        ("hf://org/x/../y", "may not hold"),
        ("hf://datasets/org/x", "only model repositories"),
        ("hf://org/x@", "bad revision"),
        ("hf://org/x--y", "bad repository id"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            io.resolve_sources(bad)


def test_pickle_only_repository_gets_the_conversion_hint(hub):
    cache_repo(hub, "org/old", {"pytorch_model.bin": b"\x80\x02pickle", "config.json": b"{}"})
    with pytest.raises(CheckpointError, match="safetensors.torch.save_file") as e:
        io.resolve_sources("hf://org/old")
    assert str(e.value).startswith("hf://org/old: only pickled weights here; pickle-based")
    # Beside safetensors models, a pickled one is listed under skip_unreadable, else refused.
    cache_repo(
        hub, "org/mixed", {"a/model.safetensors": _bytes(_dense(0)), "b/pytorch_model.bin": b"x"}
    )
    with pytest.raises(CheckpointError, match=r"1 model\(s\) here are pickles \(b\)"):
        io.resolve_sources("hf://org/mixed/*")
    unreadable = []
    assert [
        os.path.basename(p) for p in io.resolve_sources("hf://org/mixed/*", unreadable=unreadable)
    ] == ["org--mixed--a"]
    assert [u[0] for u in unreadable] == ["hf://org/mixed/b"]


def _cache_sharded(hub):
    shards = {"model-00001-of-00002.safetensors": {"layer.0.weight": _dense(0)["layer.0.weight"]}}
    shards["model-00002-of-00002.safetensors"] = {"layer.1.weight": _dense(0)["layer.1.weight"]}
    index = {"weight_map": {k: f for f, t in shards.items() for k in t}}
    files = {f: _bytes(t) for f, t in shards.items()}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    cache_repo(hub, "org/sharded", files)


def test_sharded_model_resolves(hub):
    _cache_sharded(hub)
    (path,) = io.resolve_sources("hf://org/sharded")
    assert os.path.basename(path) == "org--sharded"
    assert _formats.model_kind(path) == "safetensors-index"


def test_incomplete_cached_snapshot_offline_names_the_missing_file(hub):
    index = {"weight_map": {"layer.0.weight": "model-00001-of-00002.safetensors"}}
    index["weight_map"]["layer.1.weight"] = "model-00002-of-00002.safetensors"
    files = {"model.safetensors.index.json": json.dumps(index).encode()}
    files["model-00001-of-00002.safetensors"] = _bytes({"layer.0.weight": np.ones((2, 2))})
    cache_repo(hub, "org/partial", files)
    with pytest.raises(CheckpointError, match="the cached snapshot lacks model-00002-of-00002"):
        io.resolve_sources("hf://org/partial")


def test_sharded_model_loads(hub):
    _cache_sharded(hub)
    model = io.load_model(io.resolve_sources("hf://org/sharded")[0])
    np.testing.assert_array_equal(
        model.tensors["layer.1.weight"].read(), _dense(0)["layer.1.weight"]
    )


def test_unwritable_link_folder_falls_back_to_the_snapshot(zoo, tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the links' folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.warns(UserWarning, match="cannot write the link naming org--model-1"):
        (path,) = io.resolve_sources("hf://org/model-1")
    assert os.path.basename(path) == MAIN


# ---- online: a fake Hub


class FakeHub:
    """Serves repositories (one commit, MAIN, each) from memory through `HfApi.repo_info`,
    `HfApi.list_repo_files` and `snapshot_download`, which writes into the cache as
    huggingface_hub does (and, with local_files_only, is the real one); records downloads."""

    def __init__(self, cache, monkeypatch):
        self.cache = cache
        self.repos: dict[str, dict[str, bytes]] = {}
        self.downloads: list[tuple[str, str, list[str]]] = []
        real = huggingface_hub.snapshot_download

        def snapshot_download(
            repo_id,
            *,
            revision=None,
            cache_dir=None,
            allow_patterns=None,
            local_files_only=False,
            **kw,
        ):
            if local_files_only:
                return real(
                    repo_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    allow_patterns=allow_patterns,
                    local_files_only=True,
                )
            assert allow_patterns, "never a whole repository"
            files = self.repos[repo_id]
            chosen = sorted(
                huggingface_hub.utils.filter_repo_objects(files, allow_patterns=allow_patterns)
            )
            self.downloads.append((repo_id, revision, chosen))
            refs = () if revision == MAIN else [revision or "main"]
            return str(cache_repo_add(cache, repo_id, {f: files[f] for f in chosen}, refs=refs))

        def repo_info(api, repo_id, revision=None, **kw):
            if repo_id not in self.repos:
                raise huggingface_hub.utils.RepositoryNotFoundError("404", response=_Response())
            return types.SimpleNamespace(sha=MAIN)

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
        monkeypatch.setattr(
            huggingface_hub.HfApi,
            "list_repo_files",
            lambda api, repo_id, revision=None, **kw: list(self.repos[repo_id]),
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


class _Response:
    status_code = 404
    headers: dict = {}
    request = None

    def json(self):
        return {}


def cache_repo_add(cache, repo_id, files, *, refs):
    """Adds files to the MAIN snapshot (as a download does), skipping those already there."""
    snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / MAIN
    new = {f: d for f, d in files.items() if not (snapshot / f).exists()}
    cache_repo(cache, repo_id, new, refs=refs)
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


@pytest.fixture
def fake_hub(hub, monkeypatch):
    return FakeHub(hub, monkeypatch)


def test_online_downloads_only_the_files_read(fake_hub, hub):
    adapter = _adapter_files(1)
    fake_hub.repos["org/big"] = {
        "config.json": b"{}",
        "model.safetensors": _bytes(_dense(0)),
        "consolidated.safetensors": _bytes(_dense(5)),  # another copy of the weights
        "pytorch_model.bin": b"pickle",
        **{f"adapters/a1/{n}": d for n, d in adapter.items()},
        **{f"adapters/a1/checkpoint-10/{n}": d for n, d in adapter.items()},
        "adapters/a1/training_args.bin": b"pickle",
        **{f"adapters/a2/{n}": d for n, d in _adapter_files(2).items()},
    }
    (path,) = io.resolve_sources("hf://org/big")
    assert os.path.basename(path) == "org--big"
    assert fake_hub.downloads == [("org/big", None, ["model.safetensors"])]
    fake_hub.downloads.clear()
    paths = io.resolve_sources("hf://org/big/adapters/a*")
    assert [os.path.basename(p) for p in paths] == [
        "org--big--adapters--a1",
        "org--big--adapters--a2",
    ]
    assert fake_hub.downloads == [
        (
            "org/big",
            None,
            [
                "adapters/a1/adapter_config.json",
                "adapters/a1/adapter_model.safetensors",
                "adapters/a2/adapter_config.json",
                "adapters/a2/adapter_model.safetensors",
            ],
        )
    ]
    assert io.open_population(paths).is_lora
    # Everything cached now: no further call reaches the Hub, online or not.
    fake_hub.downloads.clear()
    io.resolve_sources("hf://org/big,hf://org/big/adapters/a2")
    assert fake_hub.downloads == []


def test_online_sharded_download_fetches_the_listed_shards(fake_hub, monkeypatch):
    shards = {"model-00001-of-00002.safetensors": {"layer.0.weight": _dense(0)["layer.0.weight"]}}
    shards["model-00002-of-00002.safetensors"] = {"layer.1.weight": _dense(0)["layer.1.weight"]}
    index = {"weight_map": {k: f for f, t in shards.items() for k in t}}
    fake_hub.repos["org/sharded"] = {
        **{f: _bytes(t) for f, t in shards.items()},
        "model.safetensors.index.json": json.dumps(index).encode(),
        "consolidated.safetensors": _bytes(_dense(5)),
    }
    (online,) = io.resolve_sources("hf://org/sharded")
    assert [d[1:] for d in fake_hub.downloads] == [
        (MAIN, ["model.safetensors.index.json"]),
        (
            None,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
            ],
        ),
    ]
    # huggingface_hub recorded the ref: the same id now resolves offline, to the same link.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert io.resolve_sources("hf://org/sharded") == [online]


def test_online_pickle_only_and_missing_repositories(fake_hub):
    fake_hub.repos["org/old"] = {"pytorch_model.bin": b"pickle", "config.json": b"{}"}
    with pytest.raises(CheckpointError, match="only pickled weights here; pickle-based"):
        io.resolve_sources("hf://org/old")
    assert fake_hub.downloads == []
    with pytest.raises(CheckpointError, match="no model repository org/none on the Hub"):
        io.resolve_sources("hf://org/none")


def test_parse():
    spec = _hub.parse("hf://org/name@refs%2Fpr%2F3/a/b")
    assert (spec.repo, spec.revision, spec.subfolder) == ("org/name", "refs/pr/3", "a/b")
    assert _hub.parse("hf://org/name/").subfolder == ""
