"""Golden `spectra.json` cases: recorded before the layer-plan restructure, compared after it.

Each case is a population (written by `jsubspace.cli._demo.write_demo_population`, seeded) and
the `jsubspace.analyze` options it runs with. `python -m tests.golden.cases --record` rewrites
the recorded outputs (only when a change of numbers is intended and explained in the commit);
`tests/test_golden.py` compares a fresh run against them.
"""

from __future__ import annotations

import gzip
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
N_MODELS = 16
DEVICES = 4

# name -> (population, analyze options, LoRA controls from the factors instead of the updates)
CASES = {
    "dense_default": ("dense", {}, False),
    "dense_randomized": ("dense", {"method": "randomized", "rank": 8}, False),
    "dense_center_none": ("dense", {"center": "none", "holdout": "loo"}, False),
    "dense_compare_to": ("dense", {"compare_to": "other", "holdout": None}, False),
    "lora_factor": ("adapters", {}, False),
    "lora_side": ("adapters", {"lora_space": "side"}, False),
    "lora_factors_stat": ("adapters", {"lora": "factors"}, False),
    "lora_randomized": ("adapters", {"method": "randomized", "rank": 8}, True),
    "lora_factored_controls": ("adapters", {}, True),
}


def populations(root: str) -> dict:
    """The demo population (N = 16) and a second one (other seed) for `compare_to`."""
    from jsubspace.cli._demo import write_demo_population

    paths = write_demo_population(os.path.join(root, "main"), n_models=N_MODELS, seed=0)
    other = write_demo_population(os.path.join(root, "other"), n_models=N_MODELS, seed=7)
    return {**paths, "other": other["dense"]}


def run_case(name: str, paths: dict, out: str, *, no_materialise) -> dict:
    """`jsubspace.analyze` of one case; `no_materialise()` is a context manager that makes the
    LoRA controls come from the factors (the route of layers too large to materialise)."""
    import contextlib

    import jsubspace

    population, options, factored = CASES[name]
    options = dict(options)
    if options.get("compare_to") == "other":
        options["compare_to"] = [paths["other"]]
    ctx = no_materialise() if factored else contextlib.nullcontext()
    with ctx:
        result = jsubspace.analyze(
            [paths[population]], out, num_devices=DEVICES, quiet=True, plots=False, **options
        )
    return strip(result)


def strip(result: dict) -> dict:
    """The parts of a result that must not change: models and layer records, without what no
    rerun can repeat (wall seconds, and the plan's estimate from the machine's measured rates)."""
    from jsubspace.testing import reproducible_layers

    return {"models": result["models"], "layers": reproducible_layers(result)}


def path(name: str) -> str:
    return os.path.join(HERE, f"{name}.json.gz")


def load(name: str) -> dict:
    with gzip.open(path(name), "rt", encoding="utf-8") as f:
        return json.load(f)


def record(root: str, no_materialise) -> None:
    paths = populations(root)
    for name in CASES:
        found = run_case(name, paths, os.path.join(root, name), no_materialise=no_materialise)
        with gzip.open(path(name), "wt", encoding="utf-8") as f:
            json.dump(found, f, sort_keys=True)
        print(name, "recorded", file=sys.stderr)


def no_materialise():
    """LoRA controls from the factors whatever the layer's size: the materialise limit at 0."""
    import contextlib

    from jsubspace.spectra import _plan

    @contextlib.contextmanager
    def patched():
        saved = _plan.MATERIALISE_LIMIT
        _plan.MATERIALISE_LIMIT = 0
        try:
            yield
        finally:
            _plan.MATERIALISE_LIMIT = saved

    return patched()


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    if "--record" not in sys.argv:
        sys.exit("usage: python -m tests.golden.cases --record")
    with tempfile.TemporaryDirectory() as tmp:
        record(tmp, no_materialise)
