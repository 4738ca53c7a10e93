"""Progress in a log (stderr not a terminal): plain lines, one per finished layer, with what a
resumed run kept."""

from jsubspace.run._progress import Progress


def test_progress_in_a_log_is_one_line_per_layer(capsys):
    progress = Progress(3, 1, [1.0, 2.0], quiet=False)
    progress.starting("encoder.layer.0.attention.self.query.weight")
    progress.finished()
    progress.starting("b.weight")
    progress.finished()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "resuming: 1 of 3 layers kept from the earlier run"
    assert lines[1].startswith("2/3 layers") and "left" in lines[1]
    assert lines[1].endswith("done: encoder.layer.0.attention.self.query.weight")  # whole name
    assert lines[2].startswith("3 layers done in")
    assert len(lines) == 3 and not any("\r" in line for line in lines)


def test_quiet_progress_prints_nothing(capsys):
    progress = Progress(2, 0, [1.0, 1.0], quiet=True)
    progress.starting("a")
    progress.finished()
    assert capsys.readouterr().err == ""
