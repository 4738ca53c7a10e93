"""Typed layer records: what `spectra.analyze_layer` returns, turned into the JSON of
`spectra.json` only at the edge (`LayerRecord.to_json`).

The controls' own records (null, holdout, compare, lineage) and the plan stay the plain
dictionaries their modules write (their keys are documented there); the layer, its modes and
its verdict are typed.
"""

from __future__ import annotations

import dataclasses

from jsubspace.spectra._verdict import Verdict


@dataclasses.dataclass(frozen=True)
class ModeRecord:
    """One mode's spectrum and how it was computed.

    Attributes:
        eigenvalues, evr, cev: descending eigenvalues, their explained-variance ratios and the
            cumulative ratios (all over the exact total energy).
        k_at: `{tau: k}`, the smallest k with CEV(k) >= tau (None where the computed eigenvalues
            do not reach tau).
        effective_rank: `exp(entropy(EVR))`, None when eigenvalues are missing.
        method: the solver that ran ('exact', 'exact-dual', 'randomized', ...).
        side: the side length of the mode's matrix.
        total_energy: the mode's own trace where it differs from the layer's (LoRA factors).
        estimated_flops, residual, iterations: the randomized solver's cost and accuracy.
    """

    eigenvalues: list[float]
    evr: list[float]
    cev: list[float]
    k_at: dict[str, int | None]
    effective_rank: float | None
    method: str
    side: int | None
    total_energy: float | None = None
    estimated_flops: float | None = None
    residual: list[float] | None = None
    iterations: int | None = None

    def to_json(self) -> dict:
        return {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if v is not None or k in ("effective_rank", "side")
        }

    @classmethod
    def from_json(cls, record: dict) -> ModeRecord:
        """The record `to_json` wrote."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})

    def k_label(self, tau: float = 0.9) -> str:
        """`k_at[tau]` as text: the k, or `>K` when the K computed eigenvalues do not reach
        tau (a randomized solver's top K)."""
        k = self.k_at.get(str(tau))
        return str(k) if k is not None else f">{len(self.eigenvalues)}"


@dataclasses.dataclass
class LayerRecord:
    """One layer's spectra beside its controls and its verdict.

    Attributes:
        name, kind, shape, dtype: the layer as the population holds it.
        center: the spectra's centring ('mean', 'none', 'base').
        total_energy: the trace every mode shares.
        modes: `{mode: ModeRecord}`.
        null, plan, holdout, compare, lineage: the controls' records and the layer's plan.
        scale: per-model norms and the share of the variation along the mean.
        rank, lora: LoRA layers' rank and statistic ('delta' / 'factors').
        normalize: 'fro' when the models were put at unit norm first.
        seconds: wall seconds of each part.
        peak_bytes: peak resident bytes of the process during each part (sampled; empty where
            it cannot be read: `spectra._cost`).
        verdict: the verdict card.
    """

    name: str
    kind: str
    shape: list[int]
    dtype: str
    center: str
    total_energy: float
    modes: dict[str, ModeRecord]
    rank: int | None = None
    lora: str | None = None
    normalize: str | None = None
    scale: dict | None = None
    null: dict | None = None
    plan: dict | None = None
    holdout: dict = dataclasses.field(default_factory=dict)
    compare: dict = dataclasses.field(default_factory=dict)
    lineage: dict | None = None
    groups: dict | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    peak_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    verdict: Verdict | None = None

    def to_json(self, *, verdict: bool = True) -> dict:
        """The `spectra.json` form (key order as written: the null before the controls that
        run ahead of it in time, for readers of the file)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "modes":
                value = {mode: rec.to_json() for mode, rec in value.items()}
            elif field.name == "verdict":
                if not verdict or value is None:
                    continue
                value = value.to_json()
            elif value is None and field.name in (
                "rank",
                "lora",
                "normalize",
                "scale",
                "lineage",
                "groups",
            ):
                continue
            elif field.name == "peak_bytes" and not value:
                continue
            out[field.name] = value
        return out

    @classmethod
    def from_json(cls, record: dict) -> LayerRecord:
        """The record `to_json` wrote (a `spectra.json` layer); keys of a newer writer that
        this version does not know are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        values["modes"] = {m: ModeRecord.from_json(r) for m, r in record["modes"].items()}
        if record.get("verdict") is not None:
            values["verdict"] = Verdict.from_json(record["verdict"])
        return cls(**values)
