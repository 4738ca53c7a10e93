"""The verdict of a layer: a calibrated decision per side, read from every control, as a card.

Each criterion is a test with a controlled false-positive rate, not a fixed margin:

  * **null**: per mode and k, the observed CEV(k) against the Gaussian null's draws. The null's
    spread is estimated from its `D` draws, so the bound is a t prediction interval,
    `mean + t_{D-1}(1 - a) s sqrt(1 + 1/D)` (s the draws' sample deviation), Bonferroni-corrected
    over every mode and k examined.
  * **holdout**, per side (`rows`, `cols`, and `both` for the two-sided capture): the held-out
    models' mean capture at k against a random k-subspace's `k/side` (`k^2/(mn)` for both). Under
    "no shared subspace" a held-out model is independent of the basis fitted without it, so its
    expected capture is exactly the random one. The lower bound is a percentile bootstrap over
    models at level `a / T` (T the number of side x k tests). Only `k <= side / 2` is examined: at
    the full side every basis captures everything.
  * **split half**, per side: the overlap (mean squared cosine of the principal angles) of two
    random halves' top-k bases against two independent uniformly random k-subspaces of a
    `d`-dimensional space, whose overlap has mean `k/d` and deviation
    `sqrt(2) (d - k) / (d sqrt((d - 1)(d + 2)))`; a normal bound at level `a / 2`.
  * **lineage**: the fraction of models in groups of identical tensors (or LoRA `A` factors).
  * **scale**: the fraction of the centred energy along the mean direction. When it is near one
    the models are one matrix at different scales.
  * **mean only**: the energy-weighted fraction of the held-out updates the training mean
    explains (`1 - sum ||W_i - mu||^2 / sum ||W_i - ref||^2`).

A side is *shared* when its holdout **and** its split half both pass. The label names the shared
sides; a layer with no shared side is explained by the mean, model-specific (beyond the null) or
noise. A label never rests on fewer criteria than it needs: with a control missing the verdict is
*inconclusive* and names the flag that would decide, and populations smaller than a control's
minimum are *too few models to judge*.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import statistics

import numpy as np

ALPHA = 0.05
"""The false-positive rate of each label's claim on one layer (family-wise over its tests)."""

BOOTSTRAP = 2000
"""Bootstrap resamples of the held-out models."""

PAIRED = math.sqrt(2.0)
"""The widening of the held-out capture's interval for models that enter two differences."""

MEAN_DOMINATES = 0.5
"""The mean-only fraction from which the mean carries most of the held-out energy."""

SCALE_DOMINATES = 0.9
"""The fraction of the centred energy along the mean direction from which models are one
matrix at different scales."""

MIN_MODELS = 6
"""The fewest models from which a layer is judged. The split halves of fewer models find one
direction each once centred, and the overlap of two lines in a shared r-dimensional subspace is
`Beta(1/2, (r-1)/2)`: mostly near zero, so the comparison has no power at any useful level. The
holdout's bases are as thin (leave-one-out on five models fits three, one direction fewer once
centred)."""


class Label(enum.StrEnum):
    """The verdict labels. The value is the text written to `spectra.json` and the report."""

    SHARED = "shared subspace (rows and cols)"
    SHARED_COLS = "shared cols subspace; rows model-specific"
    SHARED_ROWS = "shared rows subspace; cols model-specific"
    MEAN = "explained by the mean"
    SHARED_INIT = "explained by shared initialisation"
    SCALE = "one matrix at different scales"
    MODEL_SPECIFIC = "model-specific structure, not shared"
    NOISE = "indistinguishable from noise"
    TOO_FEW = "too few models to judge"
    INCONCLUSIVE = "inconclusive"


SHARED_LABELS = (Label.SHARED, Label.SHARED_COLS, Label.SHARED_ROWS)

