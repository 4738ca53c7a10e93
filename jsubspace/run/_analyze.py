"""`analyze`: a population in, `spectra.json` + csv + plots + report out, resumable.

The steps: open the population (headers only), plan every layer (`spectra.plan_layer`: route,
solvers, memory, estimated time; a layer over the memory budget is refused before any byte is
read), then stream the layers one at a time through `spectra.analyze_layer` and write each record
as soon as it is done. The output directory (lock, resume, atomic records) is `RunDirectory`'s
business. Layer keys are derived from the seed and the layer index, so a resumed run gives the
same numbers as an uninterrupted one. SIGINT / SIGTERM stop the run within seconds, keeping the
finished layers (`interruptible`), and a failed peer process ends a multi-host run with a clear
message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np

from jsubspace import io
from jsubspace import sharding
from jsubspace import spectra
from jsubspace.config import AnalysisConfig
from jsubspace.errors import DistributedError
from jsubspace.errors import OutputError
from jsubspace.errors import PopulationError
from jsubspace.io._atomic import atomic_write_text
from jsubspace.io._atomic import compact_json
from jsubspace.io._atomic import plain
from jsubspace.report import write_csv
from jsubspace.report import write_plots
from jsubspace.report import write_report_html
from jsubspace.run._groups import automatic_groups
from jsubspace.run._groups import read_groups
from jsubspace.run._interrupt import interruptible
from jsubspace.run._manifest import run_manifest
from jsubspace.run._progress import Progress
from jsubspace.run._result import AnalysisResult
from jsubspace.run._rundir import RunDirectory
from jsubspace.spectra._cost import run_cost

SPECTRA_VERSION = "1"


@dataclasses.dataclass
class Prepared:
    """A run before any tensor is read: the population, configurations, mesh and layer plans."""

    population: io.Population
    others: dict
    spectra_config: spectra.SpectraConfig
    control_config: spectra.ControlConfig
    config: dict
    fingerprint: str
    mesh: object
    budget: int
    plans: list[spectra.LayerPlan]
    analysis: AnalysisConfig
    groupings: tuple = ()


def prepare(
    models: str | Sequence[str],
    *,
    config: AnalysisConfig | None = None,
    quiet: bool = False,
    **options,
) -> Prepared:
    """Opens the population (headers only) and plans every layer. The analysis is described by
    `config` or, equivalently, by the flat `options` of `analyze`. Refuses a layer over the
    memory budget before any tensor is read."""
    config = config or AnalysisConfig.from_options(**options)
    spectra_config, control_config, run = config.spectra, config.controls, config.run
    if spectra_config.center == "base" and not run.base:
        raise OutputError("center='base' needs a base model (--base=PATH)")

    def reading(done, total):
        if quiet or jax.process_index() != 0 or total < 8:
            return
        if sys.stderr.isatty():
            end = "\n" if done == total else ""
            print(f"\rreading headers {done}/{total}", end=end, file=sys.stderr, flush=True)
        elif done == total:  # a log gets one line, not a line rewritten in place
            print(f"read the headers of {total} models", file=sys.stderr, flush=True)

    population = io.open_population(
        models,
        include=run.include,
        exclude=run.exclude,
        skip_mismatched=run.skip_mismatched,
        skip_unreadable=run.skip_unreadable,
        progress=reading,
    )
    if population.unreadable and not quiet and jax.process_index() == 0:
        print(
            f"skipped {len(population.unreadable)} unreadable model(s) (--skip_unreadable):",
            file=sys.stderr,
        )
        for path, reason in population.unreadable:
            print(f"  {path}: {reason}", file=sys.stderr)
    # The run's identity (resume fingerprint, spectra.json "config"): the keys of the first
    # version, so that runs begun before a new option existed still resume.
    legacy = {
        "models": [m.path for m in population.models],
        "include": run.include,
        "exclude": run.exclude,
        "center": spectra_config.center,
        "base": run.base,
        "modes": list(spectra_config.modes),
        "rank": spectra_config.rank,
        "method": spectra_config.method,
        "lora": spectra_config.lora,
        "null_draws": control_config.null_draws,
        "holdout": control_config.holdout,
        "seed": control_config.seed,
        "skip_mismatched": run.skip_mismatched,
        "compare_to": None,
    }
    # Recorded when they differ from the default.
    if spectra_config.lora_space != "auto":
        legacy["lora_space"] = spectra_config.lora_space
    if not control_config.split_half:
        legacy["split_half"] = False
    if run.skip_unreadable:
        legacy["skip_unreadable"] = True
    groupings = list(automatic_groups(population))
    if run.groups:
        given = read_groups(run.groups, population)
        columns = {g.column for g in given}
        groupings = given + [g for g in groupings if g.column not in columns]
    if groupings:
        # The labels themselves (not the file's name) identify the run.
        legacy["groups"] = [[g.column, [g.labels[i] for i in g.index]] for g in groupings]
    if spectra_config.normalize != "none":
        legacy["normalize"] = spectra_config.normalize
    n_models = len(population.models)
    if n_models < 3 and (control_config.holdout is not None or control_config.split_half):
        raise PopulationError(
            f"{n_models} models are too few to judge whether they share a subspace (a verdict "
            f"needs at least {spectra.MIN_MODELS}). Add models, or ask for spectra only with "
            "--holdout=none --nosplit_half"
        )
    others = {}
    if run.compare_to:
        other_pop = io.open_population(
            list(run.compare_to), include=run.include, exclude=run.exclude, skip_mismatched=True
        )
        legacy["compare_to"] = [m.path for m in other_pop.models]
        others = {layer.name: layer for layer in other_pop.layers}
    fingerprint = hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    mesh = sharding.models_mesh(run.num_devices)
    budget = run.memory_budget
    if budget is None:
        budget = spectra.default_memory_budget(mesh)
    plans = []
    for layer in population.layers:
        n_pad = sharding.padded_count(spectra.layer_models(layer), mesh)
        plan = spectra.plan_layer(
            layer,
            n_pad=n_pad,
            spectra=spectra_config,
            controls=control_config,
            budget=budget,
            devices=mesh.devices.size,
        )
        plan.check_budget(budget)
        plans.append(plan)
    return Prepared(
        population,
        others,
        spectra_config,
        control_config,
        legacy,
        fingerprint,
        mesh,
        budget,
        plans,
        config,
        tuple(groupings),
    )


def plan(models: str | Sequence[str], **options) -> list[spectra.LayerPlan]:
    """The plan of every layer of a population, read from headers only: what `analyze` with the
    same arguments would do, how much memory each layer needs and how long it should take."""
    return prepare(models, **options).plans


def analyze(
    models: str | Sequence[str],
    out: str,
    *,
    overwrite: bool = False,
    plots: bool = True,
    quiet: bool = False,
    **options,
) -> AnalysisResult:
    """Mode-wise spectra of a population beside their controls; writes `out/` and returns
    an `AnalysisResult` (typed layers and verdicts, `.table()`, `.to_json()`, `.paths`; also
    a mapping over the `spectra.json` keys).

    Args:
        models: sources (see `io.resolve_sources`).
        out: output directory (created).
        overwrite: discard a previous run in `out` instead of resuming it.
        plots: write PNG plots and report.html (after spectra.json: a failed rendering is
            reported and loses nothing).
        quiet: no progress bar.
        **options: how the population is analysed, either `config=` a
            `jsubspace.config.AnalysisConfig` or its flat fields
            (`AnalysisConfig.from_options`):
            include, exclude: layer-name regexes.
            center: 'mean', 'none' or 'base' (needs `base`).
            base: path of the base model for `center='base'`.
            modes: spectra to compute.
            rank: eigenvalues computed by randomized solvers (exact solvers give all).
            method: 'auto', 'exact' or 'randomized' (rows / cols modes, and the LoRA factor
                PCA; see `spectra.SpectraConfig.method`).
            lora: 'delta' or 'factors' for PEFT populations.
            null_draws: Gaussian null draws per layer.
            holdout: 'loo', K (folds) or None.
            seed: seeds every random draw.
            skip_mismatched: skip layers the models disagree on (listed in the output).
            skip_unreadable: leave out models that cannot be read (listed in the output).
            compare_to: a second population; layers of the same name and shape get principal
                angles between the two populations' bases (`compare.other`).
            num_devices: devices of the `models` mesh (all by default).
            memory_budget: bytes one layer's analysis may use (the command line's
                `--memory_budget` is in GiB; default: half the host RAM on
                CPU, 80% of device memory on accelerators); larger layers are refused before
                any read. With `lora_space='auto'`, a LoRA layer whose factor-space matrices
                would exceed it goes to side space where that fits.
            lora_space: 'auto', 'factor' or 'side': where LoRA layers are computed
                (`spectra.SpectraConfig.lora_space`).
            split_half: the compare control between two random halves of the population.
    """
    run = prepare(models, quiet=quiet, **options)
    population = run.population
    base = run.analysis.run.base
    base_refs = io.base_refs(base, population.layers) if base else {}
    with RunDirectory(
        out, fingerprint=run.fingerprint, config=run.config, overwrite=overwrite
    ) as rundir:
        records = rundir.finished([layer.name for layer in population.layers])
        for rec in records:
            if rec is not None:
                rec.pop("fingerprint", None)
        encoded: list[str | None] = [None] * len(records)
        todo = [i for i, r in enumerate(records) if r is None]

        def kept() -> str:
            done = sum(r is not None for r in records)
            return (
                f"{done} of {len(records)} layers are kept in {rundir.layers_dir}; run the same "
                "command again to resume"
            )

        progress = Progress(
            len(records),
            len(records) - len(todo),
            [run.plans[i].seconds for i in todo],
            quiet=quiet,
        )
        with interruptible(message=kept):
            with progress:
                _analyze_layers(run, rundir, todo, records, encoded, base_refs, progress)
            return _finish(run, rundir, records, encoded, out, plots=plots)


def _analyze_layers(run: Prepared, rundir, todo, records, encoded, base_refs, progress) -> None:
    """Streams the layers still to do through `spectra.analyze_layer`, writing each record."""
    population, mesh = run.population, run.mesh
    root = jax.random.key(run.control_config.seed)
    layers = [population.layers[i] for i in todo]
    # Reading ahead holds one more layer in memory. Side-space LoRA layers compute for seconds
    # per read, so they are read in turn and memory stays flat.
    ahead = 0 if any(run.plans[i].route == "lora-side" for i in todo) else 1
    stream = io.stream_layers(population, mesh, layers=layers, prefetch=ahead)
    if todo:
        progress.starting(population.layers[todo[0]].name)
    for j, (i, (layer, placed)) in enumerate(zip(todo, stream)):
        base_value = None
        if layer.name in base_refs:
            base_value = jax.numpy.asarray(
                np.asarray(base_refs[layer.name].read()).reshape(layer.shape)
            )
        other = run.others.get(layer.name)
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
                spectra_config=run.spectra_config,
                control_config=run.control_config,
                key=jax.random.fold_in(root, i),
                base=base_value,
                other=other,
                release=True,
                plan=run.plans[i],
                groupings=run.groupings,
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
        rec = plain(rec.to_json())
        # Encoded once: the layer file and spectra.json reuse the same text.
        encoded[i] = compact_json(rec)
        rundir.write_layer(i, rec, encoded[i])
        records[i] = rec
        progress.finished()
        if j + 1 < len(todo):
            progress.starting(population.layers[todo[j + 1]].name)
        # Released before the stream reads the next layer (the loop variable would keep
        # this layer alive until the next one is placed).
        del placed, other


def _render(result: dict, out: str) -> None:
    """The plots and report.html. A failure here is reported and leaves the results written."""
    images = []
    try:
        images.extend(write_plots(os.path.join(out, "plots"), result))
        atomic_write_text(os.path.join(out, "report.html"), write_report_html(result, images, out))
    except Exception as e:  # noqa: BLE001 - rendering must never lose a finished run
        print(
            f"jsubspace: warning: the plots / report.html could not be written "
            f"({type(e).__name__}: {e}); the results are complete in "
            f"{os.path.join(out, 'spectra.json')} and layers.csv",
            file=sys.stderr,
        )


def _finish(run: Prepared, rundir, records, encoded, out: str, *, plots: bool) -> AnalysisResult:
    """Writes the run's final files; spectra.json last, as its presence means complete."""
    population = run.population
    result = {
        "version": SPECTRA_VERSION,
        "models": population.names,
        "config": run.config,
        "analysis": run.analysis.to_json(),
        "manifest": run_manifest(run.config, run.mesh, population),
        "plan_total": spectra.plan_total(run.plans),
        "skipped_layers": [{"name": n, "reason": r} for n, r in population.skipped],
        "skipped_models": [{"path": p, "reason": r} for p, r in population.unreadable],
        "conclusion": spectra.conclusion(records),
        "cost": run_cost(records),
        "layers": records,
    }
    if rundir.lead:
        rundir.write_json("manifest.json", result["manifest"])
        rundir.write("layers.csv", lambda path: write_csv(path, result))
        # spectra.json's presence means the run is complete; it is written before any
        # rendering, so that a failed plot never loses the results.
        layers = ",".join(e if e is not None else compact_json(r) for e, r in zip(encoded, records))
        head = compact_json({k: v for k, v in result.items() if k != "layers"})
        rundir.write(
            "spectra.json",
            lambda path: atomic_write_text(path, f'{head[:-1]},"layers":[{layers}]}}'),
        )
        if plots:
            _render(result, out)
    return AnalysisResult(result, out)
