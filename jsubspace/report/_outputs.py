"""What a person reads: layers.csv, PNG plots and a self-contained report.html."""

from __future__ import annotations

import base64
import collections
import csv
import html
import io as _io
import os
import re
import textwrap

import numpy as np

from jsubspace.io._atomic import atomic_write_bytes
from jsubspace.io._atomic import atomic_write_text
from jsubspace.report._plan import middle_ellipsis
from jsubspace.report._plan import short_names
from jsubspace.spectra import MEANINGS
from jsubspace.spectra import TAUS

MAX_LAYER_PLOTS = 24


def layer_family(name: str) -> str:
    """`model.layers.7.self_attn.q_proj` -> `model.layers.*.self_attn.q_proj`."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)


def _headline(layer: dict, mode: str) -> dict:
    rec = layer["modes"][mode]
    null = (layer.get("null") or {}).get(mode) or {}
    hold = layer.get("holdout") or {}
    row = {
        "layer": layer["name"],
        "kind": layer["kind"],
        "m": layer["shape"][0],
        "n": layer["shape"][1],
        "dtype": layer["dtype"],
        "mode": mode,
        "method": rec["method"],
        "total_energy": rec.get("total_energy", layer["total_energy"]),
        "lambda_1": rec["eigenvalues"][0] if rec["eigenvalues"] else 0.0,
        "evr_1": rec["evr"][0] if rec["evr"] else 0.0,
        "effective_rank": rec["effective_rank"],
    }
    for tau in TAUS:
        row[f"k_at_{tau}"] = rec["k_at"][str(tau)]
    for k in ("1", "4", "16"):
        row[f"null_excess_k{k}"] = (null.get("excess") or {}).get(k)
    if hold.get("ks"):
        row["holdout_k"] = hold["ks"][-1]
        row["holdout_two_sided"] = hold["two_sided"][-1]
        row["holdout_random"] = hold["random"]["two_sided"][-1]
        row["mean_only"] = hold["mean_only"]
    else:
        row.update(holdout_k=None, holdout_two_sided=None, holdout_random=None, mean_only=None)
    half = (layer.get("compare") or {}).get("split_half") or {}
    side = "cols" if mode in ("cols", "lora_A") else "rows"
    row["split_half_overlap"] = half.get(f"{side}_overlap")
    row["random_overlap"] = half.get(f"random_{side}_overlap")
    row["verdict"] = (layer.get("verdict") or {}).get("label")
    return row


def _criterion(verdict: dict, name: str, side: str | None = None) -> dict | None:
    for c in verdict.get("criteria", []):
        if c["name"] == name and (side is None or c["side"] == side):
            return c
    return None


def _k_label(mode: dict, tau: str = "0.9") -> str:
    k = mode["k_at"].get(tau)
    return str(k) if k is not None else f">{len(mode['eigenvalues'])}"


def verdict_rows(result: dict) -> list[dict]:
    """Per layer, from its verdict card: per side (rows, cols) the held-out capture at the k
    that decides beside a random subspace's, and whether the holdout and the split half pass;
    whether the spectrum departs from the null; the mean-only fraction; the verdict."""
    rows = []
    for layer in result["layers"]:
        verdict = layer.get("verdict") or {}
        label = verdict.get("label")
        if len(verdict.get("shared", [])) == 1:  # name the shared side's role
            side = verdict["shared"][0]
            role = (verdict.get("roles") or {}).get(side)
            label = f"{label} ({side}: {role} side)" if role else label
        row = {"layer": layer["name"], "verdict": label}
        for side in ("rows", "cols"):
            held = _criterion(verdict, "holdout", side) or {}
            half = _criterion(verdict, "split_half", side) or {}
            row[side] = held.get("value")
            row[f"{side}_random"] = held.get("reference")
            row[f"{side}_k"] = held.get("k")
            row[f"{side}_passed"] = held.get("passed")
            row[f"{side}_split_half"] = half.get("passed")
        nulls = [c for c in verdict.get("criteria", []) if c["name"] == "null"]
        row["beyond_null"] = any(c["passed"] for c in nulls) if nulls else None
        # Per side, the mode whose spectrum it is (rows / cols, or the LoRA factors' B / A)
        # and its k_at(0.9), as text: `>K` when the K computed eigenvalues fall short.
        for side, names in (("rows", ("rows", "lora_B")), ("cols", ("cols", "lora_A"))):
            mode = next((m for m in names if m in layer["modes"]), None)
            row[f"{side}_mode"] = mode
            row[f"{side}_k90"] = _k_label(layer["modes"][mode]) if mode else None
        # The first mode's k_at(0.9) and null excess at k = 1 (rows, or the LoRA A factors).
        mode = next((m for m in ("rows", "lora_A", "cols", "models") if m in layer["modes"]), None)
        null = ((layer.get("null") or {}).get(mode) or {}) if mode else {}
        row["mode"] = mode
        row["k90"] = layer["modes"][mode]["k_at"]["0.9"] if mode else None
        row["excess_k1"] = (null.get("excess") or {}).get("1")
        mean_only = _criterion(verdict, "mean_only")
        row["mean_only"] = mean_only["value"] if mean_only else None
        rows.append(row)
    return rows


LEGEND_ENTRIES = (
    "rows / cols: the two sides of each layer's matrix (its input and output, named in the "
    "verdict); a LoRA layer's rows are its B factors' side, its cols its A factors'.",
    "held-out: mean capture of held-out models by the basis fitted without them, at the k (@k) "
    "where it beats a random k-subspace (rand) most; + when beyond it at the 5% level "
    "(bootstrap over models, corrected for every k and side tried), ++ when the split halves "
    "agree too.",
    "k@.9: the smallest k whose directions hold 90% of that side's spectrum (mode rows / cols, "
    "or lora_B / lora_A); >K when the K eigenvalues computed fall short.",
    "null: + when the spectrum is more concentrated than a matched Gaussian population.",
    "mean-only: the share of held-out energy the training mean alone explains (energy-weighted; "
    "negative when the mean of other models moves a model further away than zero would).",
    "Each layer's verdict card (every criterion, reference, interval) is in spectra.json and "
    "report.html.",
)
LEGEND = "\n".join(textwrap.fill(entry, 90, subsequent_indent="  ") for entry in LEGEND_ENTRIES)


def legend_html() -> str:
    """The legend as an HTML list (for report.html and the main job's index.html)."""
    items = "".join(f"<li>{html.escape(entry)}</li>" for entry in LEGEND_ENTRIES)
    return f'<ul class="legend" style="font-size: smaller">{items}</ul>'


NAME_WIDTH = 48


def _number(v) -> str:
    """Three decimals, or two significant digits in scientific notation for values that
    three decimals would show as 0.000."""
    if v is None:
        return "-"
    if v != 0 and abs(v) < 0.0005:
        return f"{v:.1e}"
    return f"{v:.3f}"


def verdict_table(result: dict, *, width: int | None = None, legend: bool = True) -> str:
    """`verdict_rows` as a text table (rendered by `rich`, plain text without colour), with
    a legend (unless `legend` is False: a caller printing several tables prints `LEGEND`
    once) and the population's conclusion. Layer names are cut in the middle to `width`
    (default 48) where needed, never so that two read alike."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    rows = verdict_rows(result)
    names = short_names([r["layer"] for r in rows], width or NAME_WIDTH)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    table.add_column("layer", no_wrap=True)
    for side in ("rows", "cols"):
        table.add_column(f"{side}: held-out", justify="right", no_wrap=True)
        table.add_column("rand", justify="right", no_wrap=True)
        table.add_column("k@.9", justify="right", no_wrap=True)
    table.add_column("null", justify="center", no_wrap=True)
    table.add_column("mean-only", justify="right", no_wrap=True)
    table.add_column("verdict")
    null = {True: "+", False: "-", None: ""}
    for name, r in zip(names, rows):
        cells = [name]
        for side in ("rows", "cols"):
            held, half = r[f"{side}_passed"], r[f"{side}_split_half"]
            mark = ("+" if held else "") + ("+" if held and half else "")
            at = f"@{r[f'{side}_k']}" if r[f"{side}_k"] else ""
            value = _number(r[side])
            cells += [
                f"{value}{mark:<2}{at}" if r[side] is not None else "-",
                _number(r[f"{side}_random"]),
                r[f"{side}_k90"] or "-",
            ]
        cells += [null[r["beyond_null"]], _number(r["mean_only"]), r["verdict"] or "-"]
        table.add_row(*cells)
    buffer = _io.StringIO()
    # Wide enough that nothing but the verdict ever wraps; no colour or cursor codes, so
    # the text reads the same in a terminal, a log and a file.
    console = Console(file=buffer, width=200, color_system=None, force_terminal=False)
    console.print(table)
    lines = [line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines()]
    if legend:
        lines += ["", LEGEND]
    if result.get("conclusion"):
        lines += ["", f"conclusion: {result['conclusion']}"]
    return "\n".join(lines)


def write_csv(path: str, result: dict) -> None:
    """One row per layer and mode with the headline numbers."""
    rows = [_headline(layer, mode) for layer in result["layers"] for mode in layer["modes"]]
    buf = _io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _save(fig, path: str) -> str:
    buf = _io.BytesIO()
    # Every figure lays itself out (constrained layout): a tight bounding box on top would draw
    # it a second time.
    fig.savefig(buf, format="png", dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _plot_layer(layer: dict, path: str) -> str:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    modes = list(layer["modes"])
    fig, axes = plt.subplots(
        1, len(modes), figsize=(4 * len(modes), 3.4), squeeze=False, layout="constrained"
    )
    for ax, mode in zip(axes[0], modes):
        rec = layer["modes"][mode]
        c = np.asarray(rec["cev"])
        k = np.arange(1, len(c) + 1)
        ax.plot(k, c, "o-", ms=3, color="C0", label="observed")
        null = (layer.get("null") or {}).get(mode)
        if null:
            mean, std = np.asarray(null["cev_mean"]), np.asarray(null["cev_std"])
            kk = np.arange(1, len(mean) + 1)
            ax.fill_between(
                kk,
                mean - 3 * std,
                mean + 3 * std,
                color="0.6",
                alpha=0.4,
                label="Gaussian null ±3σ",
            )
            ax.plot(kk, mean, color="0.3", lw=1, label="null mean")
            if null.get("mp_cev"):
                mp = np.asarray(null["mp_cev"])
                ax.plot(
                    np.arange(1, len(mp) + 1), mp, "--", color="C3", lw=1, label="Marchenko–Pastur"
                )
        ax.set_xscale("log")
        # Plain integer ticks: few models put 3x10^0, 4x10^0 labels side by side.
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        # No minor ticks: their tick objects were most of the figure's drawing time.
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("k")
        ax.set_title(f"{mode} ({rec['method']})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("cumulative explained variance")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{layer['name']}: {(layer.get('verdict') or {}).get('label', '')}", fontsize=10)
    return _save(fig, path)


def _plot_k_at(result: dict, path: str) -> str:
    import matplotlib.pyplot as plt

    layers = result["layers"]
    modes = sorted({m for layer in layers for m in layer["modes"]})
    grid = np.full((len(layers), len(modes)), np.nan)
    text = [[""] * len(modes) for _ in layers]
    short = np.zeros(grid.shape, bool)
    for i, layer in enumerate(layers):
        for j, mode in enumerate(modes):
            if mode in layer["modes"]:
                rec = layer["modes"][mode]
                k = rec["k_at"]["0.9"]
                # Past the computed eigenvalues (a randomized solver's top K): at least K + 1,
                # drawn at K + 1 and marked ">K", hatched.
                short[i, j] = k is None
                grid[i, j] = len(rec["eigenvalues"]) + 1 if k is None else k
                text[i][j] = _k_label(rec)
    fig, ax = plt.subplots(
        figsize=(2 + 1.3 * len(modes), 1.2 + 0.28 * len(layers)), layout="constrained"
    )
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(modes)), modes)
    names = short_names([layer["name"] for layer in layers], NAME_WIDTH)
    ax.set_yticks(range(len(layers)), names, fontsize=7)
    for i in range(len(layers)):
        for j in range(len(modes)):
            if short[i, j]:
                ax.add_patch(
                    plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", ec="w", lw=0)
                )
            if text[i][j]:
                # Dark text on the bright end of viridis, white on the dark end.
                bright = im.norm(grid[i, j]) > 0.6
                ax.text(
                    j,
                    i,
                    text[i][j],
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="k" if bright else "w",
                )
    fig.colorbar(im, ax=ax, label="k at 90% energy")
    title = "k_at(0.9) per layer and mode"
    if short.any():
        title += "\n(>K, hatched: the K computed eigenvalues fall short of 90%)"
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _plot_holdout(layer: dict, path: str) -> str | None:
    import matplotlib.pyplot as plt

    hold = layer.get("holdout") or {}
    if not hold.get("ks"):
        return None
    ks = hold["ks"]
    fig, ax = plt.subplots(figsize=(4.5, 3.2), layout="constrained")
    ax.plot(ks, hold["two_sided"], "o-", label="held-out, two-sided U^T X V")
    ax.plot(ks, hold["cols_one_sided"], "s-", ms=3, label="held-out, one-sided X V")
    ax.plot(ks, hold["random"]["two_sided"], ":", color="0.4", label="random subspace")
    ax.plot(ks, hold["mean_plus_basis"], "^-", ms=3, label="mean + basis (uncentred)")
    ax.axhline(hold["mean_only"], color="C3", ls="--", label="mean only (uncentred)")
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("fraction of held-out energy")
    ax.set_title(f"{layer['name']}: {hold['scheme']} holdout", fontsize=9)
    # Beside the axes, never over the curves.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def whole_model_cosine(result: dict) -> np.ndarray | None:
    """Cosine similarity of whole models (all analysed layers concatenated)."""
    total = None
    for layer in result["layers"]:
        lin = layer.get("lineage")
        if not lin or "norms" not in lin:
            continue
        norms = np.asarray(lin["norms"])
        gram = np.asarray(lin["cosine"]) * np.outer(norms, norms)
        total = gram if total is None else total + gram
    if total is None:
        return None
    d = np.sqrt(np.clip(np.diag(total), 1e-300, None))
    return total / np.outer(d, d)


def _plot_lineage(result: dict, path: str) -> str | None:
    import matplotlib.pyplot as plt

    cos = whole_model_cosine(result)
    if cos is None:
        return None
    order = next(
        (layer["lineage"]["order"] for layer in result["layers"] if layer.get("lineage")),
        list(range(len(cos))),
    )
    cos = cos[np.ix_(order, order)]
    names = [result["models"][i] for i in order]
    fig, ax = plt.subplots(figsize=(5.5, 4.6), layout="constrained")
    im = ax.imshow(cos, cmap="magma", vmin=min(0.0, cos.min()), vmax=1.0)
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set_title("whole-model similarity (clustered order)", fontsize=10)
    return _save(fig, path)


MAX_GROUP_PANELS = 6


def _plot_groups(result: dict, column: str, path: str) -> str | None:
    """Per layer (the first few with the control), the between-group capture matrix of one
    grouping: row a's basis on column b's held-out variation, two-sided at the record's k; the
    diagonal is each group's own basis on its own held-out models."""
    import matplotlib.pyplot as plt

    layers = [
        layer
        for layer in result["layers"]
        if ((layer.get("groups") or {}).get(column) or {}).get("k")
    ][:MAX_GROUP_PANELS]
    if not layers:
        return None
    fig, axes = plt.subplots(
        1, len(layers), figsize=(3.6 * len(layers), 3.6), squeeze=False, layout="constrained"
    )
    for ax, layer in zip(axes[0], layers):
        rec = layer["groups"][column]
        grid = np.array(
            [[np.nan if v is None else v for v in row] for row in rec["capture"]["two_sided"]]
        )
        im = ax.imshow(grid, vmin=0, vmax=max(1e-9, np.nanmax(grid)), cmap="magma")
        labels = [middle_ellipsis(label, 14) for label in rec["labels"]]
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("held-out models of", fontsize=8)
        ax.set_ylabel("basis of", fontsize=8)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if np.isfinite(grid[i, j]):
                    bright = im.norm(grid[i, j]) > 0.6
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="k" if bright else "w",
                    )
        ax.set_title(
            f"{middle_ellipsis(layer['name'], 40)}\nk={rec['k']}, random "
            f"{rec['random']['two_sided']:.3f}",
            fontsize=8,
        )
    fig.suptitle(f"between-group capture ({column}), two-sided", fontsize=10)
    return _save(fig, path)


