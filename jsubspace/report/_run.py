"""`analyze`: a population in, `spectra.json` + csv + plots + report out, resumable.

The output directory (lock, resume, atomic records) is `RunDirectory`'s business. Layer keys are
derived from the seed and the layer index, so a resumed run gives the same numbers as an
uninterrupted one. A layer whose working set exceeds the memory budget is refused before any
byte is read, and a failed peer process ends a multi-host run with a clear message.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from jsubspace import io
from jsubspace import kernels
from jsubspace import sharding
from jsubspace import spectra
from jsubspace.errors import CheckpointError
from jsubspace.errors import JsubspaceError
from jsubspace.errors import PopulationError
from jsubspace.report._atomic import atomic_write_text
from jsubspace.report._atomic import compact_json
from jsubspace.report._atomic import plain
from jsubspace.report._outputs import write_csv
from jsubspace.report._outputs import write_plots
from jsubspace.report._outputs import write_report_html
from jsubspace.report._rundir import OutputError
from jsubspace.report._rundir import RunDirectory

SPECTRA_VERSION = "1"


class DistributedError(JsubspaceError):
    """A process of a multi-host run failed; the survivors stop instead of hanging."""


def _git_revision() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_manifest(config: dict, mesh, population: io.Population) -> dict:
    """Versions, devices, mesh, dtypes and revision of a run, for `manifest.json`."""
    import flax
    import jaxlib

    from jsubspace import __version__

    return {
        "jsubspace": __version__,
        "git_revision": _git_revision(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "mesh": {"axis": sharding.MODELS, "size": int(mesh.devices.size)},
        "dtypes": sorted({str(np.dtype(layer.dtype)) for layer in population.layers}),
        "config": config,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _progress(i: int, total: int, name: str, seconds: float, *, quiet: bool) -> None:
    if quiet or jax.process_index() != 0:
        return
    width = 24
    done = int(width * i / total)
    bar = "#" * done + "." * (width - done)
    print(
        f"\r[{bar}] {i}/{total} layers  {seconds:6.1f}s  {name[:60]:<60}",
        end="",
        file=sys.stderr,
        flush=True,
    )
    if i == total:
        print(file=sys.stderr, flush=True)


def _load_base(path: str, population: io.Population) -> dict[str, io.TensorRef]:
    """The base model's tensor of every layer (for `center='base'`); headers only."""
    base = io.load_model(path)
    refs = {}
    for layer in population.layers:
        ref = base.tensors.get(layer.name)
        if ref is None or math.prod(ref.shape) != layer.shape[0] * layer.shape[1]:
            raise CheckpointError(
                path, f"base model lacks layer {layer.name!r} of shape {list(layer.shape)}"
            )
        refs[layer.name] = ref
    return refs


