"""The printed layer plan: per layer the route, solvers, memory and estimated time, and a total."""

from __future__ import annotations


def middle_ellipsis(name: str, width: int) -> str:
    """`name` cut in the middle to `width` characters (both ends kept: they tell layers apart)."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head) :]


def short_names(names: list[str], width: int) -> list[str]:
    """Each name cut in the middle to `width` (`middle_ellipsis`), never ambiguously: names
    that would read alike are widened until they differ (or kept whole)."""
    out = [middle_ellipsis(n, width) for n in names]
    while True:
        seen: dict[str, list[int]] = {}
        for i, short in enumerate(out):
            seen.setdefault(short, []).append(i)
        clashes = [
            i for group in seen.values() if len(set(names[j] for j in group)) > 1 for i in group
        ]
        if not clashes:
            return out
        width += 4
        for i in clashes:
            out[i] = middle_ellipsis(names[i], width)


def _solvers(plan: dict) -> str:
    return " ".join(
        f"{mode}:{'rand' if solver == 'randomized' else 'exact'}"
        for mode, solver in plan["solvers"].items()
    )


def _control(entry: dict) -> str:
    if entry.get("off"):
        return "off"
    if "skipped" in entry:
        return "too few"
    bases = entry.get("bases", {})
    kinds = {b for b in bases.values()}
    how = "/".join(sorted(kinds)) if kinds else ""
    folds = f"{entry['folds']}f " if "folds" in entry else ""
    return f"{folds}{how}".strip()


def plan_table(plans: list[dict], total: dict, *, width: int = 44) -> str:
    """The plan of a run as a terminal table (`plans`: `LayerPlan.to_json()` records).

    Columns: layer, shape, N, route ('dense c2': the chunked route, two models per device
    converted to float32 at a time), the solver of each mode, the holdout and split-half bases
    (exact / randomized / factored), working-set memory and estimated seconds.
    """
    head = (
        f"{'layer':<{width}} {'shape':>12} {'N':>4} {'route':<11} {'holdout':<14} "
        f"{'split-half':<12} {'memory':>9} {'est. s':>7}  solvers"
    )
    lines = [head, "-" * len(head)]
    for p in plans:
        shape = "x".join(str(s) for s in p["shape"])
        route = p["route"] + (f" c{p['chunk']}" if p.get("chunk") else "")
        lines.append(
            f"{middle_ellipsis(p['name'], width):<{width}} {shape:>12} {p['n_models']:>4} "
            f"{route:<11} {_control(p['controls']['holdout']):<14} "
            f"{_control(p['controls']['split_half']):<12} "
            f"{p['working_set_bytes'] / 2**20:>7,.0f}MB {p['seconds']:>7.1f}  {_solvers(p)}"
        )
    lines.append(
        f"total: {total['layers']} layers, about {total['seconds']:.0f} s at the measured rates; "
        f"largest working set {total['working_set_bytes'] / 2**30:.2f} GiB"
    )
    parts = sorted((total.get("parts") or {}).items(), key=lambda item: -item[1])
    if parts:
        lines.append("by part: " + ", ".join(f"{part} {s:.0f} s" for part, s in parts if s > 0))
    return "\n".join(lines)
