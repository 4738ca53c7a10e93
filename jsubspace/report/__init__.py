"""Renders what a run produced: layers.csv, plots, report.html and the terminal table.

A leaf: it reads result dicts and writes files; it computes nothing and runs nothing (the run
loop is `jsubspace.run`).
"""

from jsubspace.report._outputs import LEGEND
from jsubspace.report._outputs import layer_family
from jsubspace.report._outputs import legend_html
from jsubspace.report._outputs import verdict_rows
from jsubspace.report._outputs import verdict_table
from jsubspace.report._outputs import whole_model_cosine
from jsubspace.report._outputs import write_csv
from jsubspace.report._outputs import write_plots
from jsubspace.report._outputs import write_report_html
from jsubspace.report._plan import middle_ellipsis
from jsubspace.report._plan import plan_table
from jsubspace.report._plan import short_names

__all__ = [
    "LEGEND",
    "layer_family",
    "legend_html",
    "middle_ellipsis",
    "plan_table",
    "short_names",
    "verdict_rows",
    "verdict_table",
    "whole_model_cosine",
    "write_csv",
    "write_plots",
    "write_report_html",
]
