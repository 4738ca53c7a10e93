"""The installed `jsubspace` command.

jsubspace analyze --models=PATH[,PATH...] --out=DIR [--include=REGEX] [--exclude=REGEX]
    [--center=mean|none|base] [--base=PATH] [--modes=models,rows,cols] [--rank=K]
    [--lora=delta|factors] [--lora_space=auto|factor|side] [--null_draws=R] [--holdout=loo|K]
    [--[no]split_half] [--seed=S] [--mesh=N]
jsubspace plan --models=PATH[,PATH...] [analyze's flags] [--json=FILE]
    per layer: route, solvers, memory and estimated time; nothing is computed (also: analyze
    --dry_run)
jsubspace demo --out=DIR      writes a population with known truth and analyses it
jsubspace compress --models=... --out=STORE (--k=K | --tau=T | --budget_bytes=B) [--kmax=K]
jsubspace reconstruct --store=STORE --out=DIR [--model=NAME|all] [--k=K] [--lora_rank=R]
jsubspace merge --models=... --base=PATH --out=FILE [--merge_method=mean|task_arithmetic|ties|
    dare_linear|dare_ties|subspace] [--weights=...] [--density=D] [--lambda=L] [--seed=S]
    [--store=STORE]   (the basis of a subspace merge)
"""

from __future__ import annotations

import contextlib
import os
import sys

from absl import app
from absl import flags

from jsubspace.cli._flags import config_from_flags
from jsubspace.cli._flags import define_config_flags

COMMANDS = ("analyze", "plan", "demo", "compress", "reconstruct", "merge")

_MODELS = flags.DEFINE_list(
    "models", None, "Model sources: dirs, globs, files, hf://ORG/NAME[@REV][/SUB] or @list files."
)
_OUT = flags.DEFINE_string("out", None, "Output directory.")
# Every option of the analysis (spectra, controls, run) is a flag generated from its typed
# configuration (`jsubspace.config`); the flags below are the commands' own.
_CONFIG = define_config_flags()
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a previous run in --out.")
_PLOTS = flags.DEFINE_bool("plots", True, "Write PNG plots and report.html.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "analyze: print the layer plan (routes, memory, estimated time) and stop."
)
_JSON = flags.DEFINE_string("json", None, "plan: also write the plan as JSON to this file.")
_STORE = flags.DEFINE_string("store", None, "A subspace store directory.")
_K = flags.DEFINE_integer("k", None, "Basis size per layer.")
_TAU = flags.DEFINE_float("tau", None, "Per layer: smallest k capturing this energy fraction.")
_BUDGET_BYTES = flags.DEFINE_integer("budget_bytes", None, "Total bytes of the store.")
_KMAX = flags.DEFINE_integer("kmax", 128, "Largest basis size considered.")
_MODEL = flags.DEFINE_string("model", "all", "Model to rebuild, or 'all'.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", None, "Rank of exported adapters.")
_METHOD_MERGE = flags.DEFINE_enum(
    "merge_method",
    "mean",
    ["mean", "task_arithmetic", "ties", "dare_linear", "dare_ties", "subspace"],
    "Merge method.",
)
_WEIGHTS = flags.DEFINE_list("weights", None, "Per-model weights (mergekit 'weight').")
_DENSITY = flags.DEFINE_float("density", None, "Kept fraction for TIES / DARE.")
_LAMBDA = flags.DEFINE_float("lambda", 1.0, "Scale of the merged task vector.")
_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "Split the CPU into this many JAX devices (testing)."
)
_COORD = flags.DEFINE_string(
    "coordinator_address", None, "jax.distributed coordinator host:port (multi-host runs)."
)
_NPROC = flags.DEFINE_integer("num_processes", None, "jax.distributed process count.")
_PID = flags.DEFINE_integer("process_id", None, "jax.distributed process id.")
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.path.join("~", ".cache", "jsubspace", "xla"),
    "Directory of JAX's persistent compilation cache ('none': off). A later run on layers of the "
    "same shapes loads the compiled kernels instead of compiling them again.",
)


def _setup_jax():
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # JAX's backend probing is not the user's business.

    if _CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    if _CACHE.value != "none" and not jax.config.jax_compilation_cache_dir:
        # Not when the user configured a cache of their own (JAX_COMPILATION_CACHE_DIR).
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
        # Our kernels compile in 0.1-1 s each; JAX only caches compilations over 1 s by default.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    if _COORD.value:
        from jsubspace import sharding

        sharding.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)


