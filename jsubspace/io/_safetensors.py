"""A bounds-checked safetensors header parser and memory-mapped tensor reader.

The format is an 8-byte little-endian header length, a UTF-8 JSON object, then the raw bytes of
every tensor. We parse it ourselves rather than through `safetensors.safe_open` so that every
dtype (bf16, the float8 variants) comes back as a numpy view without a copy, and so that a hostile
header is rejected before anything is allocated: the header length is checked against the file
size, every offset against the data section, every byte count against shape x itemsize, and
tensors may not overlap.

References:
  https://github.com/huggingface/safetensors (format description in its README).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from jsubspace.errors import CheckpointError
from jsubspace.io import _remote

# The largest header we accept. safetensors itself refuses headers over 100 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file.

    Attributes:
        name: the tensor's key in the header.
        dtype: numpy dtype (ml_dtypes for bf16 / float8).
        shape: the stored shape.
        offset: absolute byte offset of its first byte in the file.
        nbytes: its size in bytes.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one file: its tensors by name and its `__metadata__`."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def _fail(path: str, problem: str) -> CheckpointError:
    return CheckpointError(path, f"not a valid safetensors file: {problem}")


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Reads and validates the header of a safetensors file; reads no tensor bytes.

    Args:
        path: the `.safetensors` file, or its URL (`io._remote`: two range requests, the length
            then the header, validated alike).

    Returns:
        The validated header.

    Raises:
        CheckpointError: naming the file and the problem, for any malformed input.
    """
    path = os.fspath(path)
    if _remote.is_url(path):
        remote = _remote.open_file(path)
        return _parse_header(path, remote.size, remote.read)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:

            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            return _parse_header(path, size, read)
    except OSError as e:
        raise CheckpointError(path, f"cannot read file: {e.strerror or e}") from None


def _parse_header(path: str, size: int, read) -> SafetensorsHeader:
    """The header of a file of `size` bytes whose bytes `read(offset, n)` returns (fewer where the
    file ends first)."""
    prefix = read(0, 8)
    if len(prefix) < 8:
        raise _fail(path, f"file is {size} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > size - 8:
        raise _fail(path, f"header length {header_len} is larger than the file ({size} bytes)")
    if header_len > MAX_HEADER_BYTES:
        raise _fail(path, f"header length {header_len} exceeds {MAX_HEADER_BYTES} bytes")
    raw = read(8, header_len)
    if len(raw) != header_len:
        raise _fail(path, "file truncated inside the header")
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(path, f"header is not UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"header is a JSON {type(header).__name__}, not an object")

    data_start = 8 + header_len
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")

    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise _fail(path, f"{where}: entry is not an object")
        dtype_name = entry.get("dtype")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise _fail(path, f"{where}: unknown dtype {dtype_name!r}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**62 for d in shape):
            raise _fail(path, f"{where}: shape {shape!r} is not a list of non-negative ints")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            raise _fail(path, f"{where}: data_offsets {offsets!r} is not a pair of ints")
        begin, end = offsets
        dtype = DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= data_size:
            raise _fail(
                path,
                f"{where}: data_offsets [{begin}, {end}] lie outside the data section "
                f"({data_size} bytes; file truncated?)",
            )
        if end - begin != nbytes:
            raise _fail(
                path,
                f"{where}: {end - begin} bytes stored but shape {shape} of {dtype_name} "
                f"needs {nbytes}",
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, nbytes)
        if nbytes:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise _fail(path, f"tensors {name0!r} and {name1!r} overlap")
    return SafetensorsHeader(path, tensors, dict(metadata))


def read_tensor(path: str | os.PathLike, info: TensorInfo) -> np.ndarray:
    """A read-only memory-mapped view of one tensor; no bytes are read until used. For a URL,
    the tensor's bytes are fetched now, by one range request (or from the range cache)."""
    if info.nbytes == 0:
        return np.zeros(info.shape, info.dtype)
    if _remote.is_url(path):
        array = np.frombuffer(_remote.read_range(path, info.offset, info.nbytes), info.dtype)
        array.flags.writeable = False
        return array.reshape(info.shape)
    try:
        flat = np.memmap(
            path,
            dtype=info.dtype,
            mode="r",
            offset=info.offset,
            shape=(info.nbytes // info.dtype.itemsize,),
        )
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"cannot map tensor {info.name!r}: {e}") from None
    return flat.reshape(info.shape)


def write_file(
    path: str | os.PathLike,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a safetensors file (every dtype of `DTYPES`, bf16 and float8 included), atomically.

    Tensors are streamed to a temporary file one at a time (memory-mapped sources are never
    loaded whole), fsynced, then renamed over `path`.
    """
    import tempfile

    path = os.fspath(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, value in tensors.items():
        dtype = np.dtype(value.dtype)
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        nbytes = int(value.size) * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for value in tensors.values():
                f.write(np.ascontiguousarray(value).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
