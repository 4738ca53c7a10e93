"""The project's own error types.

Every problem with user input ends in one of these, with a message that names the file (or the
model and layer) and the problem, so that the command line can print it without a traceback.
"""

from __future__ import annotations

import os


class JsubspaceError(Exception):
    """Base class of every error jsubspace raises on purpose."""


class CheckpointError(JsubspaceError, ValueError):
    """A checkpoint file is malformed, truncated, hostile or of an unknown format.

    Attributes:
        path: the offending file or directory.
        problem: what is wrong with it, in words.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class PopulationError(JsubspaceError, ValueError):
    """The models of a population cannot be analysed together (missing layers, shapes, size)."""


class NonFiniteError(JsubspaceError, ValueError):
    """Weights hold NaN or Inf; `where` lists (model, layer, count) triples."""

    def __init__(self, where: list[tuple[str, str, int]]):
        self.where = where
        lines = [f"  model {m!r} layer {l!r}: {c} non-finite values" for m, l, c in where]
        super().__init__("non-finite weights found:\n" + "\n".join(lines))


class OutputError(JsubspaceError):
    """The output directory holds another run, is in use, or cannot be written."""


class DistributedError(JsubspaceError):
    """A process of a multi-host run failed; the survivors stop instead of hanging."""


class StoreError(JsubspaceError, ValueError):
    """A store cannot be built, read, or used with the given model or layer."""


class Interrupted(JsubspaceError):
    """The run was stopped by SIGINT or SIGTERM; finished layers are kept for resume.

    Attributes:
        exit_code: the conventional exit status of the signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, *, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
