"""One layer's full record: spectra of every mode beside their controls, and a verdict.

A spectrum alone proves little: random-init populations match a Gaussian null, held-out models may
gain nothing over the population mean, and shared initialisations fake low rank. So every layer
record carries the null, holdout and lineage controls, and the verdict reads all of them.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from jax.sharding import Mesh

from jsubspace import kernels
from jsubspace.config import ControlConfig
from jsubspace.io import PlacedDense
from jsubspace.io import PlacedLora
from jsubspace.sharding import host_array
from jsubspace.spectra import _compare
from jsubspace.spectra import _holdout
from jsubspace.spectra import _layer
from jsubspace.spectra import _lineage
from jsubspace.spectra import _null
from jsubspace.spectra._plan import COMPARE_K
from jsubspace.spectra._plan import LayerPlan
from jsubspace.spectra._plan import basis_solvers
from jsubspace.spectra._plan import plan_layer
from jsubspace.spectra._summary import summarize

VERDICTS = (
    "structure beyond the null",
    "explained by the mean",
    "explained by shared initialisation",
    "indistinguishable from noise",
    "model-specific structure, not shared",
)


def _primary_mode(modes) -> str:
    for mode in ("rows", "lora_A", "cols", "models"):
        if mode in modes:
            return mode
    return next(iter(modes))


def verdict(record: dict, *, shared_fraction: float = 0.2) -> dict:
    """The plain-language verdict of a layer record, with the numbers it rests on."""
    mode = _primary_mode(record["modes"])
    lineage = record.get("lineage") or {}
    # Exactly identical tensors, or LoRA A factors left at one shared initialisation. Dense models
    # that are merely close (fine-tuned from one parent) are judged by the mean-only control.
    exact = sum(len(g) for g in lineage.get("identical_groups", []))
    n_models = max(1, len(lineage.get("cosine", [])))
    shared = max(exact / n_models, (lineage.get("lora_A") or {}).get("fraction_shared", 0.0))
    null = (record.get("null") or {}).get(mode)
    holdout = record.get("holdout") or {}
    evidence = {"mode": mode, "shared_fraction": shared}
    beyond = None
    if null:
        obs = np.asarray(record["modes"][mode]["cev"])
        mean, std = np.asarray(null["cev_mean"]), np.asarray(null["cev_std"])
        width = min(len(obs), len(mean), 16)
        margin = np.maximum(4 * std[:width], 0.02)
        gap = obs[:width] - mean[:width]
        beyond = bool(np.any(gap > margin))
        evidence["max_cev_gap_over_null"] = float(gap.max()) if width else 0.0
    generalises = None
    mean_only = holdout.get("mean_only")
    if holdout.get("ks"):
        j = len(holdout["ks"]) - 1
        gain = holdout["two_sided"][j] - holdout["random"]["two_sided"][j]
        evidence["holdout_k"] = holdout["ks"][j]
        evidence["holdout_gain_over_random"] = float(gain)
        evidence["mean_only"] = mean_only
        generalises = gain > 0.05
    if shared >= shared_fraction:
        label = VERDICTS[2]
    elif beyond is False or generalises is False:
        if (mean_only or 0.0) >= 0.5:
            label = VERDICTS[1]
        elif beyond and generalises is False:
            # More concentrated than the null (each model is low-rank on its own, say), but the
            # directions do not carry over to held-out models: nothing universal.
            label = VERDICTS[4]
        else:
            label = VERDICTS[3]
    elif beyond is None and generalises is None:
        label = "no controls run"
    else:
        label = VERDICTS[0]
    return {"label": label, **evidence}


def _mode_record(result: _layer.ModeResult, energy: float) -> dict:
    own = result.total_energy if result.total_energy is not None else energy
    rec = summarize(result.eigenvalues, own)
    rec.update(method=result.method, side=result.side)
    if result.total_energy is not None:
        rec["total_energy"] = result.total_energy
    if result.flops is not None:
        rec["estimated_flops"] = result.flops
    if result.residual is not None:
        rec.update(residual=result.residual, iterations=result.iterations)
    return rec


def analyze_layer(
    layer,
    placed: PlacedDense | PlacedLora,
    names: list[str],
    *,
    mesh: Mesh,
    spectra_config: _layer.SpectraConfig,
    control_config: ControlConfig,
    key: jax.Array,
    base: jax.Array | None = None,
    other=None,
    release: bool = False,
    plan: LayerPlan | None = None,
) -> dict:
    """Spectra and controls of one layer, as the JSON record of `spectra.json`.

    Every step follows the layer's `plan` (`spectra.plan_layer`; made here from the shapes when
    not given): the spectra's route and solvers, the null on the same route, the bases of the
    holdout and compare controls, and whether LoRA controls materialise the updates.
    `other` is `(layer, placed)` of the same layer in a second population, for `compare`.
    `release`: free the device memory of `placed` once the controls that read it are done, before
    the null (whose drawn population then takes its place); the caller must not use `placed`
    afterwards.
    """
    if plan is None:
        n_pad = placed.x.shape[0] if isinstance(placed, PlacedDense) else placed.a.shape[0]
        plan = plan_layer(layer, n_pad=n_pad, spectra=spectra_config, controls=control_config)
    spectra_config = plan.spectra_config(spectra_config)
    ranks = list(layer.ranks) if isinstance(placed, PlacedLora) else None
    k_spec, k_null = jax.random.split(key)
    clock = _Clock()
    spectra = _layer.layer_spectra(
        placed,
        mesh=mesh,
        config=spectra_config,
        key=k_spec,
        base=base,
        ranks=ranks,
        lineage=control_config.lineage,
        plan=plan,
    )
    record = {
        "name": layer.name,
        "kind": layer.kind,
        "shape": list(layer.shape),
        "dtype": str(np.dtype(layer.dtype)),
        "center": spectra_config.center,
        "total_energy": spectra.total_energy,
        "modes": {m: _mode_record(r, spectra.total_energy) for m, r in spectra.modes.items()},
    }
    if isinstance(placed, PlacedLora):
        record["rank"] = layer.rank
        record["lora"] = spectra_config.lora
    uncentred_norms = np.diag(spectra.uncentred) if spectra.uncentred is not None else None
    record["null"] = None  # Filled last, after every control that reads the layer itself.
    record["plan"] = plan.to_json()
    clock.lap("spectra")
    x = dense_stack(placed, plan)

    def bases(control: str) -> dict:
        """The solvers of a control's rows / cols bases, as the plan has them."""
        chosen = plan.controls[control].get("bases")
        if chosen is None:  # compare_to without the split-half: the same rule at k = 16
            chosen = basis_solvers(placed.n_models, *plan.shape, COMPARE_K, spectra_config)
        return dict(solvers=(chosen["rows"], chosen["cols"]), iterations=spectra_config.iterations)

    if x is None:
        # A LoRA layer too large to materialise: its controls come from the factors.
        factors = _control_factors(placed, spectra, spectra_config, mesh=mesh)
        record["holdout"] = _run_lora_holdout(
            placed,
            factors,
            spectra,
            mesh=mesh,
            control=control_config,
            config=spectra_config,
            key=jax.random.fold_in(key, 2),
        )
        clock.lap("holdout")
        record["compare"] = {}
        if control_config.split_half:
            record["compare"]["split_half"] = _compare.lora_split_half_compare(
                factors,
                placed.n_models,
                mesh=mesh,
                seed=control_config.seed,
                key=jax.random.fold_in(key, 3),
                iterations=spectra_config.iterations,
            )
        del factors
    else:
        record["holdout"] = _run_holdout(
            x,
            placed.n_models,
            mesh=mesh,
            control=control_config,
            center=spectra_config.center,
            base=base,
            key=jax.random.fold_in(key, 2),
            **bases("holdout"),
        )
        clock.lap("holdout")
        record["compare"] = {}
        if control_config.split_half:
            record["compare"]["split_half"] = _compare.split_half_compare(
                x,
                placed.n_models,
                mesh=mesh,
                seed=control_config.seed,
                key=jax.random.fold_in(key, 3),
                **bases("split_half"),
            )
    if other is not None:
        other_layer, other_placed = other
        y = dense_stack(other_placed, plan)
        if x is not None and y is not None:
            found = _compare.population_compare(
                x,
                placed.n_models,
                y,
                other_placed.n_models,
                mesh=mesh,
                key=jax.random.fold_in(key, 4),
                **bases("split_half"),
            )
        else:  # LoRA, one of them too large to materialise: from the factors
            found = _compare.lora_population_compare(
                placed[:3],
                placed.n_models,
                other_placed[:3],
                other_placed.n_models,
                mesh=mesh,
                key=jax.random.fold_in(key, 4),
                iterations=spectra_config.iterations,
            )
        record["compare"]["other"] = found
        del y
    del x
    clock.lap("compare")
    if control_config.lineage and spectra.uncentred is not None:
        prints = factor_prints = None
        if isinstance(placed, PlacedDense):
            prints = host_array(_lineage.fingerprints(placed.x, mesh=mesh))[: placed.n_models]
        else:
            factor_prints = host_array(_lineage.fingerprints(placed.a, mesh=mesh))
            factor_prints = factor_prints[: placed.n_models]
        record["lineage"] = _lineage.lineage_record(
            spectra.uncentred,
            names,
            prints=prints,
            factor_gram=spectra.factor_gram,
            factor_prints=factor_prints,
        )
    clock.lap("lineage")
    if release and plan.route == "lora-side":
        # The side-space null draws a population as large as the real one: it takes its place.
        for array in (placed.a, placed.b):
            array.delete()
    elif release and isinstance(placed, PlacedDense):
        # So does the dense null (a float32 stack and its centred copy): the real stack, read
        # by every control above, is not needed past this point (its shape still is).
        placed.x.delete()
    record["null"] = _null.null_control(
        placed,
        spectra,
        mesh=mesh,
        config=spectra_config,
        key=k_null,
        draws=control_config.null_draws,
        ranks=ranks,
        uncentred_norms=uncentred_norms,
        plan=plan,
    )
    clock.lap("null")
    record["seconds"] = clock.laps
    record["verdict"] = verdict(record, shared_fraction=control_config.shared_fraction)
    return record


