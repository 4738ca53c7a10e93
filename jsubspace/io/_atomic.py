"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import threading

import numpy as np

# Held while a file is written and renamed into place: an interrupted run waits for it before it
# ends the process (`jsubspace.run._interrupt`), so no write is ever left half done.
WRITE_LOCK = threading.RLock()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, fsyncs it, then renames it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with WRITE_LOCK:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite(value):
    """`value` with every NaN / Inf float replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def plain(value):
    """`value` as JSON types: numpy scalars and arrays, tuples and dataclasses converted, NaN / Inf
    floats as None. One walk, instead of a `json.loads(json.dumps(...))` round trip; long lists
    of floats are checked at C speed."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            return [plain(v) for v in value.astype(object).tolist()]
        return value.tolist()
    if isinstance(value, (list, tuple)):
        if value and all(type(v) is float for v in value):
            if np.all(np.isfinite(np.fromiter(value, np.float64, len(value)))):
                return list(value)
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if value is None or isinstance(value, (str, int, bool)):
        return value
    raise TypeError(f"cannot serialise {type(value).__name__}")


def compact_json(value) -> str:
    """Strict compact JSON (NaN / Inf become null)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(finite(value), separators=(",", ":"), allow_nan=False)


def atomic_write_json(path: str, value) -> None:
    """Indented strict JSON (NaN / Inf become null), for the small human-read files."""
    try:
        text = json.dumps(value, indent=1, allow_nan=False)
    except ValueError:
        text = json.dumps(finite(value), indent=1, allow_nan=False)
    atomic_write_text(path, text)
