"""`--groups=FILE.csv`: which models belong together (task, seed, base model, author, ...).

The file has a header row; its first column names the model (the model's name, its path, or its
path's last component), every further column is one grouping. PEFT adapters also get a
`base_model` grouping from their `adapter_config.json` when the population holds adapters of
more than one base.
"""

from __future__ import annotations

import csv
import os

from jsubspace import io
from jsubspace.errors import PopulationError
from jsubspace.spectra._groups import Grouping


def _keys(model: io.Model) -> list[str]:
    path = os.path.normpath(model.path)
    return [model.name, path, os.path.basename(path)]


def read_groups(path: str, population: io.Population) -> list[Grouping]:
    """The groupings of `path` over `population`'s models, in its columns' order.

    Raises:
        PopulationError: naming the file (and row) for an unreadable file, a missing header, a
            row with a missing label, a model the population does not hold, or a model of the
            population the file does not label.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PopulationError(f"{path}: cannot read the groups file ({e})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r) and not r[0].startswith("#")]
    if len(rows) < 2 or len(rows[0]) < 2:
        raise PopulationError(
            f"{path}: a groups file needs a header (model, then one or more label columns, e.g. "
            "'model,task,seed') and a row per model"
        )
    header = [h.strip() for h in rows[0]]
    lookup = {}
    for i, model in enumerate(population.models):
        for key in _keys(model):
            lookup.setdefault(key, set()).add(i)
    # Rows of models left out as unreadable (`skip_unreadable`) are passed over.
    skipped = set()
    for path, _ in population.unreadable:
        skipped.update({os.path.normpath(path), os.path.basename(os.path.normpath(path))})
    labels: dict[int, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        name = row[0].strip()
        if name in skipped or os.path.normpath(name) in skipped:
            continue
        values = [c.strip() for c in row[1:]]
        if len(values) != len(header) - 1 or not all(values):
            raise PopulationError(
                f"{path}, row {line}: {name!r} needs a label in each of {header[1:]}, got {values}"
            )
        found = lookup.get(name) or lookup.get(os.path.normpath(name)) or set()
        if len(found) != 1:
            why = "names more than one model" if found else "is no model of the population"
            raise PopulationError(
                f"{path}, row {line}: {name!r} {why} (models: {population.names[:5]}...)"
            )
        (i,) = found
        if i in labels:
            raise PopulationError(f"{path}, row {line}: model {name!r} is labelled twice")
        labels[i] = values
    missing = [m.name for i, m in enumerate(population.models) if i not in labels]
    if missing:
        raise PopulationError(
            f"{path}: {len(missing)} model(s) of the population have no row: {missing[:5]}"
        )
    return [
        Grouping.from_labels(column, [labels[i][c] for i in range(len(population.models))])
        for c, column in enumerate(header[1:])
    ]


def automatic_groups(population: io.Population) -> list[Grouping]:
    """Groupings the models carry themselves: PEFT adapters' base model, when they differ."""
    if not population.is_lora:
        return []
    bases = [
        (m.lora.base_model_name_or_path if m.lora is not None else None) or "?"
        for m in population.models
    ]
    if len(set(bases)) < 2:
        return []
    return [Grouping.from_labels("base_model", bases)]
