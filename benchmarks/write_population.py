"""Writes synthetic populations at real shapes, in real formats, for the benchmarks.

LoRA: N PEFT adapter directories with Mistral-7B shapes (per layer q_proj 4096x4096, k_proj and
v_proj 1024x4096; rank 16, alpha 32, bf16), optionally with a planted shared subspace in the B
factors and a group of adapters sharing one A. Full models: N safetensors files of a small
transformer shape.

Run:
    python benchmarks/write_population.py --out=/tmp/bench/lora --n=100 --layers=32
    python benchmarks/write_population.py --out=/tmp/bench/full --kind=full --n=16
"""

from __future__ import annotations

import os
import sys

import ml_dtypes
import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shapes import lora_modules  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_KIND = flags.DEFINE_enum("kind", "lora", ["lora", "full"], "Adapters or full models.")
_N = flags.DEFINE_integer("n", 100, "Number of models.")
_LAYERS = flags.DEFINE_integer("layers", 32, "Transformer layers.")
_HIDDEN = flags.DEFINE_integer("hidden", 4096, "Model width (LoRA: Mistral-7B's 4096).")
_KV = flags.DEFINE_integer("kv", 1024, "k_proj / v_proj output width (Mistral: 1024).")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank.")
_PLANTED = flags.DEFINE_integer("planted", 0, "Shared subspace dimension planted in B (0: none).")
_SHARED_A = flags.DEFINE_float("shared_a_fraction", 0.0, "Adapters sharing one A.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")


def write_lora(out, n, layers, hidden, kv, rank, planted, shared_a, seed):
    from jsubspace import testing

    rng = np.random.default_rng(seed)
    shapes = lora_modules(layers, hidden, kv)
    shared = int(round(shared_a * n))
    bases = {
        name: np.linalg.qr(rng.standard_normal((m, planted)))[0] if planted else None
        for name, (m, _) in shapes.items()
    }
    a_shared = {
        name: (rng.standard_normal((rank, k)) / np.sqrt(k)).astype(ml_dtypes.bfloat16)
        for name, (_, k) in shapes.items()
    }
    for i in range(n):
        modules = {}
        for name, (m, k) in shapes.items():
            a = (
                a_shared[name]
                if i < shared
                else (rng.standard_normal((rank, k), np.float32) / np.sqrt(k)).astype(
                    ml_dtypes.bfloat16
                )
            )
            b = rng.standard_normal((m, rank), np.float32) * 0.01
            if bases[name] is not None:
                b += bases[name] @ rng.standard_normal((planted, rank)).astype(np.float32)
            modules[name] = (a, b.astype(ml_dtypes.bfloat16))
        testing.write_peft_adapter(
            os.path.join(out, f"adapter_{i:03d}"),
            modules,
            r=rank,
            lora_alpha=2 * rank,
            base_model_name_or_path="mistral-7b",
        )
        print(f"\r{i + 1}/{n} adapters", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def write_full(out, n, layers, hidden, seed):
    from jsubspace import io

    rng = np.random.default_rng(seed)
    for i in range(n):
        tensors = {}
        for layer in range(layers):
            for name, shape in (
                ("attn.qkv", (3 * hidden, hidden)),
                ("attn.out", (hidden, hidden)),
                ("mlp.up", (4 * hidden, hidden)),
                ("mlp.down", (hidden, 4 * hidden)),
            ):
                tensors[f"blocks.{layer}.{name}.weight"] = (
                    rng.standard_normal(shape, np.float32) * 0.02
                ).astype(ml_dtypes.bfloat16)
        io.write_safetensors(os.path.join(out, f"model_{i:03d}.safetensors"), tensors)
        print(f"\r{i + 1}/{n} models", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def main(argv):
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    if _KIND.value == "lora":
        write_lora(
            _OUT.value,
            _N.value,
            _LAYERS.value,
            _HIDDEN.value,
            _KV.value,
            _RANK.value,
            _PLANTED.value,
            _SHARED_A.value,
            _SEED.value,
        )
    else:
        write_full(_OUT.value, _N.value, _LAYERS.value, _HIDDEN.value, _SEED.value)


if __name__ == "__main__":
    app.run(main)
