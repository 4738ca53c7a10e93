"""Progress of long commands on stderr: the item in progress, items done, elapsed time and an
estimate of the time left (from the layer plans where there are some).

On a terminal the line is drawn by `rich.progress` (a live bar); in a log (stderr not a
terminal) each finished item is one plain line, so that logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import jax


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


class Progress:
    """Progress over `total` items, `done` of them kept from an earlier run.

    Use as a context manager (the terminal's live line is closed on exit, also on errors and
    Ctrl-C); call `starting(name)` when an item begins and `finished()` when it ends. Silent
    when `quiet` or not process 0.

    `estimates`, when given, are the plans' seconds per item still to do: the time left is
    their remainder, scaled by how the finished items compared with their own estimates.
    Without them it is the mean time per finished item times the items left.
    """

    def __init__(
        self,
        total: int,
        done: int = 0,
        estimates: list[float] | None = None,
        *,
        quiet: bool = False,
        what: str = "layers",
        verb: str = "analysing",
        terminal: bool | None = None,
        clock: Callable[[], float] = time.time,
        lead: bool | None = None,
    ):
        self.total = total
        self.done = done
        self.kept = done
        self.estimates = list(estimates) if estimates is not None else None
        # `lead`: whether this process speaks (default: process 0; commands that start no
        # JAX backend say so, so that progress does not start one).
        self.quiet = quiet or not (jax.process_index() == 0 if lead is None else lead)
        self.what = what
        self.verb = verb
        self.clock = clock
        self.start = clock()
        self.spent_estimate = 0.0
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.name = ""
        self._live = None
        if done and not self.quiet:
            print(
                f"resuming: {done} of {total} {what} kept from the earlier run",
                file=sys.stderr,
                flush=True,
            )

    # The live line (terminals only).
    def __enter__(self) -> Progress:
        if self.quiet or not self.terminal:
            return self
        from jsubspace.run._live import live_display

        self._live, self._item_width = live_display(self)
        self._live.start()
        self._task = self._live.add_task(self.verb, total=self.total, completed=self.done, item="")
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float | None:
        """Seconds left, estimated."""
        elapsed = self.elapsed()
        if self.estimates is not None:
            left = sum(self.estimates)
            if self.spent_estimate > 0:
                left *= elapsed / self.spent_estimate
            return left
        finished = self.done - self.kept
        if finished == 0:
            return None
        return elapsed / finished * (self.total - self.done)

    def times(self) -> str:
        if self.done == self.total:
            return self._summary()
        return f"{_duration(self.elapsed())} elapsed, ~{_duration(self.left())} left"

    def starting(self, name: str) -> None:
        """Item `name` is in progress now."""
        self.name = name
        if self._live is not None:
            from jsubspace.report import middle_ellipsis

            item = middle_ellipsis(name, self._item_width)
            self._live.update(self._task, item=item)

    def finished(self) -> None:
        """The item in progress is done."""
        self.done += 1
        if self.estimates:
            self.spent_estimate += self.estimates.pop(0)
        if self.quiet:
            return
        if self._live is not None:
            self._live.update(self._task, completed=self.done)
            if self.done == self.total:
                self._live.update(self._task, item="")
            return
        if self.done < self.total:
            print(
                f"{self.done}/{self.total} {self.what}  {self.times()}  done: {self.name}",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(self._summary(), file=sys.stderr, flush=True)

    def _summary(self) -> str:
        return f"{self.total} {self.what} done in {_duration(self.elapsed())}"
