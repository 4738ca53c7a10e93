"""What the controls cost: `jsubspace analyze` with its defaults against the spectra alone, on
the same LoRA files, in one run.

Paths timed (each the installed command as a user runs it, plots and report included; a whole
process, median of --repeats warm runs after one cold run that compiles into an emptied
persistent cache; peak RSS from the kernel's rusage of that process):
  spectra   --null_draws=0 --holdout=none --nosplit_half (spectra and lineage)
  default   every control at its default: 3 null draws, 5-fold holdout, split halves, lineage
Reported: seconds and peak RSS of each, their ratio (the target of issue 17: at most 1.5x), the
default run's seconds and sampled peak bytes per part (`spectra.json`'s `cost`), and whether the
two runs' eigenvalues are identical.

Run (the issue's population: 40 adapters, one layer of q / k / v, Mistral-7B shapes):
    python benchmarks/controls_cost.py --workdir=/tmp/bench --n=40 --layers=1
The full adapter set at N = 100 (96 modules):
    python benchmarks/controls_cost.py --workdir=/tmp/bench --n=100 --layers=32 --repeats=1
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shapes import lora_population  # noqa: E402

_WORK = flags.DEFINE_string("workdir", "/tmp/jsubspace_bench", "Populations and outputs.")
_N = flags.DEFINE_integer("n", 40, "Adapters.")
_LAYERS = flags.DEFINE_integer("layers", 1, "Transformer layers (3 modules each).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Warm runs per path (median).")
_PLOTS = flags.DEFINE_bool("plots", True, "Runs write their plots and report.html.")
_RESULTS = flags.DEFINE_string("results", None, "Also write the figures to this JSON file.")

PATHS = {
    "spectra": ["--null_draws=0", "--holdout=none", "--nosplit_half"],
    "default": [],
}


def _population(n: int, layers: int) -> str:
    return lora_population(_WORK.value, n, layers)


def _run(path: str, pop: str, cache: str) -> tuple[float, float]:
    out = os.path.join(_WORK.value, f"out_controls_{path}")
    command = [
        sys.executable,
        "-m",
        "jsubspace.cli.main",
        "analyze",
        f"--models={pop}",
        f"--out={out}",
        "--overwrite",
        "--quiet",
        f"--compilation_cache={cache}",
        *([] if _PLOTS.value else ["--noplots"]),
        *PATHS[path],
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{path} failed:\n{proc.stderr.read()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def _load(path: str) -> dict:
    with open(os.path.join(_WORK.value, f"out_controls_{path}", "spectra.json")) as f:
        return json.load(f)


def main(argv):
    del argv
    os.makedirs(_WORK.value, exist_ok=True)
    pop = _population(_N.value, _LAYERS.value)
    cache = os.path.join(_WORK.value, "xla_cache_controls")
    shutil.rmtree(cache, ignore_errors=True)
    figures = {}
    for path in PATHS:
        cold = _run(path, pop, cache)
        warm = [_run(path, pop, cache) for _ in range(_REPEATS.value)]
        figures[path] = {
            "seconds": statistics.median(s for s, _ in warm),
            "rss_mb": statistics.median(r for _, r in warm),
            "seconds_cold": cold[0],
            "rss_mb_cold": cold[1],
        }
    spectra, default = _load("spectra"), _load("default")
    same = all(
        np.array_equal(a["modes"][m]["eigenvalues"], b["modes"][m]["eigenvalues"])
        for a, b in zip(spectra["layers"], default["layers"])
        for m in a["modes"]
    )
    ratio = figures["default"]["seconds"] / figures["spectra"]["seconds"]
    modules = len(default["layers"])
    print(f"{_N.value} adapters x {modules} modules (Mistral-7B shapes, rank 16, bf16)")
    print(f"{'path':<9} {'s warm':>8} {'s cold':>8} {'RSS MB':>8}")
    for path, f in figures.items():
        print(f"{path:<9} {f['seconds']:>8.1f} {f['seconds_cold']:>8.1f} {f['rss_mb']:>8.0f}")
    print(f"default / spectra: {ratio:.2f}x (target <= 1.5x); eigenvalues identical: {same}")
    cost = default["cost"]
    print("default run, summed over modules (in-process timers; peak: sampled RSS):")
    for part, seconds in cost["seconds"].items():
        peak = cost["peak_bytes"].get(part)
        print(f"  {part:<8} {seconds:>7.2f} s {'' if peak is None else f'{peak / 2**20:>7.0f} MB'}")
    bases = [layer["holdout"].get("bases") or {} for layer in default["layers"]]
    routes = sorted({b.get("from", "stack or factors") for b in bases})
    residual = max((b["residual"] for b in bases if "residual" in b), default=None)
    print(f"holdout bases from: {', '.join(routes)}; largest solver residual: {residual}")
    if _RESULTS.value:
        with open(_RESULTS.value, "w") as f:
            json.dump(
                {
                    "n": _N.value,
                    "modules": modules,
                    "paths": figures,
                    "ratio": ratio,
                    "identical_eigenvalues": same,
                    "cost": cost,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    app.run(main)
