#!/usr/bin/env bash
# A plain `pip install .` (no extras) in a fresh venv runs `jsubspace analyze` end to end with
# its default plots and report on a small population: what a newcomer gets from
# `pip install jsubspace`. Fails when any output is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q .
cd "$work"  # away from the checkout: the installed package, not the source tree, is imported
"$work/venv/bin/python" - <<'PY'
import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(0)
shared = np.linalg.qr(rng.standard_normal((24, 4)))[0]
for i in range(8):
    w = shared @ rng.standard_normal((4, 16)) + 0.1 * rng.standard_normal((24, 16))
    save_file({"layer.weight": w.astype(np.float32), "layer.bias": np.zeros(24, np.float32)},
              f"model_{i}.safetensors")
PY
mkdir population && mv model_*.safetensors population/
"$work/venv/bin/jsubspace" analyze --help >/dev/null
"$work/venv/bin/jsubspace" analyze --models=population --out=out --null_draws=1
for f in spectra.json layers.csv report.html plots/k_at.png; do
  [ -s "out/$f" ] || { echo "plain install: out/$f missing"; exit 1; }
done
echo "plain install: analyze wrote spectra.json, layers.csv, report.html and plots"
