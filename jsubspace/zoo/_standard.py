"""The standard zoos of the experiments, trained once and cached on disk.

  trained/      independently initialised models, each on its own task
  random_init/  the same initialisations, never trained (the control)
  lora/         rank-r PEFT adapters on one pretrained base (`base.safetensors`), a fraction of
                them sharing one `A` initialisation
The cache key is a hash of the configuration, so changing any setting trains anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from jsubspace import io
from jsubspace.zoo._data import TRANSFORMS
from jsubspace.zoo._data import Dataset
from jsubspace.zoo._data import Task
from jsubspace.zoo._train import accuracy
from jsubspace.zoo._train import flatten
from jsubspace.zoo._train import init_zoo
from jsubspace.zoo._train import lora_accuracy
from jsubspace.zoo._train import lora_init
from jsubspace.zoo._train import train_lora_zoo
from jsubspace.zoo._train import train_zoo
from jsubspace.zoo._train import write_lora_zoo
from jsubspace.zoo._train import write_zoo


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    """Sizes and seeds of the standard zoos."""

    models: int = 32
    lora_models: int = 32
    steps: int = 300
    lora_steps: int = 200
    rank: int = 4
    shared_a_fraction: float = 0.5
    a_lr_scale: float = 0.0
    hidden: int = 64
    arch: str = "mlp"
    seed: int = 0


def make_tasks(n: int, seed: int, *, num_classes: int = 10, offset: int = 0) -> list[Task]:
    """Diverse tasks: class subsets, label permutations, input transforms, seeds."""
    rng = np.random.default_rng(seed + offset)
    tasks = []
    for i in range(n):
        size = int(rng.choice([4, 6, 10]))
        classes = tuple(sorted(rng.choice(num_classes, size, replace=False).tolist()))
        perm = tuple(rng.permutation(num_classes).tolist()) if rng.random() < 0.5 else None
        transform = TRANSFORMS[int(rng.integers(len(TRANSFORMS)))]
        tasks.append(Task(classes, perm, transform, seed=seed * 10_000 + offset + i))
    return tasks


def load_tasks(directory: str) -> list[Task]:
    """The tasks recorded in a zoo's `zoo.json`."""
    with open(os.path.join(directory, "zoo.json")) as f:
        manifest = json.load(f)
    out = []
    for m in manifest["models"]:
        t = m["task"]
        perm = tuple(t["permutation"]) if t["permutation"] else None
        out.append(Task(tuple(t["classes"]), perm, t["transform"], t["seed"]))
    return out


def standard_zoos(
    cache: str,
    config: ZooConfig,
    data: Dataset,
    model,
    *,
    mesh=None,
    log: Callable[[str], None] = print,
) -> dict:
    """Trains the zoos, or returns the cached ones of the same configuration.

    Returns:
        `{"trained", "random_init", "lora", "base": paths, "shared_adapters": names, ...}`.
    """
    key = {**dataclasses.asdict(config), "data": data.name, "version": 1}
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    root = os.path.join(cache, tag)
    done = os.path.join(root, "done.json")
    paths = {name: os.path.join(root, name) for name in ("trained", "random_init", "lora")}
    paths["base"] = os.path.join(root, "base.safetensors")
    if os.path.exists(done):
        log(f"zoos: cached in {root}")
        with open(done) as f:
            return {**paths, **json.load(f)}
    start = time.time()
    tasks = make_tasks(config.models, config.seed, num_classes=data.num_classes)
    log(f"zoos: training {len(tasks)} models ({config.steps} steps, vmapped over models)")
    init = init_zoo(model, [t.seed for t in tasks], data.x, mesh)
    write_zoo(paths["random_init"], init, tasks, parent="random init (untrained)")
    trained = train_zoo(model, init, data, tasks, steps=config.steps, mesh=mesh)
    acc = accuracy(model, trained, data, tasks)
    write_zoo(paths["trained"], trained, tasks, parent=None)
    log(f"  trained zoo: mean test accuracy {acc.mean():.3f} ({time.time() - start:.0f}s)")

    log("zoos: pretraining the LoRA base on all classes")
    everything = Task(tuple(range(data.num_classes)), seed=config.seed + 99)
    base = train_zoo(
        model, init_zoo(model, [everything.seed], data.x), data, [everything], steps=config.steps
    )
    base = jax.tree.map(lambda a: a[0], base)
    io.write_safetensors(paths["base"], flatten(base))
    # LoRA on every 2-D kernel but the output layer (as PEFT targets linear layers).
    flat = flatten(base)
    dense = [k[: -len(".kernel")] for k in flat if k.endswith("kernel") and flat[k].ndim == 2]
    targets = sorted(dense)[:-1] or sorted(dense)
    lora_tasks = make_tasks(
        config.lora_models, config.seed, num_classes=data.num_classes, offset=500
    )
    shared = int(round(config.shared_a_fraction * len(lora_tasks)))
    a_seeds = [7 if i < shared else 10_000 + i for i in range(len(lora_tasks))]
    rank, alpha = config.rank, 2.0 * config.rank
    log(
        f"zoos: training {len(lora_tasks)} rank-{rank} adapters on {targets} "
        f"({shared} share one A initialisation)"
    )
    adapters = lora_init(base, targets, a_seeds, rank)
    adapters = train_lora_zoo(
        model,
        base,
        adapters,
        data,
        lora_tasks,
        steps=config.lora_steps,
        scale=alpha / rank,
        a_lr_scale=config.a_lr_scale,
        mesh=mesh,
    )
    lacc = lora_accuracy(model, base, adapters, data, lora_tasks, scale=alpha / rank)
    write_lora_zoo(
        paths["lora"],
        adapters,
        lora_tasks,
        rank=rank,
        alpha=alpha,
        seeds_a=a_seeds,
        parent="base.safetensors",
    )
    log(f"  LoRA zoo: mean test accuracy {lacc.mean():.3f} ({time.time() - start:.0f}s)")
    info = {
        "shared_adapters": [f"a{i:03d}" for i in range(shared)],
        "trained_accuracy": float(acc.mean()),
        "lora_accuracy": float(lacc.mean()),
        "seconds": time.time() - start,
    }
    with open(done, "w") as f:
        json.dump(info, f)
    return {**paths, **info}
