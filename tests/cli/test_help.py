"""Per-command help, and a misspelt command named as such."""

import subprocess
import sys

import pytest

from jsubspace.cli import main


@pytest.mark.parametrize("command", main.COMMANDS)
def test_each_command_lists_its_own_flags(command):
    text = main.command_help(command)
    assert text.startswith(f"usage: jsubspace {command}")
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    names = [flag.split("=")[0].replace("[no]", "").lstrip("-") for flag in listed]
    assert names == main.HELP[command][1]  # each flag once, in the table's order
    assert "coordinator_address" not in names or command == "analyze"


def test_help_names_choices_and_defaults():
    analyze = main.command_help("analyze")
    assert "--normalize=none|fro  (default: none)" in analyze
    assert "--[no]split_half  (default: true)" in analyze
    compress = main.command_help("compress")
    assert "--exclude" in compress and "--null_draws" not in compress


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jsubspace.cli.main", *args], capture_output=True, text=True
    )


def test_help_exits_zero_and_a_misspelt_command_is_named():
    done = _cli("analyze", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: jsubspace analyze")
    assert "--holdout" in done.stdout and "--json" not in done.stdout
    top = _cli("--help")
    assert top.returncode == 0 and "commands: analyze" in top.stdout
    wrong = _cli("analyse")
    assert wrong.returncode == 2
    assert "unknown command 'analyse' (did you mean 'analyze'?)" in wrong.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["analyze"], "analyze needs --models and --out"),
        (["analyze", "--models=x", "--out=y", "--modes=row"], "modes must be a non-empty subset"),
        (["analyze", "--models=x", "--out=y", "--holdout=abc"], "holdout must be 'loo'"),
        (["analyze", "--models=/nonexistent", "--out=y"], "/nonexistent: no such file"),
        (["plan", "--models=x", "--modes=row"], "modes must be a non-empty subset"),
        (["plan", "--models=x", "--mesh=abc"], "mesh must be 'auto' or a device count"),
        (["plan", "--models=x", "--memory_budget=-1"], "memory_budget must be > 0 GiB"),
        (["demo", "--holdout=abc"], "holdout must be 'loo'"),
        (["demo", "--null_draws=-1"], "null_draws must be >= 0"),
        (["demo", "--bogus_flag"], "Unknown command line flag 'bogus_flag'"),
        (["compress", "--models=x", "--out=y", "--kmax=abc"], "flag --kmax=abc"),
        (["compress", "--models=x", "--out=y", "--tau=2"], "tau must be in (0, 1]"),
        (["compress", "--models=x", "--out=y", "--k=0"], "k must be >= 1"),
        (["reconstruct", "--store=s", "--out=y", "--k=-1"], "--k must be >= 0"),
        (["reconstruct", "--store=s", "--out=y", "--lora_rank=0"], "--lora_rank must be >= 1"),
        (["reconstruct", "--store=/nonexistent", "--out=y"], "/nonexistent/store.json"),
        (["merge", "--models=x", "--base=b", "--out=y", "--merge_method=bogus"], "value should"),
        (["merge", "--models=x", "--base=b", "--out=y", "--density=2"], "--density must be"),
        (["merge", "--models=x", "--base=b", "--out=y", "--lambda=abc"], "flag --lambda=abc"),
    ],
)
def test_every_error_is_one_line_in_one_style(args, message):
    done = _cli(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jsubspace: error: ") and message in lines[0]
