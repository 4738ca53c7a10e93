"""A subspace store: per layer the centre, `U_k`, `V_k` and every model's coefficients, and every
tensor the store does not factor, so that it rebuilds each model with the originals gone.

On disk, three files (all a user must keep; the sources are never opened again):
  * `store.safetensors`: tensors `<layer>::center`, `::U`, `::V`, `::C`, in the layer's stored
    dtype;
  * `kept.safetensors`: the tensors left untouched (biases, norms, 1-D and non-float tensors,
    layers left out by include / exclude, PEFT modules left out and `modules_to_save`), bit-exact
    in their own dtype, as `<model>::<tensor>`. A tensor whose bytes, dtype and shape equal one
    already kept (a frozen embedding shared by every model, say) is stored once, under the first
    holder's key, and every holder's inventory entry names that key;
  * `store.json`: the models, layers, the k chosen and why, captured energy, byte accounting, and
    per model its inventory: every original tensor in order with its dtype and shape, and either
    the layer that rebuilds it or its key in `kept.safetensors`; for PEFT adapters also the
    `adapter_config.json` content and each module's factors, rank and alpha; the safetensors
    `__metadata__` of the source files (a record; exports write their own).
Both safetensors files carry the run's `store_id`, which the manifest names: files of two
compress runs (an interrupted re-compress into the same directory) are refused, never mixed.
Loading reads the JSON and the safetensors headers only; tensors are memory-mapped when used.
The choice of k is per layer: fixed, the smallest reaching an energy fraction `tau`, or the
greedy split of a total byte budget (which covers all three files, see `fit_store`).

Accounting (`store.json` "accounting", `SubspaceStore.accounting()`): `original_bytes` is the
tensor bytes of every source model (factored and untouched); `store_bytes` is the sizes of the
three files on disk, headers and the manifest included; `ratio` their quotient. Per layer,
`original_bytes` is that layer's tensor bytes in the sources and `bytes` its basis, coefficients
and centre; "kept" is the untouched tensors' line, "overhead_bytes" the safetensors headers and
the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import os
import uuid
from collections.abc import Sequence

import jax
import ml_dtypes
import numpy as np

from jsubspace import io
from jsubspace import sharding
from jsubspace import spectra
from jsubspace.compress._basis import LayerBasis
from jsubspace.compress._basis import dense_basis
from jsubspace.compress._basis import lora_basis
from jsubspace.errors import JsubspaceError
from jsubspace.errors import StoreError
from jsubspace.io._atomic import atomic_write_text
from jsubspace.io._atomic import finite
from jsubspace.io._safetensors import DTYPE_NAMES
from jsubspace.sharding import host_array

# Version 2 keeps the untouched tensors and each model's inventory (version 1 re-read the
# sources on export).
STORE_VERSION = "2"
STORE_FILE = "store.safetensors"
KEPT_FILE = "kept.safetensors"
MANIFEST_FILE = "store.json"
FILES = (STORE_FILE, KEPT_FILE, MANIFEST_FILE)
STORABLE = {
    np.dtype(np.float32),
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.float64),
}


def storage_dtype(dtype) -> np.dtype:
    """The dtype a layer's basis is stored in: its own when it is a float type we keep."""
    dtype = np.dtype(dtype)
    return dtype if dtype in STORABLE else np.dtype(np.float32)


def dtype_from_name(name: str) -> np.dtype:
    """The dtype of an inventory entry (`str(np.dtype(...))`: 'float32', 'bfloat16', ...)."""
    try:
        return np.dtype(name)
    except TypeError:
        pass
    if isinstance(getattr(ml_dtypes, name, None), type):
        return np.dtype(getattr(ml_dtypes, name))
    raise StoreError(f"unknown dtype {name!r} in the store")


def _nbytes(ref: io.TensorRef) -> int:
    return math.prod(ref.shape) * np.dtype(ref.dtype).itemsize


