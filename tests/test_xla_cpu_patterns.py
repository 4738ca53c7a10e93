"""benchmarks/xla_cpu_patterns.py runs and its kernels compute what the plain expressions do
(small sizes; the models Gram still long enough to be summed in slices)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_patterns_benchmark_runs_and_its_kernels_agree(tmp_path):
    out = tmp_path / "patterns.json"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "xla_cpu_patterns.py"),
            "--n=4",
            "--m=16",
            "--cols=4100",  # 65600 entries per model: long_dot's slices and a remainder
            "--l=8",
            "--repeats=1",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["pattern"] for r in rows] == [
        "models sum (bf16)",
        "models Gram",
        "cols product",
        "rows product",
        "tall X^T Y",
    ]
    for r in rows:
        assert r["rel_diff"] < 1e-5 and r["plain_s"] > 0 and r["kernel_s"] > 0, r
