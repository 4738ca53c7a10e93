"""The groups control: between-group capture, each group's own basis, leave-one-group-out,
per-group spectra; against float64 numpy, on a planted population where two groups share one
subspace and a third has its own."""

import json
import os

import numpy as np
import pytest

import jsubspace
from jsubspace import PopulationError
from jsubspace import sharding
from jsubspace import spectra
from jsubspace import testing
from jsubspace.run._groups import read_groups
from jsubspace.spectra._groups import within_pairs

M, N, R, PER = 32, 24, 4, 8
LABELS = ["t1"] * PER + ["t2"] * PER + ["t3"] * PER


def planted(seed=0):
    """t1 and t2 vary in one rank-4 subspace (both sides), t3 in another; plus noise."""
    rng = np.random.default_rng(seed)
    bases = [
        (np.linalg.qr(rng.standard_normal((M, R)))[0], np.linalg.qr(rng.standard_normal((N, R)))[0])
        for _ in range(2)
    ]
    models = []
    for group in (0, 0, 1):
        u, v = bases[group]
        for _ in range(PER):
            w = 3 * u @ rng.standard_normal((R, R)) @ v.T + 0.3 * rng.standard_normal((M, N))
            models.append(w.astype(np.float32))
    return np.stack(models)


def place(x, mesh):
    import jax

    n_pad = sharding.padded_count(len(x), mesh)
    padded = np.concatenate([x, np.zeros((n_pad - len(x),) + x.shape[1:], x.dtype)])
    return jax.device_put(padded, sharding.stacked_sharding(mesh))


def top(gram, k):
    return np.linalg.eigh(gram)[1][:, ::-1][:, :k]


def captures64(x, basis, held, partner, k):
    """float64: the basis of models `basis` (centred by their mean) on `held - partner`."""
    xt = x[basis] - x[basis].mean(0)
    u = top(np.einsum("imn,ikn->mk", xt, xt), k)
    v = top(np.einsum("imn,imk->nk", xt, xt), k)
    two, rows, cols = [], [], []
    for i in held:
        d = x[i] - x[partner[i]]
        e = np.sum(d * d)
        core = (u.T @ d @ v) ** 2
        two.append(np.diag(np.cumsum(np.cumsum(core, 0), 1)) / e)
        rows.append(np.cumsum(np.sum((u.T @ d) ** 2, axis=1)) / e)
        cols.append(np.cumsum(np.sum((d @ v) ** 2, axis=0)) / e)
    return np.array(two), np.array(rows), np.array(cols)


@pytest.fixture(scope="module")
def population():
    return planted().astype(np.float64)


@pytest.mark.parametrize("devices", [1, 8])
def test_between_group_capture_against_float64(population, devices):
    x64 = population
    mesh = sharding.models_mesh(devices)
    grouping = spectra.Grouping.from_labels("task", LABELS)
    flat = x64.reshape(len(x64), -1)
    rec = spectra.group_control(
        place(x64.astype(np.float32), mesh),
        len(x64),
        grouping,
        mesh=mesh,
        seed=3,
        uncentred=flat @ flat.T,
    )
    index = np.asarray(grouping.index)
    partner = within_pairs(index, 3)
    k = rec["k"]
    assert k == 4 and rec["ks"] == [1, 2, 4]  # own LOO bases of 8 models reach 5 directions
    assert rec["random"] == {"two_sided": 16 / (M * N), "rows": 4 / M, "cols": 4 / N}
    for a in range(3):
        for b in range(3):
            if a == b:
                continue
            held = np.flatnonzero(index == b)
            two, rows, cols = captures64(x64, index == a, held, partner, PER - 1)
            for side, want in (("two_sided", two), ("rows", rows), ("cols", cols)):
                got = rec["curves"][side][f"t{a + 1} -> t{b + 1}"]
                np.testing.assert_allclose(got, want.mean(0)[[0, 1, 3]], rtol=2e-3, atol=2e-5)
            mu = x64[index == a].mean(0)
            mean_only = 1 - np.sum((x64[held] - mu) ** 2) / np.sum(x64[held] ** 2)
            np.testing.assert_allclose(rec["mean_only"][a][b], mean_only, rtol=1e-4)
    # The planted structure: t1 and t2 capture each other as well as their own held-out bases
    # do; nothing carries to or from t3 beyond a random subspace's few percent.
    two = np.array(rec["capture"]["two_sided"])
    random = rec["random"]["two_sided"]
    assert two[0, 1] > 0.5 and two[1, 0] > 0.5
    assert two[0, 1] > 0.85 * two[1, 1] and two[1, 0] > 0.85 * two[0, 0]
    assert all(two[g, g] > 0.5 for g in range(3))
    for a, b in ((0, 2), (1, 2), (2, 0), (2, 1)):
        assert two[a, b] < random + 0.03, (a, b, two[a, b])
    # Each group's own basis: the holdout control inside the group, run on its models alone.
    own = spectra.holdout_control(
        place(x64[16:].astype(np.float32), mesh), PER, mesh=mesh, holdout="loo", seed=3
    )
    np.testing.assert_allclose(two[2, 2], own["two_sided"][own["ks"].index(k)], rtol=1e-5)
    # Per-group spectra: t1's models-mode spectrum from the Gram of its centred models.
    xc = x64[:PER] - x64[:PER].mean(0)
    lam = np.linalg.eigvalsh(np.einsum("imn,jmn->ij", xc, xc))[::-1]
    np.testing.assert_allclose(rec["spectra"]["t1"]["evr"][:5], (lam / lam.sum())[:5], rtol=1e-6)
    assert rec["spectra"]["t1"]["n"] == PER


