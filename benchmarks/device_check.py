"""One check of a machine's accelerator (or its CPU), written to one JSON: what the devices are,
the kernel rates the layer plans use, the core kernels' achieved rates, and the default analysis
against the spectra alone on a LoRA population (Mistral-7B module shapes) and a dense one (two
layer shapes), with the seconds XLA spent compiling each.

The JSON is rewritten after every stage (`"complete": false` until the last), so a run stopped
by a time limit still leaves what it measured. On an NVIDIA H200 (2026-12-04) the first run of a
dense layer's default analysis was compile-bound: about 100 s of XLA compilation for one
1536 x 512 layer at N = 16, where the whole layer takes 17 s on 2 CPU cores (see
benchmarks/README.md); the dense stage is therefore two layer shapes, and each stage records
its compile seconds. `--quick` (tiny shapes, about a minute on 2 CPU cores) is what the test
suite runs, so that the script is known to work before an accelerator is at hand.

Run:
    python benchmarks/device_check.py --out=device_check.json
    python benchmarks/device_check.py --out=/tmp/check.json --quick        # CPU, tests
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "device_check.json", "Where the JSON goes.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny shapes: a CPU check of the script itself.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (default: a temporary one).")

HERE = os.path.dirname(os.path.abspath(__file__))

# (adapters, transformer layers, hidden, kv width) of the LoRA population; (models, layers,
# hidden) of the dense one; (N, m, n) of the kernel-rate stack.
SIZES = {
    False: {"lora": (40, 1, 4096, 1024), "dense": (16, 1, 512), "kernel": (64, 1024, 1024)},
    True: {"lora": (8, 1, 256, 64), "dense": (6, 1, 64), "kernel": (8, 128, 96)},
}
# The dense stage's layers: a square and a 4:1 one (the population has four shapes per block).
DENSE_LAYERS = r"blocks\.0\.(attn\.out|mlp\.up)\.weight"

_COMPILE = {"seconds": 0.0}


def _count_compiles() -> None:
    """Sums XLA's backend compile time (jax.monitoring) into `_COMPILE`."""
    import jax.monitoring

    def listener(name, seconds, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            _COMPILE["seconds"] += seconds

    jax.monitoring.register_event_duration_secs_listener(listener)


def _best(fn, *args, repeats: int = 3) -> float:
    fn(*args)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        getattr(out, "block_until_ready", lambda: None)()
        times.append(time.perf_counter() - start)
    return min(times)


def kernel_rates(n: int, m: int, k: int) -> dict:
    """Achieved rates of the Gram and randomized kernels on an `[n, m, k]` stack on every
    device, in flop/s."""
    import jax
    import numpy as np

    from jsubspace import kernels
    from jsubspace import sharding

    mesh = sharding.models_mesh()
    n_pad = sharding.padded_count(n, mesh)
    x = jax.device_put(
        np.random.default_rng(0).standard_normal((n_pad, m, k), np.float32),
        sharding.stacked_sharding(mesh),
    )

    def grams():
        return kernels.mode_grams(x, mesh=mesh, n_models=n, modes=("rows", "cols")).rows

    rank = min(64, m, k)

    def randomized():
        return kernels.randomized_mode_eigh(
            x, key=jax.random.key(0), mesh=mesh, n_models=n, mode="rows", rank=rank
        ).values

    t_gram = _best(grams)
    t_rand = _best(randomized)
    width = rank + 10
    return {
        "stack": [n, m, k],
        "devices": mesh.devices.size,
        "gram_seconds": t_gram,
        "gram_flops_per_s": 2.0 * n * m * k * (m + k) / t_gram,
        "randomized_seconds": t_rand,
        "randomized_flops_per_s": (3 + 1) * 4.0 * n * m * k * width / t_rand,
    }


def device_peak_bytes() -> int | None:
    """The accelerator's peak bytes in use since the process started (None on the CPU backend,
    which keeps none): the stages run in order, so the dense stage's includes the LoRA one's."""
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _write(kind: str, out: str, sizes: tuple) -> float:
    """A population written by benchmarks/write_population.py (its own process: it defines
    flags of its own); returns the seconds it took."""
    if kind == "lora":
        n, layers, hidden, kv = sizes
        extra = [f"--hidden={hidden}", f"--kv={kv}", "--planted=8", "--shared_a_fraction=0.25"]
    else:
        n, layers, hidden = sizes
        extra = [f"--hidden={hidden}"]
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "write_population.py"),
            f"--out={out}",
            f"--kind={'lora' if kind == 'lora' else 'full'}",
            f"--n={n}",
            f"--layers={layers}",
            *extra,
        ],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def analysis(population: str, work: str, include: str | None = None) -> dict:
    """The default analysis against the spectra alone (no null, holdout or split half), each in
    this process after a warm-up run of the same shapes (so compilation is not timed: the
    warm-up's seconds and the XLA compile seconds in it are recorded beside), and the seconds
    of each part of the default run (summed over layers)."""
    import jsubspace

    spectra_only = dict(null_draws=0, holdout=None, split_half=False)
    out = {}
    for name, options in (("spectra_only", spectra_only), ("default", {})):
        kwargs = dict(plots=False, quiet=True, overwrite=True, include=include, **options)
        start, compiled = time.perf_counter(), _COMPILE["seconds"]
        jsubspace.analyze([population], os.path.join(work, f"{name}_warm"), **kwargs)
        out[f"{name}_warmup_seconds"] = time.perf_counter() - start
        out[f"{name}_warmup_compile_seconds"] = _COMPILE["seconds"] - compiled
        start = time.perf_counter()
        result = jsubspace.analyze([population], os.path.join(work, name), **kwargs)
        out[f"{name}_seconds"] = time.perf_counter() - start
        parts = {}
        for layer in result["layers"]:
            for part, seconds in layer.get("seconds", {}).items():
                parts[part] = parts.get(part, 0.0) + seconds
        out[f"{name}_parts"] = parts
        if name == "default":
            out["verdicts"] = {la["name"]: la["verdict"]["label"] for la in result["layers"]}
            out["layers"] = len(result["layers"])
            out["models"] = len(result["models"])
    out["default_over_spectra"] = out["default_seconds"] / out["spectra_only_seconds"]
    return out


