"""The verdict on planted truths (every case, two shapes, 1 and 8 devices), its calibration
pieces against their laws, too few models, scale, centring and missing controls."""

import json

import numpy as np
import pytest

import jsubspace
from jsubspace import PopulationError
from jsubspace import spectra
from jsubspace import testing
from jsubspace.spectra import Label
from jsubspace.spectra import _verdict

TRUTH = {
    **{f"{case}.weight": label for case, label in testing.DENSE_CASES.items()},
    **{f"model.{case}": label for case, label in testing.LORA_CASES.items()},
}


@pytest.fixture(scope="module", params=[(48, 40), (24, 72)], ids=lambda s: f"{s[0]}x{s[1]}")
def planted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return root, testing.write_planted_cases(root, 0, n_models=40, shape=request.param)


@pytest.mark.parametrize("devices", [1, 8])
def test_every_planted_case_gets_its_label(planted, devices):
    root, paths = planted
    for kind, path in paths.items():
        result = jsubspace.analyze(
            [path], str(root / f"{kind}_{devices}"), num_devices=devices, quiet=True, plots=False
        )
        got = {layer["name"]: layer["verdict"]["label"] for layer in result["layers"]}
        assert got == {name: TRUTH[name] for name in got}, [
            (la["name"], la["verdict"]["reason"]) for la in result["layers"]
        ]
        assert len(got) == (len(testing.DENSE_CASES) if kind == "dense" else 2)
    # The card: every criterion with its number, reference and pass / fail, and the sides.
    dense = json.loads((root / f"dense_{devices}" / "spectra.json").read_text())
    cols = next(la for la in dense["layers"] if la["name"] == "shared_cols.weight")["verdict"]
    assert cols["shared"] == ["cols"]
    held = {c["side"]: c for c in cols["criteria"] if c["name"] == "holdout"}
    assert held["cols"]["passed"] and not held["rows"]["passed"]
    assert held["cols"]["interval"][0] > held["cols"]["reference"]
    assert "share a subspace" in dense["conclusion"]


def _population(tmp_path, case, n_models, shape=(32, 24)):
    x = testing.planted_case(case, 0, n_models=n_models, shape=shape)
    for i in range(n_models):
        testing.write_safetensors(tmp_path / f"m{i:02d}.safetensors", {"w.weight": x[i]})
    return str(tmp_path)


SHAPES = [(32, 24), (16, 40)]


@pytest.mark.parametrize("shape", SHAPES)
def test_two_models_are_refused_unless_only_spectra_are_asked_for(tmp_path, shape):
    models = _population(tmp_path / "pop", "shared_both", 2, shape)
    with pytest.raises(
        PopulationError, match="2 models are too few.*--holdout=none --nosplit_half"
    ):
        jsubspace.analyze([models], str(tmp_path / "out"), quiet=True, plots=False)
    result = jsubspace.analyze(
        [models],
        str(tmp_path / "spectra_only"),
        holdout=None,
        split_half=False,
        quiet=True,
        plots=False,
    )
    assert result["layers"][0]["verdict"]["label"] == Label.TOO_FEW.value


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_models", [3, 4])
def test_too_few_models_to_judge_says_which_control_could_not_run(tmp_path, n_models, shape):
    models = _population(tmp_path / "pop", "shared_both", n_models, shape)
    result = jsubspace.analyze([models], str(tmp_path / "out"), quiet=True, plots=False)
    layer = result["layers"][0]
    verdict = layer["verdict"]
    assert verdict["label"] == Label.TOO_FEW.value
    assert f"{n_models} models" in verdict["reason"]
    if n_models == 3:
        assert any("too few for a holdout" in m for m in verdict["missing"])
    else:
        # 5-fold asked of 4 models: leave-one-out instead, and the record says so.
        assert layer["holdout"]["scheme"] == "loo"
        assert any("leave-one-out" in note for note in verdict["notes"])


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        (dict(holdout=None), "--holdout"),
        (dict(split_half=False), "--split_half"),
        (dict(lineage=False), "--lineage"),
    ],
)
def test_a_missing_control_makes_a_sharing_claim_inconclusive(tmp_path, options, flag):
    models = _population(tmp_path / "pop", "shared_both", 16)
    result = jsubspace.analyze([models], str(tmp_path / "out"), quiet=True, plots=False, **options)
    verdict = result["layers"][0]["verdict"]
    assert verdict["label"] == Label.INCONCLUSIVE.value, verdict
    assert flag in verdict["reason"]


