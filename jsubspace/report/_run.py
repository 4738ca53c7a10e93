"""`analyze`: a population in, `spectra.json` + csv + plots + report out, resumable.

Layout of `out/`:
  run.json              the configuration; a rerun must match it (or pass overwrite=True)
  layers/NNNNN.json     one finished layer each, written atomically as soon as it is done
  spectra.json          the whole result, written last: its presence means the run finished
  layers.csv, plots/, report.html, manifest.json
A killed run resumes at the first unfinished layer; layer keys are derived from the seed and the
layer index, so a resumed run gives the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from jsubspace import io, sharding, spectra
from jsubspace.errors import JsubspaceError
from jsubspace.report._atomic import atomic_write_json, atomic_write_text
from jsubspace.report._outputs import write_csv, write_plots, write_report_html

SPECTRA_VERSION = "1"


class OutputError(JsubspaceError):
    """The output directory holds a different run, or cannot be written."""


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


def _load_base(path: str, population: io.Population) -> dict[str, np.ndarray]:
    base = io.load_model(path)
    values = {}
    for layer in population.layers:
        ref = base.tensors.get(layer.name)
        if ref is None or math_prod(ref.shape) != layer.shape[0] * layer.shape[1]:
            raise OutputError(
                f"{path}: base model lacks layer {layer.name!r} of shape {list(layer.shape)}"
            )
        values[layer.name] = ref
    return values


def math_prod(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


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
        method: 'auto', 'exact' or 'randomized'.
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
    """
    if center == "base" and not base:
        raise OutputError("center='base' needs a base model (--base=PATH)")
    if holdout not in (None, "loo"):
        holdout = int(holdout)
    population = io.open_population(
        models, include=include, exclude=exclude, skip_mismatched=skip_mismatched
    )
    spectra_config = spectra.SpectraConfig(
        modes=tuple(modes), center=center, lora=lora, method=method, rank=rank
    )
    control_config = spectra.ControlConfig(null_draws=null_draws, holdout=holdout, seed=seed)
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
    others = {}
    if compare_to:
        other_pop = io.open_population(
            compare_to, include=include, exclude=exclude, skip_mismatched=True
        )
        config["compare_to"] = [m.path for m in other_pop.models]
        others = {layer.name: layer for layer in other_pop.layers}
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    mesh = sharding.models_mesh(num_devices)
    layers_dir = os.path.join(out, "layers")
    run_path = os.path.join(out, "run.json")
    os.makedirs(layers_dir, exist_ok=True)
    previous = None
    if os.path.exists(run_path):
        try:
            with open(run_path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, json.JSONDecodeError):
            previous = None
    if previous is not None and previous.get("fingerprint") != fingerprint and not overwrite:
        raise OutputError(
            f"{out} holds a run with another configuration; pass --overwrite to replace it "
            "or choose another --out"
        )
    lead = jax.process_index() == 0
    if lead and (overwrite or previous is None or previous.get("fingerprint") != fingerprint):
        for name in os.listdir(layers_dir):
            os.remove(os.path.join(layers_dir, name))
    for stale in ("spectra.json", "layers.csv", "report.html", "manifest.json"):
        path = os.path.join(out, stale)
        if lead and os.path.exists(path):
            os.remove(path)  # A result that is not this run's must not look complete.

    def layer_path(i):
        return os.path.join(layers_dir, f"{i:05d}.json")

    records: list[dict | None] = [None] * len(population.layers)
    for i, layer in enumerate(population.layers):
        path = layer_path(i)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    rec = json.load(f)
                if rec.get("name") == layer.name and rec.get("fingerprint") == fingerprint:
                    records[i] = rec
            except (OSError, json.JSONDecodeError):
                pass  # A broken layer file is recomputed, never trusted.
    if jax.process_count() > 1:
        # Every process must run the same layers (the kernels are collectives): process 0's
        # view of what is finished decides. `out` must be on a filesystem all hosts see.
        from jax.experimental import multihost_utils

        done = np.asarray([r is not None for r in records], np.int32)
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
        for i, flag in enumerate(done):
            if not flag:
                records[i] = None
            elif records[i] is None:
                raise OutputError(
                    f"{layer_path(i)}: finished on process 0 but not visible here; "
                    "--out must be on a filesystem every host sees"
                )
    if lead:
        atomic_write_json(run_path, {"fingerprint": fingerprint, "config": config})
    todo = [i for i, r in enumerate(records) if r is None]
    base_refs = _load_base(base, population) if base else {}
    root = jax.random.key(seed)
    start = time.time()
    _progress(len(records) - len(todo), len(records), "", 0.0, quiet=quiet)
    stream = io.stream_layers(population, mesh, layers=[population.layers[i] for i in todo])
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
        rec = spectra.analyze_layer(
            layer,
            placed,
            population.names,
            mesh=mesh,
            spectra_config=spectra_config,
            control_config=control_config,
            key=jax.random.fold_in(root, i),
            base=base_value,
            other=other,
        )
        rec["fingerprint"] = fingerprint
        rec = json.loads(json.dumps(rec, default=_jsonable))
        if jax.process_index() == 0:
            atomic_write_json(layer_path(i), rec)
        records[i] = rec
        done = sum(r is not None for r in records)
        _progress(done, len(records), layer.name, time.time() - start, quiet=quiet)

    result = {
        "version": SPECTRA_VERSION,
        "models": population.names,
        "config": config,
        "manifest": run_manifest(config, mesh, population),
        "skipped_layers": [{"name": n, "reason": r} for n, r in population.skipped],
        "layers": [{k: v for k, v in r.items() if k != "fingerprint"} for r in records],
    }
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(out, "manifest.json"), result["manifest"])
        write_csv(os.path.join(out, "layers.csv"), result)
        if plots:
            images = write_plots(os.path.join(out, "plots"), result)
            atomic_write_text(
                os.path.join(out, "report.html"), write_report_html(result, images, out)
            )
        # Last: spectra.json's presence means the run is complete.
        atomic_write_json(os.path.join(out, "spectra.json"), result)
    return result


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
