"""benchmarks/device_check.py, the one script an accelerator session runs, works here on CPU
(`--quick`) and writes its JSON: so it is known to run before a GPU or TPU is at hand."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_device_check_runs_on_cpu_and_writes_its_json(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "device_check.py"),
            "--quick",
            f"--out={out}",
            f"--workdir={tmp_path / 'work'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["backend"] == "cpu" and record["devices"][0]["platform"] == "cpu"
    assert all(record["plan_rates"][k] > 0 for k in ("gemm", "eigh", "stream", "draw"))
    kernels = record["kernels"]
    assert kernels["stack"] == [8, 128, 96] and kernels["gram_flops_per_s"] > 0
    assert record["complete"] and record["compile_seconds"] > 0
    for kind, (models, layers) in (("lora", (8, 3)), ("dense", (6, 2))):
        found = record[kind]
        assert found["models"] == models and found["layers"] == layers, found
        assert len(found["verdicts"]) == layers
        assert found["default_over_spectra"] > 0  # a ratio of two timings (not judged here)
        assert set(found["default_parts"]) >= {"spectra", "holdout", "compare", "null"}
        assert "spectra" in found["spectra_only_parts"]
        # The warm-up compiles what the timed runs reuse: compile time is part of it.
        assert 0 < found["default_warmup_compile_seconds"] < found["default_warmup_seconds"]