def _memory_budget() -> int | None:
    """`--memory_budget` in bytes (None: the default); a value <= 0 is a usage error."""
    gib = _CONFIG["memory_budget"].value
    if gib is None:
        return None
    if gib <= 0:
        raise app.UsageError(f"--memory_budget must be > 0 GiB, got {gib}")
    return int(float(gib) * 2**30)


def _options() -> dict:
    """The analysis options of the flags (`config=` the typed configuration), and the run's own
    flags. An invalid value is a usage error naming it."""
    try:
        config = config_from_flags(_CONFIG)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return dict(config=config, overwrite=_OVERWRITE.value, plots=_PLOTS.value, quiet=_QUIET.value)


def _plan(argv):
    del argv
    from jsubspace import spectra
    from jsubspace.io._atomic import atomic_write_json
    from jsubspace.report import plan_table
    from jsubspace.run import plan

    if not _MODELS.value:
        raise app.UsageError("plan needs --models")
    _setup_jax()
    options = _options()
    for key in ("overwrite", "plots"):
        options.pop(key)
    plans = plan(_MODELS.value, **options)
    total = spectra.plan_total(plans)
    records = [p.to_json() for p in plans]
    print(plan_table(records, total))
    if _JSON.value:
        rates = spectra.measure_rates()
        atomic_write_json(
            _JSON.value,
            {"layers": records, "total": total, "rates": rates.__dict__},
        )
        print(f"wrote {_JSON.value}")


def _analyze(argv):
    from jsubspace.report import verdict_table
    from jsubspace.run import analyze
    from jsubspace.spectra._cost import cost_line

    if not _MODELS.value or (not _OUT.value and not _DRY_RUN.value):
        raise app.UsageError("analyze needs --models and --out")
    if _DRY_RUN.value:
        return _plan(argv)
    del argv
    _setup_jax()
    result = analyze(_MODELS.value, _OUT.value, **_options())
    print(verdict_table(result))
    if line := cost_line(result.get("cost") or {}):
        print(line)
    extra = " and report.html" if _PLOTS.value else ""
    print(f"\nwrote {os.path.join(_OUT.value, 'spectra.json')}{extra}")


def _demo(argv):
    del argv
    from jsubspace.cli._demo import TRUTH
    from jsubspace.cli._demo import write_demo_population
    from jsubspace.report import middle_ellipsis
    from jsubspace.report import verdict_table
    from jsubspace.run import analyze

    out = _OUT.value or "demo_out"
    _setup_jax()
    print(f"writing the demo population (safetensors + PEFT adapters) under {out}/population")
    paths = write_demo_population(os.path.join(out, "population"))
    options = _options()
    options["overwrite"] = True
    for name, path in paths.items():
        report = os.path.join(out, f"{name}_report")
        print(f"\n== {name}: {path} -> {report}")
        result = analyze([path], report, **options)
        print(verdict_table(result))
        print("\nplanted truth beside the verdict:")
        for layer in result["layers"]:
            got, want = layer["verdict"]["label"], TRUTH.get(layer["name"])
            mark = "ok " if got == want else "!! "
            print(f"  {mark}{middle_ellipsis(layer['name'], 34):<34} planted: {want}; got: {got}")
    print(f"\nopen {out}/dense_report/report.html and {out}/adapters_report/report.html")


