r"""The verdict's false-positive rate and power over many seeds, beside the fixed-margin rule it
replaced.

For each seed, one population of --n models is written (safetensors, one layer per case, every
case drawn afresh from the seed by `jsubspace.testing.planted_case`) and analysed with the
defaults (`jsubspace.analyze`: 3 null draws, 5-fold holdout, split half, lineage). Per case the
table gives the fraction of seeds whose verdict claims a shared subspace (any "shared ..."
label), and the fraction with the label the case must get, for:
  calibrated   `jsubspace.spectra.verdict` (the label written into spectra.json)
  fixed-margin the rule before it, re-read from the same records: beyond the null when
               CEV(k) exceeds the null's mean by max(4 sd, 0.02) at some k <= 16; generalises
               when the two-sided held-out capture at the largest k beats a random subspace's
               by 0.05; "structure beyond the null" when both (counted as a sharing claim).
Cases: noise (the false-positive rate), shared_02 / 05 / 10 / 20 (a shared rank-8 subspace at
that percentage of each model's energy: the power), shared_cols (input side only) and
model_specific (low rank per model, nothing shared: a sharing claim is a false positive).

Run (the issue's setting, about 6 minutes on 2 cores):
    python benchmarks/verdict_calibration.py --seeds=50 --n=40 --shape=128x128
Results: benchmarks/results/verdict_calibration_n<N>_<m>x<n>_s<seeds>.json (--results_dir).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

_SEEDS = flags.DEFINE_integer("seeds", 50, "Populations drawn per case.")
_N = flags.DEFINE_integer("n", 40, "Models per population.")
_SHAPE = flags.DEFINE_string("shape", "128x128", "Layer shape m x n.")
_CASES = flags.DEFINE_list(
    "cases",
    ["noise", "shared_02", "shared_05", "shared_10", "shared_20", "shared_cols", "model_specific"],
    "Planted cases (jsubspace.testing.planted_case names).",
)
_RESULTS = flags.DEFINE_string(
    "results_dir", os.path.join(os.path.dirname(__file__), "results"), "Where the JSON goes."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (default: a temporary one).")


def fixed_margin(layer: dict) -> str:
    """The label of the rule the calibrated verdict replaced (margins fixed, largest k)."""
    mode = next(m for m in ("rows", "cols", "models") if m in layer["modes"])
    null = layer["null"][mode]
    obs = np.asarray(layer["modes"][mode]["cev"])
    mean, std = np.asarray(null["cev_mean"]), np.asarray(null["cev_std"])
    width = min(len(obs), len(mean), 16)
    beyond = bool(np.any(obs[:width] - mean[:width] > np.maximum(4 * std[:width], 0.02)))
    holdout = layer["holdout"]
    gain = holdout["two_sided"][-1] - holdout["random"]["two_sided"][-1]
    if beyond and gain > 0.05:
        return "structure beyond the null"
    if (holdout.get("mean_only") or 0) >= 0.5:
        return "explained by the mean"
    return "model-specific structure, not shared" if beyond else "indistinguishable from noise"


def expected(case: str) -> str:
    from jsubspace import testing

    if case.startswith("shared_") and case[7:].isdigit():
        return testing.DENSE_CASES["shared_05"]
    return testing.DENSE_CASES[case]


def main(argv):
    del argv
    import jsubspace
    from jsubspace import testing

    shape = tuple(int(v) for v in _SHAPE.value.split("x"))
    root = _WORKDIR.value or tempfile.mkdtemp(prefix="verdict_calibration_")
    labels = {case: [] for case in _CASES.value}
    old = {case: [] for case in _CASES.value}
    start = time.perf_counter()
    for seed in range(_SEEDS.value):
        population = os.path.join(root, f"seed_{seed}")
        shutil.rmtree(population, ignore_errors=True)
        layers = {
            case: testing.planted_case(case, 1000 * seed + j, n_models=_N.value, shape=shape)
            for j, case in enumerate(_CASES.value)
        }
        for i in range(_N.value):
            testing.write_safetensors(
                os.path.join(population, "models", f"model_{i:03d}.safetensors"),
                {f"{case}.weight": x[i] for case, x in layers.items()},
            )
        result = jsubspace.analyze(
            [os.path.join(population, "models")],
            os.path.join(population, "out"),
            quiet=True,
            plots=False,
            seed=seed,
        )
        for layer in result["layers"]:
            case = layer["name"].removesuffix(".weight")
            labels[case].append(layer["verdict"]["label"])
            old[case].append(fixed_margin(layer))
        shutil.rmtree(population)
        print(f"seed {seed + 1}/{_SEEDS.value}  {time.perf_counter() - start:.0f} s", flush=True)

    def sharing(label: str) -> bool:
        return label.startswith("shared") or label == "structure beyond the null"

    rows = []
    for case in _CASES.value:
        want = expected(case)
        new, before = labels[case], old[case]
        rows.append(
            {
                "case": case,
                "expected": want,
                "calibrated_claims_shared": float(np.mean([sharing(v) for v in new])),
                "calibrated_correct": float(np.mean([v == want for v in new])),
                "fixed_margin_claims_shared": float(np.mean([sharing(v) for v in before])),
                "labels": {v: new.count(v) for v in sorted(set(new))},
            }
        )
    print(
        f"\nN = {_N.value}, {shape[0]} x {shape[1]}, {_SEEDS.value} seeds; fraction of seeds\n"
        f"{'case':<16} {'claims shared':>14} {'(fixed margin)':>15} {'right label':>12}"
    )
    for r in rows:
        print(
            f"{r['case']:<16} {r['calibrated_claims_shared']:>14.2f} "
            f"{r['fixed_margin_claims_shared']:>15.2f} {r['calibrated_correct']:>12.2f}"
        )
    os.makedirs(_RESULTS.value, exist_ok=True)
    name = f"verdict_calibration_n{_N.value}_{shape[0]}x{shape[1]}_s{_SEEDS.value}.json"
    with open(os.path.join(_RESULTS.value, name), "w") as f:
        json.dump(
            {"n": _N.value, "shape": shape, "seeds": _SEEDS.value, "cases": rows}, f, indent=1
        )
    if not _WORKDIR.value:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
