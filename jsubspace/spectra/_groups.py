"""The `groups` control: do groups of models (task, seed, base model, author) share one subspace,
or does each have its own?

For one grouping (a label per model) and one layer:
  * **between-group capture** `C[a, b]`: how much of group b's variation the basis of group a
    captures. The basis is the top-k rows / cols eigenvectors of a's models centred by a's mean
    (`masked_bases`); each model of b is centred by another model of b (a cyclic pairing in a
    seeded order), a difference that no model of a's basis enters, so with nothing shared
    between a and b its expected capture is exactly a random k-subspace's (`k^2/(mn)`, `k/n`,
    `k/m`) -- the argument of `_holdout.centre_models`. Two-sided `||U^T D V||^2 / ||D||^2`
    and one-sided per side, the mean over b's models.
  * the diagonal `C[b, b]` is b's **own** basis on its own held-out models: the holdout control
    run inside b alone (leave-one-out up to 10 models, else 5 folds), the reference a foreign
    basis is measured against;
  * **mean-only** `M[a, b]`: the share of b's energy (about zero, or the base) that a's mean
    alone explains, energy-weighted: `1 - sum_i ||W_i - mu_a||^2 / sum_i ||W_i - ref||^2`;
  * a **leave-one-group-out** holdout: the holdout control with the groups as folds;
  * each group's `models`-mode spectrum, from the population's uncentred Gram (no new pass).
The matrices are read at one k for all pairs, the largest of `EXCESS_KS` that every basis
reaches; the curves at every `k <= that` are in the record too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jsubspace.kernels._hosvd import EXACT
from jsubspace.sharding._mesh import host_array
from jsubspace.sharding._mesh import padded_count
from jsubspace.sharding._mesh import stacked_sharding
from jsubspace.spectra._holdout import MIN_MODELS
from jsubspace.spectra._holdout import _population_sum
from jsubspace.spectra._holdout import _record
from jsubspace.spectra._holdout import held_captures
from jsubspace.spectra._holdout import holdout_control
from jsubspace.spectra._holdout import masked_bases
from jsubspace.spectra._holdout import model_weights
from jsubspace.spectra._null import EXCESS_KS

SIDES = ("two_sided", "rows", "cols")
OWN_LOO_UP_TO = 10
"""A group of at most this many models is its own holdout leave-one-out; larger ones 5-fold."""


@dataclasses.dataclass(frozen=True)
class Grouping:
    """One label column over the population's models.

    Attributes:
        column: the label's name ('task', 'seed', 'base_model', ...).
        labels: the distinct labels, in order of first appearance.
        index: per model (population order), the index of its label.
    """

    column: str
    labels: tuple[str, ...]
    index: tuple[int, ...]

    @classmethod
    def from_labels(cls, column: str, values: list[str]) -> Grouping:
        labels = tuple(dict.fromkeys(values))
        return cls(column, labels, tuple(labels.index(v) for v in values))

    def sizes(self) -> list[int]:
        return np.bincount(np.asarray(self.index), minlength=len(self.labels)).tolist()


def within_pairs(index: np.ndarray, seed: int) -> np.ndarray:
    """`int[N]`: for each model, another model of its own group (a cycle through each group in a
    seeded order, so every model centres exactly one other); -1 in a group of one."""
    rng = np.random.default_rng([seed, 7])
    partner = np.full(len(index), -1)
    for g in np.unique(index):
        members = rng.permutation(np.flatnonzero(index == g))
        if len(members) > 1:
            partner[members] = np.roll(members, -1)
    return partner


def _substack(x: jax.Array, idx: np.ndarray, mesh: Mesh) -> jax.Array:
    """The models `idx` of `x` as their own zero-padded stack on the mesh."""
    n_pad = padded_count(len(idx), mesh)
    sub = jnp.take(x, jnp.asarray(idx), axis=0)
    pad = jnp.zeros((n_pad - len(idx),) + x.shape[1:], x.dtype)
    return jax.device_put(jnp.concatenate([sub, pad]), stacked_sharding(mesh))


def _group_spectrum(uncentred: np.ndarray, members: np.ndarray, top: int = 16) -> dict:
    """A group's `models`-mode spectrum: the eigenvalues of its centred inner products."""
    k = uncentred[np.ix_(members, members)].astype(np.float64)
    h = np.eye(len(members)) - 1.0 / len(members)
    lam = np.clip(np.linalg.eigvalsh(h @ k @ h)[::-1], 0.0, None)
    total = float(lam.sum())
    if total <= 0:
        return {
            "n": len(members),
            "energy": 0.0,
            "evr": [],
            "k_at_0.9": None,
            "effective_rank": None,
        }
    evr = lam / total
    p = evr[evr > 0]
    return {
        "n": int(len(members)),
        "energy": total,
        "evr": evr[:top].tolist(),
        "k_at_0.9": int(np.searchsorted(np.cumsum(evr), 0.9 - 1e-12) + 1),
        "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
    }


