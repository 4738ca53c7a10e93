"""What `jsubspace.analyze` returns: a run's `spectra.json`, typed, with its output paths."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

from jsubspace.errors import OutputError
from jsubspace.spectra._record import LayerRecord
from jsubspace.spectra._verdict import Verdict


class AnalysisResult(Mapping[str, Any]):
    """The result of one analysis.

    Typed access for Python users; it is also a read-only mapping over the `spectra.json`
    keys (`result["layers"]` is the JSON list), so code written against the file works on it.

    Attributes:
        out: the run directory.
        layers: one `spectra.LayerRecord` per layer (spectra, controls, `verdict`).
        verdicts: `{layer name: spectra.Verdict}`.
        conclusion: the population's one-line conclusion.
        models: the model names, in the population's order.
        skipped_layers, skipped_models: what the run left out, each with why.
        paths: `{"spectra": ..., "csv": ..., "report": ... or None, "plots": [...]}`.

    Example:
        >>> result = jsubspace.analyze(["population/"], "out")          # doctest: +SKIP
        >>> result.conclusion                                           # doctest: +SKIP
        >>> result.verdicts["layers.0.w"].label                         # doctest: +SKIP
        >>> print(result)  # the verdict table with its legend          # doctest: +SKIP
    """

    def __init__(self, record: dict, out: str):
        self._record = record
        self.out = out

    @classmethod
    def load(cls, out: str) -> AnalysisResult:
        """The result of a finished run in `out` (read from its `spectra.json`)."""
        path = os.path.join(out, "spectra.json")
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except FileNotFoundError:
            raise OutputError(f"{path}: no finished analysis here (no spectra.json)") from None
        except (OSError, json.JSONDecodeError) as e:
            raise OutputError(f"{path}: not a readable spectra.json ({e})") from None
        return cls(record, out)

    # The mapping over spectra.json.
    def __getitem__(self, key: str) -> Any:
        return self._record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._record)

    def __len__(self) -> int:
        return len(self._record)

    @functools.cached_property
    def layers(self) -> tuple[LayerRecord, ...]:
        return tuple(LayerRecord.from_json(layer) for layer in self._record["layers"])

    @property
    def verdicts(self) -> dict[str, Verdict]:
        return {layer.name: layer.verdict for layer in self.layers if layer.verdict is not None}

    @property
    def conclusion(self) -> str:
        return self._record.get("conclusion", "")

    @property
    def models(self) -> list[str]:
        return list(self._record["models"])

    @property
    def skipped_layers(self) -> list[dict]:
        return list(self._record.get("skipped_layers", []))

    @property
    def skipped_models(self) -> list[dict]:
        return list(self._record.get("skipped_models", []))

    @property
    def paths(self) -> dict:
        def there(name):
            path = os.path.join(self.out, name)
            return path if os.path.exists(path) else None

        plots = os.path.join(self.out, "plots")
        return {
            "spectra": os.path.join(self.out, "spectra.json"),
            "csv": there("layers.csv"),
            "report": there("report.html"),
            "plots": sorted(os.path.join(plots, p) for p in os.listdir(plots))
            if os.path.isdir(plots)
            else [],
        }

    def table(self) -> list[dict]:
        """One row per layer: per side the held-out capture, a random subspace's, the k read,
        pass / fail of the holdout and the split half; beyond the null; mean-only; the
        verdict (the rows of the terminal table)."""
        from jsubspace.report import verdict_rows

        return verdict_rows(self._record)

    def to_json(self) -> dict:
        """The `spectra.json` dict."""
        return self._record

    def __str__(self) -> str:
        from jsubspace.report import verdict_table

        return verdict_table(self._record)

    def __repr__(self) -> str:
        return (
            f"AnalysisResult(out={self.out!r}, {len(self._record['layers'])} layers, "
            f"{len(self._record['models'])} models, conclusion={self.conclusion!r})"
        )