def test_leave_one_group_out_against_float64(population):
    x64 = population
    mesh = sharding.models_mesh(4)
    grouping = spectra.Grouping.from_labels("task", LABELS)
    rec = spectra.group_control(
        place(x64.astype(np.float32), mesh), len(x64), grouping, mesh=mesh, seed=5
    )
    logo = rec["leave_one_group_out"]
    assert logo["scheme"] == "leave-one-group-out" and logo["folds"] == 3
    index = np.asarray(grouping.index)
    partner = within_pairs(index, 5)
    kmax = min(M, N, 24 - PER - 1)
    per_model = np.zeros((24, kmax))
    for b in range(3):
        held = np.flatnonzero(index == b)
        two, _, _ = captures64(x64, index != b, held, partner, kmax)
        per_model[held] = two
    ks = logo["ks"]
    np.testing.assert_allclose(
        logo["per_model_two_sided"], per_model[:, [k - 1 for k in ks]], rtol=2e-3, atol=2e-5
    )
    # With t3 out, the basis of t1 + t2 does not carry to it; with t1 out, t2 carries it.
    at4 = ks.index(4)
    random = logo["random"]["two_sided"][at4]
    assert logo["per_group_two_sided"]["t3"][at4] < 3 * random
    assert logo["per_group_two_sided"]["t1"][at4] > 10 * random
    # Mean-only: the mean of the other groups, energy-weighted.
    resid = sum(np.sum((x64[index == b] - x64[index != b].mean(0)) ** 2) for b in range(3))
    np.testing.assert_allclose(logo["mean_only"], 1 - resid / np.sum(x64**2), rtol=1e-4)


def _write(tmp_path, x):
    for i, w in enumerate(x):
        testing.write_safetensors(tmp_path / "pop" / f"m{i:02d}.safetensors", {"w.weight": w})
    return str(tmp_path / "pop")


def test_a_groups_file_in_an_analysis(tmp_path):
    x = planted(1)
    pop = _write(tmp_path, x)
    groups = tmp_path / "groups.csv"
    rows = ["model,task,seed"] + [f"m{i:02d},{LABELS[i]},{i % 2}" for i in range(24)]
    groups.write_text("\n".join(rows) + "\n")
    result = jsubspace.analyze([pop], str(tmp_path / "out"), groups=str(groups), null_draws=0)
    rec = result["layers"][0]["groups"]
    assert list(rec) == ["task", "seed"]
    assert rec["task"]["labels"] == ["t1", "t2", "t3"] and rec["task"]["sizes"] == [8, 8, 8]
    assert rec["seed"]["labels"] == ["0", "1"]
    two = np.array(rec["task"]["capture"]["two_sided"])
    assert two[0, 1] > 0.5 and two[0, 2] < 0.1
    assert "groups" in result["layers"][0]["seconds"]
    with open(tmp_path / "out" / "report.html", encoding="utf-8") as f:
        html = f.read()
    assert "Between-group capture: task" in html and "Between-group capture: seed" in html
    assert os.path.exists(tmp_path / "out" / "plots" / "groups_00.png")
    on_disk = json.load(open(tmp_path / "out" / "spectra.json"))
    assert on_disk["config"]["groups"][0][0] == "task"


