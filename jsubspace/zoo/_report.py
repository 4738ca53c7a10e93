"""The main job's own outputs: the function plot (accuracy of models rebuilt from the basis) and
`index.html`, the page that links every population's report."""

from __future__ import annotations

import html


def plot_function(result: dict, path: str) -> None:
    """Accuracy of models rebuilt from the top-k basis against k, beside the originals, the
    mean-only model and chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ks = result["ks"]
    ax.plot(ks, result["seen"], "o-", label="seen models, rebuilt from U_k C V_k^T")
    ax.plot(ks, result["held_out"], "s-", label="held-out models, projected")
    ax.axhline(result["original_seen"], color="C0", ls=":", label="originals (seen)")
    ax.axhline(result["original_held_out"], color="C1", ls=":", label="originals (held out)")
    ax.axhline(result["mean_only_held_out"], color="C3", ls="--", label="mean-only model")
    ax.axhline(result["chance"], color="0.5", ls="-.", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (basis size per layer)")
    ax.set_ylabel("test accuracy on own task")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def index_html(analyses: dict, tables: dict, function: dict) -> str:
    """The main job's page: per population its conclusion and a table of verdicts (with a link
    to its full report), then the function table and plot."""
    from jsubspace import report

    def num(v):
        return "–" if v is None else f"{v:.3f}"

    def side(row, s):
        mark = "+" if row[f"{s}_passed"] else ""
        mark += "+" if row[f"{s}_passed"] and row[f"{s}_split_half"] else ""
        k = f" (k={row[f'{s}_k']})" if row[f"{s}_k"] else ""
        return f"{num(row[s])}{mark} / {num(row[f'{s}_random'])}{k}"

    sections = []
    for name, res in analyses.items():
        rows = "".join(
            f"<tr><td><code>{html.escape(r['layer'])}</code></td><td>{side(r, 'rows')}</td>"
            f"<td>{side(r, 'cols')}</td><td>{num(r['excess_k1'])}</td>"
            f"<td>{num(r['mean_only'])}</td><td>{html.escape(r['verdict'])}</td></tr>"
            for r in tables[name]
        )
        sections.append(
            f"<h2>{html.escape(name)}</h2><p><b>{html.escape(res['conclusion'])}</b> "
            f"(<a href='{name}/report.html'>full report, verdict cards</a>)</p>"
            "<table><tr><th>layer</th><th>rows: held-out / random</th>"
            "<th>cols: held-out / random</th><th>null excess k=1</th><th>mean-only</th>"
            f"<th>verdict</th></tr>{rows}</table>"
        )
    fn = "".join(
        f"<tr><td>{k}</td><td>{s:.3f}</td><td>{h:.3f}</td></tr>"
        for k, s, h in zip(function["ks"], function["seen"], function["held_out"])
    )
    legend = report.legend_html()
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>universal zoo</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 14px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
</style></head><body>
<h1>Universal weight subspace: zoo results</h1>
{"".join(sections)}
{legend}
<h2>Function</h2>
<p>Test accuracy on each model's own task (trained zoo), models rebuilt from the top-k basis:
originals {function["original_seen"]:.3f}; mean-only model {function["mean_only_seen"]:.3f};
chance {function["chance"]:.3f}.</p>
<table><tr><th>k</th><th>seen</th><th>held-out</th></tr>{fn}</table>
<img src="function.png" alt="function.png">
</body></html>
"""
