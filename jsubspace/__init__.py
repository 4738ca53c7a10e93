"""jsubspace: do trained networks of one architecture share a low-dimensional weight subspace?

Mode-wise spectra of a population of checkpoints, computed with sharded JAX kernels and reported
beside their controls (Gaussian null, held-out capture, mean-only, lineage).
"""

from jsubspace import io
from jsubspace import kernels
from jsubspace import report
from jsubspace import sharding
from jsubspace import spectra
from jsubspace.errors import CheckpointError
from jsubspace.errors import JsubspaceError
from jsubspace.errors import NonFiniteError
from jsubspace.errors import PopulationError
from jsubspace.io import open_population
from jsubspace.report import analyze

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "JsubspaceError",
    "NonFiniteError",
    "PopulationError",
    "analyze",
    "io",
    "kernels",
    "open_population",
    "report",
    "sharding",
    "spectra",
]
