"""Cost accounting: each part's seconds and sampled peak resident bytes, per layer and for the
run (`spectra._cost`)."""

import time

import numpy as np
import pytest

from jsubspace.spectra import _cost

MB = 2**20


@pytest.mark.skipif(_cost.sampler() is None, reason="no /proc/self/statm")
def test_clock_gives_each_part_its_own_peak():
    clock = _cost.Clock()
    time.sleep(0.05)
    clock.lap("small")
    big = np.ones(300 * MB // 8)  # touched: 300 MB resident
    time.sleep(0.05)
    del big
    clock.lap("big")
    time.sleep(0.05)
    clock.lap("after")
    assert set(clock.laps) == set(clock.peaks) == {"small", "big", "after"}
    assert all(0.04 < s < 5 for s in clock.laps.values())
    assert clock.peaks["big"] - clock.peaks["small"] > 250 * MB
    assert clock.peaks["big"] - clock.peaks["after"] > 250 * MB  # freed: the next part starts low


def test_run_cost_sums_seconds_and_keeps_the_largest_peak():
    records = [
        {"seconds": {"spectra": 1.0, "holdout": 3.0}, "peak_bytes": {"spectra": 5, "holdout": 9}},
        {"seconds": {"spectra": 2.5, "holdout": 0.5}, "peak_bytes": {"spectra": 7, "holdout": 2}},
        {"seconds": {"null": 0.25}},
    ]
    cost = _cost.run_cost(records)
    assert cost == {
        "seconds": {"spectra": 3.5, "holdout": 3.5, "null": 0.25},
        "peak_bytes": {"spectra": 7, "holdout": 9},
    }
    assert list(cost["seconds"])[-1] == "null"  # by seconds, largest first
    line = _cost.cost_line({"seconds": {"holdout": 12.0}, "peak_bytes": {"holdout": 3 * 2**30}})
    assert line == "time by part (peak resident memory): holdout 12.0s, 3.0 GB"
    assert _cost.cost_line({}) == ""
