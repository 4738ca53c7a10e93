"""Sources -> models -> aligned layers.

Only headers are read here. A layer is one tensor name present in every model with one shape
(rank > 2 tensors are viewed as `(shape[0], prod(shape[1:]))`); for PEFT populations a layer is
one adapted module in factored form.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from collections.abc import Sequence

import numpy as np

from jsubspace.errors import CheckpointError
from jsubspace.errors import PopulationError
from jsubspace.io import _formats
from jsubspace.io import _hub
from jsubspace.io import _remote
from jsubspace.io._formats import Model
from jsubspace.io._formats import TensorRef


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """One weight matrix across the population.

    Attributes:
        name: the tensor name shared by all models.
        shape: `(m, n)`, the matrix view.
        stored_shape: the shape in the checkpoint.
        dtype: the stored dtype (the widest when models disagree).
        refs: one TensorRef per model, in population order.
    """

    name: str
    shape: tuple[int, int]
    stored_shape: tuple[int, ...]
    dtype: np.dtype
    refs: tuple[TensorRef, ...]

    @property
    def kind(self) -> str:
        return "dense"


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One LoRA-adapted module across the population: `dW_i = scales[i] B_i A_i`.

    Attributes:
        name: the module name (PEFT key without `base_model.model.` and `.lora_X.weight`).
        shape: `(m, n)` of the update (B is m x r_i, A is r_i x n).
        rank: the largest r_i; smaller factors are zero-padded when stacked, which leaves every
            update unchanged.
        dtype: stored dtype of the factors.
        ranks: r_i per model.
        scales: s_i per model (alpha/r or alpha/sqrt(r) with rslora).
        a_refs, b_refs: the factors per model.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    dtype: np.dtype
    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    a_refs: tuple[TensorRef, ...]
    b_refs: tuple[TensorRef, ...]

    @property
    def kind(self) -> str:
        return "lora"


Layer = DenseLayer | LoraLayer


@dataclasses.dataclass(frozen=True)
class Population:
    """N models of one architecture and their aligned layers.

    Attributes:
        models: the models, in a stable order (sorted by source, then name).
        layers: the aligned layers to analyse, in the first model's tensor order.
        skipped: `(layer, reason)` for layers left out because models disagree on them.
        unreadable: `(path, reason)` for entries left out under `skip_unreadable`.
    """

    models: tuple[Model, ...]
    layers: tuple[Layer, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def is_lora(self) -> bool:
        return all(m.lora_modules is not None for m in self.models)


def is_float_dtype(dtype: np.dtype) -> bool:
    """True for numpy floats and ml_dtypes' bfloat16 / float8 types."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8"))


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:]))