def _raw(array) -> np.ndarray:
    """A tensor's bytes as a flat uint8 view (NaN payloads and -0.0 compared as bytes)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _same_bytes(x: np.ndarray, y: np.ndarray, chunk: int = 1 << 26) -> bool:
    """Two `_raw` views hold the same bytes (compared in slices: no tensor-sized temporary)."""
    return x.size == y.size and all(
        np.array_equal(x[i : i + chunk], y[i : i + chunk]) for i in range(0, x.size, chunk)
    )


def layer_bytes(m: int, n: int, n_models: int, k: int, itemsize: int, *, centred: bool) -> dict:
    """Bytes of one layer in the store: basis once, coefficients of all models, the centre."""
    basis = (m + n) * k * itemsize
    coefficients = n_models * k * k * itemsize
    centre = m * n * itemsize if centred else 0
    return {
        "basis": basis,
        "coefficients": coefficients,
        "center": centre,
        "total": basis + coefficients + centre,
    }


@dataclasses.dataclass
class _Fitted:
    layer: io.Layer
    basis: LayerBasis
    captured: np.ndarray  # f64[K + 1]: energy captured by the first k directions, k = 0..K
    energy: float
    itemsize: int


def _captured_curve(coefficients: np.ndarray) -> np.ndarray:
    """`[K + 1]` energy of the leading k x k blocks of all coefficients, k = 0..K."""
    sq = np.asarray(coefficients, np.float64) ** 2
    cum = np.cumsum(np.cumsum(sq.sum(0), axis=0), axis=1)
    return np.concatenate([[0.0], np.diagonal(cum)])


def _layers_total(fitted: list[_Fitted], n_models: int, ks, centred) -> int:
    return sum(
        layer_bytes(*f.layer.shape, n_models, k, f.itemsize, centred=c)["total"]
        for f, k, c in zip(fitted, ks, centred)
    )


def _choose_budget(fitted: list[_Fitted], n_models: int, budget: int, centred) -> list[int]:
    """Greedy ks (energy gained per byte) whose layer tensors fit in `budget` bytes; the centres
    are a fixed cost the caller has checked."""
    ks = [0] * len(fitted)
    spent = _layers_total(fitted, n_models, ks, centred)
    heap = []

    def push(i):
        f, k = fitted[i], ks[i]
        if k + 1 >= len(f.captured):
            return
        m, n = f.layer.shape
        cost = (
            layer_bytes(m, n, n_models, k + 1, f.itemsize, centred=False)["total"]
            - layer_bytes(m, n, n_models, k, f.itemsize, centred=False)["total"]
        )
        gain = f.captured[k + 1] - f.captured[k]
        heapq.heappush(heap, (-gain / cost, i, cost))

    for i in range(len(fitted)):
        push(i)
    while heap:
        _, i, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this layer cannot grow; others with cheaper steps still may
        spent += cost
        ks[i] += 1
        push(i)
    return ks


def _fit_budget(fitted, n_models, budget, centred, kept_bytes, store_bytes) -> list[int]:
    """The greedy ks whose whole store, `store_bytes(ks)` (tensor files and manifest), fits in
    `budget`. Everything but the layer tensors (the kept tensors, the headers, the manifest) is
    reserved first; the manifest grows a little with k, so the reserve is raised by any overshoot
    and the choice made again (one or two rounds)."""
    zero = [0] * len(fitted)
    centres = _layers_total(fitted, n_models, zero, centred)
    reserve = store_bytes(zero) - centres
    for _ in range(100):
        if centres + reserve > budget:
            raise StoreError(
                f"the centres ({centres} bytes), the untouched tensors ({kept_bytes} bytes) and "
                f"the store's headers and manifest ({reserve - kept_bytes} bytes) alone need "
                f"{centres + reserve} bytes, over the budget of {budget}"
            )
        ks = _choose_budget(fitted, n_models, budget - reserve, centred)
        total = store_bytes(ks)
        if total <= budget:
            return ks
        reserve += total - budget
    raise StoreError(f"no choice of k found that fits the budget of {budget} bytes")


@dataclasses.dataclass
class _Inventory:
    """What the store keeps of every model besides its factored layers.

    Attributes:
        models: per model, its manifest entry (format, metadata, tensors, PEFT config).
        blobs: key in `kept.safetensors` -> the source tensor whose bytes go there.
        kept_tensors: (model, tensor) pairs kept untouched (more than `len(blobs)` when some
            share their bytes).
        kept_original: their bytes in the sources.
        source_bytes: the tensor bytes of every source model, factored and kept.
    """

    models: dict[str, dict]
    blobs: dict[str, io.TensorRef]
    kept_tensors: int = 0
    kept_original: int = 0
    source_bytes: int = 0

    @property
    def kept_bytes(self) -> int:
        return sum(_nbytes(ref) for ref in self.blobs.values())


def _source_metadata(model: io.Model) -> dict[str, dict[str, str]]:
    """The `__metadata__` of the model's safetensors files, by file name (non-empty ones)."""
    out = {}
    for ref in model.tensors.values():
        name = os.path.basename(ref.path)
        if ref.path.endswith(".safetensors") and name not in out:
            out[name] = io.read_header(ref.path).metadata
    return {name: meta for name, meta in out.items() if meta}


