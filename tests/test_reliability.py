"""Hostile checkpoints, interrupted runs, full disks, locked outputs and failing hosts."""

import errno
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import jsubspace
from jsubspace import CheckpointError
from jsubspace import OutputError
from jsubspace import PopulationError
from jsubspace import io
from jsubspace import testing
from tests._distributed import launch_analyze


def _population(path, n=6, layers=6, shape=(24, 20), seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        testing.write_safetensors(
            path / f"m{i}.safetensors",
            {
                f"layer.{j}.weight": rng.standard_normal(shape).astype(np.float32)
                for j in range(layers)
            },
        )
    return str(path)


def _cli(args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "jsubspace.cli.main", *args], capture_output=True, text=True, **kw
    )


def _layers(path):
    return testing.reproducible_layers(json.loads(open(path).read()))


# --- hostile Orbax checkpoints ---------------------------------------------------------------


def _orbax(tmp_path, name="ck"):
    return testing.write_orbax(
        tmp_path / name,
        {"params": {"w": np.ones((4, 3), np.float32), "v": np.zeros((2, 2), np.float32)}},
    )


def test_orbax_symlink_out_of_the_directory_is_refused(tmp_path):
    ck = _orbax(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    os.symlink(secret, os.path.join(ck, "d", "evil"))
    with pytest.raises(CheckpointError, match="symlink .* points outside"):
        io.load_model(ck)


def _rewrite_metadata(ck, edit):
    path = os.path.join(ck, "_METADATA")
    meta = json.loads(open(path).read())
    edit(meta)
    open(path, "w").write(json.dumps(meta))


def test_orbax_metadata_keys_that_name_paths_are_refused(tmp_path):
    ck = _orbax(tmp_path)

    def edit(meta):
        tree = meta["tree_metadata"]
        key = next(k for k in tree if "'w'" in k)
        entry = tree.pop(key)
        entry["key_metadata"][-1]["key"] = "../../../etc/passwd"
        tree["('params', '../../../etc/passwd')"] = entry

    _rewrite_metadata(ck, edit)
    with pytest.raises(CheckpointError, match="outside the checkpoint|cannot read Orbax"):
        io.load_model(ck)


def test_absurd_shapes_are_refused_before_reading(tmp_path, monkeypatch):
    from jsubspace.io import _formats

    ck = _orbax(tmp_path)
    monkeypatch.setattr(_formats, "MAX_TENSOR_BYTES", 40)  # the 4x3 float32 leaf is 48 bytes
    with pytest.raises(CheckpointError, match="refused as absurd"):
        io.load_model(ck)


def test_pickle_checkpoints_are_refused_with_a_conversion_hint(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x80\x04\x95")
    with pytest.raises(CheckpointError, match="never loaded .*safetensors"):
        io.load_model(str(tmp_path / "model.bin"))


# --- resource bounds -------------------------------------------------------------------------


def test_layer_over_the_memory_budget_is_refused_before_reading(tmp_path):
    pop = _population(tmp_path / "pop", layers=2)
    with pytest.raises(PopulationError, match="over the memory budget") as err:
        jsubspace.analyze([pop], str(tmp_path / "out"), memory_budget=50_000, quiet=True)
    assert "layer.0.weight" in str(err.value)
    assert not (tmp_path / "out" / "spectra.json").exists()


def test_disk_full_while_writing_keeps_finished_work(tmp_path, monkeypatch):
    from jsubspace.io import _atomic

    pop = _population(tmp_path / "pop", layers=5)
    opts = dict(null_draws=1, holdout=None, num_devices=2, quiet=True, plots=False)
    reference = jsubspace.analyze([pop], str(tmp_path / "ref"), **opts)
    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 4:  # run.json, layer 0, layer 1, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(_atomic.os, "fsync", failing_fsync)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="No space left on device.*rerun resumes"):
        jsubspace.analyze([pop], str(out), **opts)
    monkeypatch.setattr(_atomic.os, "fsync", real_fsync)
    assert not (out / "spectra.json").exists()
    left = sorted(os.listdir(out / "layers"))
    assert left == ["00000.json", "00001.json"]  # no temporary or torn file left behind
    for name in left:
        json.loads((out / "layers" / name).read_text())
    resumed = jsubspace.analyze([pop], str(out), **opts)
    assert testing.reproducible_layers(resumed) == testing.reproducible_layers(reference)


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    pop = _population(tmp_path / "pop", layers=1)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 12345")
        held.flush()
        with pytest.raises(OutputError, match="another jsubspace run .* is writing here"):
            jsubspace.analyze([pop], str(out), quiet=True, plots=False)
    result = jsubspace.analyze([pop], str(out), quiet=True, plots=False, holdout=None, null_draws=0)
    assert len(result["layers"]) == 1


def test_corrupt_layer_file_is_recomputed_not_trusted(tmp_path):
    pop = _population(tmp_path / "pop", layers=3)
    opts = dict(null_draws=1, holdout=None, num_devices=1, quiet=True, plots=False)
    first = jsubspace.analyze([pop], str(tmp_path / "out"), **opts)
    (tmp_path / "out" / "layers" / "00001.json").write_text('{"name": "layer.1.wei')
    (tmp_path / "out" / "spectra.json").unlink()
    again = jsubspace.analyze([pop], str(tmp_path / "out"), **opts)
    assert testing.reproducible_layers(again) == testing.reproducible_layers(first)


# --- interrupted runs ------------------------------------------------------------------------


def _kill_and_resume(tmp_path, pop, reference, delay, tag):
    out = tmp_path / f"killed-{tag}"
    args = [
        f"--models={pop}",
        f"--out={out}",
        "--quiet",
        "--noplots",
        "--null_draws=1",
        "--holdout=none",
        "--num_cpu_devices=2",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jsubspace.cli.main", "analyze", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "spectra.json").exists():
        assert _layers(out / "spectra.json") == reference  # it finished before the kill
        return
    resumed = _cli(["analyze", *args])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _layers(out / "spectra.json") == reference


def _kill_points(tmp_path, count, seed):
    pop = _population(tmp_path / "pop", n=6, layers=12)
    ref = _cli(
        [
            "analyze",
            f"--models={pop}",
            f"--out={tmp_path / 'ref'}",
            "--quiet",
            "--noplots",
            "--null_draws=1",
            "--holdout=none",
            "--num_cpu_devices=2",
        ]
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = _layers(tmp_path / "ref" / "spectra.json")
    rng = random.Random(seed)
    for k in range(count):
        _kill_and_resume(tmp_path, pop, reference, rng.uniform(1.0, 9.0), k)


def test_sigkill_at_random_points_resumes_identically(tmp_path):
    _kill_points(tmp_path, 2, seed=0)


@pytest.mark.slow
def test_sigkill_at_twenty_seeded_points(tmp_path):
    _kill_points(tmp_path, 20, seed=1)


# --- failing hosts ---------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_dead_peer_process_ends_the_survivor_with_a_clear_message(tmp_path):
    pop = _population(tmp_path / "pop", n=8, layers=40, shape=(48, 40))
    out = tmp_path / "out"
    procs = launch_analyze(
        [f"--models={pop}", f"--out={out}", "--quiet", "--noplots", "--holdout=none"],
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "layers" / "00002.json").exists():
        time.sleep(0.05)
    procs[1].kill()
    killed_at = time.time()
    try:
        _, err = procs[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("the surviving process hung after its peer died")
    procs[1].communicate()
    assert time.time() - killed_at < 120
    assert procs[0].returncode != 0
    assert "jsubspace: error:" in err and "another process probably died" in err, err[-3000:]
    assert not (out / "spectra.json").exists()
    finished = len(os.listdir(out / "layers"))
    assert finished >= 3
    # A restart (here as one process: the configuration is the same) resumes from there.
    resumed = _cli(
        [
            "analyze",
            f"--models={pop}",
            f"--out={out}",
            "--quiet",
            "--noplots",
            "--num_cpu_devices=4",
            "--holdout=none",
        ]
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(_layers(out / "spectra.json")) == 40