def _compress(argv):
    del argv
    from jsubspace.compress import fit_store

    if not _MODELS.value or not _OUT.value:
        raise app.UsageError("compress needs --models and --out")
    if _KMAX.value < 1:
        raise app.UsageError(f"--kmax must be >= 1, got {_KMAX.value}")
    if _BUDGET_BYTES.value is not None and _BUDGET_BYTES.value <= 0:
        raise app.UsageError(f"--budget_bytes must be > 0, got {_BUDGET_BYTES.value}")
    _setup_jax()
    from jsubspace.run import interruptible
    from jsubspace.run._progress import Progress

    with (
        interruptible(message=lambda: f"no store was written to {_OUT.value}"),
        contextlib.ExitStack() as shown,
    ):

        def fitting(stream, total, population):
            """Names each layer on stderr as its basis is fitted."""
            progress = shown.enter_context(Progress(total, what="layers", verb="fitting"))
            for item in stream:
                progress.starting(item[0].name)
                yield item
                progress.finished()

        store = fit_store(
            _MODELS.value,
            _OUT.value,
            k=_K.value,
            tau=_TAU.value,
            budget_bytes=_BUDGET_BYTES.value,
            kmax=_KMAX.value,
            include=_CONFIG["include"].value,
            exclude=_CONFIG["exclude"].value,
            memory_budget=_memory_budget(),
            progress=fitting,
        )
    from jsubspace.report import middle_ellipsis

    acc = store.accounting()
    print(f"{'layer':<40} {'k':>4} {'captured':>9} {'original':>12} {'store':>10} {'ratio':>7}")
    for name, e in acc["layers"].items():
        print(
            f"{middle_ellipsis(name, 40):<40} {e['k']:>4} {e['captured']:>9.4f} "
            f"{e['original_bytes']:>12} {e['total']:>10} {e['ratio']:>7.2f}"
        )
    short = [e for e in store.manifest["layers"] if e.get("tau_reached") is False]
    for e in short:
        print(
            f"note: {e['name']}: its largest basis (k = {e['k']}, the layer's limit) captures "
            f"{e['captured']:.4f}, below --tau={_TAU.value}; kept at k = {e['k']}"
        )
    kept = acc["kept"]
    print(
        f"{'untouched tensors':<40} {'':>4} {'':>9} {kept['original_bytes']:>12} "
        f"{kept['bytes']:>10}  ({kept['tensors']} kept, {kept['unique']} stored)"
    )
    print(f"{'headers and manifest':<40} {'':>4} {'':>9} {'':>12} {acc['overhead_bytes']:>10}")
    print(
        f"{'total':<40} {'':>4} {acc['captured']:>9.4f} {acc['original_bytes']:>12} "
        f"{acc['store_bytes']:>10} {acc['ratio']:>7.2f}"
    )
    print(
        f"\nwrote {_OUT.value}/store.safetensors, kept.safetensors and store.json: the store "
        "stands alone (reconstruct needs no source file)"
    )


def _reconstruct(argv):
    del argv
    from jsubspace.compress import SubspaceStore
    from jsubspace.compress import export_model
    from jsubspace.run import interruptible
    from jsubspace.run._progress import Progress

    if not _STORE.value or not _OUT.value:
        raise app.UsageError("reconstruct needs --store and --out")
    if _K.value is not None and _K.value < 0:
        raise app.UsageError(f"--k must be >= 0 (0: the centre alone), got {_K.value}")
    if _LORA_RANK.value is not None and _LORA_RANK.value < 1:
        raise app.UsageError(f"--lora_rank must be >= 1, got {_LORA_RANK.value}")
    store = SubspaceStore(_STORE.value)
    opts = dict(k=_K.value, rank=_LORA_RANK.value)
    models = store.models if _MODEL.value == "all" else [_MODEL.value]
    paths = []
    with (
        interruptible(message=lambda: f"{len(paths)} of {len(models)} models written"),
        Progress(len(models), what="models", verb="rebuilding", lead=True) as progress,
    ):
        for model in models:
            progress.starting(model)
            paths.append(export_model(store, model, _OUT.value, **opts))
            progress.finished()
    for path in paths:
        print(path)


def _merge(argv):
    del argv
    import jax

    from jsubspace import io
    from jsubspace.compress import SubspaceStore
    from jsubspace.run import interruptible
    from jsubspace.run._progress import Progress

    base_path = _CONFIG["base"].value
    if not _MODELS.value or not _OUT.value or not base_path:
        raise app.UsageError("merge needs --models, --base and --out")
    if _DENSITY.value is not None and not 0 < _DENSITY.value <= 1:
        raise app.UsageError(f"--density must be in (0, 1], got {_DENSITY.value}")
    _setup_jax()
    population = io.open_population(
        _MODELS.value, include=_CONFIG["include"].value, exclude=_CONFIG["exclude"].value
    )
    if base_path.startswith("hf://"):
        found = io.resolve_sources([base_path])
        if len(found) != 1:
            raise app.UsageError(f"--base={base_path} names {len(found)} models, not one")
        (base_path,) = found
    base = io.load_model(base_path)
    method = _METHOD_MERGE.value
    store = SubspaceStore(_STORE.value) if _STORE.value else None
    if method == "subspace" and store is None:
        raise app.UsageError("--merge_method=subspace needs --store (the basis)")
    key = jax.random.key(_CONFIG["seed"].value)
    tensors = {name: ref.read() for name, ref in base.tensors.items()}
    if any(layer.kind != "dense" for layer in population.layers):
        raise app.UsageError("merge works on full models; rebuild adapters first")
    if _WEIGHTS.value and len(_WEIGHTS.value) != len(population.models):
        raise app.UsageError(
            f"--weights: {len(_WEIGHTS.value)} given for {len(population.models)} models "
            "(one per model, in the population's order)"
        )
    try:
        [float(w) for w in _WEIGHTS.value or ()]
    except ValueError:
        raise app.UsageError(f"--weights must be numbers, got {','.join(_WEIGHTS.value)}") from None
    refs = io.base_refs(base_path, population.layers)
    progress = Progress(len(population.layers), what="layers", verb=f"merging ({method})")
    with interruptible(message=lambda: f"nothing was written to {_OUT.value}"), progress:
        for i, layer in enumerate(population.layers):
            progress.starting(layer.name)
            tensors[layer.name] = _merge_layer(
                layer, refs[layer.name], method, store, jax.random.fold_in(key, i)
            )
            progress.finished()
    io.write_safetensors(_OUT.value, tensors, {"format": "pt", "merge": method})
    print(f"wrote {_OUT.value} ({method} of {len(population.models)} models)")


