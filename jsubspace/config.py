"""One typed configuration of an analysis: how spectra are computed (`SpectraConfig`), which
controls run (`ControlConfig`) and what the run reads and may use (`RunConfig`), nested in
`AnalysisConfig`, with a JSON round trip.

The Python API (`jsubspace.analyze(models, out, **options)`, `jsubspace.run.plan`) and the
command line take the same flat options; `AnalysisConfig.from_options` is the one place that
turns them into this typed form, and `to_json` / `from_json` carry it into `spectra.json` and
back.

Example:
    >>> from jsubspace.config import AnalysisConfig
    >>> config = AnalysisConfig.from_options(null_draws=5, holdout="loo", rank=32)
    >>> config.controls.null_draws, config.spectra.rank
    (5, 32)
    >>> AnalysisConfig.from_json(config.to_json()) == config
    True
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jsubspace.kernels import CENTERS

MODES = ("models", "rows", "cols")
LORA_SPACES = ("auto", "factor", "side")
Center = Literal["mean", "none", "base"]


def _field(default, kind: str, help: str, **flag):
    """A config field with what its command-line flag needs: the absl `kind` ('enum', 'integer',
    'float', 'bool', 'string', 'list'), the help text, and optionally `choices`, the `flag`
    name (default: the field's), the `flag_default` text and `parse` (flag value -> field)."""
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help, **flag})


def _holdout(value):
    """`--holdout` text as the field: 'none' -> None, 'loo', or K folds."""
    if value in (None, "none"):
        return None
    if value == "loo":
        return "loo"
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"holdout must be 'loo', a number of folds or 'none', got {value!r}"
        ) from None


def _mesh(value):
    """`--mesh` text as the field: 'auto' -> None (every device), else a device count."""
    if value in (None, "auto"):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"mesh must be 'auto' or a device count, got {value!r}") from None


Method = Literal["auto", "exact", "randomized"]
LoraStatistic = Literal["delta", "factors"]
LoraSpace = Literal["auto", "factor", "side"]
Normalize = Literal["none", "fro"]
NORMALIZE = ("none", "fro")