def resolve_sources(
    sources: str | Sequence[str], *, unreadable: list[tuple[str, str]] | None = None
) -> list[str]:
    """Expands sources into model paths.

    Args:
        sources: a comma-separated string or a list; each entry is a model, a directory of models,
            a glob, a Hugging Face Hub model `hf://ORG/NAME[@REVISION][/SUBFOLDER]`, a URL, or
            `@file` listing one such entry per line (paths relative to that file; `#` comments).
            Hub models are read from the Hugging Face cache, and only their missing safetensors
            files are downloaded (never with HF_HUB_OFFLINE=1); a glob in NAME matches cached
            repositories, one in SUBFOLDER folders of the snapshot (see `io._hub`). Each becomes
            a link named `ORG--NAME[@REVISION][--SUB--FOLDER]`, the model's name.
            A URL (`https://`, `http://`, `s3://`, `gs://`; see `io._remote`) names a
            `*.safetensors` file, a sharded `*.safetensors.index.json`, or a directory: for
            http(s) the known file names are probed under it (a PEFT adapter's
            `adapter_config.json` + `adapter_model.safetensors`, `model.safetensors.index.json`,
            `model.safetensors`), an s3 / gs prefix is listed (a prefix of models, or a glob, gives
            each model in it). Nothing is downloaded whole: headers, then each selected tensor,
            are read by byte ranges, and kept in a range cache (`$XDG_CACHE_HOME/jsubspace/ranges`,
            or `JSUBSPACE_RANGE_CACHE=DIR|off`) keyed by the object's ETag, so a resumed run
            fetches only what it lacks. A URL model is named by its file's stem, or by its
            directory for the standard file names (`.../seed3/model.safetensors` -> `seed3`).
            `s3://` needs `s3fs` and `gs://` needs `gcsfs` (`pip install 'jsubspace[remote]'`),
            with their usual credentials; an S3-compatible store is reached with
            `AWS_ENDPOINT_URL=http://host:port` (botocore) or `FSSPEC_S3_ENDPOINT_URL`. Requests
            time out after `JSUBSPACE_REMOTE_TIMEOUT` seconds (30) and are tried
            `JSUBSPACE_REMOTE_RETRIES` times (3).
        unreadable: when given, pickled models met inside a directory are appended to it as
            `(path, reason)` and left out, instead of raising (`skip_unreadable`).

    Returns:
        Model paths, de-duplicated, in the order given (directory contents sorted).
    """
    if isinstance(sources, str):
        sources = [s for s in sources.split(",") if s.strip()]
    paths: list[str] = []
    for source in sources:
        source = source.strip()
        if _remote.is_url(source):
            paths.extend(_remote.resolve(source, unreadable=unreadable))
            continue
        source = os.path.expanduser(source)
        if _hub.is_hub_source(source):
            paths.extend(m.path for m in _hub.resolve(source, unreadable=unreadable))
            continue
        if source.startswith("@"):
            list_file = source[1:]
            try:
                with open(list_file, encoding="utf-8") as f:
                    lines = [ln.strip() for ln in f]
            except OSError as e:
                raise CheckpointError(list_file, f"cannot read list file: {e.strerror}") from None
            base = os.path.dirname(list_file)
            entries = [
                ln if _hub.is_hub_source(ln) or _remote.is_url(ln) else os.path.join(base, ln)
                for ln in lines
                if ln and not ln.startswith("#")
            ]
            paths.extend(resolve_sources(entries, unreadable=unreadable) if entries else [])
            continue
        if any(c in source for c in "*?["):
            matches = sorted(glob.glob(source))
            if not matches:
                raise CheckpointError(source, "glob matches no files")
            paths.extend(m for m in matches if _formats.model_kind(m) is not None)
            continue
        if _formats.model_kind(source) is not None:
            paths.append(source)
            continue
        if _formats.pickled_model(source):
            _formats.load_model(source)  # raises, with the conversion hint
        if os.path.isdir(source):
            children = sorted(os.path.join(source, c) for c in os.listdir(source))
            found = [c for c in children if _formats.model_kind(c) is not None]
            pickled = [c for c in children if _formats.pickled_model(c)]
            if pickled and unreadable is not None and found:
                unreadable.extend((p, _PICKLE_REASON) for p in pickled)
            elif pickled:
                # Never dropped in silence: N would shrink with no word.
                if len(pickled) == 1 and not found:
                    _formats.load_model(pickled[0])  # raises, with the conversion hint
                names = ", ".join(os.path.basename(p) for p in pickled[:3])
                more = f" and {len(pickled) - 3} more" if len(pickled) > 3 else ""
                raise CheckpointError(
                    source,
                    f"{len(pickled)} model(s) here are pickles ({names}{more}), which are never "
                    "loaded (they can run code): convert them to safetensors (torch.load with "
                    "weights_only=True, then safetensors.torch.save_file), move them out, or "
                    "pass --skip_unreadable to analyse the others",
                )
            if not found:
                raise CheckpointError(
                    source, "directory is no known model format and holds no models"
                )
            paths.extend(found)
            continue
        _formats.load_model(source)  # Raises the precise error (missing, pickle, unknown).
    seen = set()
    return [p for p in paths if not ((k := _hub.dedup_key(p)) in seen or seen.add(k))]


