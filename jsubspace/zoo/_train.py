"""Training many small models at once: `jax.vmap` over models, the model axis sharded.

Every model has its own task (inputs, labels, loss mask) and its own initialisation. Parameters,
optimiser states and per-model data are stacked on a leading models axis placed with
`NamedSharding(mesh, P('models'))`, so the same jitted step trains 8 or 800 models on one device
or many. LoRA zoos train only the factors `A`, `B` of chosen kernels of a frozen base model.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jsubspace import io
from jsubspace import sharding
from jsubspace import testing
from jsubspace.zoo._data import Dataset
from jsubspace.zoo._data import Task
from jsubspace.zoo._data import apply_task


def task_data(data: Dataset, tasks: Sequence[Task]):
    """Stacked `(x [N, S, ...], y [N, S], train_mask [N, S], test_mask [N, S])` per task."""
    xs, ys, masks = [], [], []
    for task in tasks:
        x, y, mask = apply_task(jnp.asarray(data.x), jnp.asarray(data.y), task, data.num_classes)
        xs.append(x)
        ys.append(y)
        masks.append(mask)
    split = jnp.asarray(data.train, jnp.float32)
    mask = jnp.stack(masks)
    return jnp.stack(xs), jnp.stack(ys), mask * split, mask * (1 - split)


def _put(tree, mesh):
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P(sharding.MODELS)))


def init_zoo(model, seeds: Sequence[int], sample: jnp.ndarray, mesh=None):
    """Stacked parameters of `len(seeds)` models, model i initialised from `seeds[i]`."""
    keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
    params = jax.vmap(lambda k: model.init(k, sample[:1])["params"])(keys)
    return _put(params, mesh)


def _masked_ce(logits, y, mask):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def train_zoo(
    model, params, data: Dataset, tasks: Sequence[Task], *, steps: int, lr: float = 3e-2, mesh=None
):
    """Full-batch Adam on every model's own task; returns the trained stacked parameters."""
    x, y, train, _ = _put(task_data(data, tasks), mesh)
    opt = optax.adam(lr)
    state = jax.vmap(opt.init)(params)

    def loss(p, xi, yi, mi):
        return _masked_ce(model.apply({"params": p}, xi), yi, mi)

    @jax.jit
    def step(p, s):
        grads = jax.vmap(jax.grad(loss))(p, x, y, train)
        updates, s = jax.vmap(opt.update)(grads, s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(steps):
        params, state = step(params, state)
    return params


def accuracy(model, params, data: Dataset, tasks: Sequence[Task], *, split: str = "test"):
    """`f32[N]`: accuracy of model i on the `split` samples of its own task."""
    x, y, train, test = task_data(data, tasks)
    mask = test if split == "test" else train

    def one(p, xi, yi, mi):
        hit = jnp.argmax(model.apply({"params": p}, xi), -1) == yi
        return jnp.sum(hit * mi) / jnp.maximum(jnp.sum(mi), 1.0)

    return np.asarray(jax.jit(jax.vmap(one))(params, x, y, mask))


def flatten(params) -> dict[str, np.ndarray]:
    """`{'Dense_0.kernel': array, ...}` of one model's parameters."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep=".")
    return {k: np.asarray(v) for k, v in flat.items()}


def unflatten(tensors: dict[str, np.ndarray]):
    return flax.traverse_util.unflatten_dict(
        {tuple(k.split(".")): jnp.asarray(v) for k, v in tensors.items()}
    )


def write_zoo(
    directory: str,
    params,
    tasks: Sequence[Task],
    *,
    parent: str | None = None,
    extra: dict | None = None,
) -> list[str]:
    """One `m{i:03d}.safetensors` per model plus `zoo.json` (task, seed, parent per model)."""
    os.makedirs(directory, exist_ok=True)
    stacked = flatten(jax.device_get(params))
    paths, entries = [], []
    for i, task in enumerate(tasks):
        name = f"m{i:03d}"
        path = os.path.join(directory, f"{name}.safetensors")
        io.write_safetensors(path, {k: v[i] for k, v in stacked.items()}, {"format": "flax"})
        paths.append(path)
        entries.append({"name": name, "task": task.describe(), "parent": parent})
    with open(os.path.join(directory, "zoo.json"), "w") as f:
        json.dump({"models": entries, **(extra or {})}, f, indent=1)
    return paths


# --- LoRA zoos -------------------------------------------------------------------------------


def lora_init(base_params, targets: Sequence[str], seeds_a: Sequence[int], rank: int):
    """Adapters in PEFT layout: `A: [N, r, in]` Kaiming-uniform from `seeds_a[i]` (adapters with
    the same seed share one `A` initialisation), `B: [N, out, r]` zeros."""
    flat = flatten(base_params)
    adapters = {}
    for name in targets:
        fan_in, fan_out = flat[f"{name}.kernel"].shape
        bound = 1.0 / np.sqrt(fan_in)
        salt = zlib.crc32(name.encode())  # per-module stream, stable across processes
        a = jnp.stack(
            [
                jax.random.uniform(
                    jax.random.fold_in(jax.random.key(int(s)), salt),
                    (rank, fan_in),
                    minval=-bound,
                    maxval=bound,
                )
                for s in seeds_a
            ]
        )
        adapters[name] = {"A": a, "B": jnp.zeros((len(seeds_a), fan_out, rank))}
    return adapters


def _with_adapters(base_params, adapter, scale):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(base_params))
    for name, ab in adapter.items():
        key = (name, "kernel")
        flat[key] = flat[key] + scale * (ab["B"] @ ab["A"]).T  # PEFT dW is [out, in]
    return flax.traverse_util.unflatten_dict(flat)


def train_lora_zoo(
    model,
    base_params,
    adapters,
    data: Dataset,
    tasks: Sequence[Task],
    *,
    steps: int,
    scale: float,
    lr: float = 1e-2,
    a_lr_scale: float = 1.0,
    mesh=None,
):
    """Trains only the adapters, each on its own task, the base frozen.

    `a_lr_scale` scales the `A` gradients: 0 keeps every `A` at its initialisation (LoRA-FA),
    which is what adapters look like when their `A` never left a shared initialisation.
    """
    x, y, train, _ = _put(task_data(data, tasks), mesh)
    adapters = _put(adapters, mesh)
    opt = optax.adam(lr)
    state = jax.vmap(opt.init)(adapters)

    def loss(ad, xi, yi, mi):
        p = _with_adapters(base_params, ad, scale)
        return _masked_ce(model.apply({"params": p}, xi), yi, mi)

    @jax.jit
    def step(ad, s):
        grads = jax.vmap(jax.grad(loss))(ad, x, y, train)
        grads = {m: {"A": g["A"] * a_lr_scale, "B": g["B"]} for m, g in grads.items()}
        updates, s = jax.vmap(opt.update)(grads, s, ad)
        return optax.apply_updates(ad, updates), s

    for _ in range(steps):
        adapters, state = step(adapters, state)
    return adapters


def lora_accuracy(model, base_params, adapters, data, tasks, *, scale, split="test"):
    params = jax.vmap(lambda ad: _with_adapters(base_params, ad, scale))(adapters)
    return accuracy(model, params, data, tasks, split=split)


def write_lora_zoo(
    directory: str,
    adapters,
    tasks: Sequence[Task],
    *,
    rank: int,
    alpha: float,
    seeds_a: Sequence[int],
    parent: str,
) -> list[str]:
    """PEFT adapter directories `a{i:03d}/` (real key names and config) plus `zoo.json`."""
    adapters = jax.device_get(adapters)
    paths, entries = [], []
    for i, task in enumerate(tasks):
        name = f"a{i:03d}"
        modules = {
            mod: (np.asarray(ab["A"][i], np.float32), np.asarray(ab["B"][i], np.float32))
            for mod, ab in adapters.items()
        }
        paths.append(
            testing.write_peft_adapter(
                os.path.join(directory, name),
                modules,
                r=rank,
                lora_alpha=alpha,
                base_model_name_or_path=parent,
            )
        )
        entries.append(
            {"name": name, "task": task.describe(), "parent": parent, "a_seed": int(seeds_a[i])}
        )
    with open(os.path.join(directory, "zoo.json"), "w") as f:
        json.dump({"models": entries}, f, indent=1)
    return paths