def test_noise_without_the_null_is_inconclusive(tmp_path):
    models = _population(tmp_path / "pop", "noise", 16)
    result = jsubspace.analyze([models], str(tmp_path / "out"), null_draws=0, quiet=True)
    verdict = result["layers"][0]["verdict"]
    assert verdict["label"] == Label.INCONCLUSIVE.value and "--null_draws" in verdict["reason"]


def test_random_subspace_overlap_follows_its_law():
    # The split half's reference: two independent uniformly random k-subspaces of R^d.
    rng = np.random.default_rng(0)
    for k, d in ((4, 32), (16, 48)):
        draws = []
        for _ in range(3000):
            u = np.linalg.qr(rng.standard_normal((d, k)))[0]
            v = np.linalg.qr(rng.standard_normal((d, k)))[0]
            draws.append(np.sum((u.T @ v) ** 2) / k)
        assert np.mean(draws) == pytest.approx(k / d, rel=0.02)
        assert np.std(draws) == pytest.approx(_verdict.overlap_deviation(k, d), rel=0.06)


def test_held_out_capture_of_independent_models_is_the_random_one():
    # With no shared subspace the holdout's statistic has the random subspace's mean exactly,
    # also for low-rank models (whose mean-centred holdout used to be biased upwards).
    m, n, n_models, k = 24, 20, 10, 4
    rng = np.random.default_rng(0)
    folds = spectra.fold_assignment(n_models, 5, 0)
    captures = []
    for seed in range(200):
        left = rng.standard_normal((n_models, m, 2))
        right = rng.standard_normal((n_models, n, 2))
        low_rank = np.einsum("imr,inr->imn", left, right)
        _, rows, cols, centred, _, _ = testing.holdout64(low_rank, folds, k, seed)
        captures.append([rows[:, k - 1] / centred, cols[:, k - 1] / centred])
    captures = np.asarray(captures)  # [seeds, 2, N]
    assert captures[:, 0].mean() == pytest.approx(k / m, rel=0.05)
    assert captures[:, 1].mean() == pytest.approx(k / n, rel=0.05)


def test_scale_fraction_and_energy_weighted_mean_only(tmp_path):
    models = _population(tmp_path / "pop", "scaled", 12)
    result = jsubspace.analyze([models], str(tmp_path / "out"), quiet=True, plots=False)
    layer = result["layers"][0]
    x = testing.planted_case("scaled", 0, n_models=12, shape=(32, 24)).astype(np.float64)
    np.testing.assert_allclose(layer["scale"]["norms"], np.linalg.norm(x, axis=(1, 2)), rtol=1e-5)
    assert layer["scale"]["along_mean"] == pytest.approx(1.0, abs=1e-6)
    assert layer["verdict"]["label"] == Label.SCALE.value
    # Energy-weighted: bounded by one, and equal to its definition on the held-out models.
    holdout = layer["holdout"]
    assert holdout["mean_only"] <= 1.0
    # --normalize=fro: every model at unit norm (the scaled copies become one matrix).
    norm = jsubspace.analyze(
        [models], str(tmp_path / "fro"), normalize="fro", quiet=True, plots=False
    )["layers"][0]
    assert norm["normalize"] == "fro"
    np.testing.assert_allclose(norm["scale"]["norms"], layer["scale"]["norms"], rtol=1e-5)
    assert norm["total_energy"] < 1e-6 * layer["total_energy"]


def test_normalised_spectra_equal_float64(tmp_path):
    models = _population(tmp_path / "pop", "shared_both", 10)
    x = testing.planted_case("shared_both", 0, n_models=10, shape=(32, 24)).astype(np.float64)
    x *= np.linspace(0.5, 3.0, 10)[:, None, None]
    for i in range(10):
        testing.write_safetensors(
            f"{models}/m{i:02d}.safetensors", {"w.weight": x[i].astype(np.float32)}
        )
    layer = jsubspace.analyze(
        [models], str(tmp_path / "out"), normalize="fro", quiet=True, plots=False
    )["layers"][0]
    unit = x / np.linalg.norm(x, axis=(1, 2), keepdims=True)
    want = testing.mode_spectra64(unit - unit.mean(0))
    for mode, values in want.items():
        got = np.asarray(layer["modes"][mode]["eigenvalues"])
        np.testing.assert_allclose(got[:5], values[:5], rtol=1e-4, atol=1e-6 * values[0])