def _adapter_config(model: io.Model) -> dict:
    path = os.path.join(model.path, "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: cannot read the adapter config ({e})") from None


def _inventory(population: io.Population) -> _Inventory:
    """Every model's tensors, in order: those of a layer the store fits are rebuilt from it; all
    others are kept untouched, one copy per distinct (dtype, shape, bytes)."""
    layers = {layer.name for layer in population.layers}
    inventory = _Inventory({}, {})
    seen: dict[tuple, list[str]] = {}  # (dtype, shape, digest) -> keys holding those bytes

    def keep(model: io.Model, name: str, ref: io.TensorRef) -> str:
        dtype = np.dtype(ref.dtype)
        if dtype not in DTYPE_NAMES:
            raise StoreError(
                f"{model.path}: tensor {name!r} is {dtype}, which a safetensors file cannot hold; "
                "the store keeps every tensor it does not fit (convert it, or leave this model out)"
            )
        raw = _raw(ref.read())
        signature = (str(dtype), tuple(ref.shape), hashlib.blake2b(raw, digest_size=32).digest())
        for key in seen.get(signature, ()):
            if _same_bytes(_raw(inventory.blobs[key].read()), raw):
                return key  # the same bytes are stored once
        key = f"{model.name}::{name}"
        while key in inventory.blobs:  # two (model, tensor) pairs joined to one string
            key += "::"
        inventory.blobs[key] = ref
        seen.setdefault(signature, []).append(key)
        return key

    for model in population.models:
        entry: dict = {"format": model.format, "metadata": _source_metadata(model)}
        factored: dict[str, tuple[str, str | None]] = {}
        if model.lora_modules is not None:
            entry["adapter_config"] = _adapter_config(model)
            entry["lora_modules"] = {
                name: {"a": m.a.name, "b": m.b.name, "rank": int(m.rank), "alpha": float(m.alpha)}
                for name, m in model.lora_modules.items()
            }
            for name, m in model.lora_modules.items():
                if name in layers:
                    factored[m.a.name] = (name, "A")
                    factored[m.b.name] = (name, "B")
        else:
            factored = {name: (name, None) for name in model.tensors if name in layers}
        tensors = []
        for name, ref in model.tensors.items():
            item = {
                "name": name,
                "dtype": str(np.dtype(ref.dtype)),
                "shape": [int(d) for d in ref.shape],
            }
            inventory.source_bytes += _nbytes(ref)
            if name in factored:
                item["layer"], side = factored[name]
                if side:
                    item["factor"] = side
            else:
                item["kept"] = keep(model, name, ref)
                inventory.kept_tensors += 1
                inventory.kept_original += _nbytes(ref)
            tensors.append(item)
        entry["tensors"] = tensors
        inventory.models[model.name] = entry
    return inventory


