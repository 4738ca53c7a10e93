"""The model zoo trains on real data, writes real checkpoints, and the main job's controls
behave as the science says they must."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jsubspace import io
from jsubspace import sharding
from jsubspace import zoo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_vmapped_sharded_training_equals_one_model_at_a_time(tmp_path):
    data = zoo.load_digits()
    model = zoo.MLP(hidden=16)
    tasks = [
        zoo.Task(tuple(range(10)), seed=i, transform=t)
        for i, t in enumerate(["none", "rotate", "noise", "shift"])
    ]
    mesh = sharding.models_mesh(4)
    init = zoo.init_zoo(model, [t.seed for t in tasks], data.x, mesh)
    together = zoo.train_zoo(model, init, data, tasks, steps=30, mesh=mesh)
    alone = zoo.train_zoo(
        model, zoo.init_zoo(model, [tasks[2].seed], data.x), data, [tasks[2]], steps=30
    )
    for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
        np.testing.assert_allclose(np.asarray(a)[2], np.asarray(b)[0], rtol=2e-4, atol=2e-5)
    acc = zoo.accuracy(model, together, data, tasks)
    assert np.all(acc > 0.5)  # far above chance (0.1) after 30 full-batch steps
    paths = zoo.write_zoo(str(tmp_path / "z"), together, tasks)
    pop = io.open_population(str(tmp_path / "z"))
    assert pop.names == ["m000", "m001", "m002", "m003"]
    assert {la.name: la.shape for la in pop.layers} == {
        "Dense_0.kernel": (64, 16),
        "Dense_1.kernel": (16, 16),
        "Dense_2.kernel": (16, 10),
    }
    manifest = json.loads((tmp_path / "z" / "zoo.json").read_text())
    assert manifest["models"][1]["task"]["transform"] == "rotate"
    assert len(paths) == 4


def test_tasks_select_classes_and_permute_labels():
    data = zoo.load_digits()
    task = zoo.Task((1, 3), permutation=tuple(reversed(range(10))), transform="rotate")
    x, y, mask = zoo.apply_task(data.x, data.y, task, 10)
    keep = np.isin(data.y, [1, 3])
    np.testing.assert_array_equal(np.asarray(mask) == 1, keep)
    np.testing.assert_array_equal(np.asarray(y)[keep], 9 - data.y[keep])
    np.testing.assert_allclose(np.asarray(x)[0], np.rot90(data.x[0]))


def test_lora_zoo_with_shared_a_writes_peft_adapters(tmp_path):
    data = zoo.load_digits()
    model = zoo.MLP(hidden=16)
    base = jax.tree.map(lambda a: a[0], zoo.init_zoo(model, [0], data.x))
    tasks = [zoo.Task((0, 1, 2), seed=i) for i in range(4)]
    adapters = zoo.lora_init(base, ["Dense_0"], [5, 5, 6, 7], rank=2)
    adapters = zoo.train_lora_zoo(
        model, base, adapters, data, tasks, steps=5, scale=2.0, a_lr_scale=0.0
    )
    zoo.write_lora_zoo(
        str(tmp_path / "l"), adapters, tasks, rank=2, alpha=4.0, seeds_a=[5, 5, 6, 7], parent="base"
    )
    pop = io.open_population(str(tmp_path / "l"))
    (layer,) = pop.layers
    a = [ref.read() for ref in layer.a_refs]
    np.testing.assert_array_equal(a[0], a[1])  # shared initialisation, never trained away
    assert np.abs(a[0] - a[2]).max() > 0.01
    assert np.abs(layer.b_refs[0].read()).max() > 0  # B trained


@pytest.mark.slow
def test_main_job_full_size(tmp_path):
    _run_main(tmp_path, [])


def test_main_job_small_controls_behave(tmp_path):
    _run_main(
        tmp_path,
        [
            "--models=16",
            "--lora_models=16",
            "--steps=150",
            "--lora_steps=100",
            "--null_draws=2",
            "--ks=1,4,16",
        ],
    )


def _run_main(tmp_path, extra):
    out = tmp_path / "zoo"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "universal_zoo.py"),
            f"--out={out}",
            "--quiet",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "function (test accuracy" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    tables = results["tables"]
    # The page a user opens first: HTML tables, each population's conclusion, its report.
    page = (out / "index.html").read_text()
    assert page.count("<table>") == len(tables) + 1  # one per population, and function
    assert "share a subspace" in page or "no shared subspace" in page
    assert "<pre>" not in page and "trained/report.html" in page
    # The random-init zoo is indistinguishable from the Gaussian null ...
    for row in tables["random_init"]:
        assert row["verdict"] == "indistinguishable from noise", row
        assert abs(row["excess_k1"] - 1) < 0.1
    # ... trained zoos are not: more concentrated than the null on every layer.
    for row in tables["trained"]:
        assert row["excess_k1"] > 1.5, row
    assert all(
        r["verdict"].startswith("shared")
        or r["verdict"] in ("model-specific structure, not shared", "explained by the mean")
        for r in tables["trained"]
    ), tables["trained"]
    # The shared-A LoRA zoo is flagged, and its A spectrum collapses to the null without the
    # shared-init adapters.
    for row in tables["lora"] + tables["lora_factors"]:
        assert row["verdict"] == "explained by shared initialisation", row
    for full, own in zip(tables["lora_factors"], tables["lora_factors_own_a"]):
        assert full["excess_k1"] > 2.0 and own["excess_k1"] < 1.3, (full, own)
    function = results["function"]
    assert function["original_seen"] > 0.9
    assert len(function["seen"]) == len(function["ks"])
    page = (out / "trained" / "report.html").read_text()
    assert '<img src="data:image/png;base64,' in page
    assert (out / "function.png").read_bytes()[:4] == b"\x89PNG"


_RUN_EXPERIMENT = """
import dataclasses, importlib.util, json, sys
from jsubspace import zoo
name, path, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
spec = importlib.util.spec_from_file_location(name, path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
kwargs["zoo_config"] = zoo.ZooConfig(**kwargs["zoo_config"])
print(json.dumps(module.run(log=lambda *a: None, **kwargs)))
"""


def _experiment(name, **kwargs):
    """Runs `experiments/<name>.py`'s `run` in its own process (each script defines flags)."""
    import dataclasses

    kwargs["zoo_config"] = dataclasses.asdict(kwargs["zoo_config"])
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _RUN_EXPERIMENT,
            name,
            os.path.join(ROOT, "experiments", f"{name}.py"),
            json.dumps(kwargs),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


SMALL = zoo.ZooConfig(models=8, lora_models=8, steps=60, lora_steps=20, hidden=32)


@pytest.fixture(scope="module")
def small_zoo_cache(tmp_path_factory):
    """One zoo cache for the experiments on `SMALL`, as the experiments share the main job's
    cache: the first to run trains the zoos, the other reads them (a training saved)."""
    return str(tmp_path_factory.mktemp("small_zoo_cache"))


def test_merging_experiment_runs_and_centred_subspace_is_the_mean(tmp_path, small_zoo_cache):
    result = _experiment(
        "merging",
        out=str(tmp_path / "m"),
        cache=small_zoo_cache,
        steps=20,
        k=2,
        seed=0,
        zoo_config=SMALL,
    )
    assert result["centred_subspace_minus_mean"] < 1e-5
    assert result["accuracy"]["subspace, centred (= mean)"] == pytest.approx(
        result["accuracy"]["mean"], abs=1e-9
    )
    assert len(result["accuracy"]["ties (density=0.2)"]) == 6


def test_adaptation_experiment_counts_parameters_exactly(tmp_path, small_zoo_cache):
    results = _experiment(
        "adaptation",
        out=str(tmp_path / "a"),
        cache=small_zoo_cache,
        k=4,
        steps=30,
        lr=1e-2,
        seed=0,
        zoo_config=SMALL,
    )
    # MLP 64-32-32-10: coefficients 3 x 4^2; LoRA r on every kernel: r (in + out) each.
    assert results["coefficients"]["parameters"] == 3 * 16
    assert results["lora_r1"]["parameters"] == (64 + 32) + (32 + 32) + (32 + 10)
    assert results["lora_r4"]["parameters"] == 4 * ((64 + 32) + (32 + 32) + (32 + 10))
    assert results["full"]["parameters"] == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    for method in ("coefficients", "lora_r4", "full"):
        assert results[method]["final_loss"] < results[method]["initial_loss"], method


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_cnn_and_vit_zoos_train_and_analyse(tmp_path, arch):
    import jsubspace

    data = zoo.load_digits()
    model = zoo.ARCHITECTURES[arch]()
    tasks = [zoo.Task(tuple(range(10)), seed=i) for i in range(2)]
    mesh = sharding.models_mesh(2)
    init = zoo.init_zoo(model, [t.seed for t in tasks], data.x, mesh)
    trained = zoo.train_zoo(model, init, data, tasks, steps=25, lr=3e-2, mesh=mesh)
    acc = zoo.accuracy(model, trained, data, tasks)
    assert np.all(acc > 0.3), acc  # chance is 0.1
    zoo.write_zoo(str(tmp_path / "z"), trained, tasks)
    result = jsubspace.analyze(
        [str(tmp_path / "z")],
        str(tmp_path / "o"),
        null_draws=1,
        holdout=None,
        split_half=False,  # two models: spectra only
        num_devices=2,
        quiet=True,
        plots=False,
    )
    names = {layer["name"]: layer["shape"] for layer in result["layers"]}
    if arch == "cnn":
        assert names["Conv_0.kernel"] == [3, 3 * 1 * 8]  # (kh, kw, in, out) as a matrix
    else:
        assert names["Attn_0.query.kernel"] == [32, 2 * 16]  # (dim, heads, head_dim)
    for layer in result["layers"]:
        trace = sum(layer["modes"]["models"]["eigenvalues"])
        assert trace == pytest.approx(layer["total_energy"], rel=1e-4)


def test_fashion_mnist_reader_on_idx_files(tmp_path):
    import gzip
    import struct

    rng = np.random.default_rng(0)

    def idx(path, array):
        header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(
            ">" + "I" * array.ndim, *array.shape
        )
        with gzip.open(path, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    images = rng.integers(0, 256, (12, 28, 28))
    labels = rng.integers(0, 10, 12)
    idx(tmp_path / "train-images-idx3-ubyte.gz", images[:8])
    idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:8])
    idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[8:])
    idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[8:])
    data = zoo.load_fashion_mnist(str(tmp_path), limit=100)
    assert data.x.shape == (12, 28, 28) and data.x.max() <= 1.0
    np.testing.assert_array_equal(data.y, labels)
    np.testing.assert_allclose(data.x[9], images[9] / 255.0, rtol=1e-6)
    assert data.train.sum() == 8
    assert zoo.load_fashion_mnist(str(tmp_path / "absent")) is None
