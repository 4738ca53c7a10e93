# ruff: noqa: E501 (the snapshot is the table as printed, wider than a code line)
"""The terminal verdict table, as a snapshot on a fixture: long names intact or cut in the
middle without ambiguity, a `>K` cell, small values shown, the legend and the conclusion."""

from jsubspace.report import LEGEND
from jsubspace.report import short_names
from jsubspace.report import verdict_table


def _criterion(name, side, k, value, reference, passed):
    return dict(
        name=name,
        side=side,
        k=k,
        value=value,
        reference=reference,
        threshold=reference,
        passed=passed,
        interval=None,
    )


def _layer(name, label, shared, rows, cols, k90_rows, k90_cols, solved=64, mean_only=0.25):
    criteria = [
        _criterion("holdout", "rows", rows[0], rows[1], rows[2], rows[3]),
        _criterion("split_half", "rows", rows[0], 0.5, 0.1, rows[3]),
        _criterion("holdout", "cols", cols[0], cols[1], cols[2], cols[3]),
        _criterion("split_half", "cols", cols[0], 0.5, 0.1, False),
        _criterion("null", "rows", 1, 1.5, 1.0, True),
        _criterion("mean_only", None, None, mean_only, 0.0, None),
    ]
    return {
        "name": name,
        "modes": {
            "rows": {"k_at": {"0.9": k90_rows}, "eigenvalues": [1.0] * solved},
            "cols": {"k_at": {"0.9": k90_cols}, "eigenvalues": [1.0] * solved},
        },
        "verdict": {
            "label": label,
            "shared": shared,
            "roles": {"rows": "output", "cols": "input"},
            "criteria": criteria,
        },
    }


LONG = "model.layers.{}.self_attn.q_proj.base_layer.lora_magnitude_vector.weight"
RESULT = {
    "layers": [
        _layer(
            LONG.format(10),
            "shared rows subspace; cols model-specific",
            ["rows"],
            (8, 0.4123, 0.125, True),
            (1, 0.0002, 0.0001, False),
            12,
            None,
        ),
        _layer(
            LONG.format(11),
            "explained by the mean",
            [],
            (1, 0.0, 0.0625, False),
            (2, 0.03, 0.0312, False),
            40,
            41,
            mean_only=0.91,
        ),
    ],
    "conclusion": "1 of 2 layers share a subspace across models",
}

SNAPSHOT = """\
layer                                              rows: held-out    rand   k@.9   cols: held-out      rand   k@.9   null   mean-only   verdict
─────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────
model.layers.10.self_at…_magnitude_vector.weight        0.412++@8   0.125     12      2.0e-04  @1   1.0e-04    >64    +         0.250   shared rows subspace; cols model-specific (rows: output side)
model.layers.11.self_at…_magnitude_vector.weight        0.000  @1   0.062     40        0.030  @2     0.031     41    +         0.910   explained by the mean"""


def test_the_table_snapshot():
    table = verdict_table(RESULT)
    head, legend, conclusion = table.split("\n\n")
    assert head == SNAPSHOT, "\n" + head
    assert legend == LEGEND and "k@.9" in legend and ">K" in legend
    assert conclusion == "conclusion: 1 of 2 layers share a subspace across models"


def test_names_are_cut_in_the_middle_and_never_alike():
    names = ["a." * 30 + "q_proj", "a." * 30 + "k_proj", "short"]
    cut = short_names(names, 20)
    assert cut[2] == "short" and len(set(cut)) == 3
    assert all(c.endswith(n[-6:]) for c, n in zip(cut, names))
    # Two names that differ only in the middle are widened until they differ.
    middle = ["x" * 20 + "1" + "y" * 20, "x" * 20 + "2" + "y" * 20]
    cut = short_names(middle, 12)
    assert cut[0] != cut[1]
    assert all(len(c) <= len(n) for c, n in zip(cut, middle))
