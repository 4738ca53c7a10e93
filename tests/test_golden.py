"""Behaviour preserved: fresh runs of the golden cases equal the recorded `spectra.json` records
(numbers to float32 rounding, verdict labels and every string exactly). Keys added since the
recording (the layer plan, say) are allowed; keys that disappeared are not."""

import numpy as np
import pytest

from tests.golden import cases

# float32 rounding of sums over 16 models and of eigen-solvers, relative to each array's scale.
RTOL = 2e-4
# Principal cosines of directions past a basis's spectral gap (noise directions with near-tied
# eigenvalues) move by the rounding of the Grams divided by the gap: absolute 1e-3 (of 1).
COSINE_ATOL = 1e-3
RESIDUAL_ATOL = 1e-5
# Lineage linkage heights are cosine distances `1 - cos`: between near copies (1 - cos ~ 4e-4)
# the float32 rounding of the cosines (~1e-6, machine-dependent: SIMD width changes the order
# of the sums) is a large fraction of the distance, and the merge order of near-tied heights
# follows that rounding. So heights are compared to an absolute 1e-5, and which clusters merge
# (the index columns, and the dendrogram's leaf `order` drawn from them) is not compared.
LINKAGE_ATOL = 1e-5
# Distances between near copies come from Grams (`|Wi|^2 + |Wj|^2 - 2 <Wi, Wj>`), whose float32
# cancellation leaves ~1e-4 of a 2%-relative distance.
DISTANCE_RTOL = 2e-3


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return cases.populations(str(tmp_path_factory.mktemp("golden")))


def assert_same(found, want, where="record"):
    if isinstance(want, dict):
        assert isinstance(found, dict), where
        missing = set(want) - set(found)
        assert not missing, f"{where}: keys gone {sorted(missing)}"
        for key, value in want.items():
            assert_same(found[key], value, f"{where}.{key}")
    elif where.endswith(".lineage.order"):
        assert sorted(found) == sorted(want), where
    elif where.endswith(".lineage.min_relative_distance"):
        assert found == pytest.approx(want, rel=DISTANCE_RTOL), where
    elif isinstance(want, list) and _numeric(want) and where.endswith(".linkage"):
        a, b = np.asarray(found, np.float64), np.asarray(want, np.float64)
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        np.testing.assert_allclose(a[:, 2], b[:, 2], rtol=0, atol=LINKAGE_ATOL, err_msg=where)
        assert a[-1, 3] == b[-1, 3], where  # the last merge holds every model
    elif isinstance(want, list) and _numeric(want):
        a, b = np.asarray(found, np.float64), np.asarray(want, np.float64)
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)
        atol = COSINE_ATOL if where.endswith("_cosines") else RTOL * scale
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=atol, err_msg=where)
    elif isinstance(want, list):
        assert isinstance(found, list) and len(found) == len(want), where
        for i, (f, w) in enumerate(zip(found, want)):
            assert_same(f, w, f"{where}[{i}]")
    elif isinstance(want, float) and where.endswith("residual"):
        # A solver's residual (relative to lambda_1) is itself at rounding level.
        assert found == pytest.approx(want, abs=RESIDUAL_ATOL), where
    elif isinstance(want, float) and not isinstance(want, bool):
        assert found == pytest.approx(want, rel=RTOL, abs=1e-6 * max(abs(want), 1e-30)), where
    else:
        assert found == want, f"{where}: {found!r} != {want!r}"


def _numeric(value: list) -> bool:
    """A non-empty rectangular array of numbers (no booleans, no strings)."""
    try:
        flat = np.asarray(value, dtype=object).ravel()
        np.asarray(value, np.float64)
    except (ValueError, TypeError):
        return False
    return bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat
    )


@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_golden_case(name, paths, tmp_path):
    found = cases.run_case(name, paths, str(tmp_path / name), no_materialise=cases.no_materialise)
    want = cases.load(name)
    assert found["models"] == want["models"]
    for got, rec in zip(found["layers"], want["layers"], strict=True):
        assert got["verdict"]["label"] == rec["verdict"]["label"], rec["name"]
        assert_same(got, rec, rec["name"])
