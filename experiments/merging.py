"""Merging task models: subspace merge against mean, task arithmetic, TIES and DARE.

Task models are full fine-tunes of the zoo's pretrained base on six tasks (three input
transforms on all classes, three class subsets). Every method merges their task vectors onto the
base with mergekit's parameter names (`weight`, `density`, `lambda`), and every merged model is
evaluated on every task. The centred subspace merge is checked to equal the mean merge exactly.

Run:
    python experiments/merging.py --out=zoo_out/merging
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

_OUT = flags.DEFINE_string("out", "zoo_out/merging", "Output directory.")
_CACHE = flags.DEFINE_string("cache_dir", "zoo_out/cache", "Zoo cache (shared with the main job).")
_STEPS = flags.DEFINE_integer("steps", 150, "Fine-tuning steps per task model.")
_K = flags.DEFINE_integer("k", 4, "Basis size of the subspace merges.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed (DARE drops, zoo).")

METHODS = {
    "mean": {},
    "task_arithmetic (lambda=0.5)": {"lam": 0.5},
    "ties (density=0.2)": {"density": 0.2, "lam": 1.0},
    "dare_linear (density=0.5, lambda=0.5)": {"density": 0.5, "lam": 0.5},
    "dare_ties (density=0.5)": {"density": 0.5, "lam": 1.0},
    "subspace, sum (lambda=0.5)": {"combine": "sum", "lam": 0.5},
    "subspace, ties": {"combine": "ties", "density": 0.5},
    "subspace, centred (= mean)": {"center": True},
}


def run(out: str, cache: str, *, steps: int, k: int, seed: int, log=print, zoo_config=None) -> dict:
    """The experiment as a function (used by the tests with small settings)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jsubspace import compress
    from jsubspace import io
    from jsubspace import zoo

    data = zoo.load_digits(seed=seed)
    config = zoo_config or zoo.ZooConfig(seed=seed)
    model = zoo.MLP(hidden=config.hidden, num_classes=data.num_classes)
    zoos = zoo.standard_zoos(cache, config, data, model, log=log)
    base_flat = {n: r.read() for n, r in io.load_model(zoos["base"]).tensors.items()}
    all_classes = tuple(range(data.num_classes))
    tasks = [
        zoo.Task(all_classes, transform="rotate", seed=1),
        zoo.Task(all_classes, transform="noise", seed=2),
        zoo.Task(all_classes, transform="shift", seed=3),
        zoo.Task((0, 1, 2, 3, 4), seed=4),
        zoo.Task((5, 6, 7, 8, 9), seed=5),
        zoo.Task((0, 2, 4, 6, 8), seed=6),
    ]
    stacked_base = jax.tree.map(lambda a: jnp.stack([a] * len(tasks)), zoo.unflatten(base_flat))
    tuned = zoo.train_zoo(model, stacked_base, data, tasks, steps=steps, lr=1e-2)
    tuned_flat = zoo.flatten(tuned)

    def accuracies(flat):
        stacked = {n: np.stack([v] * len(tasks)) for n, v in flat.items()}
        return zoo.accuracy(model, zoo.unflatten(stacked), data, tasks)

    table = {
        "base": accuracies(base_flat).tolist(),
        "task models (each on its own task)": zoo.accuracy(model, tuned, data, tasks).tolist(),
    }
    key = jax.random.key(seed)
    identity_error = None
    for label, params in METHODS.items():
        method = label.split(" ")[0].rstrip(",")
        merged = {}
        for i, (name, base) in enumerate(base_flat.items()):
            models = tuned_flat[name]
            if method == "subspace":
                if base.ndim != 2:
                    merged[name] = np.asarray(compress.merge("mean", base, models))
                    continue
                tau = models - base
                xc = tau - tau.mean(0) if params.get("center") else tau
                u = np.linalg.eigh(np.einsum("imn,ikn->mk", xc, xc))[1][:, ::-1][:, :k]
                v = np.linalg.eigh(np.einsum("imn,imk->nk", xc, xc))[1][:, ::-1][:, :k]
                merged[name] = np.asarray(
                    compress.merge("subspace", base, models, u=u, v=v, **params)
                )
            else:
                merged[name] = np.asarray(
                    compress.merge(method, base, models, key=jax.random.fold_in(key, i), **params)
                )
        if params.get("center"):
            mean = {
                n: np.asarray(compress.merge("mean", b, tuned_flat[n]))
                for n, b in base_flat.items()
            }
            identity_error = max(float(np.abs(merged[n] - mean[n]).max()) for n in merged)
        table[label] = accuracies(merged).tolist()
    log(
        f"  {'model':<40}"
        + "".join(f"{'task ' + str(i):>8}" for i in range(len(tasks)))
        + f"{'mean':>8}"
    )
    for label, accs in table.items():
        log(f"  {label:<40}" + "".join(f"{a:>8.3f}" for a in accs) + f"{np.mean(accs):>8.3f}")
    log(f"  centred subspace merge vs mean merge: max |difference| = {identity_error:.2e}")
    os.makedirs(out, exist_ok=True)
    result = {
        "tasks": [t.describe() for t in tasks],
        "accuracy": table,
        "k": k,
        "steps": steps,
        "centred_subspace_minus_mean": identity_error,
    }
    with open(os.path.join(out, "merging.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    print("merging six task models fine-tuned from one base (accuracy on every task)")
    run(_OUT.value, _CACHE.value, steps=_STEPS.value, k=_K.value, seed=_SEED.value)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