def write_plots(directory: str, result: dict) -> list[tuple[str, str]]:
    """Writes the PNGs; returns `(caption, path)` pairs in report order."""
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(directory, exist_ok=True)
    images = []
    if p := _plot_lineage(result, os.path.join(directory, "lineage.png")):
        images.append(("Whole-model similarity (lineage)", p))
    images.append(("k at 90% energy", _plot_k_at(result, os.path.join(directory, "k_at.png"))))
    columns = dict.fromkeys(c for layer in result["layers"] for c in layer.get("groups") or {})
    for i, column in enumerate(columns):
        if p := _plot_groups(result, column, os.path.join(directory, f"groups_{i:02d}.png")):
            images.append((f"Between-group capture: {column}", p))
    families = collections.OrderedDict()
    for layer in result["layers"]:
        families.setdefault(layer_family(layer["name"]), []).append(layer)
    chosen = (
        result["layers"]
        if len(result["layers"]) <= MAX_LAYER_PLOTS
        else [group[0] for group in families.values()][:MAX_LAYER_PLOTS]
    )
    for i, layer in enumerate(chosen):
        images.append(
            (
                f"Spectra vs null: {layer['name']}",
                _plot_layer(layer, os.path.join(directory, f"cev_{i:03d}.png")),
            )
        )
        if p := _plot_holdout(layer, os.path.join(directory, f"holdout_{i:03d}.png")):
            images.append((f"Held-out capture: {layer['name']}", p))
    return images