def analyze(
    models: str | Sequence[str],
    out: str,
    *,
    include: str | None = None,
    exclude: str | None = None,
    center: str = "mean",
    base: str | None = None,
    modes: Sequence[str] = ("models", "rows", "cols"),
    rank: int = 64,
    method: str = "auto",
    lora: str = "delta",
    null_draws: int = 3,
    holdout: str | int | None = 5,
    seed: int = 0,
    skip_mismatched: bool = False,
    compare_to: str | Sequence[str] | None = None,
    num_devices: int | None = None,
    overwrite: bool = False,
    plots: bool = True,
    quiet: bool = False,
    memory_budget: int | None = None,
    lora_space: str = "auto",
    split_half: bool = True,
) -> dict:
    """Mode-wise spectra of a population beside their controls; writes `out/` and returns
    the `spectra.json` dict.

    Args:
        models: sources (see `io.resolve_sources`).
        out: output directory (created).
        include, exclude: layer-name regexes.
        center: 'mean', 'none' or 'base' (needs `base`).
        base: path of the base model for `center='base'`.
        modes: spectra to compute.
        rank: eigenvalues computed by randomized solvers (exact solvers give all).
        method: 'auto', 'exact' or 'randomized' (rows / cols modes, and the LoRA factor PCA;
            see `spectra.SpectraConfig.method`).
        lora: 'delta' or 'factors' for PEFT populations.
        null_draws: Gaussian null draws per layer.
        holdout: 'loo', K (folds) or None.
        seed: seeds every random draw.
        skip_mismatched: skip layers the models disagree on (listed in the output).
        compare_to: a second population; layers of the same name and shape get principal
            angles between the two populations' bases (`compare.other`).
        num_devices: devices of the `models` mesh (all by default).
        overwrite: discard a previous run in `out` instead of resuming it.
        plots: write PNG plots and report.html (needs matplotlib).
        quiet: no progress bar.
        memory_budget: bytes one layer's analysis may use (default: half the host RAM on CPU,
            80% of device memory on accelerators); larger layers are refused before any read.
            With `lora_space='auto'`, a LoRA layer whose factor-space matrices would exceed it
            goes to side space where that fits.
        lora_space: 'auto', 'factor' or 'side': where LoRA layers are computed
            (`spectra.SpectraConfig.lora_space`).
        split_half: the compare control between two random halves of the population.
    """
    if center == "base" and not base:
        raise OutputError("center='base' needs a base model (--base=PATH)")
    if holdout not in (None, "loo"):
        holdout = int(holdout)

    def reading(done, total):
        if not quiet and jax.process_index() == 0 and total >= 8:
            print(
                f"\rreading headers {done}/{total}",
                end="\n" if done == total else "",
                file=sys.stderr,
                flush=True,
            )

    population = io.open_population(
        models,
        include=include,
        exclude=exclude,
        skip_mismatched=skip_mismatched,
        progress=reading,
    )
    spectra_config = spectra.SpectraConfig(
        modes=tuple(modes),
        center=center,
        lora=lora,
        method=method,
        rank=rank,
        lora_space=lora_space,
    )
    control_config = spectra.ControlConfig(
        null_draws=null_draws, holdout=holdout, seed=seed, split_half=split_half
    )
    config = {
        "models": [m.path for m in population.models],
        "include": include,
        "exclude": exclude,
        "center": center,
        "base": base,
        "modes": list(modes),
        "rank": rank,
        "method": method,
        "lora": lora,
        "null_draws": null_draws,
        "holdout": holdout,
        "seed": seed,
        "skip_mismatched": skip_mismatched,
        "compare_to": None,
    }
    # Recorded when they differ from the default (runs begun before them still resume).
    if lora_space != "auto":
        config["lora_space"] = lora_space
    if not split_half:
        config["split_half"] = False
    others = {}
    if compare_to:
        other_pop = io.open_population(
            compare_to, include=include, exclude=exclude, skip_mismatched=True
        )
        config["compare_to"] = [m.path for m in other_pop.models]
        others = {layer.name: layer for layer in other_pop.layers}
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    mesh = sharding.models_mesh(num_devices)
    budget = memory_budget if memory_budget is not None else default_memory_budget(mesh)
    spaces = {}
    for layer in population.layers:
        spaces[layer.name] = lora_space_for(layer, mesh, budget, spectra_config)
        check_layer_memory(
            layer, mesh, budget, dataclasses.replace(spectra_config, lora_space=spaces[layer.name])
        )
    base_refs = _load_base(base, population) if base else {}
    with RunDirectory(out, fingerprint=fingerprint, config=config, overwrite=overwrite) as rundir:
        records = rundir.finished([layer.name for layer in population.layers])
        for rec in records:
            if rec is not None:
                rec.pop("fingerprint", None)
        encoded: list[str | None] = [None] * len(records)
        todo = [i for i, r in enumerate(records) if r is None]
        root = jax.random.key(seed)
        start = time.time()
        _progress(len(records) - len(todo), len(records), "", 0.0, quiet=quiet)
        layers = [population.layers[i] for i in todo]
        # Reading ahead holds one more layer in memory. Side-space LoRA layers (N r past both
        # sides) compute for seconds per read, so they are read in turn and memory stays flat.
        ahead = 0 if any(_side_space(layer, mesh, spaces[layer.name]) for layer in layers) else 1
        stream = io.stream_layers(population, mesh, layers=layers, prefetch=ahead)
        for i, (layer, placed) in zip(todo, stream):
            base_value = None
            if layer.name in base_refs:
                base_value = jax.numpy.asarray(
                    np.asarray(base_refs[layer.name].read()).reshape(layer.shape)
                )
            other = others.get(layer.name)
            if other is not None and other.shape == layer.shape and other.kind == layer.kind:
                other = (other, io.place_layer(other, mesh))
            else:
                other = None
            try:
                rec = spectra.analyze_layer(
                    layer,
                    placed,
                    population.names,
                    mesh=mesh,
                    spectra_config=dataclasses.replace(
                        spectra_config, lora_space=spaces[layer.name]
                    ),
                    control_config=control_config,
                    key=jax.random.fold_in(root, i),
                    base=base_value,
                    other=other,
                    release=True,
                )
            except jax.errors.JaxRuntimeError as e:
                if jax.process_count() > 1:
                    raise DistributedError(
                        f"layer {layer.name!r}: a collective across {jax.process_count()} "
                        f"processes failed ({str(e).splitlines()[0][:200]}); another process "
                        f"probably died. Finished layers are kept in {rundir.layers_dir}; "
                        "restart every process to resume"
                    ) from None
                raise
            rec = plain(rec)
            # Encoded once: the layer file and spectra.json reuse the same text.
            encoded[i] = compact_json(rec)
            rundir.write_layer(i, rec, encoded[i])
            records[i] = rec
            done = sum(r is not None for r in records)
            _progress(done, len(records), layer.name, time.time() - start, quiet=quiet)
            # Released before the stream reads the next layer (the loop variable would keep
            # this layer alive until the next one is placed).
            del placed, other

        result = {
            "version": SPECTRA_VERSION,
            "models": population.names,
            "config": config,
            "manifest": run_manifest(config, mesh, population),
            "skipped_layers": [{"name": n, "reason": r} for n, r in population.skipped],
            "layers": records,
        }
        if rundir.lead:
            rundir.write_json("manifest.json", result["manifest"])
            rundir.write("layers.csv", lambda path: write_csv(path, result))
            if plots:
                images = []
                rundir.write("plots", lambda path: images.extend(write_plots(path, result)))
                rundir.write(
                    "report.html",
                    lambda path: atomic_write_text(path, write_report_html(result, images, out)),
                )
            # Last: spectra.json's presence means the run is complete.
            layers = ",".join(
                e if e is not None else compact_json(r) for e, r in zip(encoded, records)
            )
            head = compact_json({k: v for k, v in result.items() if k != "layers"})
            rundir.write(
                "spectra.json",
                lambda path: atomic_write_text(path, f'{head[:-1]},"layers":[{layers}]}}'),
            )
    return result


