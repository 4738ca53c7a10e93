"""One layer's full record: spectra of every mode beside their controls, and a verdict.

A spectrum alone proves little: random-init populations match a Gaussian null, held-out models may
gain nothing over the population mean, and shared initialisations fake low rank. So every layer
record carries the null, holdout and lineage controls, and the verdict reads all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jsubspace import kernels
from jsubspace.config import ControlConfig
from jsubspace.io import PlacedDense
from jsubspace.io import PlacedLora
from jsubspace.sharding import host_array
from jsubspace.sharding._mesh import stacked_sharding
from jsubspace.spectra import _compare
from jsubspace.spectra import _cost
from jsubspace.spectra import _holdout
from jsubspace.spectra import _layer
from jsubspace.spectra import _lineage
from jsubspace.spectra import _null
from jsubspace.spectra._groups import Grouping
from jsubspace.spectra._groups import group_control
from jsubspace.spectra._plan import COMPARE_K
from jsubspace.spectra._plan import HOLDOUT_MODELS
from jsubspace.spectra._plan import LayerPlan
from jsubspace.spectra._plan import basis_solvers
from jsubspace.spectra._plan import plan_layer
from jsubspace.spectra._record import LayerRecord
from jsubspace.spectra._record import ModeRecord
from jsubspace.spectra._summary import summarize
from jsubspace.spectra._verdict import scale_fraction
from jsubspace.spectra._verdict import verdict


def _mode_record(result: _layer.ModeResult, energy: float) -> ModeRecord:
    own = result.total_energy if result.total_energy is not None else energy
    return ModeRecord(
        **summarize(result.eigenvalues, own),
        method=result.method,
        side=result.side,
        total_energy=result.total_energy,
        estimated_flops=result.flops,
        residual=result.residual,
        iterations=result.iterations if result.residual is not None else None,
    )


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
    groupings: Sequence[Grouping] = (),
) -> LayerRecord:
    """Spectra and controls of one layer, as a typed record (`LayerRecord.to_json` gives the
    layer's entry in `spectra.json`).

    Every step follows the layer's `plan` (`spectra.plan_layer`; made here from the shapes when
    not given): the spectra's route and solvers, the null on the same route, the bases of the
    holdout and compare controls, and whether LoRA controls materialise the updates.
    `other` is `(layer, placed)` of the same layer in a second population, for `compare`.
    `groupings` label the models (`spectra.Grouping`): each gets the groups control
    (`spectra.group_control`) under its column's name in `record.groups`.
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
    clock = _cost.Clock()
    scales = None
    if spectra_config.normalize == "fro":
        placed, scales = normalized(placed, base, mesh=mesh, release=release)
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
    record = LayerRecord(
        name=layer.name,
        kind=layer.kind,
        shape=list(layer.shape),
        dtype=str(np.dtype(layer.dtype)),
        center=spectra_config.center,
        total_energy=spectra.total_energy,
        modes={m: _mode_record(r, spectra.total_energy) for m, r in spectra.modes.items()},
        plan=plan.to_json(),
    )
    if isinstance(placed, PlacedLora):
        record.rank = layer.rank
        record.lora = spectra_config.lora
    if spectra_config.normalize != "none":
        record.normalize = spectra_config.normalize
    uncentred_norms = np.diag(spectra.uncentred) if spectra.uncentred is not None else None
    if spectra.uncentred is not None:
        # Per-model Frobenius norms (before any normalisation), and how much of the variation
        # is along the mean: models that differ only by scale put all of it there.
        norms = np.sqrt(np.clip(uncentred_norms, 0.0, None))
        record.scale = {
            "norms": (norms * scales if scales is not None else norms).tolist(),
            "along_mean": scale_fraction(spectra.uncentred),
        }
    clock.lap("spectra")
    x = dense_stack(placed, plan)

    def bases(control: str) -> dict:
        """The solvers of a control's rows / cols bases, as the plan has them."""
        chosen = plan.controls[control].get("bases")
        if chosen is None:  # compare_to without the split-half: the same rule at k = 16
            chosen = basis_solvers(placed.n_models, *plan.shape, COMPARE_K, spectra_config)
        return dict(
            solvers=(chosen["rows"], chosen["cols"]),
            iterations=spectra_config.iterations,
            chunk=plan.chunk,
        )

    if x is None:
        # A LoRA layer too large to materialise: its controls come from the factors.
        factors, shifted = _control_factors(placed, spectra, spectra_config, mesh=mesh)
        # The spectra's factor Grams serve the controls when these factors are the ones they
        # were computed from (not shifted towards the mean).
        grams = None if shifted else spectra.factor_grams
        record.holdout = _run_lora_holdout(
            placed,
            factors,
            spectra,
            mesh=mesh,
            control=control_config,
            config=spectra_config,
            key=jax.random.fold_in(key, 2),
            grams=grams,
        )
        clock.lap("holdout")
        record.compare = {}
        if control_config.split_half:
            record.compare["split_half"] = _compare.lora_split_half_compare(
                factors,
                placed.n_models,
                mesh=mesh,
                seed=control_config.seed,
                key=jax.random.fold_in(key, 3),
                iterations=spectra_config.iterations,
                center="mean" if spectra_config.center == "mean" else "none",
                grams=grams,
            )
        del factors, grams
        spectra.factor_grams = None
    else:
        record.holdout = _run_holdout(
            x,
            placed.n_models,
            mesh=mesh,
            control=control_config,
            center=spectra_config.center,
            base=base,
            key=jax.random.fold_in(key, 2),
            grams=spectra.grams,
            **bases("holdout"),
        )
        spectra.grams = None  # device memory back before the other controls and the null
        spectra.factor_grams = None  # (a materialised LoRA layer's: not needed)
        clock.lap("holdout")
        record.compare = {}
        if control_config.split_half:
            record.compare["split_half"] = _compare.split_half_compare(
                x,
                placed.n_models,
                mesh=mesh,
                seed=control_config.seed,
                key=jax.random.fold_in(key, 3),
                ref=_centre(spectra_config.center, base, x.shape[1:]),
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
        record.compare["other"] = found
        del y
    if groupings:
        record.groups = {}
        for j, grouping in enumerate(groupings):
            if x is None:
                record.groups[grouping.column] = {
                    "skipped": "the groups control needs the layer's updates, too large to form "
                    "here (raise --memory_budget)"
                }
                continue
            record.groups[grouping.column] = group_control(
                x,
                placed.n_models,
                grouping,
                mesh=mesh,
                seed=control_config.seed,
                ref=base if spectra_config.center == "base" else None,
                uncentred=spectra.uncentred,
                key=jax.random.fold_in(key, 5 + j),
                **bases("holdout"),
            )
        clock.lap("groups")
    del x
    clock.lap("compare")
    if control_config.lineage and spectra.uncentred is not None:
        prints = factor_prints = None
        if isinstance(placed, PlacedDense):
            prints = _lineage.fingerprints(placed.x, mesh=mesh, one_at_a_time=bool(plan.chunk))
            prints = host_array(prints)[: placed.n_models]
        else:
            factor_prints = host_array(_lineage.fingerprints(placed.a, mesh=mesh))
            factor_prints = factor_prints[: placed.n_models]
        record.lineage = _lineage.lineage_record(
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
    record.null = _null.null_control(
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
    record.seconds = clock.laps
    record.peak_bytes = clock.peaks
    record.verdict = verdict(
        record.to_json(),
        n_models=placed.n_models,
        shared_fraction=control_config.shared_fraction,
        controls={
            "null": control_config.null_draws > 0,
            "holdout": control_config.holdout is not None,
            "split_half": control_config.split_half,
            "lineage": control_config.lineage,
        },
    )
    return record


def _centre(center: str, base, shape) -> jax.Array | None:
    """The fixed centre of the controls' bases: None (each basis' own mean) for
    `center='mean'`, zeros for 'none', the base for 'base'."""
    if center == "mean":
        return None
    if center == "base" and base is not None:
        return jnp.asarray(base, jnp.float32)
    return jnp.zeros(shape, jnp.float32)


@jax.jit
def _update_energies(x, ref):
    """`f32[N_pad]`: `||x_i - ref||^2`, fused (no float32 copy of the stack)."""
    return jnp.sum((x.astype(jnp.float32) - ref) ** 2, axis=(1, 2))


@jax.jit
def _scaled_stack(x, ref, inverse):
    """`ref + (x_i - ref) / ||x_i - ref||`: each model's update about `ref` at unit norm."""
    return (ref + (x.astype(jnp.float32) - ref) * inverse[:, None, None]).astype(x.dtype)


def normalized(placed, base, *, mesh, release: bool = False):
    """The layer with each model's update (about the base, or the origin) at unit Frobenius norm
    (`--normalize=fro`: shapes without scale), and the norms divided out (`f64[N]`).

    Dense: a new stack (the old one is freed when `release`). LoRA: the scales change, the
    factors stay.
    """
    if isinstance(placed, PlacedLora):
        energies = host_array(_holdout._factor_energies(placed.a, placed.b, placed.scales))
        norms = np.sqrt(np.clip(energies.astype(np.float64), 0.0, None))
        inverse = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-30), 0.0).astype(np.float32)
        scales = placed.scales * jax.device_put(inverse, placed.scales.sharding)
        return PlacedLora(placed.a, placed.b, scales, placed.n_models), norms[: placed.n_models]
    ref = jnp.zeros(placed.x.shape[1:], jnp.float32) if base is None else jnp.asarray(base)
    ref = ref.astype(jnp.float32)
    norms = np.sqrt(host_array(_update_energies(placed.x, ref)).astype(np.float64))
    inverse = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-30), 0.0).astype(np.float32)
    x = _scaled_stack(placed.x, ref, jax.device_put(inverse, stacked_sharding(mesh)))
    if release:
        placed.x.delete()
    return PlacedDense(x, placed.n_models), norms[: placed.n_models]


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
    if n < HOLDOUT_MODELS:
        return {"skipped": f"{n} models are too few for a holdout (it needs {HOLDOUT_MODELS})"}
    return None