def fit_store(
    models: str | Sequence[str],
    out: str,
    *,
    k: int | None = None,
    tau: float | None = None,
    budget_bytes: int | None = None,
    kmax: int = 128,
    center: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    num_devices: int | None = None,
    seed: int = 0,
    memory_budget: int | None = None,
    progress=lambda stream, total, population: stream,
) -> SubspaceStore:
    """Fits the universal basis of every layer and writes a self-contained store to `out`.

    Every tensor not fitted (biases, norms, non-float tensors, layers left out by `include` /
    `exclude`, PEFT modules left out and `modules_to_save`) is kept bit-exact in the store, so
    `export_model` needs nothing but the store.

    Args:
        models: population sources (see `io.resolve_sources`).
        out: directory for `store.safetensors`, `kept.safetensors` and `store.json`.
        k: a fixed basis size for every layer; or
        tau: per layer, the smallest k whose basis captures this fraction of the energy; or
        budget_bytes: the k of every layer chosen greedily (energy gained per byte) so the whole
            store (its three files, untouched tensors, headers and manifest included) fits in
            this many bytes. Exactly one of k, tau, budget_bytes.
        kmax: the largest k considered.
        center: 'mean', 'none' (default for LoRA populations, whose mean update is a dense
            m x n matrix) or 'base' is not offered here (use task vectors as the population).
        include, exclude: layer-name regexes.
        num_devices: devices of the `models` mesh.
        seed: seeds the randomized solver of long sides.
        memory_budget: bytes one layer's fit may use (default: `spectra.default_memory_budget`,
            as for the analysis). A dense layer whose float32 stack does not fit is fitted by
            the analysis's chunked route (`spectra.dense_chunk`: a few models converted at a
            time); one that does not fit even so is refused before anything is fitted.
        progress: wraps the stream of `(layer, placed)` pairs (`(stream, total, population)`),
            e.g. to show which layer is being fitted.
    """
    if sum(x is not None for x in (k, tau, budget_bytes)) != 1:
        raise StoreError("give exactly one of k, tau or budget_bytes")
    if tau is not None and not 0 < tau <= 1:
        raise StoreError(f"tau must be in (0, 1], got {tau}")
    if k is not None and k < 1:
        raise StoreError(f"k must be >= 1, got {k}")
    population = io.open_population(models, include=include, exclude=exclude)
    center = center or ("none" if population.is_lora else "mean")
    if center not in ("mean", "none"):
        raise StoreError(f"center must be 'mean' or 'none', got {center!r}")
    # Before the fit: a tensor the store cannot keep fails here, not after hours of fitting.
    inventory = _inventory(population)
    mesh = sharding.models_mesh(num_devices)
    n = len(population.models)
    # Each dense layer's solvers and chunk, before anything is read: a layer that cannot fit
    # the budget fails here, not after the layers before it were fitted.
    budget = spectra.default_memory_budget(mesh) if memory_budget is None else memory_budget
    n_pad = sharding.padded_count(n, mesh)
    routes = {}
    for layer in population.layers:
        if layer.kind != "dense":
            continue
        m, nn = layer.shape
        kk = min(kmax, m, nn)
        # The same rule as the analysis's control bases: no side x side Gram past the exact
        # limit, the randomized solver where it is cheaper.
        bases = spectra.basis_solvers(n, m, nn, kk, spectra.SpectraConfig())
        chunk, working = spectra.dense_chunk(
            layer,
            n_pad,
            spectra.SpectraConfig(),
            budget=budget,
            devices=mesh.devices.size,
            bases=[bases],
        )
        if working > budget:
            raise StoreError(
                f"layer {layer.name!r} ({layer.shape[0]} x {layer.shape[1]}, {n} models): its "
                f"fit needs about {working / 2**30:.1f} GiB even a model at a time, over the "
                f"memory budget of {budget / 2**30:.1f} GiB: use more devices, fewer models, "
                "--exclude this layer, or raise --memory_budget"
            )
        routes[layer.name] = (kk, (bases["rows"], bases["cols"]), chunk)
    fitted: list[_Fitted] = []
    key = jax.random.key(seed)
    stream = io.stream_layers(population, mesh)
    for i, (layer, placed) in enumerate(progress(stream, len(population.layers), population)):
        m, nn = layer.shape
        if layer.kind == "dense":
            kk, solvers, chunk = routes[layer.name]
            basis = dense_basis(
                placed.x,
                None,
                jax.random.fold_in(key, i),
                mesh=mesh,
                n_models=n,
                center=center,
                k=kk,
                solvers=solvers,
                chunk=chunk,
            )
        else:
            kk = min(kmax, m, nn, n * layer.rank)
            basis = lora_basis(
                placed.a, placed.b, placed.scales, mesh=mesh, n_models=n, center=center, k=kk
            )
        basis = jax.tree.map(host_array, basis)
        coeff = np.asarray(basis.coefficients)[:n]
        energy = float(np.sum(np.asarray(basis.energies, np.float64)[:n]))
        curve = _captured_curve(coeff)
        itemsize = storage_dtype(layer.dtype).itemsize
        fitted.append(_Fitted(layer, basis._replace(coefficients=coeff), curve, energy, itemsize))
    centred = [center == "mean"] * len(fitted)
    choice = {"k": k, "tau": tau, "budget_bytes": budget_bytes, "kmax": kmax}
    layout = _Layout(population, fitted, center, choice, inventory)
    if k is not None:
        ks = [min(k, len(f.captured) - 1) for f in fitted]
    elif tau is not None:
        ks = []
        for f in fitted:
            frac = f.captured / max(f.energy, 1e-300)
            hit = np.nonzero(frac >= tau - 1e-9)[0]
            largest = len(f.captured) - 1
            if not len(hit) and largest >= kmax:
                raise StoreError(
                    f"layer {f.layer.name!r}: k = {largest} captures only {frac[-1]:.4f} of the "
                    f"energy, below tau = {tau}; raise --kmax (now {kmax})"
                )
            # Past the layer's own limit (its shorter side, or the models' ranks) no basis of
            # this form reaches tau: the largest one is kept, and the store says so
            # (`tau_reached` false in its layer entry).
            ks.append(int(hit[0]) if len(hit) else largest)
    else:
        ks = _fit_budget(
            fitted, n, budget_bytes, centred, inventory.kept_bytes, layout.predicted_bytes
        )
    return layout.write(out, ks)


