"""The main job: is there a universal weight subspace in a zoo of real trained models?

Trains (or loads from its cache) four populations on scikit-learn's bundled digits, all with the
same MLP architecture:
  * `trained`: independently initialised models, each on its own task (class subset, label
    permutation, input transform, seed);
  * `random_init`: the same initialisations, never trained (the control population);
  * `lora`: rank-r PEFT adapters on one pretrained base, each on its own task; a fraction of them
    share one `A` initialisation (the confound reported against the paper's LoRA results);
then runs `jsubspace analyze` on each with every control (null, holdout, lineage, compare),
checks the shared-A effect by removing the shared-init adapters, and evaluates *function*: the
accuracy of every trained model rebuilt from the universal basis (seen models, and held-out models
projected on it) against the original and against the mean-only model, as a function of k.

Run (the README's Quick start):
    python experiments/universal_zoo.py --out=zoo_out
Smaller and faster:
    python experiments/universal_zoo.py --out=/tmp/zoo --models=16 --steps=100
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

_OUT = flags.DEFINE_string("out", "zoo_out", "Output directory (reports, tables, cache).")
_CACHE = flags.DEFINE_string("cache_dir", None, "Zoo cache (default: OUT/cache).")
_MODELS = flags.DEFINE_integer("models", 32, "Models in the trained and random-init zoos.")
_LORA_MODELS = flags.DEFINE_integer("lora_models", 32, "Adapters in the LoRA zoo.")
_STEPS = flags.DEFINE_integer("steps", 300, "Full-batch Adam steps per model.")
_LORA_STEPS = flags.DEFINE_integer("lora_steps", 200, "Adam steps per adapter.")
_RANK = flags.DEFINE_integer("rank", 4, "LoRA rank.")
_SHARED = flags.DEFINE_float("shared_a_fraction", 0.5, "Adapters sharing one A initialisation.")
_TRAIN_A = flags.DEFINE_float(
    "lora_a_lr_scale",
    0.0,
    "Learning-rate scale of the LoRA A factors: 0 keeps A at its initialisation (LoRA-FA), as in "
    "the released adapters whose shared A was never trained away; 1 trains A like B.",
)
_DATASET = flags.DEFINE_enum(
    "dataset",
    "digits",
    ["digits", "fashion-mnist"],
    "digits: scikit-learn's bundled set; fashion-mnist: Debian's dataset-fashion-mnist package.",
)
_ARCH = flags.DEFINE_enum("arch", "mlp", ["mlp", "cnn", "vit"], "Architecture of every zoo.")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Hidden width of the MLP.")
_KS = flags.DEFINE_list("ks", ["1", "2", "4", "8", "16", "32"], "Basis sizes to evaluate.")
_NULL = flags.DEFINE_integer("null_draws", 3, "Gaussian null draws per layer.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of tasks, inits and controls.")
_DEVICES = flags.DEFINE_integer("num_cpu_devices", None, "Split the CPU into this many devices.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bars.")


def say(*args):
    print(*args, flush=True)


def function_eval(zoos, data, model, out) -> dict:
    """Accuracy of trained models rebuilt from the universal basis, seen and held out."""
    import numpy as np

    from jsubspace import compress
    from jsubspace import io
    from jsubspace import zoo

    tasks = zoo.load_tasks(zoos["trained"])
    names = [f"m{i:03d}" for i in range(len(tasks))]
    n_seen = int(round(0.75 * len(names)))
    seen = [os.path.join(zoos["trained"], f"{n}.safetensors") for n in names[:n_seen]]
    ks = [int(k) for k in _KS.value]
    store = compress.fit_store(seen, os.path.join(out, "store"), k=max(ks))
    originals = [
        {
            k: v.read()
            for k, v in io.load_model(
                os.path.join(zoos["trained"], f"{n}.safetensors")
            ).tensors.items()
        }
        for n in names
    ]
    layers = list(store.layers)

    def acc_of(weights_list, task_list):
        stacked = {k: np.stack([w[k] for w in weights_list]) for k in weights_list[0]}
        return zoo.accuracy(model, zoo.unflatten(stacked), data, task_list)

    def rebuilt(i, k, *, held_out: bool, mean_only: bool = False):
        w = dict(originals[i])
        for name in layers:
            shape = w[name].shape
            c = store.project(w[name], name) if held_out else store.coefficients(names[i], name)
            # A layer keeps at most its shorter side's directions (the 64 x 10 output: 10).
            kk = 0 if mean_only else min(k, store.layers[name]["k"])
            w[name] = store.rebuild(c, name, k=kk).reshape(shape)
        return w

    seen_idx, held_idx = range(n_seen), range(n_seen, len(names))
    result = {"ks": ks, "seen": [], "held_out": [], "captured": {name: [] for name in layers}}
    result["original_seen"] = float(
        acc_of([originals[i] for i in seen_idx], [tasks[i] for i in seen_idx]).mean()
    )
    result["original_held_out"] = float(
        acc_of([originals[i] for i in held_idx], [tasks[i] for i in held_idx]).mean()
    )
    result["mean_only_seen"] = float(
        acc_of(
            [rebuilt(i, 0, held_out=False, mean_only=True) for i in seen_idx],
            [tasks[i] for i in seen_idx],
        ).mean()
    )
    result["mean_only_held_out"] = float(
        acc_of(
            [rebuilt(i, 0, held_out=True, mean_only=True) for i in held_idx],
            [tasks[i] for i in held_idx],
        ).mean()
    )
    for k in ks:
        result["seen"].append(
            float(
                acc_of(
                    [rebuilt(i, k, held_out=False) for i in seen_idx], [tasks[i] for i in seen_idx]
                ).mean()
            )
        )
        result["held_out"].append(
            float(
                acc_of(
                    [rebuilt(i, k, held_out=True) for i in held_idx], [tasks[i] for i in held_idx]
                ).mean()
            )
        )
    chance = float(np.mean([1.0 / len(t.classes) for t in tasks]))
    result["chance"] = chance
    result["store"] = store.accounting()
    return result


def main(argv):
    del argv
    import jax

    logging.set_verbosity(logging.WARNING)
    if _DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    import jsubspace
    from jsubspace import report
    from jsubspace import sharding
    from jsubspace import zoo

    t0 = time.time()
    out = _OUT.value
    os.makedirs(out, exist_ok=True)
    cache = _CACHE.value or os.path.join(out, "cache")
    if _DATASET.value == "fashion-mnist":
        data = zoo.load_fashion_mnist()
        if data is None:
            raise app.UsageError(
                f"Fashion-MNIST not found in {zoo.FASHION_DIR}: "
                "apt-get install dataset-fashion-mnist"
            )
    else:
        data = zoo.load_digits(seed=_SEED.value)
    if _ARCH.value == "mlp":
        model = zoo.MLP(hidden=_HIDDEN.value, num_classes=data.num_classes)
    else:
        model = zoo.ARCHITECTURES[_ARCH.value](num_classes=data.num_classes)
    devices = len(jax.devices())
    mesh = sharding.models_mesh(
        max(
            d
            for d in range(1, devices + 1)
            if _MODELS.value % d == 0 and _LORA_MODELS.value % d == 0
        )
    )
    config = zoo.ZooConfig(
        models=_MODELS.value,
        lora_models=_LORA_MODELS.value,
        steps=_STEPS.value,
        lora_steps=_LORA_STEPS.value,
        rank=_RANK.value,
        shared_a_fraction=_SHARED.value,
        a_lr_scale=_TRAIN_A.value,
        hidden=_HIDDEN.value,
        arch=_ARCH.value,
        seed=_SEED.value,
    )
    zoos = zoo.standard_zoos(cache, config, data, model, mesh=mesh, log=say)
    opts = dict(
        null_draws=_NULL.value, holdout=5, seed=_SEED.value, quiet=_QUIET.value, overwrite=True
    )
    analyses = {}
    say("\nanalysis: trained zoo")
    analyses["trained"] = jsubspace.analyze([zoos["trained"]], os.path.join(out, "trained"), **opts)
    say("analysis: random-init zoo (control)")
    analyses["random_init"] = jsubspace.analyze(
        [zoos["random_init"]], os.path.join(out, "random_init"), **opts
    )
    say("analysis: LoRA zoo (whole updates, and the paper's A/B factor statistic)")
    analyses["lora"] = jsubspace.analyze([zoos["lora"]], os.path.join(out, "lora"), **opts)
    analyses["lora_factors"] = jsubspace.analyze(
        [zoos["lora"]], os.path.join(out, "lora_factors"), lora="factors", **opts
    )
    own = [
        os.path.join(zoos["lora"], n)
        for n in sorted(os.listdir(zoos["lora"]))
        if n.startswith("a") and n not in zoos["shared_adapters"]
    ]
    analyses["lora_factors_own_a"] = jsubspace.analyze(
        own, os.path.join(out, "lora_factors_own_a"), lora="factors", **opts
    )
    say("function: rebuilding trained models from the universal basis")
    function = function_eval(zoos, data, model, out)
    zoo.plot_function(function, os.path.join(out, "function.png"))

    tables = {name: report.verdict_rows(res) for name, res in analyses.items()}
    lines = []
    for name, res in analyses.items():
        lines += [f"\n{name}", report.verdict_table(res, legend=False)]
    lines += ["", report.LEGEND]
    lines.append("\nfunction (test accuracy on each model's own task; trained zoo)")
    lines.append(f"  {'k':>4}{'seen':>8}{'held-out':>10}")
    for k, s, h in zip(function["ks"], function["seen"], function["held_out"]):
        lines.append(f"  {k:>4}{s:>8.3f}{h:>10.3f}")
    lines.append(
        f"  originals: seen {function['original_seen']:.3f}, held-out "
        f"{function['original_held_out']:.3f}; mean-only model: seen "
        f"{function['mean_only_seen']:.3f}, held-out "
        f"{function['mean_only_held_out']:.3f}; chance {function['chance']:.3f}"
    )
    a_full = [la["modes"]["lora_A"]["k_at"]["0.9"] for la in analyses["lora_factors"]["layers"]]
    a_own = [
        la["modes"]["lora_A"]["k_at"]["0.9"] for la in analyses["lora_factors_own_a"]["layers"]
    ]
    lines.append(
        f"\nLoRA A-factor k@0.9 with the shared-init adapters: {a_full}; without them: {a_own}"
    )
    lines.append(
        f"\nfinished in {time.time() - t0:.0f}s; reports: {out}/*/report.html, {out}/index.html"
    )
    text = "\n".join(lines)
    print(text)
    summary = {
        "tables": tables,
        "function": function,
        "lora_a_k90": {"all": a_full, "own_a": a_own},
        "zoos": {k: v for k, v in zoos.items()},
        "seconds": time.time() - t0,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(zoo.index_html(analyses, tables, function))
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
