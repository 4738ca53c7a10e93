"""Remote models read by byte ranges: `http(s)://`, `s3://` and `gs://` URLs.

A remote safetensors file is never downloaded whole. Its header is read with two range requests
(the 8-byte length, then the JSON header) and validated as a local header is
(`_safetensors.read_header`); each tensor's bytes are fetched by one range request of its own when
its `TensorRef.read()` is called, so selecting one layer fetches the headers and that layer only.

* A URL is a `*.safetensors` file, a sharded `*.safetensors.index.json` (its shards are read
  beside it), or a "directory": for http(s) the known names are probed under it
  (`adapter_config.json` + `adapter_model.safetensors`, `model.safetensors.index.json`,
  `model.safetensors`); for s3 / gs the prefix is listed, and a prefix holding models (and no
  model files of its own) is a directory of models, as a local directory is. A glob in an s3 / gs
  URL matches objects and prefixes.
* http(s) goes through the standard library (`urllib`: redirects and the `*_proxy` variables
  honoured; no extra package). `s3://` needs `s3fs`, `gs://` needs `gcsfs` (both through `fsspec`;
  `pip install 'jsubspace[remote]'`), with credentials, region and endpoint found where those
  libraries look: for an S3-compatible store set `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`;
  read by botocore) or fsspec's `FSSPEC_S3_ENDPOINT_URL`; fsspec configuration
  (`FSSPEC_S3_*`, `~/.config/fsspec/`) is applied too.
* Every request is bounded: `JSUBSPACE_REMOTE_TIMEOUT` seconds (default 30) for a connection and
  between two reads of the socket, and `JSUBSPACE_REMOTE_RETRIES` attempts (default 3, with
  0.25 s, 0.5 s, ... between them) on connection errors, timeouts, HTTP 5xx / 408 / 429 and
  truncated bodies. Then, and for 404, access denied or a changed file, a `CheckpointError`
  naming the URL says what happened.
* Fetched ranges are cached in `$XDG_CACHE_HOME/jsubspace/ranges` (default `~/.cache/...`;
  `JSUBSPACE_RANGE_CACHE=DIR` elsewhere, `=off` not at all), one file per range written
  atomically, under the URL (without its query) and the object's version: its ETag, else its
  Last-Modified and size, or the commit of a Hugging Face `.../resolve/<commit>/...` URL. An
  object with none of these is not cached. A resumed run fetches only the ranges it lacks; a
  changed version leaves the old ranges unused and removes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import posixpath
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings

from jsubspace.errors import CheckpointError
from jsubspace.io._atomic import atomic_write_bytes

_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://")
# scheme -> (package, fsspec protocol)
_FSSPEC = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_ATTEMPTS = 3
BACKOFF_S = 0.25
MAX_JSON_BYTES = 64 * 1024 * 1024

PEFT_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
# Probed under an http(s) directory, in the order `_formats.model_kind` tries them.
PROBED = ((PEFT_CONFIG, "peft"), (INDEX, "safetensors-index"), (WEIGHTS, "safetensors"))
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# File names that are no model read from a URL (anything else without a known suffix is taken for
# a directory).
_OTHER_FILES = (".json", ".npz", ".npy", ".gguf", ".onnx", ".h5", ".msgpack", ".txt", ".md")
_OTHER_FILES += (".zip", ".tar", ".gz", ".csv", ".yaml", ".yml", ".model", ".tiktoken")
_NOT_MODELS = ("optimizer", "scheduler", "rng_state", "training_args", "trainer_state")
_HUB_COMMIT = re.compile(r"/resolve/([0-9a-f]{40})/")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def is_url(path) -> bool:
    """True for an `http://`, `https://`, `s3://`, `gs://` or `gcs://` source."""
    return isinstance(path, str) and path[:8].lower().startswith(_SCHEMES)


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _split(url: str) -> urllib.parse.SplitResult:
    return urllib.parse.urlsplit(url)


def _url_path(url: str) -> str:
    """The path of `url` without query or fragment, percent-decoded."""
    return urllib.parse.unquote(_split(url).path)


def file_kind(url: str) -> str | None:
    """What the last path component of `url` names: 'safetensors', 'safetensors-index',
    'pickle', 'other' for another file name, None for a "directory"."""
    name = posixpath.basename(_url_path(url))
    if not name or _url_path(url).endswith("/"):
        return None
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".safetensors.index.json"):
        return "safetensors-index"
    if name.endswith(_PICKLE_SUFFIXES):
        return "pickle"
    if name.lower().endswith(_OTHER_FILES):
        return "other"
    return None  # a directory: `llama-3.1-8b`, `seed.1`


def join(directory: str, name: str) -> str:
    """The URL of `name` (a `/`-separated relative path) inside directory URL `directory`."""
    parts = _split(directory)
    quoted = name if _scheme(directory) in _FSSPEC else urllib.parse.quote(name)
    path = parts.path.rstrip("/") + "/" + quoted
    return urllib.parse.urlunsplit(parts._replace(path=path))


def parent(url: str) -> str:
    """The directory URL holding file URL `url`."""
    parts = _split(url)
    return urllib.parse.urlunsplit(parts._replace(path=posixpath.dirname(parts.path)))


def join_inside(directory: str, name, source: str) -> str:
    """Joins a file name from metadata (a shard of an index) to its directory URL, refusing
    names that would leave it."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(source, f"bad file name {name!r}")
    parts = name.split("/")
    if (
        "\\" in name
        or "://" in name
        or name.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise CheckpointError(source, f"file name {name!r} points outside {directory}")
    return join(directory, name)


def _hub_name(parts: list[str], is_file: bool) -> str | None:
    """`ORG--NAME[@REV][--SUB--FOLDER]` for a Hugging Face `/ORG/NAME/resolve/REV/...` URL, as
    `hf://` sources are named (the revision left out when it is `main`)."""
    if len(parts) < 4 or parts[2] != "resolve":
        return None
    org, name, revision = parts[0], parts[1], parts[3]
    sub = parts[4:-1] if is_file else parts[4:]
    head = f"{org}--{name}" + ("" if revision == "main" else f"@{revision}")
    return "--".join([head, *sub])


def model_name(url: str) -> str:
    """A model's name from its URL, as meaningful as a local one: the file's stem
    (`runs/seed3.safetensors` -> `seed3`), but the parent directory's name for the standard file
    names (`seed3/model.safetensors`, `seed3/model.safetensors.index.json` -> `seed3`) so that
    two models' URLs ending in one file name get two names; a directory's own name; for a
    Hugging Face `.../ORG/NAME/resolve/REV/...` URL `ORG--NAME[@REV][--SUBFOLDER]`."""
    split = _split(url)
    parts = [p for p in _url_path(url).split("/") if p]
    if _scheme(url) in _FSSPEC:
        parts = [split.netloc, *parts]  # the bucket, as the top directory
    kind = file_kind(url)
    hub = _hub_name(parts, kind is not None)
    if hub:
        return hub
    if kind is None:
        return parts[-1] if parts else split.hostname or split.netloc
    stem = parts[-1]
    for suffix in (".safetensors.index.json", ".safetensors"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if stem in ("model", "adapter_model"):
        return parts[-2] if len(parts) > 1 else split.hostname or split.netloc
    return stem


def _timeout() -> float:
    raw = os.environ.get("JSUBSPACE_REMOTE_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"JSUBSPACE_REMOTE_TIMEOUT={raw!r} is not a positive number of seconds")
    return value


def _attempts() -> int:
    raw = os.environ.get("JSUBSPACE_REMOTE_RETRIES", "").strip()
    if not raw:
        return DEFAULT_ATTEMPTS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"JSUBSPACE_REMOTE_RETRIES={raw!r} is not a positive number of attempts")
    return int(raw)


class _Retry(Exception):
    """A failure worth another attempt; `problem` says what it was."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


class _NotFound(Exception):
    """The object does not exist (HTTP 404 / 410, NoSuchKey)."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def _stalled(timeout: float) -> _Retry:
    return _Retry(
        f"the server stalled: no data for {timeout:g} s (timeout; JSUBSPACE_REMOTE_TIMEOUT)"
    )


def _with_retries(url: str, what: str, call):
    """`call()`, again after a backoff on `_Retry`, at most `JSUBSPACE_REMOTE_RETRIES` times."""
    attempts = _attempts()
    for attempt in range(attempts):
        try:
            return call()
        except _Retry as e:
            problem = e.problem
        if attempt + 1 < attempts:
            time.sleep(BACKOFF_S * 2**attempt)
    tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
    raise CheckpointError(url, f"{what} failed ({tries}): {problem}")


@dataclasses.dataclass(frozen=True)
class _Stat:
    size: int
    etag: str | None
    version: str | None  # what the range cache is keyed by; None: not cached


def _version(url: str, etag, modified, size: int) -> str | None:
    commit = _HUB_COMMIT.search(_split(url).path)
    if commit:
        return f"commit:{commit.group(1)}"
    if etag:
        return f"etag:{etag}"
    if modified:
        return f"modified:{modified}:size:{size}"
    return None


class _Http:
    """Range reads over http(s) with the standard library."""

    def _open(self, url: str, method: str, headers: dict[str, str]):
        request = urllib.request.Request(
            url,
            method=method,
            headers={"User-Agent": "jsubspace", "Accept-Encoding": "identity", **headers},
        )
        timeout = _timeout()
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            status, reason = e.code, e.reason
            e.close()
            problem = f"HTTP {status} {reason}".strip()
            if status in (404, 410):
                raise _NotFound(problem) from None
            if status >= 500 or status in (408, 429):
                raise _Retry(problem) from None
            if status == 416:
                raise CheckpointError(
                    url,
                    f"{problem}: the file is shorter than its header says (changed or truncated "
                    "on the server?)",
                ) from None
            if status in (401, 403):
                raise CheckpointError(url, f"access denied ({problem})") from None
            raise CheckpointError(url, problem) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _stalled(timeout) from None
            raise _Retry(f"cannot connect ({e.reason})") from None
        except TimeoutError:
            raise _stalled(timeout) from None
        except (http.client.HTTPException, OSError) as e:
            raise _Retry(f"connection failed ({type(e).__name__}: {e})") from None

    def stat(self, url: str) -> _Stat:
        try:
            response = self._open(url, "HEAD", {})
        except CheckpointError as e:
            if "HTTP 403" not in e.problem and "HTTP 405" not in e.problem:
                raise
            response = None  # HEAD refused (a presigned GET URL, say): ask for one byte instead
        if response is not None:
            with response:
                length = response.headers.get("Content-Length")
                headers = response.headers
            if length is not None and length.isdigit():
                size = int(length)
                return _Stat(
                    size,
                    headers.get("ETag"),
                    _version(url, headers.get("ETag"), headers.get("Last-Modified"), size),
                )
        response = self._open(url, "GET", {"Range": "bytes=0-0"})
        with response:
            headers = response.headers
            if response.status == 206:
                match = _CONTENT_RANGE.match(headers.get("Content-Range", ""))
                if not match or match.group(3) == "*":
                    raise CheckpointError(url, "the server does not say the file's size")
                size = int(match.group(3))
            else:
                size = int(headers.get("Content-Length") or -1)
                if size < 0:
                    raise CheckpointError(url, "the server does not say the file's size")
        etag = headers.get("ETag")
        return _Stat(size, etag, _version(url, etag, headers.get("Last-Modified"), size))

    def read(self, url: str, start: int, end: int, etag: str | None) -> bytearray:
        headers = {"Range": f"bytes={start}-{end - 1}"}
        if etag and not etag.startswith("W/"):
            headers["If-Range"] = etag  # a changed file answers 200, not the wrong bytes
        response = self._open(url, "GET", headers)
        with response:
            if response.status != 206:
                now = response.headers.get("ETag")
                if etag and now and now != etag:
                    raise CheckpointError(
                        url, f"the file changed on the server while it was read (ETag {now})"
                    )
                raise CheckpointError(
                    url,
                    f"the server ignores Range requests (HTTP {response.status} to bytes "
                    f"[{start}, {end})); reading by byte ranges needs them",
                )
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or (int(match.group(1)), int(match.group(2))) != (start, end - 1):
                raise CheckpointError(
                    url,
                    f"asked for bytes [{start}, {end}), the server sent "
                    f"{response.headers.get('Content-Range')!r}",
                )
            return _read_body(response, end - start, _timeout())


def _read_body(response, n: int, timeout: float) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    try:
        while got < n:
            k = response.readinto(view[got:])
            if not k:
                break
            got += k
    except TimeoutError:
        raise _stalled(timeout) from None
    except (http.client.HTTPException, OSError) as e:
        raise _Retry(f"connection lost after {got} of {n} bytes ({type(e).__name__})") from None
    if got < n:
        raise _Retry(f"truncated response: {got} of the {n} bytes asked for")
    return buf


class _Fsspec:
    """Range reads through an fsspec filesystem (s3fs, gcsfs)."""

    def __init__(self, url: str):
        scheme = _scheme(url)
        package, self.protocol = _FSSPEC[scheme]
        self.scheme = scheme
        try:
            __import__(package)
        except ImportError:
            raise CheckpointError(
                url,
                f"{scheme}:// URLs need the '{package}' package: pip install {package} "
                "(or 'jsubspace[remote]')",
            ) from None
        import fsspec

        self.fs = fsspec.filesystem(self.protocol, **_fsspec_options(self.protocol))
        if self.protocol == "s3":
            self.fs.retries = 1  # ours are the only retries (s3fs's default is 5)

    def _call(self, url: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as e:
            raise _NotFound(f"no such object ({e})") from None
        except PermissionError as e:
            raise CheckpointError(url, f"access denied ({e})") from None
        except TimeoutError:
            raise _stalled(_timeout()) from None
        except Exception as e:  # each client library raises its own types
            kind = type(e).__name__
            if "Credentials" in kind or "Auth" in kind:
                raise CheckpointError(url, f"no credentials ({kind}: {e})") from None
            if "Timeout" in kind:
                raise _stalled(_timeout()) from None
            raise _Retry(f"{kind}: {e}") from None

    def stat(self, url: str) -> _Stat:
        self.fs.invalidate_cache(url)
        info = self._call(url, self.fs.info, url)
        if info.get("type") == "directory":
            raise _NotFound("a prefix (directory), not an object")
        size = int(info["size"])
        etag = info.get("ETag") or info.get("etag") or info.get("generation")
        modified = info.get("LastModified") or info.get("updated") or info.get("mtime")
        return _Stat(size, None, _version(url, etag, modified, size))

    def read(self, url: str, start: int, end: int, etag: str | None) -> bytes:
        data = self._call(url, self.fs.cat_file, url, start=start, end=end)
        if len(data) < end - start:
            raise _Retry(f"truncated response: {len(data)} of the {end - start} bytes asked for")
        return data[: end - start]

    def listdir(self, url: str) -> list[tuple[str, bool]]:
        """`(url, is_directory)` of each entry under directory `url`."""
        entries = self._call(url, self.fs.ls, url.rstrip("/"), detail=True)
        return [
            (f"{self.scheme}://{e['name'].rstrip('/')}", e.get("type") == "directory")
            for e in entries
        ]

    def glob(self, url: str) -> list[str]:
        return sorted(f"{self.scheme}://{m}" for m in self._call(url, self.fs.glob, url))


def _fsspec_options(protocol: str) -> dict:
    """Our timeouts under the user's fsspec configuration (which wins, key by key)."""
    import fsspec.config

    user = dict(fsspec.config.conf.get(protocol, {}))
    timeout = _timeout()
    options: dict = {"skip_instance_cache": True}
    if protocol == "s3":
        config = {"connect_timeout": timeout, "read_timeout": timeout}
        config["retries"] = {"max_attempts": 1}
        config.update(user.pop("config_kwargs", None) or {})
        options["config_kwargs"] = config
    elif protocol == "gcs":
        options["requests_timeout"] = timeout
    options.update(user)
    return options


_filesystems: dict = {}
_lock = threading.Lock()


def _backend(url: str):
    scheme = _scheme(url)
    if scheme in ("http", "https"):
        return _HTTP
    # One filesystem per configuration: the endpoint and credentials are read from the
    # environment when the client is made.
    env = tuple(
        sorted(
            (k, v)
            for k, v in os.environ.items()
            if k.startswith(("AWS_", "FSSPEC_", "GOOGLE_", "GCS", "JSUBSPACE_REMOTE_"))
        )
    )
    key = (scheme, env)
    with _lock:
        backend = _filesystems.get(key)
    if backend is None:
        backend = _Fsspec(url)
        with _lock:
            _filesystems[key] = backend
    return backend


_HTTP = _Http()


def cache_root() -> str | None:
    """Where fetched ranges are kept (None: `JSUBSPACE_RANGE_CACHE=off`)."""
    env = os.environ.get("JSUBSPACE_RANGE_CACHE")
    if env is not None:
        if env.strip().lower() in ("", "0", "off", "none", "false"):
            return None
        return os.path.expanduser(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jsubspace", "ranges")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_cache_warned = False


def _cache_dir(url: str, version: str | None) -> str | None:
    """This version's directory of cached ranges; other versions of the URL are removed."""
    root = cache_root()
    if root is None or version is None:
        return None
    key = urllib.parse.urlunsplit(_split(url)._replace(query="", fragment=""))
    url_dir = os.path.join(root, _digest(key)[:32])
    here = _digest(version)[:16]
    try:
        for entry in os.listdir(url_dir):
            if entry != here:
                shutil.rmtree(os.path.join(url_dir, entry), ignore_errors=True)
    except OSError:
        pass
    directory = os.path.join(url_dir, here)
    if not os.path.exists(os.path.join(directory, "source.json")):
        _cache_write(
            os.path.join(directory, "source.json"),
            json.dumps({"url": key, "version": version}).encode(),
        )
    return directory


def _cache_write(path: str, data) -> None:
    global _cache_warned
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        if not _cache_warned:
            _cache_warned = True
            warnings.warn(f"range cache not written ({e}); set JSUBSPACE_RANGE_CACHE", stacklevel=3)


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One remote object as it was when stat'ed: its size, and its version for the cache."""

    url: str
    size: int
    etag: str | None
    version: str | None
    cache_dir: str | None
    backend: object = dataclasses.field(repr=False, compare=False)

    def read(self, start: int, n: int):
        """Bytes `[start, start + n)`, fewer where the object ends first (never more)."""
        n = max(0, min(n, self.size - start))
        if n == 0:
            return b""
        path = None
        if self.cache_dir is not None:
            path = os.path.join(self.cache_dir, f"{start}-{start + n}")
            try:
                with open(path, "rb") as f:
                    data = f.read(n + 1)
                if len(data) == n:
                    return data
            except OSError:
                pass
        data = _with_retries(
            self.url,
            f"reading bytes [{start}, {start + n})",
            lambda: self.backend.read(self.url, start, start + n, self.etag),
        )
        if path is not None:
            _cache_write(path, data)
        return data


_files: dict[str, RemoteFile] = {}


def open_file(url: str, *, fresh: bool = True) -> RemoteFile:
    """The object at `url`, stat'ed anew (`fresh`) or as last stat'ed in this process."""
    if not fresh:
        with _lock:
            known = _files.get(url)
        if known is not None:
            return known
    backend = _backend(url)
    try:
        stat = _with_retries(url, "reading the file's size", lambda: backend.stat(url))
    except _NotFound as e:
        raise CheckpointError(url, f"not found ({e.problem})") from None
    file = RemoteFile(
        url, stat.size, stat.etag, stat.version, _cache_dir(url, stat.version), backend
    )
    with _lock:
        _files[url] = file
    return file


def read_range(url: str, start: int, n: int):
    """Bytes `[start, start + n)` of `url` (of the version whose header was read), all of them
    or a CheckpointError."""
    try:
        data = open_file(url, fresh=False).read(start, n)
    except _NotFound as e:
        raise CheckpointError(url, f"not found any more ({e.problem})") from None
    if len(data) != n:
        raise CheckpointError(url, f"the file ends before bytes [{start}, {start + n})")
    return data


def read_json_bytes(url: str):
    """The whole (small) object at `url`."""
    try:
        file = open_file(url)
        if file.size > MAX_JSON_BYTES:
            raise CheckpointError(url, f"{file.size} bytes: too large for a JSON file")
        return file.read(0, file.size)
    except _NotFound as e:
        raise CheckpointError(url, f"not found ({e.problem})") from None


def exists(url: str) -> bool:
    """True when the object at `url` exists (an http(s) HEAD, an s3 / gs info)."""
    backend = _backend(url)
    try:
        _with_retries(url, "looking for the file", lambda: backend.stat(url))
    except _NotFound:
        return False
    return True


_listings: dict[str, list[tuple[str, bool]]] = {}


def _listdir(url: str) -> list[tuple[str, bool]]:
    key = url.rstrip("/")
    if key not in _listings:
        backend = _backend(url)
        try:
            _listings[key] = _with_retries(url, "listing", lambda: backend.listdir(url))
        except _NotFound:
            _listings[key] = []
    return _listings[key]


_kinds: dict[str, str | None] = {}


def model_kind(url: str) -> str | None:
    """`_formats.model_kind` for a URL: 'safetensors', 'safetensors-index', 'peft' or None."""
    kind = file_kind(url)
    if kind in ("safetensors", "safetensors-index"):
        return kind
    if kind is not None:
        return None
    key = url.rstrip("/")
    if key in _kinds:
        return _kinds[key]
    if _scheme(url) in _FSSPEC:
        names = {posixpath.basename(u) for u, is_dir in _listdir(url) if not is_dir}
        found = next((k for name, k in PROBED if name in names), None)
    else:
        found = next((k for name, k in PROBED if exists(join(url, name))), None)
    _kinds[key] = found
    return found


def is_file_url(url: str) -> bool:
    return file_kind(url) is not None


def pickled_model(url: str) -> bool:
    """A URL naming a pickle (`*.bin`, `*.pt`, ...) that is no training state."""
    name = posixpath.basename(_url_path(url))
    return file_kind(url) == "pickle" and not name.startswith(_NOT_MODELS)


def missing_problem(url: str) -> str:
    """Why `url` is no model, for `load_model`'s error."""
    if file_kind(url) == "other":
        return (
            "not a model format read from URLs (*.safetensors, *.safetensors.index.json, or "
            "a directory holding adapter_config.json, model.safetensors.index.json or "
            "model.safetensors)"
        )
    probed = ", ".join(name for name, _ in PROBED)
    return f"no model here: none of {probed} found under this URL"


_PICKLE_REASON = "a pickle-based checkpoint (never loaded: it can run code); convert to safetensors"


def resolve(source: str, *, unreadable: list[tuple[str, str]] | None = None) -> list[str]:
    """Model URLs of one URL source (see the module docstring); `unreadable` as in
    `resolve_sources`."""
    url = source.strip()
    _listings.clear()  # listings and probes are remembered from here to the models' loading
    _kinds.clear()
    scheme = _scheme(url)
    remote_fs = scheme in _FSSPEC
    if remote_fs and any(c in _url_path(url) for c in "*?["):
        matches = _backend(url).glob(url)
        found = [m for m in matches if model_kind(m) is not None]
        if not found:
            raise CheckpointError(source, "glob matches no models")
        return found
    if model_kind(url) is not None:
        return [url.rstrip("/") if file_kind(url) is None else url]
    if pickled_model(url) or not remote_fs or file_kind(url) is not None:
        from jsubspace.io import _formats

        _formats.load_model(url)  # raises the precise error (pickle, not found, unknown)
    children = _listdir(url)
    if not children:
        raise CheckpointError(url, "not found (no object or prefix of this name)")
    found = [u for u, _ in children if model_kind(u) is not None]
    pickled = [u for u, is_dir in children if not is_dir and pickled_model(u)]
    if pickled and unreadable is not None and found:
        unreadable.extend((u, _PICKLE_REASON) for u in pickled)
    elif pickled:
        names = ", ".join(posixpath.basename(u) for u in pickled[:3])
        raise CheckpointError(
            url,
            f"{len(pickled)} model(s) here are pickles ({names}), which are never loaded (they "
            "can run code): convert them to safetensors, or pass --skip_unreadable",
        )
    if not found:
        raise CheckpointError(url, "prefix is no known model format and holds no models")
    return found