MEANINGS = {
    Label.SHARED: "held-out models are captured on both sides by a basis fitted without them, "
    "and two random halves find the same directions",
    Label.SHARED_COLS: "one side (cols: the input side of a torch Linear or LoRA update) is "
    "shared across models; the other is not",
    Label.SHARED_ROWS: "one side (rows: the output side of a torch Linear or LoRA update, the "
    "input side of a flax kernel) is shared across models; the other is not",
    Label.MEAN: "the population mean carries most of each model; what is left is not shared",
    Label.SHARED_INIT: "many models hold identical tensors (copies, or LoRA A left at one "
    "initialisation): any subspace they show is inherited, not learned",
    Label.SCALE: "the models are one matrix at different scales (try --normalize=fro)",
    Label.MODEL_SPECIFIC: "each model is more structured than noise, but its directions do not "
    "carry over to other models",
    Label.NOISE: "the spectrum sits on a Gaussian null and held-out models gain nothing",
    Label.TOO_FEW: "the controls need more models than the population has",
    Label.INCONCLUSIVE: "a control the label needs did not run (the card names the flag)",
}


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One line of a verdict card: a statistic, its reference, a confidence interval (or the
    reference's band) and whether it passed.

    Attributes:
        name: 'null', 'holdout', 'split_half', 'lineage', 'scale' or 'mean_only'.
        side: 'rows', 'cols', 'both', a spectra mode (null), or None.
        k: the subspace dimension the statistic is read at (None where it has none).
        value: the statistic.
        reference: what it would be without the effect tested (random subspace, null mean).
        threshold: the value it must exceed to pass.
        interval: the statistic's confidence interval at the test's level, when it has one.
        passed: whether the effect is there; None for a criterion reported but not judged
            (a split half of too few models).
    """

    name: str
    side: str | None
    k: int | None
    value: float
    reference: float
    threshold: float
    passed: bool | None
    interval: tuple[float, float] | None = None

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["interval"] = list(self.interval) if self.interval is not None else None
        return out

    @classmethod
    def from_json(cls, record: dict) -> Criterion:
        """The criterion `to_json` wrote."""
        interval = record.get("interval")
        return cls(**{**record, "interval": tuple(interval) if interval is not None else None})


_LEGACY_LABELS = {
    "shared input subspace (cols); outputs model-specific": Label.SHARED_COLS.value,
    "shared output subspace (rows); inputs model-specific": Label.SHARED_ROWS.value,
}
"""One-sided labels as an earlier version wrote them."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A layer's verdict card: the label, why, and every criterion it read.

    Attributes:
        label: the decision.
        reason: one sentence naming what decided it.
        shared: the sides judged shared (`('rows', 'cols')`, `('cols',)`, ...).
        roles: which side is the layer's input and which its output (`side_roles`).
        criteria: every statistic read, with reference, interval and pass / fail.
        missing: the controls that did not run or could not, each with why and the flag.
        notes: what else the user should know (fallbacks, disagreements, the mean's share).
        alpha: the false-positive rate of the label's claim.
    """

    label: Label
    reason: str
    shared: tuple[str, ...] = ()
    roles: dict[str, str] = dataclasses.field(default_factory=dict)
    criteria: tuple[Criterion, ...] = ()
    missing: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    alpha: float = ALPHA

    def to_json(self) -> dict:
        return {
            "label": self.label.value,
            "reason": self.reason,
            "shared": list(self.shared),
            "roles": dict(self.roles),
            "criteria": [c.to_json() for c in self.criteria],
            "missing": list(self.missing),
            "notes": list(self.notes),
            "alpha": self.alpha,
        }

    @classmethod
    def from_json(cls, record: dict) -> Verdict:
        """The card `to_json` wrote (a `spectra.json` layer's "verdict")."""
        label, notes = record["label"], tuple(record.get("notes", ()))
        label = _LEGACY_LABELS.get(label, label)
        if label not in Label._value2member_map_:
            # A card of a version whose labels this one does not know: kept readable.
            notes += (f"label written by another version: {label!r}",)
            label = Label.INCONCLUSIVE
        return cls(
            label=Label(label),
            reason=record["reason"],
            shared=tuple(record.get("shared", ())),
            roles=dict(record.get("roles", {})),
            criteria=tuple(Criterion.from_json(c) for c in record.get("criteria", ())),
            missing=tuple(record.get("missing", ())),
            notes=notes,
            alpha=record.get("alpha", ALPHA),
        )

    def find(self, name: str, side: str | None = None) -> Criterion | None:
        """The criterion `name` (of `side`), or None."""
        for c in self.criteria:
            if c.name == name and (side is None or c.side == side):
                return c
        return None


def _t_quantile(p: float, dof: int) -> float:
    """Student's t quantile (`scipy.stats.t.ppf`), from `scipy.special`: importing scipy.stats
    costs a run 0.4-0.8 s, more than the 40-adapter population's holdout."""
    from scipy import special

    return float(special.stdtrit(dof, p))


def null_criteria(record: dict, *, alpha: float = ALPHA) -> list[Criterion]:
    """Per mode, the observed CEV against the null's t prediction bound at the k where it
    exceeds the bound most (relative to the null's spread); Bonferroni over modes and k."""
    null = record.get("null") or {}
    draws = int(null.get("draws", 0))
    if draws < 2:
        return []
    tests = []
    for mode, band in null.items():
        if mode == "draws" or mode not in record["modes"]:
            continue
        obs = np.asarray(record["modes"][mode]["cev"], np.float64)
        mean = np.asarray(band["cev_mean"], np.float64)
        # The recorded deviation is the population one (ddof 0); the bound needs the sample's.
        sd = np.asarray(band["cev_std"], np.float64) * math.sqrt(draws / (draws - 1))
        width = min(len(obs), len(mean))
        # A k at which the null already holds all the energy tests nothing; "all" to float32
        # rounding of the cumulative sums (1e-9 let a full-rank k's 1e-8 rounding in or out
        # of the Bonferroni count from one machine's BLAS to the next).
        for k in (k for k in _KS if k <= width and mean[k - 1] < 1 - CEV_FULL):
            tests.append((mode, k, obs[k - 1], mean[k - 1], sd[k - 1]))
    if not tests:
        return []
    t = _t_quantile(1 - alpha / len(tests), draws - 1) * math.sqrt(1 + 1 / draws)
    best: dict[str, Criterion] = {}
    for mode, k, obs, mean, sd in tests:
        # A float32 floor: identical draws must not make every rounding error significant.
        bound = mean + max(t * sd, 1e-5)
        found = Criterion("null", mode, k, float(obs), float(mean), float(bound), bool(obs > bound))
        old = best.get(mode)
        if old is None or _excess(found) > _excess(old):
            best[mode] = found
    return list(best.values())


def _excess(c: Criterion) -> float:
    return (c.value - c.reference) / max(c.threshold - c.reference, 1e-30)


_KS = (1, 2, 4, 8, 16, 32, 64)

CEV_FULL = 1e-6
"""A null CEV within this of 1 holds all the energy (float32 sums round to ~1e-7)."""

_SIDES = {"rows": "rows_one_sided", "cols": "cols_one_sided", "both": "two_sided"}

# Which side of a layer's matrix is its input and which its output, by the tensor's name (the
# first rule that matches); torch Linear weights and PEFT LoRA updates are `(out, in)`.
SIDE_ROLES = (
    (r"(^|[._/])kernel$", ("input", "output")),  # flax / TF kernels: (in, out)
    (r"(^|\.)(c_attn|c_proj|c_fc)\.weight$", ("input", "output")),  # GPT-2's Conv1D: (in, out)
    (r"embed|(^|\.)(wte|wpe)\.", ("input", "output")),  # embeddings: (vocabulary, hidden)
)


def side_roles(name: str) -> dict[str, str]:
    """`{"rows": "input" | "output", "cols": ...}` of a layer, from its name (`SIDE_ROLES`)."""
    for pattern, (rows, cols) in SIDE_ROLES:
        if re.search(pattern, name):
            return {"rows": rows, "cols": cols}
    return {"rows": "output", "cols": "input"}


def holdout_criteria(record: dict, *, alpha: float = ALPHA, seed: int = 0) -> list[Criterion]:
    """Per side, the held-out mean capture against a random subspace's, with a bootstrap
    interval over models; at the k whose lower bound exceeds the random capture most."""
    holdout = record.get("holdout") or {}
    if not holdout.get("ks") or "per_model_rows_one_sided" not in holdout:
        return []
    m, n = record["shape"][-2:]
    sides = {"rows": m, "cols": n, "both": min(m, n)}
    tests = []
    for side, key in _SIDES.items():
        per_model = np.asarray(holdout[f"per_model_{key}"], np.float64)
        for j, k in enumerate(holdout["ks"]):
            if 2 * k <= sides[side]:
                tests.append((side, k, per_model[:, j], holdout["random"][key][j]))
    if not tests:
        return []
    n_models = len(tests[0][2])
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_models, np.full(n_models, 1.0 / n_models), size=BOOTSTRAP)
    captures = np.stack([t[2] for t in tests], axis=1)  # [N, T]
    means = counts @ captures / n_models  # [B, T]
    level = alpha / len(tests)
    # The percentile bootstrap is too narrow with few models (its lower bound at N = 4 is the
    # smallest capture); the t bound is the wider there, and the two agree for many models.
    # Both widened by sqrt(2): each model enters two held-out differences (its own, and the one
    # it centres; `spectra._holdout.centre_models`), so the captures are pairwise correlated.
    centre = captures.mean(0)
    spread = _t_quantile(1 - level, n_models - 1) * captures.std(0, ddof=1) / math.sqrt(n_models)
    lower = centre - PAIRED * np.maximum(centre - np.quantile(means, level, axis=0), spread)
    upper = centre + PAIRED * np.maximum(np.quantile(means, 1 - level, axis=0) - centre, spread)
    best: dict[str, Criterion] = {}
    for j, (side, k, values, random) in enumerate(tests):
        found = Criterion(
            "holdout",
            side,
            k,
            float(values.mean()),
            float(random),
            float(random),
            bool(lower[j] > random),
            (float(lower[j]), float(upper[j])),
        )
        old = best.get(side)
        if old is None or found.interval[0] - found.reference > old.interval[0] - old.reference:
            best[side] = found
    return [best[s] for s in _SIDES if s in best]


def overlap_deviation(k: int, d: int) -> float:
    """The standard deviation of the overlap (mean squared principal cosine) of two independent
    uniformly random k-subspaces of R^d: `Var tr(P1 P2) = 2 k^2 (d-k)^2 / (d^2 (d-1) (d+2))`."""
    if d <= 1 or k >= d:
        return 0.0
    return math.sqrt(2.0) * (d - k) / (d * math.sqrt((d - 1) * (d + 2)))


def split_half_criteria(record: dict, *, alpha: float = ALPHA) -> list[Criterion]:
    """Per side, the split halves' overlap against two random subspaces', at the k (up to half
    the side) where it exceeds its bound most; normal bounds, Bonferroni over sides and k."""
    half = (record.get("compare") or {}).get("split_half") or {}
    if "k" not in half:
        return []
    m, n = record["shape"][-2:]
    ks = half.get("ks", [half["k"]])
    tests = []
    for side, d in (("rows", m), ("cols", n)):
        values = half.get(f"{side}_overlap_at", [half[f"{side}_overlap"]])
        tests += [(side, d, k, v) for k, v in zip(ks, values) if 2 * k <= d]
    if not tests:
        return []
    z = statistics.NormalDist().inv_cdf(1 - alpha / len(tests))
    best: dict[str, Criterion] = {}
    for side, d, k, value in tests:
        random = k / d
        sd = overlap_deviation(k, d)
        bound = random + z * sd
        found = Criterion(
            "split_half",
            side,
            int(k),
            float(value),
            random,
            bound,
            bool(sd > 0 and value > bound),
            (max(0.0, random - z * sd), min(1.0, bound)),
        )
        old = best.get(side)
        if old is None or _excess(found) > _excess(old):
            best[side] = found
    return [best[s] for s in ("rows", "cols") if s in best]


def scale_fraction(uncentred: np.ndarray) -> float:
    """The fraction of the centred energy along the mean direction, from the uncentred models
    Gram `G` (`f64[N, N]`, `G_ij = <W_i, W_j>`): one for models that are one matrix at
    different scales, about `1/(mn)` for independent models."""
    g = np.asarray(uncentred, np.float64)
    n = len(g)
    if n < 2:
        return 0.0
    row = g.mean(1)  # <W_i, mu>
    mean_sq = row.mean()  # ||mu||^2
    centred = np.trace(g) - n * mean_sq  # sum ||W_i - mu||^2
    if mean_sq <= 0 or centred <= 1e-12 * max(np.trace(g), 1e-300):
        return 0.0
    along = np.sum((row - mean_sq) ** 2) / mean_sq  # sum <W_i - mu, mu/|mu|>^2
    return float(min(1.0, along / centred))


def verdict(
    record: dict,
    *,
    n_models: int,
    shared_fraction: float = 0.2,
    controls: dict | None = None,
    alpha: float = ALPHA,
) -> Verdict:
    """The verdict card of a layer record (`spectra.analyze_layer`'s).

    Args:
        record: the layer's record: its modes, null, holdout, compare, lineage, scale.
        n_models: N.
        shared_fraction: the fraction of models in identical groups from which the layer is
            explained by shared initialisation.
        controls: which controls were asked for, and the flags that turn them on:
            `{"null": bool, "holdout": bool, "split_half": bool, "lineage": bool}` (all True by
            default).
        alpha: the false-positive rate of the label's claim.
    """
    asked = {"null": True, "holdout": True, "split_half": True, "lineage": True}
    asked.update(controls or {})
    center = record.get("center", "mean")
    criteria: list[Criterion] = []
    notes: list[str] = []
    missing: list[str] = []

    lineage = record.get("lineage")
    if lineage:
        exact = sum(len(g) for g in lineage.get("identical_groups", []))
        shared = max(
            exact / max(n_models, 1), (lineage.get("lora_A") or {}).get("fraction_shared", 0.0)
        )
        criteria.append(
            Criterion(
                "lineage", None, None, shared, 0.0, shared_fraction, shared >= shared_fraction
            )
        )
    elif asked["lineage"]:
        missing.append("lineage: not computed for this layer")
    else:
        missing.append("lineage: off (--lineage)")

    scale = record.get("scale") or {}
    if "along_mean" in scale:
        along = scale["along_mean"]
        criteria.append(
            Criterion("scale", None, None, along, 0.0, SCALE_DOMINATES, along >= SCALE_DOMINATES)
        )

    nulls = null_criteria(record, alpha=alpha)
    criteria += nulls
    draws = int((record.get("null") or {}).get("draws", 0))
    if not nulls:
        if draws == 1:
            missing.append("null: one draw cannot estimate its spread (--null_draws=3)")
        elif draws == 0:
            missing.append("null: off (--null_draws=3)")

    holdout = record.get("holdout") or {}
    held = holdout_criteria(record, alpha=alpha)
    criteria += held
    if holdout.get("note"):
        notes.append(holdout["note"])
    if not held:
        if holdout.get("skipped"):
            missing.append(f"holdout: {holdout['skipped']}")
        elif not asked["holdout"] or not holdout:
            missing.append("holdout: off (--holdout=5)")
        else:
            missing.append("holdout: no k up to half a side to judge at")
    halves = split_half_criteria(record, alpha=alpha)
    half_record = (record.get("compare") or {}).get("split_half") or {}
    if halves:
        criteria += halves
    elif half_record.get("skipped"):
        missing.append(f"split half: {half_record['skipped']}")
    else:
        missing.append("split half: off (--split_half)")

    mean_only = holdout.get("mean_only")
    if mean_only is not None:
        criteria.append(
            Criterion(
                "mean_only", None, None, mean_only, 0.0, MEAN_DOMINATES, mean_only >= MEAN_DOMINATES
            )
        )

    roles = side_roles(record.get("name", ""))

    def card(label: Label, reason: str, shared=()) -> Verdict:
        return Verdict(
            label, reason, tuple(shared), roles, tuple(criteria), tuple(missing), tuple(notes)
        )

    def passed(name: str, side: str | None = None) -> bool | None:
        found = [
            c
            for c in criteria
            if c.name == name and (side is None or c.side == side) and c.passed is not None
        ]
        return any(c.passed for c in found) if found else None

    if n_models < MIN_MODELS:
        return card(
            Label.TOO_FEW,
            f"{n_models} models: the split halves would find one direction each and the "
            f"holdout's bases as few; a verdict needs at least {MIN_MODELS} models",
        )
    if passed("lineage"):
        return card(
            Label.SHARED_INIT,
            f"{criteria[0].value:.0%} of the models hold identical tensors (at least "
            f"{shared_fraction:.0%} decides)",
        )
    if passed("scale"):
        return card(
            Label.SCALE,
            f"{scale['along_mean']:.1%} of the variation about the mean lies along the mean "
            "itself: the models differ by scale",
        )

    sides, unconfirmed = [], []
    for side in ("rows", "cols"):
        by_holdout, by_halves = passed("holdout", side), passed("split_half", side)
        if by_holdout and by_halves is not False:
            sides.append(side)
        if by_holdout and by_halves is False:
            unconfirmed.append(side)
        if by_halves and by_holdout is False:
            notes.append(f"{side}: the split half passes but the holdout does not; not shared")
    if mean_only is not None and mean_only >= MEAN_DOMINATES:
        notes.append(f"the training mean explains {mean_only:.0%} of held-out energy")

    if sides:
        if center != "mean" and mean_only is not None and mean_only >= MEAN_DOMINATES:
            # Uncentred captures include the mean: they cannot tell it from a shared subspace.
            return card(
                Label.MEAN,
                f"with --center={center} the captured directions include the mean, which "
                f"explains {mean_only:.0%} of held-out energy",
            )
        need = [m for m in missing if m.startswith(("split half", "lineage"))]
        if need:
            return card(
                Label.INCONCLUSIVE,
                f"the holdout finds {' and '.join(sides)} shared, but " + "; ".join(need),
                sides,
            )
        label = (
            Label.SHARED
            if len(sides) == 2
            else (Label.SHARED_COLS if sides == ["cols"] else Label.SHARED_ROWS)
        )
        evidence = ", ".join(
            f"{c.side} ({roles[c.side]} side) held-out capture {c.value:.3f} vs random "
            f"{c.reference:.3f} at k={c.k}"
            for c in held
            if c.side in sides
        )
        return card(label, evidence, sides)

    if unconfirmed:
        return card(
            Label.INCONCLUSIVE,
            f"the holdout finds {' and '.join(unconfirmed)} shared but the split halves do not "
            "confirm it; more models would decide",
        )
    need = [m for m in missing if m.startswith(("holdout", "split half"))]
    if need:
        return card(Label.INCONCLUSIVE, "no side can be judged shared: " + "; ".join(need))
    if mean_only is not None and mean_only >= MEAN_DOMINATES:
        return card(
            Label.MEAN,
            f"the training mean explains {mean_only:.0%} of held-out energy and no side is "
            "shared beyond it",
        )
    beyond = passed("null")
    if beyond is None:
        return card(
            Label.INCONCLUSIVE,
            "no side is shared; noise or model-specific structure needs the null: "
            + "; ".join(m for m in missing if m.startswith("null")),
        )
    if beyond:
        c = max((c for c in nulls if c.passed), key=_excess)
        return card(
            Label.MODEL_SPECIFIC,
            f"{c.side} CEV({c.k}) {c.value:.3f} above the null's {c.threshold:.3f}, but no side "
            "carries over to held-out models",
        )
    return card(Label.NOISE, "no criterion departs from the null or from a random subspace")


def conclusion(layers: list[dict]) -> str:
    """One line for a population: how many layers got each label, shared ones first."""
    labels = [(la.get("verdict") or {}).get("label", "?") for la in layers]
    if not labels:
        return "no layers analysed"
    order = [label.value for label in Label]
    counts = {lab: labels.count(lab) for lab in dict.fromkeys(labels)}
    shared = sum(counts.get(label.value, 0) for label in SHARED_LABELS)
    parts = [
        f"{c} {lab}"
        for lab, c in sorted(
            counts.items(), key=lambda t: order.index(t[0]) if t[0] in order else 99
        )
    ]
    head = (
        f"{shared} of {len(labels)} layers share a subspace across models"
        if shared and len(labels) > 1
        else "the one layer shares a subspace across models"
        if shared
        else "no shared subspace in the one layer"
        if len(labels) == 1
        else f"no shared subspace in any of {len(labels)} layers"
    )
    return f"{head} ({'; '.join(parts)})"