_EXPLAIN = {label.value: text for label, text in MEANINGS.items()}


def write_report_html(result: dict, images: list[tuple[str, str]], out: str) -> str:
    """A self-contained page: verdicts per layer family, the table, and the embedded plots."""
    families = collections.OrderedDict()
    for layer in result["layers"]:
        families.setdefault(layer_family(layer["name"]), []).append(layer)
    rows = []
    for family, layers in families.items():
        counts = collections.Counter((la.get("verdict") or {}).get("label", "?") for la in layers)
        label, count = counts.most_common(1)[0]
        detail = ", ".join(f"{c}× {v}" for v, c in counts.items())
        rows.append(
            f"<tr><td><code>{html.escape(family)}</code></td><td>{len(layers)}</td>"
            f"<td><b>{html.escape(label)}</b><br><small>{html.escape(detail)}</small></td>"
            f"<td>{html.escape(_EXPLAIN.get(label, ''))}</td></tr>"
        )
    table = []
    for layer in result["layers"]:
        for mode in layer["modes"]:
            h = _headline(layer, mode)
            table.append(
                "<tr>"
                + "".join(
                    f"<td>{html.escape(_fmt(h[k]))}</td>"
                    for k in (
                        "layer",
                        "mode",
                        "method",
                        "k_at_0.9",
                        "effective_rank",
                        "null_excess_k1",
                        "null_excess_k4",
                        "holdout_two_sided",
                        "holdout_random",
                        "mean_only",
                        "split_half_overlap",
                        "random_overlap",
                        "verdict",
                    )
                )
                + "</tr>"
            )
    figures = []
    for caption, path in images:
        data = base64.b64encode(open(path, "rb").read()).decode()
        rel = os.path.relpath(path, out)
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(rel)}">'
            f"<figcaption>{html.escape(caption)} (<code>{html.escape(rel)}</code>)"
            "</figcaption></figure>"
        )
    cards = "".join(_verdict_card(layer) for layer in result["layers"])
    skipped = "".join(
        f"<li><code>{html.escape(s['name'])}</code>: {html.escape(s['reason'])}</li>"
        for s in result.get("skipped_layers", [])
    )
    skipped_models = "".join(
        f"<li><code>{html.escape(s['path'])}</code>: {html.escape(s['reason'])}</li>"
        for s in result.get("skipped_models", [])
    )
    manifest = result["manifest"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jsubspace report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>jsubspace: is there a shared weight subspace?</h1>
<p><b>Conclusion: {html.escape(result.get("conclusion", ""))}.</b></p>
<p>{len(result["models"])} models, {len(result["layers"])} layers, centre
<code>{html.escape(str(result["config"]["center"]))}</code>, null draws
{result["config"]["null_draws"]}, holdout {html.escape(str(result["config"]["holdout"]))}.
jsubspace {html.escape(str(manifest["jsubspace"]))}, jax {html.escape(manifest["jax"])},
{manifest["mesh"]["size"]} device(s) ({html.escape(manifest["backend"])}).</p>
<h2>Verdict per layer family</h2>
<table><tr><th>family</th><th>layers</th><th>verdict</th><th>what it means</th></tr>
{"".join(rows)}</table>
{f"<h3>Skipped layers</h3><ul>{skipped}</ul>" if skipped else ""}
{f"<h3>Models left out (unreadable)</h3><ul>{skipped_models}</ul>" if skipped_models else ""}
<h2>Verdict cards</h2>
<p>Each layer's label and every criterion it read: the statistic, what it would be without the
effect (a random subspace, the null's mean), its interval at the test's level and the bound it
must pass. A layer's claims hold at a family-wise false-positive rate of 5%.</p>
{legend_html()}
{cards}
<h2>Plots</h2>
{"".join(figures)}
<h2>Headline numbers</h2>
<table><tr><th>layer</th><th>mode</th><th>method</th><th>k@0.9</th><th>eff. rank</th>
<th>null excess k=1</th><th>k=4</th><th>held-out two-sided</th><th>random</th>
<th>mean only</th><th>split-half overlap</th><th>random</th><th>verdict</th></tr>
{"".join(table)}</table>
<p>Full numbers: <code>spectra.json</code>, <code>layers.csv</code>.</p>
</body></html>
"""


_CRITERIA = {
    "lineage": "models in groups of identical tensors",
    "scale": "centred energy along the mean direction",
    "null": "CEV(k) against the Gaussian null",
    "holdout": "held-out capture against a random k-subspace",
    "split_half": "overlap of two random halves' bases against random subspaces",
    "mean_only": "held-out energy explained by the training mean",
}


def _verdict_card(layer: dict) -> str:
    """One layer's verdict card as an HTML `<details>` block."""
    verdict = layer.get("verdict") or {}
    rows = []
    for c in verdict.get("criteria", []):
        interval = c.get("interval")
        shown = f"[{interval[0]:.3g}, {interval[1]:.3g}]" if interval else "–"
        passed = {True: "pass", False: "fail", None: "not judged"}[c["passed"]]
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    c["name"],
                    _CRITERIA.get(c["name"], ""),
                    c["side"] or "–",
                    c["k"] or "–",
                    _fmt(c["value"]),
                    _fmt(c["reference"]),
                    shown,
                    _fmt(c["threshold"]),
                    passed,
                )
            )
            + "</tr>"
        )
    extra = "".join(
        f"<li>{html.escape(m)}</li>" for m in verdict.get("missing", []) + verdict.get("notes", [])
    )
    return (
        f"<details><summary><code>{html.escape(layer['name'])}</code>: "
        f"<b>{html.escape(str(verdict.get('label')))}</b> — "
        f"{html.escape(str(verdict.get('reason', '')))}</summary>"
        "<table><tr><th>criterion</th><th>what</th><th>side</th><th>k</th><th>value</th>"
        "<th>reference</th><th>interval</th><th>bound</th><th></th></tr>"
        f"{''.join(rows)}</table>{f'<ul>{extra}</ul>' if extra else ''}</details>"
    )


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
