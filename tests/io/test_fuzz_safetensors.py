"""Fuzzing the safetensors parser: every input is a correct read or one CheckpointError.

Bounded in the default run (hypothesis profile "ci"); `--slow` selects profile "slow".
"""

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from jsubspace import CheckpointError
from jsubspace import io

names = st.text(min_size=0, max_size=40) | st.sampled_from(
    ["../../etc/passwd", "a/b\\c", "é" * 300, "\x00", "__metadata__"]
)
dtypes = st.sampled_from(["F32", "F16", "BF16", "F8_E4M3", "I64", "U8", "BOOL", "F33", "", "f32"])
ints = st.integers(min_value=-5, max_value=2**66) | st.integers(min_value=0, max_value=64)
entries = st.fixed_dictionaries(
    {
        "dtype": dtypes | st.integers(),
        "shape": st.lists(ints, max_size=4) | st.just("x"),
        "data_offsets": st.lists(ints, min_size=0, max_size=3) | st.none(),
    }
)
headers = st.dictionaries(names, entries | st.integers() | st.text(max_size=5), max_size=5)


def _check(path):
    size = os.path.getsize(path)
    try:
        header = io.read_header(path)
    except CheckpointError as e:
        assert e.path == str(path)
        return
    for info in header.tensors.values():
        assert 8 <= info.offset and info.offset + info.nbytes <= size
        value = io.read_tensor(path, info)
        assert value.nbytes == info.nbytes and value.shape == info.shape


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, data=st.binary(max_size=256), claimed=st.none() | ints)
def test_random_headers(tmp_path, header, data, claimed):
    raw = json.dumps(header).encode()
    length = len(raw) if claimed is None else claimed % 2**64
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    _check(path)


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("v") / "ok.safetensors"
    rng = np.random.default_rng(0)
    save_file(
        {
            "a": rng.standard_normal((3, 4)).astype(np.float32),
            "b": np.arange(6, dtype=np.int64).reshape(2, 3),
            "c": np.zeros((0, 5), np.float16),
        },
        str(path),
        metadata={"k": "v"},
    )
    return path.read_bytes()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.none() | st.integers(0, 10_000),
)
def test_mutated_valid_files(tmp_path, valid_bytes, flips, cut):
    data = bytearray(valid_bytes)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(data))
    _check(path)


def test_terabyte_claim_allocates_nothing(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "tb.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    with pytest.raises(CheckpointError, match="outside the data section"):
        io.read_header(path)
