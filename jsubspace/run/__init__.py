"""The run: plan -> stream -> analyse each layer -> write; run directory, resume, progress,
interrupts and the manifest."""

from jsubspace.run._analyze import Prepared
from jsubspace.run._analyze import analyze
from jsubspace.run._analyze import plan
from jsubspace.run._analyze import prepare
from jsubspace.run._interrupt import interruptible
from jsubspace.run._result import AnalysisResult
from jsubspace.run._rundir import RunDirectory

__all__ = [
    "AnalysisResult",
    "Prepared",
    "RunDirectory",
    "analyze",
    "interruptible",
    "plan",
    "prepare",
]
