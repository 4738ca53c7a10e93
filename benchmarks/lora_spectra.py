"""LoRA-collection spectra: jsubspace against its peers, on the same files, in one run.

Paths timed (each a whole process; median of --repeats; peak RSS from the kernel's rusage):
  jsubspace          the `jsubspace analyze` command: whole-update spectra (all three modes,
                     centred) and lineage, no null, no holdout or split-half compare, no plots: no
                     update ever formed
  jsubspace_e2e      the same with the null (1 draw)
  jsubspace_factors  `--lora=factors`: the paper's A / B statistic
  jsubspace_topk, jsubspace_factors_topk (not run by default)
                     the same with `--method=randomized --rank=--rank`: the top eigenvalues
                     by block Krylov through the factors
                     (jsubspace paths: the first run compiles into an empty persistent
                     compilation cache and is reported apart; the median is over the others)
  paper              the paper's released recipe: everything in memory, entry-wise centring,
                     row-stacking, sklearn PCA (up to 300 components) of A and of B, per module
  numpy_dense        materialise every dW and take exact spectra (numpy/scipy), as the
                     re-examinations did; run on --dense_models adapters of one module and
                     scaled to N by its cost model (Gram accumulation linear in N)
  sklearn_rsvd       sklearn `randomized_svd` of the rows unfolding [dW_1 .. dW_N] at rank
                     --rank, same subset and scaling as numpy_dense
Physical references measured in the same run: reading the population's bytes once, and the
kernel flops divided by the measured float32 GEMM rate (`achieved / roofline`).

Run (quick: 2 layers = 6 modules):
    python benchmarks/lora_spectra.py --workdir=/tmp/bench --n=100 --layers=2
Full Mistral-7B adapter set (32 layers, 96 modules; ~2 GB written at N = 100):
    python benchmarks/lora_spectra.py --workdir=/tmp/bench --n=100 --layers=32
Scaling of jsubspace alone:
    python benchmarks/lora_spectra.py --workdir=/tmp/bench --scaling=25,50,100,200,400
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shapes import gemm_rate  # noqa: E402
from _shapes import lora_modules  # noqa: E402
from _shapes import lora_population  # noqa: E402

_WORK = flags.DEFINE_string("workdir", "/tmp/jsubspace_bench", "Populations and outputs.")
_N = flags.DEFINE_integer("n", 100, "Adapters.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Transformer layers (3 modules each).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per path (median).")
_DENSE = flags.DEFINE_integer("dense_models", 8, "Adapters for the materialising paths.")
_RANK = flags.DEFINE_integer(
    "rank", 64, "Rank of the randomized peer, and --rank of the jsubspace top-k paths."
)
_PATHS = flags.DEFINE_list(
    "paths",
    ["jsubspace", "jsubspace_e2e", "jsubspace_factors", "paper", "numpy_dense", "sklearn_rsvd"],
    "Paths to time.",
)
_SCALING = flags.DEFINE_list("scaling", [], "N values for the jsubspace scaling table.")
_SCALING_PATH = flags.DEFINE_enum(
    "scaling_path",
    "jsubspace_e2e",
    ["jsubspace_e2e", "jsubspace_factors_e2e", "jsubspace_topk_e2e", "jsubspace_factors_topk_e2e"],
    "What --scaling times: whole-update spectra or the factor statistic, with null and lineage.",
)
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one path in this process.")
_POP = flags.DEFINE_string("population", None, "Internal: population directory.")


# --- workers (one path per process) ----------------------------------------------------------


def _adapters(pop):
    return sorted(os.path.join(pop, d) for d in os.listdir(pop) if d.startswith("adapter_"))


def _load_factors(paths, module):
    from safetensors.flax import load_file  # in memory, as the paper did (numpy has no bf16)

    a, b = [], []
    for p in paths:
        t = load_file(os.path.join(p, "adapter_model.safetensors"))
        a.append(t[f"base_model.model.{module}.lora_A.weight"].astype(np.float32))
        b.append(t[f"base_model.model.{module}.lora_B.weight"].astype(np.float32))
    return np.stack(a), np.stack(b)


def _modules(pop):
    with open(os.path.join(_adapters(pop)[0], "adapter_model.safetensors"), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return sorted(
        {
            k[len("base_model.model.") : -len(".lora_A.weight")]
            for k in header
            if k.endswith(".lora_A.weight")
        }
    )


JSUBSPACE_FLAGS = {
    "jsubspace": ["--null_draws=0"],
    "jsubspace_e2e": ["--null_draws=1"],
    "jsubspace_factors": ["--null_draws=0", "--lora=factors"],
    "jsubspace_factors_e2e": ["--null_draws=1", "--lora=factors"],
}
# Top eigenvalues only (block Krylov through the factors), with --rank=_RANK.
TOPK = ["--method=randomized"]
JSUBSPACE_FLAGS.update(
    {
        "jsubspace_topk": JSUBSPACE_FLAGS["jsubspace"] + TOPK,
        "jsubspace_topk_e2e": JSUBSPACE_FLAGS["jsubspace_e2e"] + TOPK,
        "jsubspace_factors_topk": JSUBSPACE_FLAGS["jsubspace_factors"] + TOPK,
        "jsubspace_factors_topk_e2e": JSUBSPACE_FLAGS["jsubspace_factors_e2e"] + TOPK,
    }
)


def _jsubspace_command(path: str, pop: str, cache: str) -> list[str]:
    """The installed command line, as a user runs it (no plots, no holdout or split-half
    compare: spectra, lineage, and the null where asked)."""
    return [
        sys.executable,
        "-m",
        "jsubspace.cli.main",
        "analyze",
        f"--models={pop}",
        f"--out={os.path.join(_WORK.value, 'out_' + path)}",
        "--holdout=none",
        "--nosplit_half",
        "--noplots",
        "--quiet",
        "--overwrite",
        f"--compilation_cache={cache}",
        *JSUBSPACE_FLAGS[path],
        *([f"--rank={_RANK.value}"] if "_topk" in path else []),
    ]


def _jsubspace_top(path: str) -> dict:
    with open(os.path.join(_WORK.value, "out_" + path, "spectra.json")) as f:
        first = json.load(f)["layers"][0]
    return {m: r["eigenvalues"][:5] for m, r in first["modes"].items()}


def worker(path: str, pop: str) -> dict:
    out = {}
    modules = _modules(pop)
    paths = _adapters(pop)
    scale = 2.0  # alpha / r of the written adapters
    if path == "paper":
        from safetensors.flax import load_file
        from sklearn.decomposition import PCA

        # In memory, as the released recipe works: every adapter loaded once.
        loaded = [load_file(os.path.join(p, "adapter_model.safetensors")) for p in paths]
        for module in modules:
            key = f"base_model.model.{module}"
            a = np.stack([t[f"{key}.lora_A.weight"].astype(np.float32) for t in loaded])
            b = np.stack([t[f"{key}.lora_B.weight"].astype(np.float32) for t in loaded])
            rows_a = a.reshape(-1, a.shape[2])  # N r x n, entry-wise centred by PCA
            cols_b = np.concatenate(list(b), axis=1).T  # N r x m
            pa = PCA(n_components=min(300, *rows_a.shape)).fit(rows_a)
            pb = PCA(n_components=min(300, *cols_b.shape)).fit(cols_b)
            if module == modules[0]:
                out["top"] = {
                    "lora_A": (pa.explained_variance_[:5] * (len(rows_a) - 1)).tolist(),
                    "lora_B": (pb.explained_variance_[:5] * (len(cols_b) - 1)).tolist(),
                }
        return out
    sub = paths[: _DENSE.value]
    a, b = _load_factors(sub, modules[0])
    dw = scale * np.einsum("imr,irn->imn", b, a)  # the materialised updates
    x = dw - dw.mean(0)
    if path == "numpy_dense":
        import scipy.linalg

        flat = x.reshape(len(x), -1)
        models = scipy.linalg.eigvalsh(flat @ flat.T)[::-1]
        rows = scipy.linalg.eigvalsh(np.einsum("imn,ikn->mk", x, x))[::-1]
        cols = scipy.linalg.eigvalsh(np.einsum("imn,imk->nk", x, x))[::-1]
        out["top"] = {
            "models": models[:5].tolist(),
            "rows": rows[:5].tolist(),
            "cols": cols[:5].tolist(),
        }
    elif path == "sklearn_rsvd":
        from sklearn.utils.extmath import randomized_svd

        unfolding = np.concatenate(list(x), axis=1)  # m x N n
        _, s, _ = randomized_svd(unfolding, _RANK.value, n_iter=4, random_state=0)
        out["top"] = {"rows": (s[:5] ** 2).tolist()}
    return out


# --- driver ----------------------------------------------------------------------------------


def _timed(path: str, pop: str, *, cache: str | None = None) -> tuple[float, float, dict]:
    """One whole-process run: seconds, peak RSS (MB) of that process, its top eigenvalues."""
    if path in JSUBSPACE_FLAGS:
        command = _jsubspace_command(path, pop, cache or "none")
    else:
        command = [
            sys.executable,
            __file__,
            f"--worker={path}",
            f"--population={pop}",
            f"--workdir={_WORK.value}",
            f"--dense_models={_DENSE.value}",
            f"--rank={_RANK.value}",
        ]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        raise RuntimeError(f"{path} failed:\n{stderr[-3000:]}")
    if path in JSUBSPACE_FLAGS:
        top = _jsubspace_top(path)
    else:
        top = json.loads(stdout.strip().splitlines()[-1]).get("top")
    return seconds, usage.ru_maxrss / 1024, top


def _population(n: int, layers: int) -> str:
    return lora_population(_WORK.value, n, layers)


def _read_rate(pop: str) -> tuple[int, float]:
    total, start = 0, time.perf_counter()
    for d in _adapters(pop):
        with open(os.path.join(d, "adapter_model.safetensors"), "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total, time.perf_counter() - start


def _flops(n: int, modules: list[tuple[int, int]], r: int = 16) -> float:
    """Flops of the algorithm jsubspace runs for the spectra (not counting the null): the two
    factor Grams (symmetric: 10 of 16 blocks), and per side either the sandwich with the stacked
    factor plus its tridiagonalisation (side < Nr), or Cholesky, the ?sygst congruence and the
    tridiagonalisation of an Nr x Nr matrix."""
    nr = n * r
    total = 0.0
    for m, k in modules:
        total += 2 * nr * nr * (m + k) * 10 / 16
        for side in (m, k):
            if side < nr:
                total += 2 * side * nr * nr + 2 * side * side * nr + 4 / 3 * side**3
            else:
                total += (1 / 3 + 1 + 4 / 3) * nr**3
    return total


def _scaling_plot(rows: list[dict], path: str, layers: int, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(n, [r["seconds"] for r in rows], "o-", label="warm")
    left.plot(n, [r["seconds_cold"] for r in rows], "s--", label="cold (compiles)")
    left.set(xlabel="adapters N", ylabel="seconds (whole process)", title="time")
    left.legend()
    right.plot(n, [r["rss_mb"] for r in rows], "o-", label="warm")
    right.plot(n, [r["rss_mb_cold"] for r in rows], "s--", label="cold (compiles)")
    right.legend()
    right.set(xlabel="adapters N", ylabel="peak RSS (MB)", title="memory")
    right.set_ylim(bottom=0)
    fig.suptitle(
        f"jsubspace analyze{what}, {3 * layers} Mistral-shaped LoRA modules, null + lineage"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _WORKER.value:
        print(json.dumps(worker(_WORKER.value, _POP.value)))
        return 0
    n, layers = _N.value, _LAYERS.value
    os.makedirs(_WORK.value, exist_ok=True)
    if _SCALING.value:
        path = _SCALING_PATH.value
        what = " ".join(["", *JSUBSPACE_FLAGS[path][1:]])
        if "_topk" in path:
            what += f" --rank={_RANK.value}"
        print(f"jsubspace analyze{what}, null + lineage; cold: first run compiles; warm: second")
        print(f"{'N':>5} {'s cold':>8} {'s warm':>8} {'RSS MB cold':>12} {'RSS MB warm':>12}")
        rows = []
        cache = os.path.join(_WORK.value, "xla_cache_scaling")
        shutil.rmtree(cache, ignore_errors=True)
        for value in (int(v) for v in _SCALING.value):
            pop = _population(value, layers)
            cold, cold_rss, _ = _timed(path, pop, cache=cache)
            seconds, rss, _ = _timed(path, pop, cache=cache)
            rows.append(
                {
                    "n": value,
                    "seconds": seconds,
                    "rss_mb": rss,
                    "seconds_cold": cold,
                    "rss_mb_cold": cold_rss,
                }
            )
            print(
                f"{value:>5} {cold:>8.1f} {seconds:>8.1f} {cold_rss:>12.0f} {rss:>12.0f}",
                flush=True,
            )
        name = "scaling" + path[len("jsubspace") : -len("_e2e")]
        with open(os.path.join(_WORK.value, f"{name}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        _scaling_plot(rows, os.path.join(_WORK.value, f"{name}.png"), layers, what)
        return 0
    pop = _population(n, layers)
    shapes = list(lora_modules(layers, 4096, 1024).values())
    n_modules = len(shapes)
    results = {}
    for path in _PATHS.value:
        repeats = 1 if path in ("numpy_dense", "sklearn_rsvd") else _REPEATS.value
        cache = None
        if path in JSUBSPACE_FLAGS:
            # The first run compiles (cold); later ones load the kernels from the persistent
            # compilation cache, as a user's second run on these shapes does. Both are reported.
            cache = os.path.join(_WORK.value, f"xla_cache_{path}")
            shutil.rmtree(cache, ignore_errors=True)
        runs = [_timed(path, pop, cache=cache) for _ in range(repeats)]
        warm = runs[1:] if cache and len(runs) > 1 else runs
        seconds = statistics.median(r[0] for r in warm)
        results[path] = {
            "seconds": seconds,
            "cold_seconds": runs[0][0] if cache else None,
            "rss_mb": max(r[1] for r in runs),
            "top": runs[0][2],
        }
        cold = f" (first run, compiling: {runs[0][0]:.1f} s)" if cache else ""
        print(
            f"  {path:<18} {seconds:8.1f} s  peak RSS {results[path]['rss_mb']:8.0f} MB{cold}",
            flush=True,
        )
    # Per-module times. The materialising paths ran one module on --dense_models adapters;
    # their cost (forming N updates, accumulating the Grams) grows linearly in N.
    per_module = {}
    for path, res in results.items():
        if path in ("numpy_dense", "sklearn_rsvd"):
            per_module[path] = res["seconds"] * n / _DENSE.value
        else:
            per_module[path] = res["seconds"] / n_modules
    # Same numbers: jsubspace on the materialising paths' subset, and the factor statistic.
    checks = {}
    if "numpy_dense" in results:
        import jsubspace

        subset = _adapters(pop)[: _DENSE.value]
        first = _modules(pop)[0]
        small = jsubspace.analyze(
            subset,
            os.path.join(_WORK.value, "out_check"),
            null_draws=0,
            holdout=None,
            plots=False,
            quiet=True,
            overwrite=True,
            include="^" + first.replace(".", r"\.") + "$",
        )
        ours = small["layers"][0]["modes"]
        theirs = results["numpy_dense"]["top"]
        checks["delta_vs_numpy"] = max(
            abs(a - b) / abs(theirs[mode][0])
            for mode in ("models", "rows", "cols")
            for a, b in zip(ours[mode]["eigenvalues"][:5], theirs[mode])
        )
    if "jsubspace_factors" in results and "paper" in results:
        ours, theirs = results["jsubspace_factors"]["top"], results["paper"]["top"]
        checks["factors_vs_paper"] = max(
            abs(a - b) / abs(theirs[mode][0])
            for mode in ("lora_A", "lora_B")
            for a, b in zip(ours[mode], theirs[mode])
        )
    # The top-k paths against the exact ones (and the paper's PCA) on the same first module.
    for fast, exact in (
        ("jsubspace_topk", "jsubspace"),
        ("jsubspace_factors_topk", "jsubspace_factors"),
        ("jsubspace_factors_topk", "paper"),
    ):
        if fast in results and exact in results:
            ours, theirs = results[fast]["top"], results[exact]["top"]
            checks[f"{fast}_vs_{exact}"] = max(
                abs(a - b) / abs(theirs[mode][0])
                for mode in theirs
                for a, b in zip(ours[mode], theirs[mode])
            )
    nbytes, read_seconds = _read_rate(pop)
    gemm = gemm_rate()
    flops = _flops(n, shapes)
    roofline = read_seconds + flops / gemm
    report = {
        "n": n,
        "layers": layers,
        "modules": n_modules,
        "results": results,
        "per_module_seconds": per_module,
        "checks": checks,
        "bytes": nbytes,
        "read_seconds": read_seconds,
        "gemm_flops_per_s": gemm,
        "kernel_flops": flops,
        "roofline_seconds": roofline,
    }
    with open(os.path.join(_WORK.value, f"lora_n{n}_l{layers}.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nN = {n} adapters, {n_modules} modules (rank 16, bf16); per module:")
    base = per_module.get("jsubspace")
    print(f"  {'path':<18} {'s/module':>10} {'x jsubspace':>12}")
    for path, t in per_module.items():
        ratio = t / base if base else float("nan")
        print(f"  {path:<18} {t:>10.3f} {ratio:>12.1f}")
    for ours in ("jsubspace_factors", "jsubspace_factors_topk"):
        if ours in per_module and "paper" in per_module:
            print(f"  paper recipe / {ours}: {per_module['paper'] / per_module[ours]:.1f}x")
    print(f"\nchecks (max difference of the top-5 eigenvalues, relative to the largest): {checks}")
    print(
        f"read once: {nbytes / 2**20:.0f} MB in {read_seconds:.2f} s; GEMM "
        f"{gemm / 1e9:.1f} GFLOP/s; kernel {flops / 1e9:.1f} GFLOP; roofline "
        f"{roofline:.1f} s; jsubspace {results.get('jsubspace', {}).get('seconds', 0):.1f} s "
        f"(achieved / roofline = "
        f"{results.get('jsubspace', {}).get('seconds', 0) / roofline:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