def _side_space(layer, mesh, space: str = "auto") -> bool:
    """Whether a layer's spectra will be computed in side space (`spectra.lora_side_space`)."""
    if layer.kind == "dense":
        return False
    m, n = layer.shape
    n_pad = sharding.padded_count(len(layer.a_refs), mesh)
    return spectra.lora_side_space(n_pad=n_pad, rank=layer.rank, m=m, n=n, space=space)


def lora_space_for(layer, mesh, budget: int, config: spectra.SpectraConfig) -> str:
    """The `lora_space` a layer is analysed with: `config.lora_space` itself, except that under
    'auto' a LoRA layer whose factor-space `(Nr)^2` matrices would exceed the memory budget, and
    whose side-space ones would not, goes to 'side'."""
    space = config.lora_space
    if space != "auto" or layer.kind == "dense" or _side_space(layer, mesh):
        return space
    factor = layer_working_set(layer, mesh, dataclasses.replace(config, lora_space="factor"))
    side = layer_working_set(layer, mesh, dataclasses.replace(config, lora_space="side"))
    return "side" if factor > budget >= side else space


def default_memory_budget(mesh) -> int:
    """Bytes a layer may use: half the host's RAM on CPU, 80% of the smallest device's memory
    times the device count on accelerators."""
    devices = list(mesh.devices.flat)
    if devices[0].platform == "cpu":
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
    limits = [(d.memory_stats() or {}).get("bytes_limit", 0) for d in devices]
    return int(0.8 * min(limits) * len(devices)) if all(limits) else 2**62


def layer_working_set(layer, mesh, config: spectra.SpectraConfig | None = None) -> int:
    """Estimated peak bytes of one layer's analysis: the stored stack, its float32 centred copy
    and temporaries (x3), the prefetched next layer, and the Grams (LoRA: in `config.lora_space`,
    plus the randomized solver's float32 factors and Krylov basis where it runs)."""
    config = config or spectra.SpectraConfig()
    n_pad = sharding.padded_count(len(layer.refs if layer.kind == "dense" else layer.a_refs), mesh)
    m, n = layer.shape
    itemsize = np.dtype(layer.dtype).itemsize
    if layer.kind == "dense":
        stack = n_pad * m * n
        return int(stack * (2 * itemsize + 3 * 4) + 4 * (m * m + n * n + n_pad * n_pad))
    r = layer.rank
    factors = n_pad * r * (m + n)
    side = _side_space(layer, mesh, config.lora_space)
    lengths = {"rows": m, "cols": n, "lora_A": n, "lora_B": m}
    fast = spectra.lora_randomized_modes(config, m=m, n=n, side=side)
    krylov = 0
    if fast:
        # Float32 factors, or their rank-2r shift, and a side x (iterations + 1) l basis with
        # its image under the operator.
        width = (config.iterations + 1) * (config.rank + 10)
        krylov = 4 * (2 * factors + 2 * max(lengths[mo] for mo in fast) * width)
    if side:
        # The stored factors and, in their place once they are released, the null's drawn ones
        # (no read-ahead; reading holds a second copy briefly); one side matrix of the modes
        # solved exactly, the sum of the updates (for those of the whole updates), a few float32
        # blocks and the models Grams.
        wanted = config.modes if config.lora == "delta" else ("lora_A", "lora_B")
        exact = [lengths[mo] for mo in wanted if mo in lengths and mo not in fast]
        blocks = 8 * kernels.BLOCK_ROWS * (m + n)
        summed = m * n if config.lora == "delta" and exact else 0
        matrix = max(exact, default=0) ** 2
        return int(
            2 * factors * itemsize + 4 * (matrix + summed + 3 * n_pad**2) + 4 * blocks + krylov
        )
    return int(factors * (2 * itemsize + 3 * 4) + 4 * 6 * (n_pad * r) ** 2 + krylov)


def check_layer_memory(layer, mesh, budget: int, config: spectra.SpectraConfig) -> None:
    """Refuses, before anything is read, a layer whose working set exceeds the budget."""
    need = layer_working_set(layer, mesh, config)
    if need > budget:
        raise PopulationError(
            f"layer {layer.name!r} ({list(layer.shape)}, {np.dtype(layer.dtype)}) needs about "
            f"{need / 2**30:.1f} GiB, over the memory budget of {budget / 2**30:.1f} GiB: "
            "use more devices or hosts, fewer models, --exclude this layer, or raise "
            "--memory_budget"
        )
