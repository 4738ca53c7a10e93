"""Coefficient-only adaptation to an unseen task, against LoRA and full fine-tuning.

Starting from the population mean of the trained zoo (the centre of the universal basis), each
method trains its own parameters on a task no zoo model saw (all classes, labels reversed,
inputs rotated) for the same number of full-batch Adam steps:
  * coefficients: only `C` in `W = c + U_k C V_k^T` per layer (k^2 parameters a layer);
  * LoRA of about equal size (rank 1) and larger (rank 4) on the same kernels;
  * full fine-tuning of every parameter;
and the table gives test accuracy next to the trainable parameter count. Zoos come from the
main job's cache (trained anew if absent).

Run:
    python experiments/adaptation.py --out=zoo_out/adaptation
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

_OUT = flags.DEFINE_string("out", "zoo_out/adaptation", "Output directory.")
_CACHE = flags.DEFINE_string("cache_dir", "zoo_out/cache", "Zoo cache (shared with the main job).")
_K = flags.DEFINE_integer("k", 8, "Basis size per layer.")
_STEPS = flags.DEFINE_integer("steps", 300, "Adam steps of every method.")
_LR = flags.DEFINE_float("lr", 1e-2, "Adam learning rate of every method.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")


def run(
    out: str, cache: str, *, k: int, steps: int, lr: float, seed: int, log=print, zoo_config=None
) -> dict:
    """The experiment as a function (used by the tests with small settings)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jsubspace import compress
    from jsubspace import io
    from jsubspace import zoo

    data = zoo.load_digits(seed=seed)
    config = zoo_config or zoo.ZooConfig(seed=seed)
    model = zoo.MLP(hidden=config.hidden, num_classes=data.num_classes)
    zoos = zoo.standard_zoos(cache, config, data, model, log=log)
    store = compress.fit_store(zoos["trained"], os.path.join(out, "store"), k=k)
    kernels = list(store.layers)
    pop = io.open_population(zoos["trained"])
    means = {}
    for name in pop.models[0].tensors:
        means[name] = np.mean([m.tensors[name].read() for m in pop.models], axis=0)
    frozen = {name: jnp.asarray(v) for name, v in means.items()}
    bases = {name: tuple(jnp.asarray(b) for b in store.basis(name)) for name in kernels}
    task = zoo.Task(
        tuple(range(data.num_classes)),
        permutation=tuple(reversed(range(data.num_classes))),
        transform="rotate",
        seed=seed + 777,
    )
    x, y, train, test = (a[0] for a in zoo.task_data(data, [task]))

    def logits_of(flat):
        return model.apply({"params": zoo.unflatten(flat)}, x)

    def build(method, trainable):
        flat = dict(frozen)
        if method == "coefficients":
            for name in kernels:
                u, v = bases[name]
                flat[name] = frozen[name] + u @ trainable[name] @ v.T
        elif method.startswith("lora"):
            for name in kernels:
                a, b = trainable[name]
                flat[name] = frozen[name] + (b @ a).T
        elif method == "full":
            flat = trainable
        return flat

    def init(method):
        key = jax.random.key(seed)
        if method == "coefficients":
            return {n: jnp.zeros((bases[n][0].shape[1], bases[n][1].shape[1])) for n in kernels}
        if method.startswith("lora"):
            r = int(method.split("_r")[1])
            out = {}
            for i, n in enumerate(kernels):
                fan_in, fan_out = frozen[n].shape
                a = jax.random.uniform(
                    jax.random.fold_in(key, i),
                    (r, fan_in),
                    minval=-1 / np.sqrt(fan_in),
                    maxval=1 / np.sqrt(fan_in),
                )
                out[n] = (a, jnp.zeros((fan_out, r)))
            return out
        if method == "full":
            return dict(frozen)
        return {}

    def evaluate(flat, mask):
        hit = jnp.argmax(logits_of(flat), -1) == y
        return float(jnp.sum(hit * mask) / jnp.sum(mask))

    results = {}
    for method in ("none", "coefficients", "lora_r1", "lora_r4", "full"):
        params = init(method)
        count = compress.count_parameters(params)
        if method != "none":

            def loss(p, _):
                nll = optax.softmax_cross_entropy_with_integer_labels(
                    logits_of(build(method, p)), y
                )
                return jnp.sum(nll * train) / jnp.sum(train)

            params, losses = compress.train_coefficients(
                loss, params, [None] * steps, optimizer=optax.adam(lr)
            )
        else:
            losses = []
        acc = evaluate(build(method, params), test)
        results[method] = {
            "parameters": count,
            "test_accuracy": acc,
            "initial_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
        }
        log(f"  {method:<14} {count:>7} params  test accuracy {acc:.3f}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "adaptation.json"), "w") as f:
        json.dump(
            {"k": k, "steps": steps, "lr": lr, "task": task.describe(), "results": results},
            f,
            indent=1,
        )
    return results


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    print("coefficient-only adaptation vs LoRA vs full fine-tuning (unseen task)")
    run(_OUT.value, _CACHE.value, k=_K.value, steps=_STEPS.value, lr=_LR.value, seed=_SEED.value)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
