"""Remote models by byte ranges (`io._remote`), against real servers started here: an HTTP server
on 127.0.0.1 honouring `Range` that counts the bytes it sends, and moto's S3 server read through
s3fs. No client library is mocked."""

import contextlib
import hashlib
import http.server
import json
import re
import struct
import threading
import urllib.parse
import warnings

import numpy as np
import pytest

import jsubspace
from jsubspace import CheckpointError
from jsubspace import io
from jsubspace import sharding
from jsubspace import testing

# Per model: one HEAD (size and ETag), then GETs of the 8-byte length, the header and each selected
# tensor. Response headers (status line, Content-Length, Content-Range, ETag, ...) are the only
# bytes on the wire beyond those: at most this many per request.
MAX_RESPONSE_HEADER_BYTES = 300


class _CountingWriter:
    def __init__(self, f):
        self.f = f
        self.n = 0

    def write(self, data):
        self.f.write(data)
        self.n += len(data)
        return len(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


class _Handler(http.server.BaseHTTPRequestHandler):
    def setup(self):
        super().setup()
        self.wfile = _CountingWriter(self.wfile)
        self.counted = 0

    def _count_wire(self):
        with self.server.owner.lock:
            self.server.owner.wire += self.wfile.n - self.counted
            self.counted = self.wfile.n

    def finish(self):
        self._count_wire()
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        with self.server.owner.serving():
            self._serve(head=True)
            self._count_wire()

    def do_GET(self):
        with self.server.owner.serving():
            self._serve(head=False)
            self._count_wire()

    def _status(self, status: int):
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.server.owner.entries.append((self.command, self.path, status, 0))

    def _serve(self, head: bool):
        owner = self.server.owner
        path = owner.root / urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        if not head:
            with owner.lock:
                owner.gets += 1
                failing = owner.fail_after is not None and owner.gets > owner.fail_after
            if failing:
                return self._status(500)
        if not path.is_file():
            return self._status(404)
        data = path.read_bytes()
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        status, start, end = 200, 0, len(data)
        asked = self.headers.get("Range")
        if asked and not head and self.headers.get("If-Range", etag) == etag:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", asked)
            start = int(match[1])
            end = min(int(match[2]) + 1 if match[2] else len(data), len(data))
            if start >= len(data):
                return self._status(416)
            status = 206
        body = data[start:end]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if head:
            owner.entries.append(("HEAD", self.path, status, 0))
            return
        self.wfile.flush()
        if owner.stall:
            owner.stopping.wait(owner.stall)
        sent = body[: len(body) // 2] if owner.truncate else body
        try:
            self.wfile.write(sent)
        except OSError:  # the client gave up (it timed out)
            sent = b""
        owner.entries.append(("GET", self.path, status, len(sent)))


class RangeServer:
    """Serves the files under `root` on 127.0.0.1 (an ephemeral port), honouring `Range`.

    `log` holds `(method, path, status, body bytes)` per request; `wire_bytes` counts everything
    sent (status lines and headers too). Faults on demand: `fail_after` (GETs after that many
    answer 500), `truncate` (half the promised body, then the connection closes), `stall`
    (seconds of silence after the headers)."""

    def __init__(self, root):
        self.root = root
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.busy = 0
        self.stopping = threading.Event()
        self.reset()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.server.handle_error = lambda request, address: None
        self.server.owner = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def reset(self):
        self.entries = []
        self.wire = 0
        self.gets = 0
        self.fail_after = None
        self.truncate = False
        self.stall = 0.0

    @contextlib.contextmanager
    def serving(self):
        """Marks a request in flight; the counters below wait for it to be logged."""
        with self.lock:
            self.busy += 1
        try:
            yield
        finally:
            with self.lock:
                self.busy -= 1
                self.idle.notify_all()

    def settle(self, timeout: float = 10.0):
        """Waits until no request is in flight. The client has its answer once the last byte is
        written, which can be before the handler thread logs it."""
        with self.lock:
            self.idle.wait_for(lambda: self.busy == 0, timeout)

    @property
    def log(self) -> list:
        self.settle()
        return self.entries

    @property
    def wire_bytes(self) -> int:
        self.settle()
        return self.wire

    @property
    def body_bytes(self) -> int:
        self.settle()
        return sum(n for _, _, status, n in self.entries if status in (200, 206))

    def close(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A range cache of this test's own; no proxy between us and 127.0.0.1."""
    monkeypatch.setenv("JSUBSPACE_RANGE_CACHE", str(tmp_path / "ranges"))
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("JSUBSPACE_REMOTE_TIMEOUT", raising=False)
    monkeypatch.delenv("JSUBSPACE_REMOTE_RETRIES", raising=False)
    return monkeypatch


@pytest.fixture
def served(tmp_path, env):
    root = tmp_path / "www"
    root.mkdir()
    server = RangeServer(root)
    yield server
    server.close()


def _dense(root, n=6, layers=3, shape=(64, 48), seed=0, prefix="m"):
    """`n` models `{prefix}{i}.safetensors` of `layers` float32 layers (and a bias each)."""
    rng = np.random.default_rng(seed)
    models = []
    for i in range(n):
        t = {}
        for j in range(layers):
            t[f"layer{j}.weight"] = rng.standard_normal(shape).astype(np.float32)
            t[f"layer{j}.bias"] = rng.standard_normal(shape[0]).astype(np.float32)
        testing.write_safetensors(root / f"{prefix}{i}.safetensors", t)
        models.append(t)
    return models


def _header_bytes(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _read_layer(pop, name):
    (layer,) = [layer for layer in pop.layers if layer.name == name]
    return [ref.read() for ref in layer.refs]


def test_one_layer_fetches_its_header_and_that_layer_only(served):
    models = _dense(served.root)
    urls = [f"{served.url}/m{i}.safetensors" for i in range(6)]
    pop = io.open_population(urls, include=r"^layer1\.weight$")
    assert pop.names == [f"m{i}" for i in range(6)]
    assert [layer.name for layer in pop.layers] == ["layer1.weight"]
    (layer,) = pop.layers
    mesh = sharding.models_mesh(1)
    ((_, placed),) = list(io.stream_layers(pop, mesh, prefetch=0))
    got = np.asarray(placed.x)[: placed.n_models]
    np.testing.assert_array_equal(got, np.stack([m["layer1.weight"] for m in models]))

    tensor = models[0]["layer1.weight"].nbytes
    headers = sum(_header_bytes(served.root / f"m{i}.safetensors") for i in range(6))
    assert served.body_bytes == headers + 6 * tensor  # not one byte more
    requests = len(served.log)
    assert [m for m, *_ in served.log].count("HEAD") == 6 and requests == 6 * 4
    overhead = served.wire_bytes - served.body_bytes
    assert overhead <= requests * MAX_RESPONSE_HEADER_BYTES, overhead
    whole = sum((served.root / f"m{i}.safetensors").stat().st_size for i in range(6))
    assert served.wire_bytes < whole / 2

    # Run again: every range comes from the cache; only the HEADs (size and ETag) go out.
    served.reset()
    pop = io.open_population(urls, include=r"^layer1\.weight$")
    for got, model in zip(_read_layer(pop, "layer1.weight"), models):
        np.testing.assert_array_equal(got, model["layer1.weight"])
    assert served.body_bytes == 0 and {m for m, *_ in served.log} == {"HEAD"}


def test_analyze_urls_equals_local(served, tmp_path):
    _dense(served.root, n=6, layers=2, shape=(12, 10), seed=3)
    local = [str(served.root / f"m{i}.safetensors") for i in range(6)]
    urls = [f"{served.url}/m{i}.safetensors" for i in range(6)]
    opts = dict(null_draws=0, holdout=None, plots=False, quiet=True, num_devices=1)
    a = jsubspace.analyze(local, str(tmp_path / "local"), **opts)
    b = jsubspace.analyze(urls, str(tmp_path / "remote"), **opts)
    assert [layer["name"] for layer in b["layers"]] == ["layer0.weight", "layer1.weight"]
    assert testing.reproducible_layers(a) == testing.reproducible_layers(b)
    assert b["config"]["models"] == urls


def test_directories_indexes_and_adapters(served):
    rng = np.random.default_rng(5)
    local = []
    for name in ("run-a", "run-b"):  # two URLs ending in model.safetensors
        t = {"w": rng.standard_normal((6, 4)).astype(np.float32)}
        testing.write_safetensors(served.root / name / "model.safetensors", t)
        local.append(str(served.root / name))
    for name in ("sh-a", "sh-b"):  # sharded, one directory URL, one index URL
        d = served.root / name
        t = {"w": rng.standard_normal((6, 4)).astype(np.float32)}
        testing.write_safetensors(d / "model-00001-of-00001.safetensors", t)
        index = {"weight_map": {"w": "model-00001-of-00001.safetensors"}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    u = served.url
    pop = io.open_population([f"{u}/run-a/model.safetensors", f"{u}/run-b/"])
    assert pop.names == ["run-a", "run-b"]
    want = io.open_population(local)
    for got, ref in zip(_read_layer(pop, "w"), want.layers[0].refs):
        np.testing.assert_array_equal(got, ref.read())
    pop = io.open_population([f"{u}/sh-a", f"{u}/sh-b/model.safetensors.index.json"])
    assert (
        pop.names == ["sh-a", "sh-b"]
        and [m.format for m in pop.models] == ["safetensors-index"] * 2
    )
    np.testing.assert_array_equal(
        _read_layer(pop, "w")[1],
        io.load_model(str(served.root / "sh-b")).tensors["w"].read(),
    )

    for i in range(3):  # PEFT adapters: a directory URL each, found by probing
        modules = {
            f"layers.{j}.q_proj": (
                rng.standard_normal((2, 8)).astype(np.float32),
                rng.standard_normal((6, 2)).astype(np.float32),
            )
            for j in range(2)
        }
        testing.write_peft_adapter(served.root / f"lora{i}", modules, r=2, lora_alpha=4)
    pop = io.open_population([f"{u}/lora{i}" for i in range(3)], include="layers.1")
    want = io.open_population([str(served.root / f"lora{i}") for i in range(3)], include="layers.1")
    assert pop.is_lora and pop.names == ["lora0", "lora1", "lora2"]
    (layer,), (local_layer,) = pop.layers, want.layers
    assert layer.scales == local_layer.scales and layer.ranks == local_layer.ranks
    for ra, rb, la, lb in zip(layer.a_refs, layer.b_refs, local_layer.a_refs, local_layer.b_refs):
        np.testing.assert_array_equal(ra.read(), la.read())
        np.testing.assert_array_equal(rb.read(), lb.read())


def _error(sources, **kwargs) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        pop = io.open_population(sources, **kwargs)
        for layer in pop.layers:
            for ref in layer.refs:
                ref.read()
    return info.value


def test_errors_name_the_url(served, env):
    _dense(served.root, n=2, layers=2, shape=(16, 8))
    good = [f"{served.url}/m{i}.safetensors" for i in range(2)]

    missing = f"{served.url}/nope.safetensors"
    e = _error([good[0], missing])
    assert e.path == missing and "not found (HTTP 404" in str(e)
    e = _error([good[0], f"{served.url}/no-such-dir"])
    assert e.path.endswith("/no-such-dir") and "no model here" in e.problem

    served.truncate = True  # (m0's header is in the range cache by now: m1 is read first)
    e = _error(good)
    assert e.path == good[1] and "truncated response: 4 of the 8 bytes" in e.problem, e
    assert "(3 attempts)" in e.problem
    served.reset()

    env.setenv("JSUBSPACE_REMOTE_TIMEOUT", "1")
    served.stall = 5
    e = _error(good)
    assert e.path == good[1] and "stalled: no data for 1 s" in e.problem, e
    served.reset()

    lying = served.root / "lying.safetensors"  # the header's length runs past the file
    data = (served.root / "m0.safetensors").read_bytes()
    lying.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    e = _error([good[1], f"{served.url}/lying.safetensors"])
    assert e.path.endswith("/lying.safetensors")
    assert f"header length {len(data)} is larger than the file ({len(data)} bytes)" in e.problem
    short = served.root / "short.safetensors"  # a data offset past the end
    short.write_bytes(data[:-4])
    e = _error([good[1], f"{served.url}/short.safetensors"])
    assert e.path.endswith("/short.safetensors") and "outside the data section" in e.problem


def test_a_failed_run_resumes_with_the_ranges_it_lacks(served):
    models = _dense(served.root)
    urls = [f"{served.url}/m{i}.safetensors" for i in range(6)]
    headers = sum(_header_bytes(served.root / f"m{i}.safetensors") for i in range(6))
    tensors = 6 * 2 * models[0]["layer0.weight"].nbytes
    served.fail_after = 6 * 2 + 5  # every header, then five of the twelve tensors
    e = _error(urls, include=r"layer[02]\.weight")
    assert "HTTP 500" in e.problem and "(3 attempts)" in e.problem
    first = served.body_bytes
    assert first == headers + 5 * models[0]["layer0.weight"].nbytes

    served.reset()
    pop = io.open_population(urls, include=r"layer[02]\.weight")
    for name in ("layer0.weight", "layer2.weight"):
        for got, model in zip(_read_layer(pop, name), models):
            np.testing.assert_array_equal(got, model[name])
    assert served.body_bytes == headers + tensors - first  # only what the first run lacked

    # A changed file has a new ETag: its ranges are fetched anew, the others' are not.
    changed = {k: v + 1 for k, v in models[2].items()}
    testing.write_safetensors(served.root / "m2.safetensors", changed)
    served.reset()
    pop = io.open_population(urls, include=r"layer[02]\.weight")
    np.testing.assert_array_equal(_read_layer(pop, "layer2.weight")[2], changed["layer2.weight"])
    np.testing.assert_array_equal(_read_layer(pop, "layer0.weight")[2], changed["layer0.weight"])
    assert served.body_bytes == _header_bytes(served.root / "m2.safetensors") + tensors // 6


def test_model_names_from_urls():
    from jsubspace.io import _remote

    assert _remote.model_name("https://h/runs/seed3.safetensors") == "seed3"
    assert _remote.model_name("https://h/runs/seed3/model.safetensors") == "seed3"
    assert _remote.model_name("https://h/runs/seed3/model.safetensors.index.json") == "seed3"
    assert _remote.model_name("https://h/runs/llama-3.1-8b/") == "llama-3.1-8b"
    assert _remote.model_name("s3://bucket/model.safetensors") == "bucket"
    assert _remote.model_name("https://h/model.safetensors?sig=1") == "h"
    hub = "https://huggingface.co/org/name/resolve/main/adapters/a1/adapter_model.safetensors"
    assert _remote.model_name(hub) == "org--name--adapters--a1"
    hub = "https://huggingface.co/org/name/resolve/v2/model.safetensors"
    assert _remote.model_name(hub) == "org--name@v2"


@pytest.fixture(scope="module")
def moto_endpoint():
    pytest.importorskip("s3fs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # moto asks for moto[server]; moto[s3] + flask suffice
        server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_s3_prefixes_files_and_globs(moto_endpoint, env, tmp_path):
    import boto3

    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    env.setenv("AWS_ENDPOINT_URL", moto_endpoint)  # what a user of an S3-compatible store sets
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="jsub-models")
    local = tmp_path / "local"
    models = _dense(local, n=3, layers=2, shape=(8, 6), seed=7)
    for i in range(3):
        data = (local / f"m{i}.safetensors").read_bytes()
        s3.put_object(Bucket="jsub-models", Key=f"runs/seed{i}/model.safetensors", Body=data)
        s3.put_object(Bucket="jsub-models", Key=f"flat/m{i}.safetensors", Body=data)
    testing.write_peft_adapter(
        local / "lora",
        {"q": (np.ones((2, 6), np.float32), np.ones((8, 2), np.float32))},
        r=2,
        lora_alpha=2,
    )
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        s3.upload_file(str(local / "lora" / name), "jsub-models", f"lora/a0/{name}")
        s3.upload_file(str(local / "lora" / name), "jsub-models", f"lora/a1/{name}")

    pop = io.open_population("s3://jsub-models/runs/", include="layer1.weight")
    assert pop.names == ["seed0", "seed1", "seed2"]
    for got, model in zip(_read_layer(pop, "layer1.weight"), models):
        np.testing.assert_array_equal(got, model["layer1.weight"])
    pop = io.open_population(
        ["s3://jsub-models/runs/seed[02]", "s3://jsub-models/flat/m1.safetensors"]
    )
    assert pop.names == ["seed0", "seed2", "m1"]
    np.testing.assert_array_equal(_read_layer(pop, "layer0.weight")[2], models[1]["layer0.weight"])
    pop = io.open_population("s3://jsub-models/lora")
    assert pop.is_lora and pop.names == ["a0", "a1"] and pop.layers[0].scales == (1.0, 1.0)
    np.testing.assert_array_equal(pop.layers[0].b_refs[1].read(), np.ones((8, 2), np.float32))

    e = _error(["s3://jsub-models/flat/m0.safetensors", "s3://jsub-models/none.safetensors"])
    assert e.path == "s3://jsub-models/none.safetensors" and "not found" in e.problem
