"""Models rebuilt from a store, written back in their own format, from the store alone.

Full models become safetensors with the original tensor names, dtypes and order; tensors the
store does not fit (biases, norms, layers left out) come bit-exact from its `kept.safetensors`.
LoRA adapters become a PEFT adapter directory: each rebuilt update is re-factorised to rank r' by
an SVD (`B' = U_r' S_r'`, `A' = V_r'^T`) and the config (the original `adapter_config.json`,
kept in the store) says `r = lora_alpha = r'` (scale 1), so PEFT loads it as it is; at full k and
r' >= r the original update comes back exactly. The source models are never opened.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np

from jsubspace import io
from jsubspace.compress._store import SubspaceStore
from jsubspace.compress._store import dtype_from_name


def refactor_lora(update: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """`(A [r', n], B [m, r'])` with `B @ A` the best rank-r' approximation of `update`."""
    u, s, vt = np.linalg.svd(np.asarray(update, np.float64), full_matrices=False)
    rank = min(rank, len(s))
    root = np.sqrt(s[:rank])
    return root[:, None] * vt[:rank], u[:, :rank] * root[None, :]


def export_model(
    store: SubspaceStore, model: str, out: str, *, k: int | None = None, rank: int | None = None
) -> str:
    """Writes model `model` rebuilt from the store (rank-k basis) in its source format.

    Args:
        store: the store.
        model: a model name of the store's population.
        out: a directory; the model is written as `out/<name>.safetensors` (full models) or
            `out/<name>/` (PEFT adapters).
        k: basis size per layer (default: each layer's stored k).
        rank: LoRA rank r' of the exported adapter (default: the largest original rank).

    Returns:
        The path written.
    """
    contents = store.contents(model)
    os.makedirs(out, exist_ok=True)
    if contents["format"] == "peft":
        return _export_peft(store, model, contents, out, k=k, rank=rank)
    tensors = {}
    for item in contents["tensors"]:
        name = item["name"]
        if "layer" in item:
            entry = store.layers[item["layer"]]
            value = store.reconstruct(model, item["layer"], k=k).reshape(entry["stored_shape"])
            tensors[name] = value.astype(dtype_from_name(item["dtype"]))
        else:
            tensors[name] = store.kept_tensor(model, name)
    path = os.path.join(out, f"{model}.safetensors")
    io.write_safetensors(path, tensors, {"format": "pt", "source": "jsubspace"})
    return path


def _export_peft(store, model, contents, out, *, k, rank) -> str:
    lora_modules = contents["lora_modules"]
    dtypes = {item["name"]: item["dtype"] for item in contents["tensors"]}
    config = copy.deepcopy(contents["adapter_config"])
    ranks = [r for e in store.layers.values() for r in (e.get("ranks") or [])]
    rank = rank or (max(ranks) if ranks else int(config["r"]))
    tensors = {}
    stored_keys = set()
    for name, module in lora_modules.items():
        if name not in store.layers:
            continue  # a module the store left out keeps its original factors below
        update = store.reconstruct(model, name, k=k)
        a, b = refactor_lora(update, rank)
        if a.shape[0] < rank:  # keep every module at one rank r' for a uniform config
            a = np.pad(a, ((0, rank - a.shape[0]), (0, 0)))
            b = np.pad(b, ((0, 0), (0, rank - b.shape[1])))
        dtype = dtype_from_name(dtypes[module["a"]])
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.astype(dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.astype(dtype)
        stored_keys.update({module["a"], module["b"]})
    # Modules the store left out, and non-LoRA tensors (modules_to_save), come untouched from
    # the store; the left-out modules keep their own rank and alpha through PEFT's per-module
    # patterns.
    kept = {n: m for n, m in lora_modules.items() if n not in store.layers}
    for item in contents["tensors"]:
        if item["name"] not in stored_keys and item["name"] not in tensors:
            tensors[item["name"]] = store.kept_tensor(model, item["name"])
    directory = os.path.join(out, model)
    os.makedirs(directory, exist_ok=True)
    io.write_safetensors(
        os.path.join(directory, "adapter_model.safetensors"), tensors, {"format": "pt"}
    )
    use_rslora = bool(config.get("use_rslora", False))
    config.update(
        r=int(rank),
        lora_alpha=float(rank) ** (0.5 if use_rslora else 1.0),  # scale 1 for rebuilt modules
        rank_pattern={n: m["rank"] for n, m in kept.items()},
        alpha_pattern={n: m["alpha"] for n, m in kept.items()},
    )
    with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return directory


def export_all(store: SubspaceStore, out: str, **kwargs) -> list[str]:
    """Every model of the store, rebuilt (see `export_model`)."""
    return [export_model(store, model, out, **kwargs) for model in store.models]
