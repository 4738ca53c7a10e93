"""The analysis flags of the command line, generated from the typed configuration.

Every field of `SpectraConfig`, `ControlConfig` and `RunConfig` is one flag: its kind, help text,
choices and, where the flag's text differs from the field (`--mesh=auto`, `--memory_budget` in
GiB, `--holdout=none`), its parser live in the field's metadata (`jsubspace.config`). Adding an
option to the configuration adds its flag; nothing here names a field.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from jsubspace.config import PARTS
from jsubspace.config import AnalysisConfig

_DEFINE = {
    "enum": flags.DEFINE_enum,
    "integer": flags.DEFINE_integer,
    "float": flags.DEFINE_float,
    "bool": flags.DEFINE_bool,
    "string": flags.DEFINE_string,
    "list": flags.DEFINE_list,
}


def _fields():
    for part in PARTS.values():
        yield from dataclasses.fields(part)


def define_config_flags() -> dict[str, flags.FlagHolder]:
    """Defines one absl flag per configuration field; returns the holders by field name."""
    holders = {}
    for field in _fields():
        meta = field.metadata
        default = meta.get("flag_default", field.default)
        if meta["kind"] == "list" and default is not None:
            default = list(default)
        elif meta["kind"] == "string" and default is not None:
            default = str(default)
        args = [meta.get("flag", field.name), default]
        if meta["kind"] == "enum":
            args.append(list(meta["choices"]))
        holders[field.name] = _DEFINE[meta["kind"]](*args, meta["help"])
    return holders


def config_from_flags(holders: dict[str, flags.FlagHolder]) -> AnalysisConfig:
    """The configuration the flags describe (`ValueError` naming a value that is not valid)."""
    options = {}
    for field in _fields():
        value = holders[field.name].value
        parse = field.metadata.get("parse")
        options[field.name] = parse(value) if parse else value
    return AnalysisConfig.from_options(**options)
