"""The README's Python example runs as written (a doctest), in a fresh directory."""

import doctest
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testfile(
        os.path.join(ROOT, "README.md"),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    assert result.attempted >= 8, result  # the example was found
    assert result.failed == 0, result
    assert os.path.exists(tmp_path / "out" / "report.html")