class _Clock:
    """Wall seconds of each part of a layer's analysis (`record["seconds"]`), beside the plan's
    estimate: where the time of a layer went. Parts end where their results reach the host."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.laps[part] = self.laps.get(part, 0.0) + now - self._last
        self._last = now


_materialise = jax.jit(kernels.materialized_updates)


def dense_stack(placed, plan: LayerPlan) -> jax.Array | None:
    """The layer as a `[N_pad, m, n]` stack: dense as is, LoRA updates materialised where the
    plan says so (`LayerPlan.materialise`); None for larger LoRA layers (whose controls are then
    taken from the factors)."""
    if isinstance(placed, PlacedDense):
        return placed.x
    if not plan.materialise:
        return None
    return _materialise(placed.a, placed.b, placed.scales)


def _holdout_skipped(n: int, control: ControlConfig) -> dict | None:
    if control.holdout is None:
        return {}
    if control.holdout != "loo" and n < max(3, int(control.holdout)):
        return {"skipped": f"{n} models are too few for {control.holdout}-fold holdout"}
    return None


def _control_factors(placed, spectra, config, *, mesh):
    """The factors the factored controls read: shifted by the mean update first when the
    population sits close to its mean (`spectra._layer.close_to_mean`), as the spectra were."""
    factors = placed[:3]
    if _layer.close_to_mean(spectra.uncentred, np.trace(_centred_gram(spectra, config))):
        factors = kernels.shifted_lora(*factors, mesh=mesh, n_models=placed.n_models, split="rows")
    return factors


def _centred_gram(spectra, config) -> np.ndarray:
    """The mean-centred models Gram of a LoRA layer (`f64[N, N]`)."""
    if config.center == "mean":
        return spectra.models_gram
    n = len(spectra.uncentred)
    h = np.eye(n) - 1.0 / n
    return h @ spectra.uncentred @ h


def _run_lora_holdout(placed, factors, spectra, *, mesh, control, config, key) -> dict:
    """The holdout control of a LoRA layer too large to materialise, from its factors."""
    skipped = _holdout_skipped(placed.n_models, control)
    if skipped is not None:
        return skipped
    return _holdout.lora_holdout_control(
        factors,
        placed.n_models,
        mesh=mesh,
        holdout=control.holdout,
        seed=control.seed,
        models_gram=_centred_gram(spectra, config),
        energies=np.diag(spectra.uncentred),
        key=key,
        iterations=config.iterations,
    )


def _run_holdout(x, n, *, mesh, control: ControlConfig, center, base, **solver) -> dict:
    skipped = _holdout_skipped(n, control)
    if skipped is not None:
        return skipped
    ref = base if center == "base" else None
    return _holdout.holdout_control(
        x, n, mesh=mesh, holdout=control.holdout, seed=control.seed, ref=ref, **solver
    )
