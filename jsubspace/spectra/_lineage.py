"""The `lineage` control: how related are the models, and is a result explained by ancestry?

From the uncentred models Gram `K0[i, j] = <W_i, W_j>`: cosine similarities, relative distances
`||W_i - W_j|| / sqrt((||W_i||^2 + ||W_j||^2) / 2)`, average-linkage clustering, and groups of
(near-)identical tensors. Exact identity is decided by bitwise-equal fingerprints (random
projections computed identically for every model) because Gram-based distances cannot resolve
differences below float32 rounding of `K0`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jsubspace import kernels
from jsubspace.kernels import HIGHEST
from jsubspace.sharding._mesh import MODELS

NEAR_IDENTICAL = 0.1  # relative distance; independent random tensors sit near sqrt(2)


@kernels.chunkable_jit(static_argnames=("mesh", "one_at_a_time"), flag="one_at_a_time")
def fingerprints(x: jax.Array, *, mesh: Mesh, one_at_a_time: bool = False) -> jax.Array:
    """`f32[N_pad, 4]`: projections of each model on 4 fixed pseudo-random directions
    (`one_at_a_time`: each model converted to float32 alone, for the chunked route)."""
    feat = int(np.prod(x.shape[1:]))
    probe = jax.random.normal(jax.random.key(20251205), (feat, 4), jnp.float32)

    def body(xb, pr):
        if one_at_a_time:
            return jax.lax.map(
                lambda xi: jnp.matmul(xi.reshape(-1).astype(jnp.float32), pr, precision=HIGHEST),
                xb,
            )
        return jnp.matmul(xb.reshape(xb.shape[0], -1).astype(jnp.float32), pr, precision=HIGHEST)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(MODELS), P()), out_specs=P(MODELS))(x, probe)


def similarity(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and relative distances from an uncentred Gram."""
    g = np.asarray(gram, np.float64)
    d = np.clip(np.diag(g), 1e-300, None)
    cos = g / np.sqrt(np.outer(d, d))
    sq = np.clip(d[:, None] + d[None, :] - 2 * g, 0, None)
    rel = np.sqrt(sq / ((d[:, None] + d[None, :]) / 2))
    np.fill_diagonal(cos, 1.0)
    np.fill_diagonal(rel, 0.0)
    return cos, rel


def average_linkage(dist: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Average-linkage agglomerative clustering (scipy `linkage` format) and the leaf order.

    Lance–Williams updates on the distance matrix: O(N^2) numpy work per merge.
    """
    n = len(dist)
    d = np.array(dist, np.float64)
    np.fill_diagonal(d, np.inf)
    size = np.ones(n)
    ids = list(range(n))
    members = {i: [i] for i in range(n)}
    merges = []
    last = 0
    for step in range(n - 1):
        i, j = np.unravel_index(np.argmin(d), d.shape)
        i, j = min(i, j), max(i, j)
        height = d[i, j]
        merged = (size[i] * d[i] + size[j] * d[j]) / (size[i] + size[j])
        d[i, :] = merged
        d[:, i] = merged
        d[j, :] = np.inf
        d[:, j] = np.inf
        d[i, i] = np.inf
        merges.append([ids[i], ids[j], float(height), size[i] + size[j]])
        members[n + step] = members.pop(ids[i]) + members.pop(ids[j])
        ids[i] = n + step
        size[i] += size[j]
        last = n + step
    order = members[last] if n > 1 else list(range(n))
    return np.asarray(merges, np.float64).reshape(-1, 4), order


def identical_groups(rel: np.ndarray, prints: np.ndarray | None, threshold: float):
    """Groups (size >= 2) of exactly identical and of near-identical models."""
    n = len(rel)

    def components(adj):
        seen, groups = set(), []
        for i in range(n):
            if i in seen:
                continue
            stack, comp = [i], []
            while stack:
                j = stack.pop()
                if j in seen:
                    continue
                seen.add(j)
                comp.append(j)
                stack.extend(np.nonzero(adj[j])[0].tolist())
            if len(comp) > 1:
                groups.append(sorted(comp))
        return groups

    exact = None
    if prints is not None:
        same = np.all(prints[:, None, :] == prints[None, :, :], axis=-1)
        exact = components(same & (rel < 1e-2))
    near = components(rel < threshold)
    return exact, near


def lineage_record(
    gram: np.ndarray,
    names: list[str],
    *,
    prints: np.ndarray | None = None,
    factor_gram: np.ndarray | None = None,
    factor_prints: np.ndarray | None = None,
    threshold: float = NEAR_IDENTICAL,
) -> dict:
    """The lineage record of one layer.

    Args:
        gram: `[N, N]` uncentred models Gram.
        names: model names.
        prints: `[N, 4]` fingerprints of the tensors (dense layers).
        factor_gram: `[N, N]` Gram of the LoRA `A` factors (`<A_i, A_j>`), to find adapters that
            kept one shared `A` initialisation.
        factor_prints: fingerprints of the `A` factors.
        threshold: relative distance below which models count as near-identical.
    """
    cos, rel = similarity(gram)
    n = len(names)
    off = ~np.eye(n, dtype=bool)
    exact, near = identical_groups(rel, prints, threshold)
    linkage, order = average_linkage(1.0 - cos) if n <= 2000 else (np.zeros((0, 4)), list(range(n)))
    record = {
        "cosine": cos.tolist(),
        "norms": np.sqrt(np.clip(np.diag(np.asarray(gram, np.float64)), 0, None)).tolist(),
        "mean_cosine": float(cos[off].mean()) if n > 1 else 1.0,
        "min_relative_distance": float(rel[off].min()) if n > 1 else 0.0,
        "identical_groups": [[names[i] for i in g] for g in (exact or [])],
        "near_identical_groups": [[names[i] for i in g] for g in near],
        "fraction_near_identical": sum(len(g) for g in near) / n,
        "linkage": linkage.tolist(),
        "order": order,
        "threshold": threshold,
    }
    if factor_gram is not None:
        _, frel = similarity(factor_gram)
        fexact, fnear = identical_groups(frel, factor_prints, threshold)
        shared = fexact if fexact else fnear
        record["lora_A"] = {
            "identical_groups": [[names[i] for i in g] for g in (fexact or [])],
            "near_identical_groups": [[names[i] for i in g] for g in fnear],
            "fraction_shared": sum(len(g) for g in shared) / n,
            "fraction_near_identical": sum(len(g) for g in fnear) / n,
        }
    return record
