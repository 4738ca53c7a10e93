"""spectra.json, layers.csv, plots and report.html; the resumable `analyze` run."""

from jsubspace.report._atomic import atomic_write_json
from jsubspace.report._outputs import layer_family
from jsubspace.report._outputs import verdict_rows
from jsubspace.report._outputs import verdict_table
from jsubspace.report._outputs import whole_model_cosine
from jsubspace.report._run import DistributedError
from jsubspace.report._run import OutputError
from jsubspace.report._run import analyze

__all__ = [
    "DistributedError",
    "OutputError",
    "analyze",
    "atomic_write_json",
    "layer_family",
    "verdict_rows",
    "verdict_table",
    "whole_model_cosine",
]