_PICKLE_REASON = "a pickle-based checkpoint (never loaded: it can run code); convert to safetensors"


def _select(name: str, include: str | None, exclude: str | None) -> bool:
    if include and not re.search(include, name):
        return False
    return not (exclude and re.search(exclude, name))


def open_population(
    sources: str | Sequence[str] | Sequence[Model],
    *,
    include: str | None = None,
    exclude: str | None = None,
    skip_mismatched: bool = False,
    skip_unreadable: bool = False,
    min_models: int = 2,
    progress=None,
) -> Population:
    """Reads the headers of every model and aligns their layers.

    Args:
        sources: paths (see `resolve_sources`) or already loaded models.
        include: regex; only layers whose name it matches (re.search) are kept.
        exclude: regex; layers whose name it matches are dropped.
        skip_mismatched: drop layers that some models lack or disagree on (listed in
            `Population.skipped`) instead of raising.
        skip_unreadable: leave out models that cannot be read (pickles inside a directory,
            unreadable or corrupt files), listed in `Population.unreadable`, instead of raising.
        min_models: the fewest models accepted (spectra need two).
        progress: called as `progress(done, total)` after each model's headers are read.

    Returns:
        The aligned population.

    Raises:
        CheckpointError: a file is unreadable or of no known format.
        PopulationError: too few models, mixed formats, or mismatched layers.
    """
    for pattern in (include, exclude):
        if pattern:
            try:
                re.compile(pattern)
            except re.error as e:
                raise PopulationError(f"bad layer regex {pattern!r}: {e}") from None
    unreadable: list[tuple[str, str]] = []
    if sources and all(isinstance(s, Model) for s in sources):
        models = list(sources)
    else:
        paths = resolve_sources(sources, unreadable=unreadable if skip_unreadable else None)
        models = []
        for i, path in enumerate(paths):
            try:
                models.append(_formats.load_model(path))
            except CheckpointError as e:
                if not skip_unreadable:
                    raise
                unreadable.append((path, e.problem if e.path == path else str(e)))
            if progress is not None:
                progress(i + 1, len(paths))
    if not models:
        left = f" ({len(unreadable)} unreadable: {unreadable[0][0]})" if unreadable else ""
        raise PopulationError(f"no models found in {sources!r}{left}")
    if len(models) < min_models:
        raise PopulationError(
            f"found {len(models)} model ({models[0].path}); spectra need at least {min_models}"
        )
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        where = [m.path for m in models if m.name in dupes]
        raise PopulationError(f"models share a name {dupes}: {where}; rename or list them apart")
    lora = [m.lora_modules is not None for m in models]
    if any(lora) and not all(lora):
        odd = [m.path for m in models if m.lora_modules is None]
        raise PopulationError(f"population mixes PEFT adapters with full models: {odd[:5]}")
    if all(lora):
        layers, skipped = _align_lora(models, include, exclude, skip_mismatched)
    else:
        layers, skipped = _align_dense(models, include, exclude, skip_mismatched)
    if not layers:
        msg = "no layers to analyse"
        if skipped:
            msg += f"; skipped: {skipped[:5]}"
        raise PopulationError(msg + f" (include={include!r}, exclude={exclude!r})")
    return Population(tuple(models), tuple(layers), tuple(skipped), tuple(unreadable))


def _mismatch_error(problems: list[str]) -> PopulationError:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return PopulationError(
        "models disagree on their layers (pass skip_mismatched / --skip_mismatched to analyse "
        f"only the common ones):\n  {shown}{more}"
    )