def _control_factors(placed, spectra, config, *, mesh):
    """The factors the factored controls read: shifted by the mean update first when the
    population sits close to its mean (`spectra._layer.close_to_mean`), as the spectra were;
    never when the spectra are uncentred (the shift would change what the controls see).
    Returns `(factors, shifted)`."""
    factors = placed[:3]
    if config.center != "mean":
        return factors, False
    if _layer.close_to_mean(spectra.uncentred, np.trace(_centred_gram(spectra, config))):
        factors = kernels.shifted_lora(*factors, mesh=mesh, n_models=placed.n_models, split="rows")
        return factors, True
    return factors, False


def _centred_gram(spectra, config) -> np.ndarray:
    """The mean-centred models Gram of a LoRA layer (`f64[N, N]`)."""
    if config.center == "mean":
        return spectra.models_gram
    n = len(spectra.uncentred)
    h = np.eye(n) - 1.0 / n
    return h @ spectra.uncentred @ h


def _run_lora_holdout(placed, factors, spectra, *, mesh, control, config, key, grams) -> dict:
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
        center=config.center,
        grams=grams,
    )


def _run_holdout(x, n, *, mesh, control: ControlConfig, center, base, **solver) -> dict:
    skipped = _holdout_skipped(n, control)
    if skipped is not None:
        return skipped
    ref = base if center == "base" else None
    return _holdout.holdout_control(
        x,
        n,
        mesh=mesh,
        holdout=control.holdout,
        seed=control.seed,
        ref=ref,
        center=center,
        **solver,
    )
