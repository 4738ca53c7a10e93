"""The output directory: an unrelated non-empty one is never written into."""

import pytest

import jsubspace
from jsubspace import OutputError
from jsubspace import testing


def test_an_unrelated_non_empty_out_is_refused(tmp_path):
    x = testing.planted_case("noise", 0, n_models=6, shape=(8, 6))
    for i in range(6):
        testing.write_safetensors(tmp_path / "pop" / f"m{i}.safetensors", {"w": x[i]})
    mine = tmp_path / "my_thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not empty .chapter1.tex. and not a jsubspace run"):
            jsubspace.analyze(
                [str(tmp_path / "pop")], str(mine), overwrite=overwrite, quiet=True, plots=False
            )
    assert sorted(p.name for p in mine.iterdir()) == ["chapter1.tex"]  # nothing written
    # A previous run's directory is still resumed, or overwritten.
    out = tmp_path / "out"
    jsubspace.analyze([str(tmp_path / "pop")], str(out), quiet=True, plots=False)
    jsubspace.analyze([str(tmp_path / "pop")], str(out), overwrite=True, quiet=True, plots=False)