def test_groups_file_errors_name_the_file_and_row(tmp_path):
    pop = _write(tmp_path, planted(2)[:6])
    population = jsubspace.open_population([pop])
    bad = tmp_path / "g.csv"
    cases = [
        ("model\nm00\n", "needs a header"),
        ("model,task\nm00,a\nnope,b\n", "row 3: 'nope' is no model"),
        ("model,task\nm00,\n", "row 2: 'm00' needs a label"),
        ("model,task\nm00,a\nm00,b\n", "row 3: model 'm00' is labelled twice"),
        ("model,task\nm00,a\n", "5 model(s) of the population have no row"),
    ]
    for text, message in cases:
        bad.write_text(text)
        with pytest.raises(PopulationError, match=str(bad)) as e:
            read_groups(str(bad), population)
        assert message in str(e.value)
    # Paths and file names name models too.
    bad.write_text(
        "model,task\n" + "".join(f"{pop}/m{i:02d}.safetensors,{i % 2}\n" for i in range(6))
    )
    (grouping,) = read_groups(str(bad), population)
    assert grouping.labels == ("0", "1") and grouping.index == (0, 1, 0, 1, 0, 1)


def test_peft_adapters_are_grouped_by_their_base_model(tmp_path):
    from jsubspace.run._groups import automatic_groups

    rng = np.random.default_rng(0)
    for i in range(6):
        path = tmp_path / f"adapter_{i}"
        testing.write_peft_adapter(
            path,
            {"model.q": (rng.standard_normal((4, 12)), rng.standard_normal((16, 4)))},
            r=4,
            lora_alpha=8,
        )
        config = json.loads((path / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = f"org/base-{i % 2}"
        (path / "adapter_config.json").write_text(json.dumps(config))
    population = jsubspace.open_population([str(tmp_path)])
    (grouping,) = automatic_groups(population)
    assert grouping.column == "base_model"
    assert grouping.labels == ("org/base-0", "org/base-1")


def test_singleton_groups_leave_the_other_means_and_the_holdout_honest(population):
    """Groups of 8, 8, 7 and one model: the mean-only of a basis group is its own mean (the
    singleton is no part of it), and a grouping of single models has no pairs to hold out."""
    x64 = population
    mesh = sharding.models_mesh(2)
    labels = LABELS[:23] + ["solo"]
    rec = spectra.group_control(
        place(x64.astype(np.float32), mesh),
        24,
        spectra.Grouping.from_labels("t", labels),
        mesh=mesh,
        seed=0,
    )
    index = np.asarray(spectra.Grouping.from_labels("t", labels).index)
    for a, b in ((0, 1), (2, 0)):
        held = np.flatnonzero(index == b)
        mu = x64[index == a].mean(0)
        want = 1 - np.sum((x64[held] - mu) ** 2) / np.sum(x64[held] ** 2)
        np.testing.assert_allclose(rec["mean_only"][a][b], want, rtol=1e-4)
    assert rec["capture"]["two_sided"][0][3] is None  # the singleton has no pair to centre by
    singles = spectra.group_control(
        place(x64[:6].astype(np.float32), mesh),
        6,
        spectra.Grouping.from_labels("seed", [str(i) for i in range(6)]),
        mesh=mesh,
        seed=0,
    )
    assert singles["leave_one_group_out"] is None and singles["k"] is None
    assert any("no group has two models" in note for note in singles["notes"])


def test_a_groups_file_may_name_models_left_out_as_unreadable(tmp_path):
    pop = _write(tmp_path, planted(3)[:6])
    (tmp_path / "pop" / "old").mkdir()
    (tmp_path / "pop" / "old" / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    population = jsubspace.open_population([pop], skip_unreadable=True)
    groups = tmp_path / "g.csv"
    groups.write_text("model,task\n" + "".join(f"m{i:02d},{i % 2}\n" for i in range(6)) + "old,1\n")
    (grouping,) = read_groups(str(groups), population)
    assert grouping.index == (0, 1, 0, 1, 0, 1)
