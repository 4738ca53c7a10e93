"""Shapes, the LoRA population on disk and the GEMM roofline shared by the benchmark scripts (no
flags here, so any script may import it)."""

import os
import subprocess
import sys


def lora_modules(layers: int, hidden: int = 4096, kv: int = 1024) -> dict[str, tuple[int, int]]:
    """Mistral-7B attention projections adapted by LoRA: module name -> (out, in)."""
    shapes = {}
    for i in range(layers):
        for proj, out in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"model.layers.{i}.self_attn.{proj}"] = (out, hidden)
    return shapes


def gemm_rate() -> float:
    """JAX's float32 GEMM rate on this machine (2048^3 at `precision=HIGHEST`, 5 runs), the
    roofline both benchmark scripts print beside their timings."""
    import time

    import jax
    import jax.numpy as jnp

    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: jnp.matmul(x, x, precision=jax.lax.Precision.HIGHEST))
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    return 5 * 2 * 2048**3 / (time.perf_counter() - start)


def lora_population(workdir: str, n: int, layers: int) -> str:
    """The directory of N Mistral-shaped adapters (8 planted B directions, a quarter sharing
    one A), written by `write_population.py` on first use and reused after."""
    pop = os.path.join(workdir, f"lora_n{n}_l{layers}")
    if not os.path.exists(os.path.join(pop, "done")):
        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.run(
            [
                sys.executable,
                os.path.join(here, "write_population.py"),
                f"--out={pop}",
                f"--n={n}",
                f"--layers={layers}",
                "--planted=8",
                "--shared_a_fraction=0.25",
            ],
            check=True,
        )
        open(os.path.join(pop, "done"), "w").close()
    return pop
