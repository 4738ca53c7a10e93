"""`jsubspace analyze` end to end: verdicts on known truth, numbers against float64, resume."""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import jsubspace
from jsubspace import OutputError
from jsubspace import PopulationError
from jsubspace import testing
from jsubspace.cli._demo import TRUTH
from jsubspace.cli._demo import write_demo_population
from tests._distributed import launch_analyze
from tests._distributed import wait_all


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    paths = write_demo_population(str(root / "population"), n_models=16)
    dense = jsubspace.analyze([paths["dense"]], str(root / "dense"), num_devices=4, quiet=True)
    lora = jsubspace.analyze([paths["adapters"]], str(root / "lora"), num_devices=4, quiet=True)
    return root, paths, dense, lora


def test_verdicts_match_the_planted_truth(demo):
    _, _, dense, lora = demo
    for result in (dense, lora):
        for layer in result["layers"]:
            assert layer["verdict"]["label"] == TRUTH[layer["name"]], layer["verdict"]


def test_null_excess_is_one_for_noise_and_large_for_structure(demo):
    _, _, dense, _ = demo
    by = {layer["name"]: layer for layer in dense["layers"]}
    for mode in ("models", "rows", "cols"):
        noise = by["pure_noise.weight"]["null"][mode]["excess"]
        assert all(abs(v - 1) < 0.1 for v in noise.values()), noise
    assert by["shared_subspace.weight"]["null"]["rows"]["excess"]["1"] > 5


def test_shared_init_loras_are_flagged(demo):
    _, _, _, lora = demo
    for layer in lora["layers"]:
        shared = layer["lineage"]["lora_A"]
        assert shared["fraction_shared"] == pytest.approx(0.5)
        assert len(shared["identical_groups"]) == 1 and len(shared["identical_groups"][0]) == 8


def test_every_part_is_timed_and_sized_per_layer_and_for_the_run(demo):
    _, _, dense, lora = demo
    for result in (dense, lora):
        parts = {"spectra", "holdout", "compare", "lineage", "null"}
        for layer in result["layers"]:
            assert set(layer["seconds"]) == parts, layer["name"]
            assert set(layer["peak_bytes"]) == parts and min(layer["peak_bytes"].values()) > 2**20
        cost = result["cost"]
        for part in parts:
            total = sum(layer["seconds"][part] for layer in result["layers"])
            assert cost["seconds"][part] == pytest.approx(total)
            peak = max(layer["peak_bytes"][part] for layer in result["layers"])
            assert cost["peak_bytes"][part] == peak


def test_all_modes_share_one_trace(demo):
    _, _, dense, lora = demo
    for layer in dense["layers"] + lora["layers"]:
        for _mode, rec in layer["modes"].items():
            if rec["method"] in ("exact", "exact-factored", "exact-side"):
                np.testing.assert_allclose(
                    sum(rec["eigenvalues"]), layer["total_energy"], rtol=1e-4
                )


def test_holdout_capture_matches_planted_fraction(tmp_path):
    n, shape, rank = 20, (40, 30), 3
    values, u, v = testing.planted_population(
        7, n_models=n, shape=shape, rank=rank, noise=0.3, return_basis=True
    )
    for i in range(n):
        testing.write_safetensors(tmp_path / "pop" / f"m{i:02d}.safetensors", {"w": values[i]})
    result = jsubspace.analyze(
        [str(tmp_path / "pop")],
        str(tmp_path / "out"),
        holdout="loo",
        null_draws=2,
        num_devices=2,
        quiet=True,
    )
    (layer,) = result["layers"]
    hold = layer["holdout"]
    x = values.astype(np.float64)
    fractions = []
    for i in range(n):
        train_mean = (x.sum(0) - x[i]) / (n - 1)
        xi = x[i] - train_mean
        fractions.append(np.sum((u.T @ xi @ v) ** 2) / np.sum(xi**2))
    planted = float(np.mean(fractions))
    # At k = 4 >= rank the basis holds the planted subspace (plus one noise direction).
    at_rank = hold["two_sided"][hold["ks"].index(4)]
    assert 0.3 < planted < 0.95
    assert abs(at_rank - planted) < 0.05, (at_rank, planted)
    assert hold["random"]["two_sided"][0] == pytest.approx(1 / (40 * 30))


def _oracle_top(x, k=5):
    x = np.asarray(x, np.float64)
    x = x - x.mean(0)
    return {
        "models": np.linalg.eigvalsh(np.einsum("imn,jmn->ij", x, x))[::-1][:k],
        "rows": np.linalg.eigvalsh(np.einsum("imn,ikn->mk", x, x))[::-1][:k],
        "cols": np.linalg.eigvalsh(np.einsum("imn,imk->nk", x, x))[::-1][:k],
    }