def test_uncentred_spectra_get_uncentred_controls(tmp_path):
    models = _population(tmp_path / "pop", "shared_both", 12)
    layer = jsubspace.analyze(
        [models], str(tmp_path / "out"), center="none", quiet=True, plots=False
    )["layers"][0]
    holdout = layer["holdout"]
    assert holdout["center"] == "none" and "mean_plus_basis" not in holdout
    # Against float64: bases of the uncentred training models, captures of W_i itself.
    x = testing.planted_case("shared_both", 0, n_models=12, shape=(32, 24)).astype(np.float64)
    folds = spectra.fold_assignment(12, 5, 0)
    k = holdout["ks"][-1]
    want = np.zeros(12)
    for f in range(folds.max() + 1):
        train = x[folds != f]
        v = np.linalg.eigh(np.einsum("imn,imk->nk", train, train))[1][:, ::-1][:, :k]
        for i in np.flatnonzero(folds == f):
            want[i] = np.sum((x[i] @ v) ** 2) / np.sum(x[i] ** 2)
    got = np.asarray(holdout["per_model_cols_one_sided"])[:, -1]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_conclusion_counts_labels_shared_first():
    layers = [
        {"verdict": {"label": Label.NOISE.value}},
        {"verdict": {"label": Label.SHARED_COLS.value}},
        {"verdict": {"label": Label.NOISE.value}},
    ]
    line = spectra.conclusion(layers)
    assert line.startswith("1 of 3 layers share a subspace")
    assert line.index(Label.SHARED_COLS.value) < line.index(Label.NOISE.value)
    assert spectra.conclusion(layers[:1]).startswith("no shared subspace in the one layer")


@pytest.mark.parametrize(("n_models", "holdout"), [(7, "loo"), (13, 4), (40, 5), (9, 2)])
def test_each_model_centres_one_model_of_another_fold(n_models, holdout):
    from jsubspace.spectra._holdout import centre_models

    folds = spectra.fold_assignment(n_models, holdout, 0)
    centre = centre_models(folds, 3)
    assert np.all(folds[centre] != folds)  # never from the held-out model's own fold
    if np.bincount(folds).max() * 2 <= n_models:
        assert sorted(centre) == list(range(n_models))  # a permutation: each centres one


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("model.layers.0.self_attn.q_proj", "output"),  # a PEFT LoRA update (out, in)
        ("encoder.layer.0.attention.self.query.weight", "output"),  # torch Linear
        ("Dense_0.kernel", "input"),  # flax (in, out)
        ("transformer.h.0.attn.c_attn.weight", "input"),  # GPT-2 Conv1D (in, out)
        ("embeddings.word_embeddings.weight", "input"),  # (vocabulary, hidden)
    ],
)
def test_sides_are_named_input_or_output_by_layout(name, rows):
    roles = _verdict.side_roles(name)
    assert roles["rows"] == rows and {roles["rows"], roles["cols"]} == {"input", "output"}


def test_report_and_table_carry_the_cards_and_the_conclusion(tmp_path):
    from jsubspace.report import verdict_table

    models = _population(tmp_path / "pop", "shared_cols", 12)
    result = jsubspace.analyze([models], str(tmp_path / "out"), quiet=True)
    page = (tmp_path / "out" / "report.html").read_text()
    assert f"Conclusion: {result['conclusion']}" in page
    assert "<details><summary><code>w.weight</code>: <b>shared cols subspace" in page
    assert "held-out capture against a random k-subspace" in page  # the card's rows
    table = verdict_table(result)
    assert "(cols: input side)" in table and f"conclusion: {result['conclusion']}" in table


def test_cards_of_other_versions_stay_readable():
    old = spectra.Verdict.from_json(
        {"label": "shared input subspace (cols); outputs model-specific", "reason": "r"}
    )
    assert old.label is Label.SHARED_COLS
    unknown = spectra.Verdict.from_json({"label": "a label never written here", "reason": "r"})
    assert unknown.label is Label.INCONCLUSIVE and "a label never written here" in unknown.notes[0]


@pytest.mark.parametrize("dof", [1, 2, 4, 39, 499])
def test_t_quantile_equals_scipy_stats(dof):
    from scipy import stats

    for p in (0.9, 0.95, 0.99, 1 - 0.05 / 21, 1 - 1e-6):
        want = stats.t.ppf(p, dof)
        assert abs(_verdict._t_quantile(p, dof) - want) <= 1e-10 * abs(want)
