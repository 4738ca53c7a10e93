"""Progress: plain lines in a log (stderr not a terminal), one per finished item with the time
left; rich's live line on a terminal; what a resumed run kept."""

import io
import sys

from jsubspace.run._progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_in_a_log_is_one_line_per_layer(capsys):
    clock = Clock()
    progress = Progress(3, 1, [10.0, 20.0], quiet=False, terminal=False, clock=clock)
    with progress:
        progress.starting("encoder.layer.0.attention.self.query.weight")
        clock.now += 5  # half the plan's 10 s: the 20 s left are estimated at 10 s
        progress.finished()
        progress.starting("b.weight")
        clock.now += 70
        progress.finished()
    # A snapshot: the whole name, the count, elapsed and the plan-scaled time left.
    assert capsys.readouterr().err.splitlines() == [
        "resuming: 1 of 3 layers kept from the earlier run",
        "2/3 layers  5s elapsed, ~10s left  done: encoder.layer.0.attention.self.query.weight",
        "3 layers done in 1m15s",
    ]


def test_without_a_plan_the_time_left_is_the_mean_pace(capsys):
    clock = Clock()
    progress = Progress(4, what="models", verb="rebuilding", terminal=False, clock=clock)
    with progress:
        for name, seconds in (("a", 30.0), ("b", 90.0)):
            progress.starting(name)
            clock.now += seconds
            progress.finished()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "1/4 models  30s elapsed, ~1m30s left  done: a",
        "2/4 models  2m00s elapsed, ~2m00s left  done: b",
    ]


def test_a_terminal_gets_a_live_line_naming_the_item_in_progress(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    clock = Clock()
    with Progress(2, 0, [1.0, 1.0], terminal=True, clock=clock) as progress:
        progress.starting("model.layers.7.self_attn.q_proj")
        progress._live.refresh()
        shown = buffer.getvalue()
        # 80 columns: the name is cut in the middle, keeping both ends.
        assert "model.layer" in shown and "attn.q_proj" in shown and "0/2" in shown
        assert "elapsed" in shown and "left" in shown
        progress.finished()
        progress.starting("model.layers.7.self_attn.k_proj")
        progress.finished()
    assert "2 layers done in" in buffer.getvalue()
    assert progress._live is None  # the live line is closed on leaving


def test_quiet_progress_prints_nothing(capsys):
    with Progress(2, 0, [1.0, 1.0], quiet=True) as progress:
        progress.starting("a")
        progress.finished()
    assert capsys.readouterr().err == ""