@dataclasses.dataclass(frozen=True)
class SpectraConfig:
    """How spectra are computed.

    Attributes:
        modes: any of 'models', 'rows', 'cols'.
        center: 'mean', 'none' or 'base'.
        lora: 'delta' (spectra of the whole updates s B A, in factor space) or 'factors' (the
            paper's statistic: PCA of the stacked centred A rows and B columns).
        method: 'auto', 'exact' or 'randomized' for the rows / cols modes (LoRA: and the factor
            PCA; `randomized_lora_modes` says which LoRA modes 'auto' solves randomized).
        rank: how many eigenvalues the randomized solver computes (exact ones keep all).
        exact_limit: 'auto' solves a side exactly when it is at most this long.
        iterations: block-Krylov steps of the randomized solver.
        lora_space: where LoRA layers are computed: 'auto' (factor space while the `Nr` factor
            rows are fewer than a side, side space past that), 'factor' or 'side'.
        normalize: 'none', or 'fro' to put every model's update (about the base for
            `center='base'`, else the origin) at unit Frobenius norm first: shapes without
            scale. The record keeps the norms.
    """

    modes: tuple[str, ...] = _field(MODES, "list", "Spectra to compute.")
    center: Center = _field("mean", "enum", "Centre of the models.", choices=CENTERS)
    lora: LoraStatistic = _field(
        "delta",
        "enum",
        "PEFT populations: whole updates or the paper's A/B factor PCA.",
        choices=("delta", "factors"),
    )
    method: Method = _field(
        "auto",
        "enum",
        "Eigen-solver for the rows/cols modes and the LoRA factor PCA; randomized gives the top "
        "--rank eigenvalues.",
        choices=("auto", "exact", "randomized"),
    )
    rank: int = _field(64, "integer", "Eigenvalues computed by randomized solvers.")
    exact_limit: int = _field(
        4096, "integer", "Sides up to this long are solved exactly (auto); longer: randomized."
    )
    iterations: int = _field(4, "integer", "Block-Krylov steps of the randomized solver.")
    lora_space: LoraSpace = _field(
        "auto",
        "enum",
        "PEFT populations: factor space (Nr x Nr matrices), side space (m x m, n x n), or auto "
        "(the smaller, or side space where only it fits --memory_budget).",
        choices=LORA_SPACES,
    )
    normalize: Normalize = _field(
        "none",
        "enum",
        "Scale every model to unit Frobenius norm first ('fro'): shapes without scale.",
        choices=NORMALIZE,
    )

    def __post_init__(self):
        bad = set(self.modes) - set(MODES)
        if bad or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        if self.center not in CENTERS:
            raise ValueError(f"center must be one of {CENTERS}, got {self.center!r}")
        if self.lora not in ("delta", "factors"):
            raise ValueError(f"lora must be 'delta' or 'factors', got {self.lora!r}")
        if self.method not in ("auto", "exact", "randomized"):
            raise ValueError(f"method must be auto/exact/randomized, got {self.method!r}")
        if self.lora_space not in LORA_SPACES:
            raise ValueError(f"lora_space must be one of {LORA_SPACES}, got {self.lora_space!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {self.normalize!r}")


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    """Which controls run and how.

    Attributes:
        null_draws: Gaussian null draws per layer (0 turns the null off).
        holdout: 'loo', an int K for K-fold, or None.
        seed: seeds every random draw (null, folds, sketches).
        lineage: compute the lineage control.
        split_half: compute the principal angles between the bases of two random halves.
        shared_fraction: the fraction of models in (near-)identical groups from which a layer is
            "explained by shared initialisation".
    """

    null_draws: int = _field(3, "integer", "Gaussian null draws per layer (0: off).")
    holdout: str | int | None = _field(
        5, "string", "'loo', K for K-fold, or 'none'.", parse=lambda v: _holdout(v)
    )
    seed: int = _field(0, "integer", "Seed of every random draw.")
    lineage: bool = _field(True, "bool", "Lineage control: similarities, identical tensors.")
    shared_fraction: float = _field(
        0.2,
        "float",
        "Fraction of models in identical groups from which a layer is 'explained by shared "
        "initialisation'.",
    )
    split_half: bool = _field(
        True, "bool", "Principal angles between the bases of two random halves (compare)."
    )

    def __post_init__(self):
        if self.null_draws < 0:
            raise ValueError(
                f"null_draws must be >= 0 (0 turns the null off), got {self.null_draws}"
            )
        if isinstance(self.holdout, int) and self.holdout < 2:
            raise ValueError(f"holdout must be 'loo', 'none' or K >= 2 folds, got {self.holdout}")
        if not 0 < self.shared_fraction <= 1:
            raise ValueError(f"shared_fraction must be in (0, 1], got {self.shared_fraction}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a run reads and what it may use.

    Attributes:
        include, exclude: layer-name regexes.
        base: the base model for `center='base'`.
        compare_to: a second population (sources) for the compare control.
        skip_mismatched: skip layers the models disagree on (listed in the output).
        skip_unreadable: leave out models that cannot be read (pickles, corrupt files), listed
            in the output, instead of stopping.
        groups: a CSV file labelling the models (`run.read_groups`): the groups control.
        num_devices: devices of the `models` mesh (None: all).
        memory_budget: bytes one layer's analysis may use (None: half the host RAM on CPU, 80%
            of device memory on accelerators).
    """

    include: str | None = _field(None, "string", "Only layers whose name matches this regex.")
    exclude: str | None = _field(None, "string", "Drop layers whose name matches this regex.")
    base: str | None = _field(None, "string", "Base model for --center=base.")
    compare_to: tuple[str, ...] | None = _field(
        None, "list", "A second population: principal angles between the two bases."
    )
    skip_mismatched: bool = _field(False, "bool", "Skip layers that models disagree on.")
    skip_unreadable: bool = _field(
        False, "bool", "Leave out models that cannot be read (pickles, corrupt files), listed."
    )
    groups: str | None = _field(
        None,
        "string",
        "CSV: model, then label columns (task, seed, ...): per-group spectra, between-group "
        "capture, leave-one-group-out.",
    )
    num_devices: int | None = _field(
        None,
        "string",
        "Devices on the models axis: 'auto' or a count.",
        flag="mesh",
        flag_default="auto",
        parse=_mesh,
    )
    memory_budget: int | None = _field(
        None,
        "float",
        "GiB one layer's analysis may use (default: half the RAM on CPU).",
        parse=lambda v: None if v is None else int(float(v) * 2**30),
    )

    def __post_init__(self):
        if self.num_devices is not None and self.num_devices < 1:
            raise ValueError(f"mesh must be 'auto' or a count >= 1, got {self.num_devices}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory_budget must be > 0 GiB, got {self.memory_budget / 2**30}")


PARTS = {"spectra": SpectraConfig, "controls": ControlConfig, "run": RunConfig}


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """The whole configuration of an analysis: `spectra`, `controls` and `run` parts."""

    spectra: SpectraConfig = SpectraConfig()
    controls: ControlConfig = ControlConfig()
    run: RunConfig = RunConfig()

    @classmethod
    def from_options(cls, **options) -> AnalysisConfig:
        """The typed form of the flat keyword options of `jsubspace.analyze` (each option is a
        field of exactly one part; an unknown one is a TypeError naming it)."""
        parts = {name: {} for name in PARTS}
        owner = {f.name: name for name, part in PARTS.items() for f in dataclasses.fields(part)}
        for key, value in options.items():
            if key not in owner:
                raise TypeError(f"unknown option {key!r}; options are {sorted(owner)}")
            parts[owner[key]][key] = _normalise(key, value)
        return cls(**{name: PARTS[name](**values) for name, values in parts.items()})

    def options(self) -> dict:
        """The flat keyword options (`from_options` of them gives this config back)."""
        out = {}
        for name in PARTS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out

    def to_json(self) -> dict:
        """`{"spectra": {...}, "controls": {...}, "run": {...}}` in JSON types."""
        return {
            name: {k: list(v) if isinstance(v, tuple) else v for k, v in part.items()}
            for name, part in ((n, dataclasses.asdict(getattr(self, n))) for n in PARTS)
        }

    @classmethod
    def from_json(cls, record: dict) -> AnalysisConfig:
        """The config `to_json` wrote."""
        return cls(
            **{
                name: PARTS[name](
                    **{k: _normalise(k, v) for k, v in (record.get(name) or {}).items()}
                )
                for name in PARTS
            }
        )


def _normalise(key: str, value):
    """Sequences as tuples (hashable, comparable after a JSON round trip); a K-fold holdout
    given as text ('5') as an int."""
    if key in ("modes", "compare_to") and value is not None:
        if isinstance(value, str):
            value = [value]
        return tuple(value)
    if key == "holdout" and value not in (None, "loo"):
        return int(value)
    return value