def _layer_original_bytes(layer: io.Layer) -> int:
    """The layer's tensor bytes in the sources (each model's own dtype)."""
    if layer.kind == "dense":
        return sum(_nbytes(ref) for ref in layer.refs)
    return sum(_nbytes(a) + _nbytes(b) for a, b in zip(layer.a_refs, layer.b_refs))


def _safetensors_bytes(specs, metadata: dict[str, str]) -> int:
    """The size of the file `io.write_safetensors` writes for `(name, dtype, shape)` specs: the
    8-byte length, its compact JSON header padded to 8 bytes, the data."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": [int(d) for d in shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + raw + (-raw % 8) + offset


def _manifest_text(manifest: dict, sizes: dict[str, int]) -> str:
    """The manifest's JSON with its accounting completed. `store_bytes` counts the tensor files
    (`sizes`) and this JSON itself; the JSON's length is a constant plus the lengths of the four
    numbers that depend on it, so the smallest consistent total is found by arithmetic. Should
    no total state its own size exactly (a digit boundary), the JSON is padded with trailing
    spaces to the size it states."""
    accounting = manifest["accounting"]
    others = sum(sizes.values())
    tensors = accounting["factored"]["bytes"] + accounting["kept"]["bytes"]

    def numbers(total: int) -> dict:
        return {
            "store_bytes": total,
            "ratio": accounting["original_bytes"] / max(total, 1),
            "overhead_bytes": total - tensors,
            "json": total - others,
        }

    def dump(total: int) -> str:
        v = numbers(total)
        accounting.update(
            store_bytes=v["store_bytes"],
            ratio=v["ratio"],
            overhead_bytes=v["overhead_bytes"],
            files={**sizes, MANIFEST_FILE: v["json"]},
        )
        try:
            return json.dumps(manifest, indent=1, allow_nan=False)
        except ValueError:
            return json.dumps(finite(manifest), indent=1, allow_nan=False)

    def width(total: int) -> int:
        return sum(len(json.dumps(x)) for x in numbers(total).values())

    base = len(dump(0).encode()) - width(0)  # ASCII: json.dumps escapes everything else
    start = others + base
    span = range(start, start + 200)  # the four numbers take far fewer characters
    total = next((t for t in span if start + width(t) == t), None)
    if total is None:
        total = next(t for t in span if start + width(t) < t)
    text = dump(total)
    return text + " " * (total - others - len(text.encode()))


class _Deferred:
    """A kept tensor read only when `io.write_safetensors` writes it, so that the kept tensors of
    every model are never in memory at once (npz and Orbax sources load on read)."""

    def __init__(self, ref: io.TensorRef):
        self.ref = ref
        self.dtype = np.dtype(ref.dtype)
        self.shape = tuple(ref.shape)
        self.size = math.prod(self.shape)

    def __array__(self, dtype=None, copy=None):
        value = np.asarray(self.ref.read())
        return value if dtype is None else value.astype(dtype)


class _Layout:
    """The store's files for a given choice of ks: predicted sizes (for the budget) and writes."""

    def __init__(self, population, fitted, center, choice, inventory):
        self.population = population
        self.fitted = fitted
        self.center = center
        self.choice = choice
        self.inventory = inventory
        self.store_id = uuid.uuid4().hex
        self.kept_size = _safetensors_bytes(
            [(key, ref.dtype, ref.shape) for key, ref in inventory.blobs.items()],
            self._metadata("jsubspace-kept"),
        )

    def _metadata(self, kind: str) -> dict[str, str]:
        return {"format": kind, "store_id": self.store_id}

    def _arrays(self, ks) -> dict[str, tuple[np.ndarray, np.dtype]]:
        """The store's tensors in file order, as views of the fitted bases and their dtype."""
        out = {}
        for f, kk in zip(self.fitted, ks):
            name = f.layer.name
            dtype = storage_dtype(f.layer.dtype)
            if self.center == "mean":
                out[f"{name}::center"] = (np.asarray(f.basis.center), dtype)
            out[f"{name}::U"] = (np.asarray(f.basis.u)[:, :kk], dtype)
            out[f"{name}::V"] = (np.asarray(f.basis.v)[:, :kk], dtype)
            out[f"{name}::C"] = (np.asarray(f.basis.coefficients)[:, :kk, :kk], dtype)
        return out

    def manifest(self, ks) -> dict:
        """The manifest, its accounting lacking the file sizes (`_manifest_text` adds them)."""
        population, inventory = self.population, self.inventory
        n = len(population.models)
        centred = self.center == "mean"
        layers = []
        for f, kk in zip(self.fitted, ks):
            layer = f.layer
            dtype = storage_dtype(layer.dtype)
            m, nn = layer.shape
            original = _layer_original_bytes(layer)
            sizes = layer_bytes(m, nn, n, kk, dtype.itemsize, centred=centred)
            captured = f.captured[kk] / max(f.energy, 1e-300)
            layers.append(
                {
                    "name": layer.name,
                    "kind": layer.kind,
                    "shape": [m, nn],
                    "stored_shape": list(layer.stored_shape) if layer.kind == "dense" else [m, nn],
                    "dtype": str(np.dtype(layer.dtype)),
                    "store_dtype": str(dtype),
                    "k": int(kk),
                    "kmax": len(f.captured) - 1,
                    "total_energy": f.energy,
                    "captured": float(captured),
                    "tau_reached": (
                        None
                        if self.choice.get("tau") is None
                        else bool(captured >= self.choice["tau"] - 1e-9)
                    ),
                    "original_bytes": int(original),
                    "bytes": sizes,
                    "ratio": original / max(sizes["total"], 1),
                    "ranks": list(layer.ranks) if layer.kind == "lora" else None,
                }
            )
        return {
            "version": STORE_VERSION,
            "store_id": self.store_id,
            "files": list(FILES),
            "models": population.names,
            "sources": [  # where the models came from; never read again
                {"name": mo.name, "path": mo.path, "format": mo.format} for mo in population.models
            ],
            "center": self.center,
            "choice": self.choice,
            "layers": layers,
            "accounting": {
                "original_bytes": inventory.source_bytes,
                "store_bytes": None,
                "ratio": None,
                "captured": sum(e["captured"] * e["total_energy"] for e in layers)
                / max(sum(e["total_energy"] for e in layers), 1e-300),
                "factored": {
                    "original_bytes": sum(e["original_bytes"] for e in layers),
                    "bytes": sum(e["bytes"]["total"] for e in layers),
                },
                "kept": {
                    "tensors": inventory.kept_tensors,
                    "unique": len(inventory.blobs),
                    "original_bytes": inventory.kept_original,
                    "bytes": inventory.kept_bytes,
                },
                "overhead_bytes": None,
                "files": None,
            },
            "inventory": inventory.models,
        }

    def predicted_bytes(self, ks) -> int:
        """The bytes of the three files `write(out, ks)` would write."""
        specs = [(name, dtype, a.shape) for name, (a, dtype) in self._arrays(ks).items()]
        sizes = {
            STORE_FILE: _safetensors_bytes(specs, self._metadata("jsubspace-store")),
            KEPT_FILE: self.kept_size,
        }
        return sum(sizes.values()) + len(_manifest_text(self.manifest(ks), sizes).encode())

    def write(self, out: str, ks) -> SubspaceStore:
        """Writes the tensor files, then the manifest (last: a store is whole once it is there)."""
        os.makedirs(out, exist_ok=True)
        io.write_safetensors(
            os.path.join(out, KEPT_FILE),
            {key: _Deferred(ref) for key, ref in self.inventory.blobs.items()},
            self._metadata("jsubspace-kept"),
        )
        io.write_safetensors(
            os.path.join(out, STORE_FILE),
            {name: a.astype(dtype) for name, (a, dtype) in self._arrays(ks).items()},
            self._metadata("jsubspace-store"),
        )
        sizes = {name: os.path.getsize(os.path.join(out, name)) for name in (STORE_FILE, KEPT_FILE)}
        atomic_write_text(
            os.path.join(out, MANIFEST_FILE), _manifest_text(self.manifest(ks), sizes)
        )
        return SubspaceStore(out)


