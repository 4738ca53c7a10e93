r"""Pod scale on paper, and the paper checked against a local multi-process run.

The model of one dense layer's analysis on a mesh of H hosts x d devices (D = H d; the models
axis sharded over all of them, `N_pad / D` models per device), at per-device rates
(`spectra.MachineRates`: GEMM, eigh, memory-bound passes, Gaussian draws, per-call overhead)
plus a per-host read rate and network bandwidth. Everything the layer plan counts
(`spectra._plan.estimated_flops`, `memory_passes`, `working_set`) is reused; what the plan
does not know, the mesh, is added here:

  sharded      matrix products over the stack and memory-bound passes: divided by D
  replicated   eigen-solves of the `side x side` / `N x N` matrices: every device solves them
  read         the host's `N_pad / H` models' bytes of the layer, at the host's read rate
  holdout      the held-out models and their centring models, routed in blocks of p / D to
               one device each for the captures (`held_captures` on a mesh: a psum per block,
               2 x the largest fold's models in float32 all-reduced per fold), in the working
               set and the collectives
  collectives  per host, crossing its network link:
               - the models Gram (`kernels.sharded_cross_gram`): an all-to-all of the host's
                 models and an all-reduce of the N x N Gram (a ring would pass D - 1 shards
                 through every host's link: the whole stack, per Gram);
               - the means (`m x n`), side Grams (`side^2`) and randomized products
                 (`side x l` per Krylov step) by all-reduce: 2 (H - 1) / H of their bytes;
               at the link's bandwidth, plus a latency per collective.

Modes:
  --mode=predict   the per-host table for --population (default 500 LLaMA-3-8B models, bf16)
                   on --hosts x --devices_per_host at --rates (a `device_check.py` JSON's
                   `plan_rates`, a named preset, or 'measure': this machine's).
  --mode=validate  writes a scaled-down dense population (GPT-2-small block shapes, --n models,
                   --blocks blocks, float32), runs the default `jsubspace analyze` on it as one
                   process and as --processes local `jax.distributed` processes (one CPU device
                   each, gloo collectives), and prints predicted against measured. The processes
                   share this machine's cores, so each is given 1/P of the measured rates (and
                   of the read rate); the network is the loopback, measured as a gloo all-reduce
                   in the same run.

Run:
    python benchmarks/scale.py --mode=predict                           # 500 LLaMA-3-8B, H100 pod
    python benchmarks/scale.py --mode=predict --rates=device_check.json --hosts=64
    python benchmarks/scale.py --mode=validate --processes=4 --workdir=/tmp/bench_scale
Results (validate): benchmarks/results/scale_validate_p<P>_cpu_<cores>core.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

_MODE = flags.DEFINE_enum("mode", "predict", ["predict", "validate"], "What to do.")
_POP = flags.DEFINE_enum(
    "population", "llama3_8b", ["llama3_8b", "gpt2"], "predict: the population's shapes."
)
_N = flags.DEFINE_integer("n", None, "Models (default: 500 for predict, 16 for validate).")
_HOSTS = flags.DEFINE_integer("hosts", 64, "predict: hosts.")
_DEVICES = flags.DEFINE_integer("devices_per_host", 8, "predict: devices per host.")
_RATES = flags.DEFINE_string(
    "rates",
    "h100",
    "predict: 'h100' or 'tpu_v5p' (datasheet presets, see RATE_PRESETS), 'measure' (this "
    "machine), or a device_check.py JSON file (its plan_rates).",
)
_READ = flags.DEFINE_float("read_gbps", 2.0, "predict: per-host read rate, GB/s.")
_NET = flags.DEFINE_float("net_gbps", 50.0, "predict: per-host network bandwidth, GB/s.")
_LATENCY = flags.DEFINE_float("latency_us", 50.0, "predict: per-collective latency, us.")
_PROCESSES = flags.DEFINE_integer("processes", 4, "validate: local processes.")
_BLOCKS = flags.DEFINE_integer("blocks", 2, "validate: GPT-2 blocks in the population.")
_WORK = flags.DEFINE_string("workdir", None, "validate: scratch (default: a temporary one).")
_TIMEOUT = flags.DEFINE_float("timeout", 1800.0, "validate: seconds allowed to each run.")
_RESULTS = flags.DEFINE_string("results_dir", None, "validate: where the JSON goes.")

_HERE = os.path.dirname(os.path.abspath(__file__))

# Per-device rates from vendors' datasheets, derated to what dense kernels reach (the factor
# after each figure); eigh, draws and overhead are assumptions (device_check.py has run on one
# H200 only, for part of its stages: results/device_check_h200_2026-12-04_partial.json).
# H100 SXM: 67 TFLOP/s FP32 without tensor cores (`precision=HIGHEST` is full float32), HBM3
# 3.35 TB/s. TPU v5p: 459 TFLOP/s bf16, HBM 2.76 TB/s; float32 at HIGHEST runs as 6 bf16 passes.
RATE_PRESETS = {
    "h100": dict(gemm=67e12 * 0.7, eigh=1.0e12, stream=3.35e12 / 8 * 0.7, draw=1e11, overhead=1e-4),
    "tpu_v5p": dict(
        gemm=459e12 / 6 * 0.7, eigh=0.5e12, stream=2.76e12 / 8 * 0.7, draw=1e11, overhead=1e-4
    ),
}


def llama3_8b_shapes() -> dict[str, tuple[int, int]]:
    """The matrices of LLaMA-3-8B (HF names, stored out x in; norms are vectors, left out)."""
    shapes = {"model.embed_tokens.weight": (128256, 4096), "lm_head.weight": (128256, 4096)}
    for i in range(32):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (4096, 4096),
            p + "self_attn.k_proj.weight": (1024, 4096),
            p + "self_attn.v_proj.weight": (1024, 4096),
            p + "self_attn.o_proj.weight": (4096, 4096),
            p + "mlp.gate_proj.weight": (14336, 4096),
            p + "mlp.up_proj.weight": (14336, 4096),
            p + "mlp.down_proj.weight": (4096, 14336),
        }
    return shapes


def gpt2_shapes(blocks: int, *, embeddings: bool = True) -> dict[str, tuple[int, int]]:
    """GPT-2 small's matrices (HF Conv1D layout, in x out); without `wte` / `wpe` if asked."""
    shapes = {"wte.weight": (50257, 768), "wpe.weight": (1024, 768)} if embeddings else {}
    for i in range(blocks):
        shapes |= {
            f"h.{i}.attn.c_attn.weight": (768, 2304),
            f"h.{i}.attn.c_proj.weight": (768, 768),
            f"h.{i}.mlp.c_fc.weight": (768, 3072),
            f"h.{i}.mlp.c_proj.weight": (3072, 768),
        }
    return shapes