def group_control(
    x: jax.Array,
    n_models: int,
    grouping: Grouping,
    *,
    mesh: Mesh,
    seed: int,
    ref: jax.Array | None = None,
    uncentred: np.ndarray | None = None,
    solvers=EXACT,
    key: jax.Array | None = None,
    iterations: int = 4,
    chunk: int | None = None,
) -> dict:
    """The groups record of one layer for one grouping (see the module docstring).

    Args:
        x: `dtype[N_pad, m, n]`, the layer's stack (sharded over models, zero padding).
        n_models: N.
        grouping: each model's label.
        seed: seeds the pairings and the groups' own holdout folds.
        ref: `f32[m, n]`, what the mean-only baseline's energy is measured about (zeros, or the
            base model for `center='base'`).
        uncentred: `f64[N, N]`, the models' inner products, for the per-group spectra.
        solvers, key, iterations: the plan's `(rows, cols)` solvers of control bases.
        chunk: the plan's models converted to float32 at a time (`LayerPlan.chunk`).
    """
    n_pad, m, n = x.shape
    index = np.asarray(grouping.index)
    sizes = np.bincount(index, minlength=len(grouping.labels))
    n_groups = len(sizes)
    key = jax.random.key(seed) if key is None else key
    ref = jnp.zeros((m, n), jnp.float32) if ref is None else jnp.asarray(ref, jnp.float32)
    total = _population_sum(x, mesh=mesh, one_at_a_time=chunk is not None)
    partner = within_pairs(index, seed)
    sharded = stacked_sharding(mesh)
    nan = np.full((n_groups, n_groups), np.nan)
    curves = {side: {} for side in SIDES}  # (a, b) -> capture at each k of a's basis
    mean_only = nan.copy()
    reach = []  # the largest k every basis reaches
    notes = []

    # Foreign bases: group a's basis on every model of the other groups (one call per a).
    for a in range(n_groups):
        if sizes[a] < 2:
            notes.append(f"{grouping.labels[a]!r} has one model: no basis of its own")
            continue
        ka = max(1, min(64, m, n, int(sizes[a]) - 1))
        reach.append(ka)
        in_a = index == a
        u, v = masked_bases(
            x,
            model_weights(in_a, n_pad, sharded),
            jax.random.fold_in(key, a),
            None,
            mesh=mesh,
            kmax=ka,
            solvers=solvers,
            iterations=iterations,
            chunk=chunk,
        )
        held = np.flatnonzero(~in_a & (partner >= 0))
        if not len(held):
            continue
        # `held_captures`' training mean is (total - sum of the held) / (count - p): given
        # a's sum plus the held models' as the total, and |a| + p as the count, a's own mean.
        in_held = np.zeros(len(index), bool)
        in_held[held] = True
        sums = _population_sum(
            x,
            model_weights(in_a | in_held, n_pad, sharded),
            mesh=mesh,
            one_at_a_time=chunk is not None,
        )
        found = held_captures(
            x,
            jnp.asarray(held),
            jnp.asarray(partner[held]),
            ref,
            sums,
            float(sizes[a] + len(held)),
            u,
            v,
            mesh=mesh,
            chunk=chunk,
        )
        two, rows, cols, centred, resid, raw = (host_array(f).astype(np.float64) for f in found)
        safe = np.maximum(centred, 1e-30)[:, None]
        for b in range(n_groups):
            mine = index[held] == b
            if b == a or not mine.any():
                continue
            for side, got in zip(SIDES, (two, rows, cols)):
                curves[side][a, b] = (got[mine] / safe[mine]).mean(0)
            mean_only[a, b] = 1.0 - resid[mine].sum() / max(raw[mine].sum(), 1e-30)

    # Own bases: each group's holdout inside it.
    own = {}
    for b in range(n_groups):
        if sizes[b] < MIN_MODELS:
            notes.append(
                f"{grouping.labels[b]!r} has {sizes[b]} models: too few for its own holdout "
                f"(it needs {MIN_MODELS})"
            )
            continue
        members = np.flatnonzero(index == b)
        record = holdout_control(
            _substack(x, members, mesh),
            len(members),
            mesh=mesh,
            holdout="loo" if len(members) <= OWN_LOO_UP_TO else 5,
            seed=seed,
            ref=ref,
            solvers=solvers,
            key=jax.random.fold_in(key, n_groups + b),
            iterations=iterations,
            chunk=chunk,
        )
        own[b] = record
        reach.append(record["ks"][-1])
        mean_only[b, b] = record["mean_only"]

    k = max((kk for kk in EXCESS_KS if kk <= min(reach)), default=None) if reach else None
    ks = [kk for kk in EXCESS_KS if k is not None and kk <= k]
    capture = {side: nan.copy() for side in SIDES}
    at = {side: {} for side in SIDES}
    own_key = {"two_sided": "two_sided", "rows": "rows_one_sided", "cols": "cols_one_sided"}
    for side in SIDES:
        for (a, b), curve in curves[side].items():
            at[side][a, b] = [float(curve[kk - 1]) for kk in ks]
        for b, record in own.items():
            at[side][b, b] = [float(record[own_key[side]][record["ks"].index(kk)]) for kk in ks]
        for (a, b), values in at[side].items():
            if values:
                capture[side][a, b] = values[-1]

    logo = None
    if n_groups >= 2:
        # Leave one group out: the basis of every other group, on the group's own pairs.
        out = [np.zeros((n_models, 64)) for _ in range(3)] + [np.zeros(n_models) for _ in range(3)]
        kmax = max(1, min(64, m, n, n_models - int(sizes.max()) - 1))
        scored = np.zeros(n_models, bool)
        for b in range(n_groups):
            in_b = index == b
            held = np.flatnonzero(in_b & (partner >= 0))
            if not len(held) or n_models - sizes[b] < 2:
                continue  # no pairs to score, or no basis to fit (fewer than 2 models)
            u, v = masked_bases(
                x,
                model_weights(~in_b, n_pad, sharded),
                jax.random.fold_in(key, 2 * n_groups + b),
                None,
                mesh=mesh,
                kmax=kmax,
                solvers=solvers,
                iterations=iterations,
                chunk=chunk,
            )
            found = held_captures(
                x,
                jnp.asarray(held),
                jnp.asarray(partner[held]),
                ref,
                total,
                float(n_models),
                u,
                v,
                mesh=mesh,
                chunk=chunk,
            )
            for j, f in enumerate(found):
                f = host_array(f).astype(np.float64)
                out[j][held, ...] = f if f.ndim == 1 else np.pad(f, ((0, 0), (0, 64 - kmax)))
            scored[held] = True
    if n_groups >= 2 and not scored.any():
        notes.append("no leave-one-group-out holdout: no group has two models to pair")
    elif n_groups >= 2:
        curves_logo = [o[scored][:, :kmax] for o in out[:3]]
        logo = _record(
            *curves_logo,
            *(o[scored] for o in out[3:]),
            m=m,
            n=n,
            kmax=kmax,
            folds=n_groups,
            holdout="groups",
            center="mean",
            note=None,
        )
        per_model = np.asarray(logo["per_model_two_sided"])
        logo["per_group_two_sided"] = {
            grouping.labels[g]: per_model[index[scored] == g].mean(0).tolist()
            for g in range(n_groups)
            if (index[scored] == g).any()
        }

    def matrix(values: np.ndarray) -> list[list[float | None]]:
        return [[None if np.isnan(v) else float(v) for v in row] for row in values]

    spectra = {}
    if uncentred is None:
        notes.append("no per-group spectra: they come from the lineage control's inner products")
    else:
        for g, label in enumerate(grouping.labels):
            spectra[label] = _group_spectrum(uncentred, np.flatnonzero(index == g))
    record = {
        "column": grouping.column,
        "labels": list(grouping.labels),
        "sizes": sizes.tolist(),
        "k": k,
        "ks": ks,
        "capture": {side: matrix(capture[side]) for side in SIDES},
        "curves": {
            side: {
                f"{grouping.labels[a]} -> {grouping.labels[b]}": v for (a, b), v in at[side].items()
            }
            for side in SIDES
        },
        "random": ({"two_sided": k * k / (m * n), "rows": k / m, "cols": k / n} if k else None),
        "mean_only": matrix(mean_only),
        "spectra": spectra,
        "leave_one_group_out": logo,
    }
    if notes:
        record["notes"] = notes
    return record