def _merge_layer(layer, ref, method, store, key):
    """One layer of `merge`: the base's tensor and the models' merged."""
    import numpy as np

    from jsubspace.compress import merge

    stack = np.stack([r.read().reshape(layer.shape) for r in layer.refs])
    params = {}
    if method != "mean":
        if _WEIGHTS.value:
            params["weight"] = [float(w) for w in _WEIGHTS.value]
        params["lam"] = _LAMBDA.value
    if method in ("ties", "dare_linear", "dare_ties") and _DENSITY.value is not None:
        params["density"] = _DENSITY.value
    if method == "subspace":
        params.update(zip(("u", "v"), store.basis(layer.name)))
    merged = merge(method, ref.read().reshape(layer.shape), stack, key=key, **params)
    return np.asarray(merged).reshape(ref.shape).astype(ref.dtype)


def _errors_as_messages(main):
    def wrapped(argv):
        from jsubspace.errors import DistributedError
        from jsubspace.errors import Interrupted
        from jsubspace.errors import JsubspaceError

        try:
            main(argv)
        except Interrupted as e:
            # Every write has been finished or undone on the way here. The process ends at once:
            # a normal exit would wait for XLA computations still running (a long solve).
            print(f"\njsubspace: interrupted: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(e.exit_code)
        except KeyboardInterrupt:
            # Before the run's own handler is in place (reading headers, planning): nothing
            # has been written yet.
            print("\njsubspace: interrupted; nothing was written", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(130)
        except DistributedError as e:
            # The peer is gone: skip jax.distributed's exit barrier, which would wait for it
            # and then abort the process with a fatal log instead of this message.
            print(f"jsubspace: error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(3)
        except JsubspaceError as e:
            print(f"jsubspace: error: {e}", file=sys.stderr)
            sys.exit(2)
        except app.UsageError as e:
            # One style for every error, instead of absl's usage text (the module docstring).
            command = argv[0].split()[-1]
            print(
                f"jsubspace: error: {e} (`jsubspace {command} --help` lists the flags)",
                file=sys.stderr,
            )
            sys.exit(2)

    return wrapped


# What each command does, and the flags it reads (in the order its help lists them). The
# analysis flags come from the typed configuration (`jsubspace.config`).
_ANALYSIS = [holder.name for holder in _CONFIG.values()]
_RUNTIME = ["compilation_cache", "num_cpu_devices"]
_HOSTS = ["coordinator_address", "num_processes", "process_id"]
HELP = {
    "analyze": (
        "Mode-wise spectra of a population beside their controls (null, holdout, split half, "
        "lineage), a verdict card per layer, and a conclusion; writes --out/spectra.json, "
        "layers.csv, plots and report.html, resumable.",
        ["models", "out", *_ANALYSIS, "overwrite", "plots", "quiet", "dry_run", *_RUNTIME, *_HOSTS],
    ),
    "plan": (
        "Per layer: the route, the solvers of each mode and control, the memory and the "
        "estimated time, from headers only (nothing is computed).",
        ["models", *_ANALYSIS, "json", *_RUNTIME],
    ),
    "demo": (
        "Writes a population with planted truth (safetensors models and PEFT adapters) and "
        "analyses it, printing the planted truth beside each verdict.",
        ["out", *_ANALYSIS, "plots", "quiet", *_RUNTIME],
    ),
    "compress": (
        "Fits a per-layer basis and per-model coefficients: a subspace store in --out.",
        [
            "models",
            "out",
            "k",
            "tau",
            "budget_bytes",
            "kmax",
            "include",
            "exclude",
            "memory_budget",
            *_RUNTIME,
        ],
    ),
    "reconstruct": (
        "Rebuilds models (safetensors) or adapters (PEFT) from a subspace store.",
        ["store", "out", "model", "k", "lora_rank", *_RUNTIME],
    ),
    "merge": (
        "Merges task models fine-tuned from one base (mean, task arithmetic, TIES, DARE, "
        "subspace) into one safetensors file.",
        [
            "models",
            "base",
            "out",
            "merge_method",
            "weights",
            "density",
            "lambda",
            "seed",
            "store",
            "include",
            "exclude",
            *_RUNTIME,
        ],
    ),
}


def command_help(command: str) -> str:
    """`jsubspace COMMAND --help`: what the command does and each of its flags."""
    import textwrap

    what, names = HELP[command]
    lines = [f"usage: jsubspace {command} --flag=value ...", "", textwrap.fill(what, 78), ""]
    for name in names:
        flag = flags.FLAGS[name]
        choices = getattr(flag.parser, "enum_values", None)
        text = flag.help
        if choices:  # absl puts the choices in front of the help; they are on the flag's line
            text = text.removeprefix(f"<{'|'.join(choices)}>: ")
        spelled = f"--[no]{name}" if flag.boolean else f"--{name}"
        if choices:
            spelled += f"={'|'.join(choices)}"
        default = (flag.default_as_str or "none").strip("'")
        lines.append(f"  {spelled}  (default: {default})")
        lines += textwrap.wrap(text, 74, initial_indent="      ", subsequent_indent="      ")
    lines += ["", "jsubspace --help lists the commands."]
    return "\n".join(lines)


def run() -> None:
    """Entry point: `jsubspace COMMAND --flags`."""
    argv = sys.argv
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(__doc__)
        print(f"commands: {', '.join(COMMANDS)}; `jsubspace COMMAND --help` for one")
        sys.exit(0 if len(argv) >= 2 else 2)
    if argv[1] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(argv[1], COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(
            f"jsubspace: error: unknown command {argv[1]!r}{hint}; commands: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        sys.exit(2)
    command = argv[1]
    if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[2:]):
        print(command_help(command))
        sys.exit(0)
    if any(a.startswith("--coordinator_address") for a in argv) and not os.environ.get(_SUPERVISED):
        sys.exit(_supervise(argv))
    main = {
        "analyze": _analyze,
        "plan": _plan,
        "demo": _demo,
        "compress": _compress,
        "reconstruct": _reconstruct,
        "merge": _merge,
    }[command]
    app.run(
        _errors_as_messages(main),
        argv=[f"jsubspace {command}"] + argv[2:],
        flags_parser=lambda args: _parse_flags(command, args),
    )


def _parse_flags(command: str, argv: list[str]) -> list[str]:
    """absl's flag parsing, with its errors in the one `jsubspace: error:` style (exit 2)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(
            f"jsubspace: error: {e} (`jsubspace {command} --help` lists the flags)",
            file=sys.stderr,
        )
        sys.exit(2)


_SUPERVISED = "JSUBSPACE_SUPERVISED"


def _die_with_parent() -> None:
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _supervise(argv) -> int:
    """Runs a multi-host command in a child process and explains how it ended.

    When a peer host dies, JAX's coordination service may abort this process from a background
    thread before Python can say anything; the supervisor turns that into one clear message.
    """
    import subprocess

    env = dict(os.environ, **{_SUPERVISED: "1"})
    child = subprocess.Popen(
        [sys.executable, "-m", "jsubspace.cli.main", *argv[1:]],
        env=env,
        preexec_fn=_die_with_parent,
    )
    try:
        code = child.wait()
    except KeyboardInterrupt:
        child.terminate()
        code = child.wait()
    if code < 0 or code == 134:
        print(
            f"jsubspace: error: this process (of a multi-host run) was stopped by JAX's "
            f"distributed runtime (exit {code}): another process probably died. Finished layers "
            "are kept in --out/layers; restart every process to resume",
            file=sys.stderr,
        )
        return 3
    return code


if __name__ == "__main__":
    run()
