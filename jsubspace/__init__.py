"""jsubspace: do trained networks of one architecture share a low-dimensional weight subspace?

Mode-wise spectra of a population of checkpoints, computed with sharded JAX kernels and reported
beside their controls (Gaussian null, held-out capture, mean-only, lineage).
"""

from jsubspace import config
from jsubspace import io
from jsubspace import kernels
from jsubspace import report
from jsubspace import run
from jsubspace import sharding
from jsubspace import spectra
from jsubspace.errors import CheckpointError
from jsubspace.errors import DistributedError
from jsubspace.errors import Interrupted
from jsubspace.errors import JsubspaceError
from jsubspace.errors import NonFiniteError
from jsubspace.errors import OutputError
from jsubspace.errors import PopulationError
from jsubspace.errors import StoreError
from jsubspace.io import open_population
from jsubspace.run import AnalysisResult
from jsubspace.run import analyze

__version__ = "0.1.0"

__all__ = [
    "AnalysisResult",
    "CheckpointError",
    "DistributedError",
    "Interrupted",
    "JsubspaceError",
    "NonFiniteError",
    "OutputError",
    "PopulationError",
    "StoreError",
    "analyze",
    "config",
    "io",
    "kernels",
    "open_population",
    "report",
    "run",
    "sharding",
    "spectra",
]
