"""The kernel patterns XLA's CPU backend runs below its GEMM rate, each timed as the plain JAX
expression against the kernel jsubspace uses instead, in one run (`benchmarks/README.md`,
"XLA's slow CPU patterns in the dense kernels").

  models sum    `jnp.sum(x.astype(f32), 0)` over a bf16 stack / `kernels.models_sum`
  models Gram   one `[N, mn] x [mn, N]` product / `kernels.long_dot` (slices of 8192); numpy
  cols product  `sum_i X_i^T (X_i Q)` as one product of `[(N m), n]` / `kernels.mode_product`
  rows product  `sum_i X_i (X_i^T Q)` with `X_i^T Q` kept as `[N, n, l]` / `kernels.mode_product`
  tall X^T Y    `X^T Y` for the stack seen as `[(N m), n]` (a LoRA route's stacked factor) and a
                `[(N m), l]` block / `kernels.t_matmul`

Each row: best of --repeats warm calls, the ratio plain / kernel, and the largest difference
between the two results relative to the largest entry (they compute the same sums).

    python benchmarks/xla_cpu_patterns.py --n=64 --m=768 --cols=3072
    python benchmarks/xla_cpu_patterns.py --n=500 --m=16 --cols=4096  # tall X^T Y: a LoRA
        # route's stacked factor of 500 rank-16 adapters, [8000, 4096]
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from jsubspace import kernels

_N = flags.DEFINE_integer("n", 64, "Models.")
_M = flags.DEFINE_integer("m", 768, "Rows of each model.")
_COLS = flags.DEFINE_integer("cols", 3072, "Columns of each model.")
_L = flags.DEFINE_integer("l", 74, "Columns of the Krylov block (rank 64 + oversample 10).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per path (best taken).")
_OUT = flags.DEFINE_string("out", None, "Also write the rows to this JSON file.")


def _best(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def _dot(x, y, contract, batch=((), ())):
    return jax.lax.dot_general(x, y, (contract, batch), precision=kernels.HIGHEST)


def main(argv):
    del argv
    n, m, c, l = _N.value, _M.value, _COLS.value, _L.value
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((n, m, c), dtype=np.float32)
    x16 = jnp.asarray(x32).astype(jnp.bfloat16)
    xf = jnp.asarray(x32)
    q = jnp.asarray(rng.standard_normal((c, l), dtype=np.float32))
    qr = jnp.asarray(rng.standard_normal((m, l), dtype=np.float32))
    flat = xf.reshape(n, -1)
    cases = [
        (
            "models sum (bf16)",
            jax.jit(lambda x: jnp.sum(x.astype(jnp.float32), axis=0)),
            jax.jit(kernels.models_sum),
            (x16,),
        ),
        (
            "models Gram",
            jax.jit(lambda a: _dot(a, a, ((1,), (1,)))),
            jax.jit(lambda a: kernels.long_dot(a, a)),
            (flat,),
        ),
        (
            "cols product",
            jax.jit(
                lambda x, q: _dot(
                    x.reshape(n * m, c), kernels.stack_times(x, q).reshape(n * m, -1), ((0,), (0,))
                )
            ),
            jax.jit(lambda x, q: kernels.mode_product(x, q, mode="cols")),
            (xf, q),
        ),
        (
            "rows product",
            jax.jit(
                lambda x, q: kernels.models_sum(
                    _dot(
                        x,
                        _dot(x, jnp.broadcast_to(q, (n, m, l)), ((1,), (1,)), ((0,), (0,))),
                        ((2,), (1,)),
                        ((0,), (0,)),
                    )
                )
            ),
            jax.jit(lambda x, q: kernels.mode_product(x, q, mode="rows")),
            (xf, qr),
        ),
        (
            "tall X^T Y",
            jax.jit(lambda a, y: _dot(a, y, ((0,), (0,)))),
            jax.jit(kernels.t_matmul),
            (xf.reshape(n * m, c), jnp.asarray(rng.standard_normal((n * m, l), dtype=np.float32))),
        ),
    ]
    rows = []
    print(f"{n} models of {m} x {c}, Krylov block {l}, backend {jax.default_backend()}")
    print(f"{'pattern':<20} {'plain s':>9} {'kernel s':>9} {'plain/kernel':>13} {'rel diff':>9}")
    for name, plain, kernel, args in cases:
        a, b = np.asarray(plain(*args)), np.asarray(kernel(*args))
        diff = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
        tp, tk = _best(plain, *args), _best(kernel, *args)
        rows.append(dict(pattern=name, plain_s=tp, kernel_s=tk, ratio=tp / tk, rel_diff=diff))
        print(f"{name:<20} {tp:9.3f} {tk:9.3f} {tp / tk:13.2f} {diff:9.1e}")
    start = time.perf_counter()
    for _ in range(_REPEATS.value):
        x32.reshape(n, -1) @ x32.reshape(n, -1).T
    numpy_gram = (time.perf_counter() - start) / _REPEATS.value
    print(f"{'models Gram, numpy':<20} {numpy_gram:9.3f} (mean of {_REPEATS.value})")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(dict(n=n, m=m, cols=c, l=l, rows=rows, numpy_gram_s=numpy_gram), f, indent=1)


if __name__ == "__main__":
    app.run(main)