def _check(result, name, x):
    layer = next(la for la in result["layers"] if la["name"] == name)
    want = _oracle_top(x)
    for mode, top in want.items():
        got = np.asarray(layer["modes"][mode]["eigenvalues"][: len(top)])
        np.testing.assert_allclose(got, top, rtol=1e-4)


def test_spectra_json_matches_float64_for_every_format(tmp_path):
    rng = np.random.default_rng(3)
    n = 6
    dense = rng.standard_normal((n, 12, 9)).astype(np.float32)
    for i in range(n):
        testing.write_safetensors(tmp_path / "st" / f"m{i}.safetensors", {"w": dense[i]})
        testing.write_orbax(tmp_path / "ox" / f"c{i}", {"params": {"w": dense[i]}})
    a, b = testing.lora_population(4, n_models=n, shape=(12, 9), rank=3)
    for i in range(n):
        testing.write_peft_adapter(
            tmp_path / "peft" / f"a{i}", {"model.q_proj": (a[i], b[i])}, r=3, lora_alpha=6
        )
    options = dict(null_draws=1, holdout=None, num_devices=2, quiet=True, plots=False)
    st = jsubspace.analyze([str(tmp_path / "st")], str(tmp_path / "o1"), **options)
    ox = jsubspace.analyze([str(tmp_path / "ox")], str(tmp_path / "o2"), **options)
    pf = jsubspace.analyze([str(tmp_path / "peft")], str(tmp_path / "o3"), **options)
    _check(st, "w", dense)
    _check(ox, "params.w", dense)
    _check(pf, "model.q_proj", 2.0 * np.einsum("imr,irn->imn", b.astype(np.float64), a))
    on_disk = json.loads((tmp_path / "o1" / "spectra.json").read_text())
    assert on_disk["layers"][0]["modes"] == st["layers"][0]["modes"]
    assert set(on_disk) >= {"version", "models", "config", "manifest", "layers"}


def test_lora_factors_statistic_matches_paper_recipe(tmp_path):
    n, r = 8, 3
    a, b = testing.lora_population(5, n_models=n, shape=(10, 7), rank=r)
    for i in range(n):
        testing.write_peft_adapter(
            tmp_path / "p" / f"a{i}", {"model.q_proj": (a[i], b[i])}, r=r, lora_alpha=6
        )
    res = jsubspace.analyze(
        [str(tmp_path / "p")],
        str(tmp_path / "o"),
        lora="factors",
        null_draws=1,
        holdout=None,
        num_devices=1,
        quiet=True,
        plots=False,
    )
    (layer,) = res["layers"]
    # The paper's statistic: PCA of the stacked rows of every A (and columns of every B).
    rows_a = a.reshape(n * r, 7).astype(np.float64)
    rows_a -= rows_a.mean(0)
    cols_b = np.concatenate(list(b), axis=1).T.astype(np.float64)
    cols_b -= cols_b.mean(0)
    want_a = np.linalg.eigvalsh(rows_a.T @ rows_a)[::-1]
    want_b = np.linalg.eigvalsh(cols_b.T @ cols_b)[::-1]
    np.testing.assert_allclose(layer["modes"]["lora_A"]["eigenvalues"][:7], want_a, rtol=1e-4)
    np.testing.assert_allclose(layer["modes"]["lora_B"]["eigenvalues"][:10], want_b, rtol=1e-4)


def test_report_files_render(demo):
    root, _, _, _ = demo
    out = root / "dense"
    page = (out / "report.html").read_text()
    for label in TRUTH.values():
        if label != "explained by shared initialisation":
            assert label in page
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', page)
    assert len(sources) >= 5
    for data, rel in sources:
        raw = base64.b64decode(data)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / rel).read_bytes() == raw
        import matplotlib.image

        assert matplotlib.image.imread(str(out / rel)).ndim == 3
    csv_lines = (out / "layers.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 3 * 3  # header + 3 layers x 3 modes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mesh"]["size"] == 4 and manifest["config"]["center"] == "mean"


def test_rerun_resumes_and_config_change_is_refused(demo):
    root, paths, dense, _ = demo
    again = jsubspace.analyze([paths["dense"]], str(root / "dense"), num_devices=4, quiet=True)
    assert again["layers"] == dense["layers"]
    with pytest.raises(OutputError, match="another configuration"):
        jsubspace.analyze([paths["dense"]], str(root / "dense"), num_devices=4, seed=1, quiet=True)


def test_bad_population_errors(tmp_path):
    with pytest.raises(PopulationError, match="at least 2"):
        testing.write_safetensors(tmp_path / "one" / "m.safetensors", {"w": np.ones((2, 2))})
        jsubspace.analyze([str(tmp_path / "one")], str(tmp_path / "o"), quiet=True)
    assert not (tmp_path / "o" / "spectra.json").exists()


def _cli(args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "jsubspace.cli.main", *args], capture_output=True, text=True, **kw
    )