def _align_dense(models, include, exclude, skip_mismatched):
    first = models[0]
    candidates = []
    seen = set()
    for model in models:
        for name, ref in model.tensors.items():
            if name not in seen and len(ref.shape) >= 2 and _select(name, include, exclude):
                seen.add(name)
                candidates.append(name)
    layers, skipped, problems = [], [], []
    for name in candidates:
        refs = [m.tensors.get(name) for m in models]
        missing = [m.name for m, r in zip(models, refs) if r is None]
        if missing:
            reason = f"missing in {len(missing)} model(s): {missing[:5]}"
        else:
            shapes = {r.shape for r in refs}
            reason = None
            if len(shapes) > 1:
                by_shape = {}
                for m, r in zip(models, refs):
                    by_shape.setdefault(r.shape, []).append(m.name)
                reason = "shapes differ: " + "; ".join(
                    f"{list(s)} in {ms[:3]}" for s, ms in by_shape.items()
                )
            elif not all(is_float_dtype(r.dtype) for r in refs):
                reason = f"not floating point ({sorted({str(r.dtype) for r in refs})})"
        if reason:
            if skip_mismatched or reason.startswith("not floating"):
                skipped.append((name, reason))
            else:
                problems.append(f"layer {name!r}: {reason}")
            continue
        dtype = max((np.dtype(r.dtype) for r in refs), key=lambda d: d.itemsize)
        stored = refs[0].shape
        layers.append(DenseLayer(name, _matrix_shape(stored), stored, dtype, tuple(refs)))
    if problems:
        raise _mismatch_error(problems)
    order = {n: i for i, n in enumerate(first.tensors)}
    layers.sort(key=lambda l: order.get(l.name, len(order)))
    return layers, skipped


def _align_lora(models, include, exclude, skip_mismatched):
    candidates = []
    seen = set()
    for model in models:
        for name in model.lora_modules:
            if name not in seen and _select(name, include, exclude):
                seen.add(name)
                candidates.append(name)
    layers, skipped, problems = [], [], []
    for name in candidates:
        mods = [m.lora_modules.get(name) for m in models]
        missing = [m.name for m, x in zip(models, mods) if x is None]
        reason = None
        if missing:
            reason = f"missing in {len(missing)} model(s): {missing[:5]}"
        else:
            shapes = {(x.b.shape[0], x.a.shape[1]) for x in mods}
            if len(shapes) > 1:
                reason = f"update shapes differ: {sorted(shapes)}"
        if reason:
            if skip_mismatched:
                skipped.append((name, reason))
            else:
                problems.append(f"module {name!r}: {reason}")
            continue
        m, n = mods[0].b.shape[0], mods[0].a.shape[1]
        dtype = max((np.dtype(x.a.dtype) for x in mods), key=lambda d: d.itemsize)
        layers.append(
            LoraLayer(
                name,
                (m, n),
                max(x.rank for x in mods),
                dtype,
                tuple(x.rank for x in mods),
                tuple(float(x.scale) for x in mods),
                tuple(x.a for x in mods),
                tuple(x.b for x in mods),
            )
        )
    if problems:
        raise _mismatch_error(problems)
    return layers, skipped


def base_refs(path: str, layers) -> dict[str, TensorRef]:
    """The base model's tensor of every layer (for `center='base'`, task vectors and merges);
    headers only.

    Raises:
        CheckpointError: naming `path`, when the base lacks a layer or holds it in another shape.
    """
    if path.startswith("hf://"):  # a hub id resolves to its cached snapshot
        found = resolve_sources([path])
        if len(found) != 1:
            raise CheckpointError(path, f"a base must be one model; this names {len(found)}")
        (path,) = found
    base = _formats.load_model(path)
    refs = {}
    for layer in layers:
        ref = base.tensors.get(layer.name)
        if ref is None or math.prod(ref.shape) != layer.shape[0] * layer.shape[1]:
            shape = list(getattr(layer, "stored_shape", layer.shape))
            raise CheckpointError(path, f"base model lacks layer {layer.name!r} of shape {shape}")
        refs[layer.name] = ref
    return refs
