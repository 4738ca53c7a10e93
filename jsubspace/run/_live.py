"""The terminal's live progress line, drawn by `rich.progress` (imported only when a terminal
shows progress, not at `import jsubspace`)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn
from rich.progress import MofNCompleteColumn
from rich.progress import Progress
from rich.progress import ProgressColumn
from rich.progress import TextColumn
from rich.table import Column
from rich.text import Text


class _TimesColumn(ProgressColumn):
    """Elapsed time and the estimate left, computed at each refresh (the line of a long item
    keeps counting)."""

    def __init__(self, owner, **kwargs):
        super().__init__(**kwargs)
        self.owner = owner

    def render(self, task) -> Text:
        return Text(self.owner.times())


def live_display(owner) -> tuple[Progress, int]:
    """A live line for `owner` (a `run.Progress`) on stderr, and how wide the item's name may
    be beside the fixed columns (names are cut in the middle to it)."""
    console = Console(file=sys.stderr, force_terminal=True)
    fixed = dict(no_wrap=True, overflow="ignore")
    live = Progress(
        TextColumn("{task.description}", table_column=Column(**fixed)),
        BarColumn(bar_width=16, table_column=Column(**fixed)),
        MofNCompleteColumn(table_column=Column(**fixed)),
        _TimesColumn(owner, table_column=Column(**fixed)),
        TextColumn("{task.fields[item]}", table_column=Column(no_wrap=True)),
        console=console,
        transient=False,
    )
    return live, max(24, console.width - len(owner.verb) - 64)
