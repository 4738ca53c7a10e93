"""What `jsubspace.analyze` returns (`AnalysisResult`), results written before any rendering,
and models left out under `skip_unreadable` listed in every output."""

import json
import os

import numpy as np
import pytest

import jsubspace
from jsubspace import spectra
from jsubspace import testing


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    """8 models of two layers (a planted shared subspace, and noise), and one pickled model."""
    root = tmp_path_factory.mktemp("population")
    shared = testing.planted_case("shared_10", 0, n_models=8, shape=(24, 16))
    noise = testing.planted_case("noise", 1, n_models=8, shape=(24, 16))
    for i in range(8):
        testing.write_safetensors(
            root / f"model_{i}" / "model.safetensors",
            {"a.weight": shared[i], "b.weight": noise[i], "b.bias": np.ones(24, np.float32)},
        )
    (root / "model_old").mkdir()
    (root / "model_old" / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    return str(root)


def test_the_result_is_typed_and_reads_like_spectra_json(population, tmp_path, capsys):
    out = str(tmp_path / "out")
    result = jsubspace.analyze([population], out, skip_unreadable=True, null_draws=1, quiet=True)
    assert isinstance(result, jsubspace.AnalysisResult)
    on_disk = json.load(open(os.path.join(out, "spectra.json")))
    assert result.to_json() == on_disk and result["layers"] == on_disk["layers"]
    assert [layer.name for layer in result.layers] == ["a.weight", "b.weight"]
    assert isinstance(result.layers[0], spectra.LayerRecord)
    assert isinstance(result.layers[0].modes["rows"], spectra.ModeRecord)
    verdict = result.verdicts["a.weight"]
    assert isinstance(verdict, spectra.Verdict) and isinstance(verdict.label, spectra.Label)
    assert verdict.label.value == on_disk["layers"][0]["verdict"]["label"]
    assert verdict.to_json() == on_disk["layers"][0]["verdict"]  # a lossless round trip
    assert result.conclusion == on_disk["conclusion"] and result.conclusion
    assert [row["layer"] for row in result.table()] == ["a.weight", "b.weight"]
    assert result.table()[0]["verdict"].startswith(verdict.label.value)
    assert str(result).endswith(f"conclusion: {result.conclusion}")
    paths = result.paths
    assert paths["report"] == os.path.join(out, "report.html")
    assert paths["csv"] and os.path.join(out, "plots", "k_at.png") in paths["plots"]
    loaded = jsubspace.AnalysisResult.load(out)
    assert loaded.to_json() == on_disk
    # The pickled model is left out, and said so in every output.
    skipped = [os.path.join(population, "model_old")]
    assert [s["path"] for s in result.skipped_models] == skipped
    assert len(result.models) == 8
    with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
        assert "model_old" in f.read()
    with pytest.raises(jsubspace.OutputError, match="no spectra.json"):
        jsubspace.AnalysisResult.load(str(tmp_path))


def test_the_command_line_lists_what_it_skipped(population, tmp_path):
    import subprocess
    import sys

    def cli(*flags):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "jsubspace.cli.main",
                "analyze",
                f"--models={population}",
                f"--out={tmp_path / 'out'}",
                "--null_draws=0",
                "--noplots",
                *flags,
            ],
            capture_output=True,
            text=True,
        )

    refused = cli()
    assert refused.returncode == 2 and "model_old" in refused.stderr
    assert "--skip_unreadable" in refused.stderr
    done = cli("--skip_unreadable")
    assert done.returncode == 0, done.stderr
    assert "skipped 1 unreadable model(s)" in done.stderr and "model_old" in done.stderr


def test_a_failed_rendering_loses_no_results(population, tmp_path, monkeypatch, capsys):
    from jsubspace.run import _analyze

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(_analyze, "write_plots", broken)
    out = str(tmp_path / "out")
    result = jsubspace.analyze(
        [os.path.join(population, f"model_{i}") for i in range(8)], out, null_draws=0, quiet=True
    )
    assert os.path.exists(os.path.join(out, "spectra.json"))
    assert os.path.exists(os.path.join(out, "layers.csv"))
    assert result.paths["report"] is None and len(result.layers) == 2
    err = capsys.readouterr().err
    assert "could not be written (RuntimeError: no fonts)" in err and "spectra.json" in err
