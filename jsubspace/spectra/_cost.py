"""Where a layer's time and memory go: wall seconds and peak resident bytes of each part of its
analysis (the spectra and each control), for `LayerRecord.seconds` / `peak_bytes` and the run's
summary (`run_cost`).

Peak bytes are sampled: a daemon thread reads the process's resident set (`/proc/self/statm`)
every `INTERVAL` seconds and keeps the largest value since the part began. Nothing is reset in
the kernel (resetting its high-water mark would also hide the true peak from `time -v` and from
the benchmarks), so a spike shorter than the interval can be missed. Where `/proc` is absent
(not Linux) no bytes are recorded. The resident set is the host's: on an accelerator the
device's memory is not in it.
"""

from __future__ import annotations

import os
import threading
import time

INTERVAL = 0.01


class _Sampler:
    """The largest resident set seen since the last `take()`."""

    def __init__(self, path: str = "/proc/self/statm"):
        self._path = path
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._lock = threading.Lock()
        self._peak = self.current()
        thread = threading.Thread(target=self._run, name="jsubspace-rss", daemon=True)
        thread.start()

    def current(self) -> int:
        with open(self._path, "rb") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while True:
            time.sleep(INTERVAL)
            try:
                now = self.current()
            except OSError:
                return
            with self._lock:
                self._peak = max(self._peak, now)

    def take(self) -> int | None:
        """The peak since the previous call (and now), then starts a new interval; None when
        the resident set cannot be read now (the part then records no bytes)."""
        try:
            now = self.current()
        except (OSError, ValueError, IndexError):
            return None
        with self._lock:
            peak, self._peak = max(self._peak, now), now
        return peak


_SAMPLER: _Sampler | None = None
_STARTED = False


def sampler() -> _Sampler | None:
    """The process's sampler, started on first use; None where `/proc` cannot be read."""
    global _SAMPLER, _STARTED
    if not _STARTED:
        _STARTED = True
        try:
            _SAMPLER = _Sampler()
        except (OSError, ValueError, AttributeError, IndexError, RuntimeError):
            _SAMPLER = None
    return _SAMPLER


class Clock:
    """Wall seconds (`laps`) and peak resident bytes (`peaks`, empty without a sampler) of each
    part of a layer's analysis, beside the plan's estimate. Parts end where their results reach
    the host; a part lapped twice adds its seconds and keeps the larger peak."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self._sampler = sampler()
        if self._sampler is not None:
            self._sampler.take()
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.laps[part] = self.laps.get(part, 0.0) + now - self._last
        peak = self._sampler.take() if self._sampler is not None else None
        if peak is not None:
            self.peaks[part] = max(self.peaks.get(part, 0), peak)
        self._last = time.perf_counter()


def run_cost(records) -> dict:
    """The run's summary of the layers' parts (`spectra.json` layer records): per part its total
    seconds and the largest peak resident bytes of any layer, parts in order of seconds."""
    seconds: dict[str, float] = {}
    peaks: dict[str, int] = {}
    for record in records:
        for part, value in (record.get("seconds") or {}).items():
            seconds[part] = seconds.get(part, 0.0) + float(value)
        for part, value in (record.get("peak_bytes") or {}).items():
            peaks[part] = max(peaks.get(part, 0), int(value))
    order = sorted(seconds, key=seconds.get, reverse=True)
    return {
        "seconds": {part: seconds[part] for part in order},
        "peak_bytes": {part: peaks[part] for part in order if part in peaks},
    }


def cost_line(cost: dict) -> str:
    """One line for the end of a run: `time by part: holdout 12s (1.2 GB), spectra 9s ...`."""
    parts = []
    for part, value in cost.get("seconds", {}).items():
        peak = cost.get("peak_bytes", {}).get(part)
        memory = f", {peak / 2**30:.1f} GB" if peak else ""
        parts.append(f"{part} {value:.1f}s{memory}")
    return "time by part (peak resident memory): " + "; ".join(parts) if parts else ""
