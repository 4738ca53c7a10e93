"""The typed configuration: flat options and nested parts are one thing, JSON round trip, and a
run driven by an `AnalysisConfig` equals one driven by the same options."""

import doctest

import numpy as np
import pytest

import jsubspace
from jsubspace import config as config_module
from jsubspace import testing
from jsubspace.config import AnalysisConfig


def test_doctests():
    assert doctest.testmod(config_module).failed == 0


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"null_draws": 0, "holdout": None, "split_half": False},
        {"holdout": "loo", "modes": ["rows", "cols"], "center": "none", "rank": 16},
        {"holdout": "5", "compare_to": "other_dir", "memory_budget": 2**30, "include": "attn"},
        {"lora": "factors", "lora_space": "side", "method": "randomized", "seed": 3},
    ],
)
def test_options_and_json_round_trip(options):
    config = AnalysisConfig.from_options(**options)
    assert AnalysisConfig.from_json(config.to_json()) == config
    assert AnalysisConfig.from_options(**config.options()) == config
    if "holdout" in options and options["holdout"] not in (None, "loo"):
        assert config.controls.holdout == int(options["holdout"])


def test_unknown_or_invalid_option_is_named():
    with pytest.raises(TypeError, match="unknown option 'null_draw'"):
        AnalysisConfig.from_options(null_draw=3)
    with pytest.raises(ValueError, match="modes must be"):
        AnalysisConfig.from_options(modes=["row"])


def test_a_run_from_the_config_equals_one_from_the_options(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        testing.write_safetensors(
            tmp_path / "pop" / f"m{i}.safetensors",
            {"w": rng.standard_normal((12, 10)).astype(np.float32)},
        )
    options = {"null_draws": 1, "holdout": 3, "seed": 4, "num_devices": 2}
    flat = jsubspace.analyze(
        [str(tmp_path / "pop")], str(tmp_path / "a"), quiet=True, plots=False, **options
    )
    typed = jsubspace.analyze(
        [str(tmp_path / "pop")],
        str(tmp_path / "b"),
        quiet=True,
        plots=False,
        config=AnalysisConfig.from_options(**options),
    )
    assert testing.reproducible_layers(flat) == testing.reproducible_layers(typed)
    assert AnalysisConfig.from_json(typed["analysis"]) == AnalysisConfig.from_options(**options)


def test_every_field_is_a_flag_and_the_flags_give_the_config():
    import dataclasses

    from absl import flags

    from jsubspace.cli import main
    from jsubspace.cli._flags import config_from_flags

    fields = [f.name for part in config_module.PARTS.values() for f in dataclasses.fields(part)]
    assert sorted(main._CONFIG) == sorted(fields)
    values = flags.FLAGS
    try:
        values(["jsubspace"])
        assert config_from_flags(main._CONFIG) == AnalysisConfig()  # the defaults agree
        values.unparse_flags()
        values(
            [
                "jsubspace",
                "--holdout=loo",
                "--mesh=2",
                "--memory_budget=1.5",
                "--modes=rows,cols",
                "--nosplit_half",
                "--exact_limit=1000",
                "--compare_to=a,b",
            ]
        )
        config = config_from_flags(main._CONFIG)
    finally:
        values.unparse_flags()
    assert config.controls.holdout == "loo" and not config.controls.split_half
    assert config.run.num_devices == 2 and config.run.memory_budget == int(1.5 * 2**30)
    assert config.spectra.modes == ("rows", "cols") and config.spectra.exact_limit == 1000
    assert config.run.compare_to == ("a", "b")