def _numbers(path):
    return testing.reproducible_layers(json.loads(open(path).read()))


def test_cli_on_8_devices_equals_1_device(demo, tmp_path):
    _, paths, _, _ = demo
    outs = {}
    for d in (1, 8):
        out = tmp_path / f"d{d}"
        proc = _cli(
            [
                "analyze",
                f"--models={paths['adapters']}",
                f"--out={out}",
                f"--num_cpu_devices={d}",
                "--quiet",
                "--noplots",
                "--null_draws=2",
                f"--compilation_cache={tmp_path / 'xla'}",
            ]
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[d] = _numbers(out / "spectra.json")
    assert len(list((tmp_path / "xla").iterdir())) >= 4  # compiled kernels kept for later runs
    for one, eight in zip(outs[1], outs[8]):
        for mode in one["modes"]:
            top = one["modes"][mode]["eigenvalues"][0]
            np.testing.assert_allclose(
                eight["modes"][mode]["eigenvalues"],
                one["modes"][mode]["eigenvalues"],
                rtol=2e-5,
                atol=2e-6 * top,
            )
        for mode in one["null"]:
            if mode != "draws":
                np.testing.assert_allclose(
                    eight["null"][mode]["cev_mean"], one["null"][mode]["cev_mean"], rtol=1e-4
                )
        np.testing.assert_allclose(
            eight["holdout"]["two_sided"], one["holdout"]["two_sided"], rtol=1e-4
        )
        assert eight["verdict"]["label"] == one["verdict"]["label"]


def test_cli_bad_input_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    (bad / "y.safetensors").write_bytes(b"\x00")
    proc = _cli(["analyze", f"--models={bad}", f"--out={tmp_path / 'o'}", "--quiet"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert re.search(
        r"jsubspace: error: .*x\.safetensors: not a valid safetensors file", proc.stderr
    ), proc.stderr
    assert not (tmp_path / "o" / "spectra.json").exists()


def test_sigkill_mid_run_resumes_to_identical_output(tmp_path):
    rng = np.random.default_rng(9)
    n, layers = 8, 10
    for i in range(n):
        testing.write_safetensors(
            tmp_path / "pop" / f"m{i}.safetensors",
            {
                f"layer.{j}.weight": rng.standard_normal((24, 20)).astype(np.float32)
                for j in range(layers)
            },
        )
    args = [
        f"--models={tmp_path / 'pop'}",
        "--quiet",
        "--noplots",
        "--null_draws=2",
        "--num_cpu_devices=2",
    ]
    ref = _cli(["analyze", f"--out={tmp_path / 'ref'}", *args])
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jsubspace.cli.main", "analyze", f"--out={out}", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "layers" / "00003.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(os.listdir(out / "layers"))
    assert 0 < len([d for d in done if d.endswith(".json")]) < layers
    assert not (out / "spectra.json").exists()  # nothing looks complete
    resumed = _cli(["analyze", f"--out={out}", *args])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _numbers(out / "spectra.json") == _numbers(tmp_path / "ref" / "spectra.json")


@pytest.mark.multiprocess
def test_cli_under_two_distributed_processes_equals_one(demo, tmp_path):
    _, paths, _, _ = demo
    common = [f"--models={paths['dense']}", "--quiet", "--noplots", "--null_draws=2"]
    single = _cli(["analyze", f"--out={tmp_path / 'one'}", "--num_cpu_devices=4", *common])
    assert single.returncode == 0, single.stderr[-2000:]
    out = tmp_path / "two"
    wait_all(launch_analyze([f"--out={out}", *common]), timeout=300, what="distributed analyze")
    one, two = _numbers(tmp_path / "one" / "spectra.json"), _numbers(out / "spectra.json")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["process_count"] == 2 and manifest["mesh"]["size"] == 4
    for a, b in zip(one, two):
        for mode in a["modes"]:
            top = a["modes"][mode]["eigenvalues"][0]
            np.testing.assert_allclose(
                b["modes"][mode]["eigenvalues"],
                a["modes"][mode]["eigenvalues"],
                rtol=2e-5,
                atol=2e-6 * top,
            )
        assert a["verdict"]["label"] == b["verdict"]["label"]


@pytest.mark.multiprocess
def test_lora_controls_from_the_grams_under_two_processes_equal_one(tmp_path):
    # 12 adapters of 4096 x 1024 (rank 4; 48 factor rows: the factor route) whose 201 MB of
    # updates exceed a quarter of the memory budget: the holdout and split halves come from the
    # factor Grams, gathered to every process and solved alike there.
    a, b = testing.lora_population(4, n_models=12, shape=(4096, 1024), rank=4)
    for i in range(12):
        testing.write_peft_adapter(
            tmp_path / "pop" / f"a{i:02d}", {"model.q_proj": (a[i], b[i])}, r=4, lora_alpha=8
        )
    common = [f"--models={tmp_path / 'pop'}", "--quiet", "--noplots", "--null_draws=1"]
    common += ["--memory_budget=0.5"]  # GiB
    single = _cli(["analyze", f"--out={tmp_path / 'one'}", "--num_cpu_devices=4", *common])
    assert single.returncode == 0, single.stderr[-2000:]
    out = tmp_path / "two"
    wait_all(launch_analyze([f"--out={out}", *common]), timeout=300, what="distributed analyze")
    (one,), (two,) = _numbers(tmp_path / "one" / "spectra.json"), _numbers(out / "spectra.json")
    assert one["plan"]["controls"]["holdout"]["from"] == "grams"
    assert one["holdout"]["bases"]["from"] == two["holdout"]["bases"]["from"] == "grams"
    for field in ("two_sided", "rows_one_sided", "cols_one_sided", "mean_plus_basis"):
        np.testing.assert_allclose(two["holdout"][field], one["holdout"][field], atol=1e-5)
    for field in ("rows_cosines", "cols_cosines"):
        np.testing.assert_allclose(
            two["compare"]["split_half"][field], one["compare"]["split_half"][field], atol=1e-4
        )


@pytest.mark.multiprocess
def test_dense_holdout_under_two_processes_after_the_exchanged_models_gram(tmp_path):
    # 16 models of 768 x 768: the models Gram takes the exchange (all_to_all) across the two
    # processes, and the holdout runs after it; the numbers equal one process. (A reduce-scatter
    # closing the exchange stalled gloo's later collectives at this size: 236 s instead of 40 s;
    # `test_dense_models_gram_takes_the_exchange_and_lora_factors_the_ring` keeps it out.)
    rng = np.random.default_rng(5)
    shared = rng.standard_normal((768, 768)).astype(np.float32)
    for i in range(16):
        noise = 0.1 * rng.standard_normal((768, 768)).astype(np.float32)
        testing.write_safetensors(tmp_path / "pop" / f"m{i:02d}.safetensors", {"w": shared + noise})
    common = [f"--models={tmp_path / 'pop'}", "--quiet", "--noplots", "--null_draws=0"]
    common += ["--nosplit_half"]
    single = _cli(["analyze", f"--out={tmp_path / 'one'}", "--num_cpu_devices=4", *common])
    assert single.returncode == 0, single.stderr[-2000:]
    out = tmp_path / "two"
    wait_all(launch_analyze([f"--out={out}", *common]), timeout=240, what="distributed analyze")
    (one,), (two,) = _numbers(tmp_path / "one" / "spectra.json"), _numbers(out / "spectra.json")
    top = one["modes"]["models"]["eigenvalues"][0]
    models = [r["modes"]["models"]["eigenvalues"] for r in (one, two)]
    np.testing.assert_allclose(models[1], models[0], atol=2e-6 * top)
    for field in ("two_sided", "rows_one_sided", "cols_one_sided", "mean_plus_basis"):
        np.testing.assert_allclose(two["holdout"][field], one["holdout"][field], atol=1e-5)


def test_center_base_uses_task_vectors(tmp_path):
    rng = np.random.default_rng(11)
    base = rng.standard_normal((10, 8)).astype(np.float32)
    tau = 0.1 * rng.standard_normal((5, 10, 8)).astype(np.float32)
    testing.write_safetensors(tmp_path / "base.safetensors", {"w": base})
    for i in range(5):
        testing.write_safetensors(tmp_path / "pop" / f"m{i}.safetensors", {"w": base + tau[i]})
    res = jsubspace.analyze(
        [str(tmp_path / "pop")],
        str(tmp_path / "o"),
        center="base",
        base=str(tmp_path / "base.safetensors"),
        null_draws=1,
        holdout=None,
        num_devices=1,
        quiet=True,
        plots=False,
    )
    x = (base + tau).astype(np.float64) - base
    (layer,) = res["layers"]
    assert layer["total_energy"] == pytest.approx(np.sum(x**2), rel=1e-4)
    want = np.linalg.eigvalsh(np.einsum("imn,jmn->ij", x, x))[::-1]
    np.testing.assert_allclose(layer["modes"]["models"]["eigenvalues"], want, rtol=1e-3)
    testing.write_safetensors(tmp_path / "other.safetensors", {"v": base})
    with pytest.raises(jsubspace.CheckpointError, match="base model lacks layer 'w'"):
        jsubspace.analyze(
            [str(tmp_path / "pop")],
            str(tmp_path / "o2"),
            center="base",
            base=str(tmp_path / "other.safetensors"),
            quiet=True,
        )
    with pytest.raises(OutputError, match="needs a base model"):
        jsubspace.analyze([str(tmp_path / "pop")], str(tmp_path / "o3"), center="base")
