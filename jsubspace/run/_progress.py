"""Progress of a run on stderr: the layer in progress, layers done, elapsed time and an estimate
of the time left from the layer plans."""

from __future__ import annotations

import sys
import time

import jax


class Progress:
    """One status line, rewritten in place on a terminal, one line per finished layer in a log
    (stderr not a terminal); silent when `quiet` or not process 0.

    `estimates` are the plans' seconds per layer still to do: the time left is their remainder,
    scaled by how the finished layers compared with their own estimates.
    """

    def __init__(self, total: int, done: int, estimates: list[float], *, quiet: bool):
        self.total = total
        self.done = done
        self.estimates = list(estimates)
        self.quiet = quiet or jax.process_index() != 0
        self.start = time.time()
        self.spent_estimate = 0.0
        self.terminal = sys.stderr.isatty()
        self.name = ""
        if done and not self.quiet:
            print(f"resuming: {done} of {total} layers kept from the earlier run", file=sys.stderr)

    def _line(self, text: str, *, end: str = "") -> None:
        if self.quiet:
            return
        if self.terminal:
            print(f"\r{text:<118.118}", end=end, file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def _left(self) -> str:
        elapsed = time.time() - self.start
        left = sum(self.estimates)
        if self.spent_estimate > 0:
            left *= elapsed / self.spent_estimate
        return f"{elapsed:6.1f}s elapsed, ~{left:5.0f}s left"

    def starting(self, name: str) -> None:
        """Layer `name` is being analysed now."""
        self.name = name
        if not self.terminal:
            return  # a log gets the line when the layer is done
        width = 20
        bar = "#" * int(width * self.done / max(self.total, 1))
        self._line(f"[{bar:.<{width}}] {self.done}/{self.total}  {self._left()}  {name}")

    def finished(self) -> None:
        """The layer in progress is done."""
        self.done += 1
        if self.estimates:
            self.spent_estimate += self.estimates.pop(0)
        if not self.terminal and self.done < self.total:
            self._line(f"{self.done}/{self.total} layers  {self._left()}  done: {self.name}")
        if self.done == self.total:
            self._line(f"{self.total} layers done in {time.time() - self.start:.1f}s", end="\n")