class SubspaceStore:
    """A store on disk, read lazily; it needs none of the models it was fitted on.

    Example:
        >>> store = SubspaceStore("out/store")          # doctest: +SKIP
        >>> store.reconstruct("model_03", "layers.0.w")  # doctest: +SKIP
    """

    def __init__(self, directory: str):
        self.directory = directory
        path = os.path.join(directory, MANIFEST_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                self.manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{path}: not a readable store manifest ({e})") from None
        version = self.manifest.get("version") if isinstance(self.manifest, dict) else None
        if version != STORE_VERSION:
            raise StoreError(
                f"{directory}: a store of format version {version!r}; this jsubspace reads "
                f"version {STORE_VERSION} (which keeps every untouched tensor, so that models "
                "rebuild without their sources): re-run `jsubspace compress` on the original "
                "models to rebuild it"
            )
        self._path = os.path.join(directory, STORE_FILE)
        self._kept_path = os.path.join(directory, KEPT_FILE)
        self._header = self._read_header(self._path)
        self._kept_header = self._read_header(self._kept_path)
        self.layers = {entry["name"]: entry for entry in self.manifest["layers"]}
        self.models = list(self.manifest["models"])
        self._items: dict[str, dict[str, dict]] = {}

    def _read_header(self, path: str) -> io.SafetensorsHeader:
        try:
            header = io.read_header(path)
        except JsubspaceError as e:
            raise StoreError(f"{e} (a file of the store in {self.directory})") from None
        if header.metadata.get("store_id") != self.manifest.get("store_id"):
            raise StoreError(
                f"{path}: written by another compress run than {MANIFEST_FILE} beside it (an "
                "interrupted compress?); re-run `jsubspace compress`"
            )
        return header

    def _tensor(self, name: str) -> np.ndarray:
        info = self._header.tensors.get(name)
        if info is None:
            raise StoreError(f"{self._path}: tensor {name!r} missing")
        return io.read_tensor(self._path, info)

    def _entry(self, layer: str) -> dict:
        if layer not in self.layers:
            raise StoreError(f"layer {layer!r} is not in the store ({len(self.layers)} layers)")
        return self.layers[layer]

    def _index(self, model: str) -> int:
        if model not in self.models:
            raise StoreError(f"model {model!r} is not in the store; project() brings new ones in")
        return self.models.index(model)

    def contents(self, model: str) -> dict:
        """What the store knows of `model`'s source: `format`, `metadata` (its safetensors
        `__metadata__`), `tensors` (every tensor in order: `name`, `dtype`, `shape`, and either
        `layer`, the layer that rebuilds it, or `kept`, its key in `kept.safetensors`); for PEFT
        adapters also `adapter_config` and `lora_modules` (factor keys, rank, alpha)."""
        self._index(model)
        return self.manifest["inventory"][model]

    def kept_tensor(self, model: str, name: str) -> np.ndarray:
        """A tensor the store keeps untouched, bit-exact in its own dtype (memory-mapped)."""
        if model not in self._items:
            self._items[model] = {t["name"]: t for t in self.contents(model)["tensors"]}
        item = self._items[model].get(name)
        if item is None or "kept" not in item:
            why = f"rebuilt from layer {item['layer']!r}" if item else "not in its inventory"
            raise StoreError(f"model {model!r}: tensor {name!r} is not kept untouched ({why})")
        info = self._kept_header.tensors.get(item["kept"])
        if info is None:
            raise StoreError(f"{self._kept_path}: tensor {item['kept']!r} missing")
        if info.dtype != dtype_from_name(item["dtype"]) or list(info.shape) != item["shape"]:
            raise StoreError(
                f"{self._kept_path}: tensor {item['kept']!r} is {info.dtype} {list(info.shape)}, "
                f"the inventory of {model!r} says {item['dtype']} {item['shape']}"
            )
        return io.read_tensor(self._kept_path, info)

    def center(self, layer: str) -> np.ndarray:
        """`f32[m, n]` (zeros when the store is uncentred)."""
        entry = self._entry(layer)
        if self.manifest["center"] == "none":
            return np.zeros(entry["shape"], np.float32)
        return self._tensor(f"{layer}::center").astype(np.float32)

    def basis(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """`(U f32[m, k], V f32[n, k])`."""
        self._entry(layer)
        return (
            self._tensor(f"{layer}::U").astype(np.float32),
            self._tensor(f"{layer}::V").astype(np.float32),
        )

    def coefficients(self, model: str, layer: str) -> np.ndarray:
        """`f32[k, k]` of one model."""
        self._entry(layer)
        return self._tensor(f"{layer}::C")[self._index(model)].astype(np.float32)

    def reconstruct(self, model: str, layer: str, *, k: int | None = None) -> np.ndarray:
        """`c + U_k C_i V_k^T` of a model of the store as `f32[m, n]` (k defaults to the stored
        k)."""
        return self.rebuild(self.coefficients(model, layer), layer, k=k)

    def rebuild(self, coefficients: np.ndarray, layer: str, *, k: int | None = None) -> np.ndarray:
        """`c + U_k C V_k^T` as `f32[m, n]` for any coefficients `C` (`f32[K, K]`): a model's own
        (`coefficients`), a new model's (`project`); `k = 0` gives the centre alone."""
        u, v = self.basis(layer)
        k = self._check_k(layer, k)
        c = np.asarray(coefficients, np.float32)
        return self.center(layer) + u[:, :k] @ c[:k, :k] @ v[:, :k].T

    def _check_k(self, layer, k):
        stored = self._entry(layer)["k"]
        if k is None:
            return stored
        if not 0 <= k <= stored:
            raise StoreError(f"layer {layer!r}: k = {k} but the store keeps {stored} directions")
        return k

    def project(self, weight: np.ndarray, layer: str) -> np.ndarray:
        """Coefficients `U^T (W - c) V` of a model that is not in the population."""
        entry = self._entry(layer)
        w = np.asarray(weight, np.float32)
        if w.size != entry["shape"][0] * entry["shape"][1]:
            raise StoreError(
                f"layer {layer!r}: weight of shape {list(w.shape)} does not fit "
                f"the store's {entry['shape']} (another architecture?)"
            )
        u, v = self.basis(layer)
        return u.T @ (w.reshape(entry["shape"]) - self.center(layer)) @ v

    def accounting(self) -> dict:
        """Bytes of the original population and of the store, per layer and in total.

        `original_bytes`: every tensor of every source model; `store_bytes`: the store's three
        files on disk (`files`), headers and manifest included; `ratio` = original / store.
        `factored` totals the layers (basis, coefficients, centre), `kept` the untouched tensors
        (`tensors` pairs of model and tensor, `unique` stored once each, their `bytes`), and
        `overhead_bytes` the safetensors headers and the manifest.
        """
        return {
            "layers": {
                e["name"]: {
                    "k": e["k"],
                    "captured": e["captured"],
                    "original_bytes": e["original_bytes"],
                    **e["bytes"],
                    "ratio": e["ratio"],
                }
                for e in self.manifest["layers"]
            },
            **self.manifest["accounting"],
        }