def _save(record: dict, started: float, *, complete: bool) -> None:
    record["seconds"] = time.perf_counter() - started
    record["compile_seconds"] = _COMPILE["seconds"]
    record["complete"] = complete
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(_OUT.value + ".tmp", _OUT.value)


def main(argv):
    del argv
    import jax

    from jsubspace import spectra

    _count_compiles()
    sizes = SIZES[_QUICK.value]
    started = time.perf_counter()
    devices = jax.devices()
    record = {
        "what": "benchmarks/device_check.py" + (" --quick" if _QUICK.value else ""),
        "host": {"platform": platform.platform(), "python": platform.python_version()},
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [{"kind": d.device_kind, "platform": d.platform, "id": d.id} for d in devices],
        "processes": jax.process_count(),
    }
    record["plan_rates"] = spectra.measure_rates().__dict__
    print(f"{len(devices)} x {devices[0].device_kind}; plan rates {record['plan_rates']}")
    _save(record, started, complete=False)
    record["kernels"] = kernel_rates(*sizes["kernel"])
    # Against the plan's GEMM probe (`measure_rates`), which is too small to fill a large GPU:
    # on an H200 this read 3.6; compare with the chip's datasheet rate there.
    record["kernels"]["gram_over_gemm"] = (
        record["kernels"]["gram_flops_per_s"] / record["plan_rates"]["gemm"]
    )
    print(f"kernels: {record['kernels']}")
    _save(record, started, complete=False)
    with tempfile.TemporaryDirectory() as scratch:
        work = _WORKDIR.value or scratch
        for kind in ("lora", "dense"):
            population = os.path.join(work, f"population_{kind}")
            written = _write(kind, population, sizes[kind])
            include = DENSE_LAYERS if kind == "dense" else None
            found = analysis(population, os.path.join(work, f"out_{kind}"), include)
            found["population"] = list(sizes[kind])
            found["write_seconds"] = written
            found["device_peak_bytes"] = device_peak_bytes()
            record[kind] = found
            print(
                f"{kind}: default {found['default_seconds']:.1f} s, spectra only "
                f"{found['spectra_only_seconds']:.1f} s "
                f"({found['default_over_spectra']:.2f}x); parts {found['default_parts']}; "
                f"warm-up {found['default_warmup_seconds']:.1f} s, of which compiling "
                f"{found['default_warmup_compile_seconds']:.1f} s"
            )
            _save(record, started, complete=False)
    _save(record, started, complete=True)
    seconds, compiling = record["seconds"], record["compile_seconds"]
    print(f"wrote {_OUT.value} ({seconds:.0f} s, {compiling:.0f} s of it compiling)")


if __name__ == "__main__":
    app.run(main)
