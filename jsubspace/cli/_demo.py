"""The embedded default population: real safetensors and PEFT files with known truth.

Until the model-zoo experiment exists this is what `jsubspace demo` analyses: a population of 24
full models whose three layers were built to answer differently (a planted shared subspace, pure
noise, near-copies of one parent), and 24 LoRA adapters of which half keep one shared `A`
initialisation, the confound reported against the paper's LoRA results.
"""

from __future__ import annotations

import os

import numpy as np

from jsubspace import testing

TRUTH = {
    "shared_subspace.weight": "shared subspace (rows and cols)",
    "pure_noise.weight": "indistinguishable from noise",
    "near_copies.weight": "explained by the mean",
    "model.layers.0.self_attn.q_proj": "explained by shared initialisation",
    "model.layers.0.self_attn.v_proj": "explained by shared initialisation",
}


def write_demo_population(directory: str, *, n_models: int = 24, seed: int = 0) -> dict:
    """Writes `dense/` (safetensors files) and `adapters/` (PEFT directories) under directory."""
    rng = np.random.default_rng(seed)
    shape = (64, 48)
    planted = testing.planted_population(seed, n_models=n_models, shape=shape, rank=4, noise=0.05)
    noise = rng.standard_normal((n_models, *shape)).astype(np.float32)
    parent = rng.standard_normal(shape)
    copies = (parent + 0.02 * rng.standard_normal((n_models, *shape))).astype(np.float32)
    dense = os.path.join(directory, "dense")
    for i in range(n_models):
        testing.write_safetensors(
            os.path.join(dense, f"model_{i:02d}.safetensors"),
            {
                "shared_subspace.weight": planted[i],
                "pure_noise.weight": noise[i],
                "near_copies.weight": copies[i],
                "near_copies.bias": copies[i][:, 0].copy(),
            },
        )
    adapters = os.path.join(directory, "adapters")
    modules = {
        "model.layers.0.self_attn.q_proj": (64, 64),
        "model.layers.0.self_attn.v_proj": (32, 64),
    }
    factors = {
        name: testing.lora_population(
            seed + j, n_models=n_models, shape=s, rank=8, shared_a_fraction=0.5
        )
        for j, (name, s) in enumerate(modules.items())
    }
    for i in range(n_models):
        testing.write_peft_adapter(
            os.path.join(adapters, f"adapter_{i:02d}"),
            {name: (a[i], b[i]) for name, (a, b) in factors.items()},
            r=8,
            lora_alpha=16,
            base_model_name_or_path="demo-base",
        )
    return {"dense": dense, "adapters": adapters}