@dataclasses.dataclass(frozen=True)
class Mesh:
    hosts: int
    devices_per_host: int
    read: float  # bytes/s per host
    net: float  # bytes/s per host
    latency: float  # seconds per collective

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host


@dataclasses.dataclass(frozen=True)
class _Layer:
    """What `spectra._plan.working_set` reads of an `io.Layer`."""

    name: str
    shape: tuple[int, int]
    dtype: str
    refs: tuple
    kind: str = "dense"


def predict_layer(name, shape, n_models, dtype, mesh: Mesh, rates, spectra_config, controls):
    """Per-host prediction for one dense layer: seconds by part and by kind of cost, bytes
    read, working set per device, Gram sizes and collective bytes."""
    import jax.numpy as jnp

    from jsubspace.spectra import _plan

    m, n = shape
    d_total = mesh.devices
    n_pad = -(-n_models // d_total) * d_total
    per_device = n_pad // d_total
    itemsize = jnp.dtype(dtype).itemsize
    solvers = _plan.dense_mode_solvers(n_models, m, n, spectra_config)
    planned = _plan.control_plan(n_models, m, n, controls, factored=False, config=spectra_config)
    flops = _plan.estimated_flops(
        "dense", n_models, m, n, None, spectra_config, solvers, planned, route="dense"
    )
    passes = _plan.memory_passes(
        "dense", solvers, planned, control_steps=spectra_config.iterations + 1
    )
    used = [planned[c]["bases"] for c in ("holdout", "split_half") if "bases" in planned[c]]
    layer = _Layer(name, (m, n), dtype, tuple(range(n_models)))
    whole = _plan.working_set(layer, n_pad, spectra_config, bases=used)
    stack_factor = 2 * itemsize + 12  # `working_set`'s bytes per stack entry
    working = whole - n_pad * m * n * stack_factor + per_device * m * n * stack_factor
    # The holdout's captures (`spectra._holdout.held_captures`): on a mesh, blocks of
    # `s = ceil(p / D)` held-out models and their centring models go to one device each, by a
    # psum per block (`_spread_captures`: about six s-model float32 buffers per device); the
    # psums carry both sets once over: `2 p m n` floats all-reduced per fold.
    held = planned["holdout"].get("largest", 0) if "folds" in planned["holdout"] else 0
    gathered = 2 * held * m * n * 4
    working += 6 * -(-held // d_total) * m * n * 4 if d_total > 1 else 0

    # Collectives: (bytes, count) per part, of the all-reduced results and the cross-Grams.
    side = {"rows": m, "cols": n}
    width = spectra_config.rank + 10
    steps = spectra_config.iterations + 1
    mean = 4.0 * m * n

    def spectra_bytes():
        total, count = mean, 1
        for mode, solver in solvers.items():
            if mode == "models":
                continue
            if solver == "randomized":
                total += steps * 4.0 * side[mode] * width
                count += steps
            elif solver == "exact":
                total += 4.0 * side[mode] ** 2
                count += 1
            # exact-dual: a cross-Gram, counted with the models Gram (`cross_gram_bytes`)
        return total, count

    def bases_bytes(bases, k, sets):
        total, count = 0.0, 0
        for mode, solver in bases.items():
            if solver == "exact":
                total += 4.0 * side[mode] ** 2
                count += 1
            else:
                total += steps * 4.0 * side[mode] * (k + 10)
                count += steps
        return sets * (total + 2 * mean), sets * (count + 2)

    def cross_gram_bytes(p, q):
        """Per host, across its link: the models-sharded cross-Gram of `kernels.
        sharded_cross_gram`, by the collective that kernel picks."""
        if d_total == 1 or mesh.hosts == 1:
            return 0.0
        ring = (d_total - 1) * per_device * p * q
        exchange = (d_total - 1) / d_total * (per_device * p * q + 2 * (n_pad * q) ** 2)
        if exchange < ring:  # all_to_all of the host's models, all-reduce of the Gram
            share = (mesh.hosts - 1) / mesh.hosts
            return 4.0 * share * (n_pad // mesh.hosts * p * q + 2 * (n_pad * q) ** 2)
        return 4.0 * ring  # one shard crosses the host's link per ring step

    duals = [mo for mo, s in solvers.items() if s == "exact-dual"]
    grams = cross_gram_bytes(m * n, 1)
    grams += sum(cross_gram_bytes(side[mo], m + n - side[mo]) for mo in duals)
    draws = planned["null"].get("draws", 0)
    rings = {"spectra": grams, "null": draws * grams}
    reduce = {part: (0.0, 0) for part in _plan.PARTS}
    reduce["spectra"] = spectra_bytes()
    b, c = spectra_bytes()
    reduce["null"] = (draws * b, draws * c)
    if "bases" in planned["holdout"]:
        h = planned["holdout"]
        b, c = bases_bytes(h["bases"], h["kmax"], h["folds"])
        reduce["holdout"] = (b + h["folds"] * gathered, c + h["folds"])
    if "bases" in planned["split_half"]:
        s = planned["split_half"]
        reduce["compare"] = bases_bytes(s["bases"], s["k"], 2)
    allreduce = 2.0 * (mesh.hosts - 1) / mesh.hosts

    calls = {
        "spectra": 1 + len(solvers),
        "lineage": 0,
        "null": len(solvers) * draws,
        "holdout": 2 * planned["holdout"].get("folds", 0),
        "compare": 4 * ("bases" in planned["split_half"]),
    }
    entries = per_device * m * n
    parts, kinds = {}, {"compute": 0.0, "eigh": 0.0, "memory": 0.0, "read": 0.0, "network": 0.0}
    collective = 0.0
    for part in _plan.PARTS:
        gemm, eigh = flops[part]
        stream, drawn = passes[part]
        compute = gemm / d_total / rates.gemm + calls[part] * rates.overhead
        solve = eigh / rates.eigh
        memory = entries * (stream / rates.stream + drawn / rates.draw)
        moved = rings.get(part, 0.0)
        nbytes, count = reduce[part]
        moved += allreduce * nbytes if mesh.hosts > 1 else 0.0
        count += (1 + draws) * (part in rings)
        network = moved / mesh.net + count * mesh.latency * (mesh.hosts > 1)
        collective += moved
        parts[part] = compute + solve + memory + network
        kinds["compute"] += compute
        kinds["eigh"] += solve
        kinds["memory"] += memory
        kinds["network"] += network
    read = n_pad // mesh.hosts * m * n * itemsize
    kinds["read"] = read / mesh.read
    parts["spectra"] += kinds["read"]
    exact = sorted(
        {side[mo] for mo, s in solvers.items() if s == "exact" and mo in side}
        | {side[mo] for u in used for mo, s in u.items() if s == "exact"}
    )
    return {
        "name": name,
        "shape": [m, n],
        "solvers": solvers,
        "seconds": sum(parts.values()),
        "parts": parts,
        "kinds": kinds,
        "read_bytes_per_host": read,
        "working_set_per_device": working,
        "exact_grams": exact,
        "models_gram": n_pad,
        "collective_bytes_per_host": collective,
    }


def predict(shapes, n_models, dtype, mesh, rates, spectra_config=None, controls=None) -> dict:
    from jsubspace import config as jconfig

    spectra_config = spectra_config or jconfig.SpectraConfig()
    controls = controls or jconfig.ControlConfig()
    layers = [
        predict_layer(name, shape, n_models, dtype, mesh, rates, spectra_config, controls)
        for name, shape in shapes.items()
    ]
    total = {
        "seconds": sum(la["seconds"] for la in layers),
        "read_bytes_per_host": sum(la["read_bytes_per_host"] for la in layers),
        "collective_bytes_per_host": sum(la["collective_bytes_per_host"] for la in layers),
        "working_set_per_device": max(la["working_set_per_device"] for la in layers),
        "kinds": {k: sum(la["kinds"][k] for la in layers) for k in layers[0]["kinds"]},
        "parts": {p: sum(la["parts"][p] for la in layers) for p in layers[0]["parts"]},
    }
    return {"layers": layers, "total": total}


def _rates(spec: str):
    from jsubspace import spectra

    if spec == "measure":
        return spectra.measure_rates()
    if spec in RATE_PRESETS:
        return spectra.MachineRates(**RATE_PRESETS[spec])
    with open(spec) as f:
        return spectra.MachineRates(**json.load(f)["plan_rates"])


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f}"


def print_prediction(found: dict, *, group) -> None:
    """One row per kind of layer (layers of one shape and group give the same figures)."""
    rows: dict[tuple, list] = {}
    for la in found["layers"]:
        rows.setdefault((group(la["name"]), tuple(la["shape"])), []).append(la)
    print(
        f"{'layers':<26} {'count':>5} {'read GB/host':>12} {'work GB/dev':>11} "
        f"{'exact Grams':>12} {'coll GB/host':>12} {'s each':>8}  solvers"
    )
    for (label, shape), group_layers in rows.items():
        la = group_layers[0]
        grams = "+".join(f"{s}^2" for s in la["exact_grams"]) or "-"
        solvers = " ".join(f"{k}:{v}" for k, v in la["solvers"].items())
        print(
            f"{label + ' ' + 'x'.join(map(str, shape)):<26} {len(group_layers):>5} "
            f"{_gb(la['read_bytes_per_host']):>12} {_gb(la['working_set_per_device']):>11} "
            f"{grams:>12} {_gb(la['collective_bytes_per_host']):>12} {la['seconds']:>8.2f}  "
            f"{solvers}"
        )
    t = found["total"]
    kinds = ", ".join(f"{k} {v:.0f} s" for k, v in t["kinds"].items())
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in t["parts"].items())
    print(
        f"total: {t['seconds']:.0f} s ({t['seconds'] / 60:.1f} min); read "
        f"{_gb(t['read_bytes_per_host'])} GB and network {_gb(t['collective_bytes_per_host'])} GB "
        f"per host; largest working set {_gb(t['working_set_per_device'])} GB per device\n"
        f"  by kind: {kinds}\n  by part: {parts}"
    )


def _group(name: str) -> str:
    parts = name.split(".")
    return ".".join(p for p in parts if not p.isdigit() and p not in ("model", "layers", "h"))


# --- validate ------------------------------------------------------------------------------


def _write_population(directory: str, n: int, blocks: int) -> None:
    from safetensors.numpy import save_file

    shapes = gpt2_shapes(blocks, embeddings=False)
    rng = np.random.default_rng(0)
    shared = {k: 0.02 * rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    for i in range(n):
        noise = np.random.default_rng([0, i + 1])
        tensors = {
            k: base + 0.002 * noise.standard_normal(base.shape, dtype=np.float32)
            for k, base in shared.items()
        }
        save_file(tensors, os.path.join(directory, f"model_{i:03d}.safetensors"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _analyze(population: str, out: str, processes: int) -> dict:
    """`jsubspace analyze` with the defaults, as `processes` local processes; process 0's
    wall time and the run's own per-part seconds."""
    base = [
        sys.executable,
        "-m",
        "jsubspace.cli.main",
        "analyze",
        f"--models={population}",
        f"--out={out}",
        "--overwrite",
        "--noplots",
    ]
    port = _free_port()
    commands = [base + ["--num_cpu_devices=1"]]
    if processes > 1:
        commands = [
            base
            + [
                "--num_cpu_devices=1",
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={processes}",
                f"--process_id={pid}",
            ]
            for pid in range(processes)
        ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for c in commands
    ]
    for p in procs:
        try:
            out_text, _ = p.communicate(timeout=_TIMEOUT.value)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"analyze with {processes} processes timed out") from None
        if p.returncode != 0:
            raise RuntimeError(f"analyze with {processes} processes failed:\n{out_text[-3000:]}")
    wall = time.perf_counter() - start
    with open(os.path.join(out, "spectra.json")) as f:
        result = json.load(f)
    seconds = result["cost"]["seconds"]
    return {"wall": wall, "in_run": sum(seconds.values()), "parts": seconds}


def _loopback_allreduce(processes: int) -> dict:
    """Bandwidth and latency of a gloo all-reduce among `processes` local processes (float32,
    64 MB and 4 bytes), measured by the processes themselves."""
    code = r"""
import sys, time, json
import jax
from jsubspace import sharding
sharding.initialize_distributed(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
mesh = Mesh(np.array(jax.devices()), ("m",))
def timed(size):
    local = jnp.ones((1, size), jnp.float32)
    x = jax.make_array_from_single_device_arrays(
        (len(jax.devices()), size), NamedSharding(mesh, P("m")), [local])
    f = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=NamedSharding(mesh, P()))
    f(x).block_until_ready()
    t = []
    for _ in range(5):
        s = time.perf_counter(); f(x).block_until_ready(); t.append(time.perf_counter() - s)
    return min(t)
big, small = timed(2**24), timed(1)
if jax.process_index() == 0:
    print(json.dumps({"big": big, "small": small}))
"""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, f"127.0.0.1:{port}", str(processes), str(pid)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for pid in range(processes)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    found = json.loads(outs[0].strip().splitlines()[-1])
    nbytes = 4.0 * 2**24
    # An all-reduce moves 2 (P-1)/P of the bytes through each process.
    moved = 2.0 * (processes - 1) / processes * nbytes
    return {
        "bandwidth": moved / max(found["big"] - found["small"], 1e-9),
        "latency": found["small"],
        "seconds_64mb": found["big"],
    }


_CONTENDED = r"""
import json, sys, time
from jsubspace.spectra._plan import rate_kernels
start, seconds = float(sys.argv[1]), float(sys.argv[2])
work = rate_kernels()  # `spectra.measure_rates`' kernels
for fn, arg, _ in work.values():
    fn(arg).block_until_ready()
out = {}
for i, (name, (fn, arg, units)) in enumerate(work.items()):
    begin = start + i * (seconds + 0.5)
    while time.time() < begin:
        time.sleep(0.005)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(arg).block_until_ready()
        count += 1
    out[name] = units * count / (time.perf_counter() - t0)
print(json.dumps(out))
"""


def contended_rates(processes: int, seconds: float = 2.0):
    """`spectra.measure_rates`' kernels timed in `processes` processes at once (each kernel run
    for `seconds` in every process from a common start): the rate one process gets while the
    others compete for the same cores, the median over the processes."""
    from jsubspace import spectra

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    start = time.time() + 8.0  # after every process has started and compiled
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDED, str(start), str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for _ in range(processes)
    ]
    found = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    median = {k: float(np.median([f[k] for f in found])) for k in found[0]}
    return spectra.MachineRates(**median)


def validate() -> dict:
    from jsubspace import spectra

    n = _N.value or 16
    processes = _PROCESSES.value
    cores = os.cpu_count() or 1
    scratch = _WORK.value or tempfile.mkdtemp(prefix="jsubspace_scale_")
    population = os.path.join(scratch, f"gpt2_blocks{_BLOCKS.value}_n{n}")
    if not os.path.exists(os.path.join(population, "done")):
        shutil.rmtree(population, ignore_errors=True)
        os.makedirs(population)
        _write_population(population, n, _BLOCKS.value)
        open(os.path.join(population, "done"), "w").close()
    shapes = gpt2_shapes(_BLOCKS.value, embeddings=False)
    rates = spectra.measure_rates()
    read = 1.0e9  # the plan's page-cache read rate (`MachineRates.read`)
    net = _loopback_allreduce(processes)
    print(
        f"rates (one process): gemm {rates.gemm / 1e9:.0f} GFLOP/s, eigh {rates.eigh / 1e9:.0f}, "
        f"stream {rates.stream / 1e6:.0f} M/s; gloo loopback all-reduce "
        f"{net['bandwidth'] / 1e9:.2f} GB/s, latency {net['latency'] * 1e3:.2f} ms"
    )
    record = {"n": n, "blocks": _BLOCKS.value, "rates": rates.__dict__, "loopback": net}
    for p in (1, processes):
        # The rates each of the p processes gets while all of them compute on these cores.
        share = contended_rates(p) if p > 1 else rates
        print(
            f"rates per process with {p} competing: gemm {share.gemm / 1e9:.0f} GFLOP/s, eigh "
            f"{share.eigh / 1e9:.0f}, stream {share.stream / 1e6:.0f} M/s, draw "
            f"{share.draw / 1e6:.0f} M/s (1/{p} of one process: "
            f"{rates.gemm / p / 1e9:.0f}, {rates.eigh / p / 1e9:.0f}, "
            f"{rates.stream / p / 1e6:.0f}, {rates.draw / p / 1e6:.0f})"
        )
        record[f"rates_p{p}"] = share.__dict__
        mesh = Mesh(
            hosts=p,
            devices_per_host=1,
            read=read / p,
            net=net["bandwidth"],
            latency=net["latency"],
        )
        predicted = predict(shapes, n, "float32", mesh, share)
        measured = _analyze(population, os.path.join(scratch, f"out_p{p}"), p)
        ratio = measured["in_run"] / predicted["total"]["seconds"]
        record[f"p{p}"] = {
            "predicted": predicted["total"],
            "measured": measured,
            "measured_over_predicted": ratio,
        }
        print(
            f"{p} process{'es' if p > 1 else ''}: predicted {predicted['total']['seconds']:.1f} s, "
            f"measured {measured['in_run']:.1f} s in the run ({measured['wall']:.1f} s whole "
            f"process), measured / predicted {ratio:.2f}"
        )
        print(
            "  predicted by part: "
            + ", ".join(f"{k} {v:.1f}" for k, v in predicted["total"]["parts"].items())
        )
        found = measured["parts"]
        print("  measured by part:  " + ", ".join(f"{k} {v:.1f}" for k, v in found.items()))
    record["cores"] = cores
    record["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    record["within_2x"] = all(
        0.5 <= record[f"p{p}"]["measured_over_predicted"] <= 2.0 for p in (1, processes)
    )
    results = _RESULTS.value or os.path.join(_HERE, "results")
    os.makedirs(results, exist_ok=True)
    path = os.path.join(results, f"scale_validate_p{processes}_cpu_{cores}core.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"within 2x: {record['within_2x']}; wrote {path}")
    if not _WORK.value:
        shutil.rmtree(scratch, ignore_errors=True)
    return record


def main(argv):
    del argv
    if _MODE.value == "validate":
        validate()
        return 0
    n = _N.value or 500
    shapes = llama3_8b_shapes() if _POP.value == "llama3_8b" else gpt2_shapes(12)
    dtype = "bfloat16"
    rates = _rates(_RATES.value)
    mesh = Mesh(
        hosts=_HOSTS.value,
        devices_per_host=_DEVICES.value,
        read=_READ.value * 1e9,
        net=_NET.value * 1e9,
        latency=_LATENCY.value * 1e-6,
    )
    print(
        f"{n} x {_POP.value} ({dtype}) on {mesh.hosts} hosts x {mesh.devices_per_host} devices; "
        f"rates {_RATES.value}: gemm {rates.gemm / 1e12:.1f} TFLOP/s, eigh "
        f"{rates.eigh / 1e12:.2f}, stream {rates.stream / 1e9:.0f} G entries/s per device; "
        f"read {_READ.value} GB/s, network {_NET.value} GB/s per host"
    )
    found = predict(shapes, n, dtype, mesh, rates)
    print_prediction(found, group=_group)
    return 0


if __name__ == "__main__":
    app.run(main)
