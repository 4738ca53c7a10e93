"""A subspace store: per layer the centre, `U_k`, `V_k` and every model's coefficients.

On disk: `store.safetensors` (tensors `<layer>::center`, `::U`, `::V`, `::C`, in the layer's
stored dtype) and `store.json` (models, layers, the k chosen and why, captured energy, byte
accounting). Loading reads the JSON and the safetensors header only; tensors are memory-mapped
when used. The choice of k is per layer: fixed, the smallest reaching an energy fraction `tau`,
or the greedy split of a total byte budget.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import os
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
from jsubspace.errors import StoreError
from jsubspace.io._atomic import atomic_write_json
from jsubspace.sharding import host_array

STORE_VERSION = "1"
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


def _choose_budget(fitted: list[_Fitted], n_models: int, budget: int, centred) -> list[int]:
    fixed = sum(
        layer_bytes(*f.layer.shape, n_models, 0, f.itemsize, centred=centred[i])["total"]
        for i, f in enumerate(fitted)
    )
    if fixed > budget:
        raise StoreError(f"the centres alone need {fixed} bytes, over the budget of {budget}")
    ks = [0] * len(fitted)
    spent = fixed
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
    progress=lambda stream, total, population: stream,
) -> SubspaceStore:
    """Fits the universal basis of every layer and writes a store to `out`.

    Args:
        models: population sources (see `io.resolve_sources`).
        out: directory for `store.safetensors` and `store.json`.
        k: a fixed basis size for every layer; or
        tau: per layer, the smallest k whose basis captures this fraction of the energy; or
        budget_bytes: the k of every layer chosen greedily (energy gained per byte) so the whole
            store fits in this many bytes. Exactly one of k, tau, budget_bytes.
        kmax: the largest k considered.
        center: 'mean', 'none' (default for LoRA populations, whose mean update is a dense
            m x n matrix) or 'base' is not offered here (use task vectors as the population).
        include, exclude: layer-name regexes.
        num_devices: devices of the `models` mesh.
        seed: seeds the randomized solver of long sides.
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
    mesh = sharding.models_mesh(num_devices)
    n = len(population.models)
    fitted: list[_Fitted] = []
    key = jax.random.key(seed)
    stream = io.stream_layers(population, mesh)
    for i, (layer, placed) in enumerate(progress(stream, len(population.layers), population)):
        m, nn = layer.shape
        if layer.kind == "dense":
            kk = min(kmax, m, nn)
            # The same rule as the analysis's control bases: no side x side Gram past the
            # exact limit, the randomized solver where it is cheaper.
            bases = spectra.basis_solvers(n, m, nn, kk, spectra.SpectraConfig())
            basis = dense_basis(
                placed.x,
                None,
                jax.random.fold_in(key, i),
                mesh=mesh,
                n_models=n,
                center=center,
                k=kk,
                solvers=(bases["rows"], bases["cols"]),
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
        ks = _choose_budget(fitted, n, budget_bytes, centred)
    return _write(
        out,
        population,
        fitted,
        ks,
        center,
        {"k": k, "tau": tau, "budget_bytes": budget_bytes, "kmax": kmax},
    )


def _write(out, population, fitted, ks, center, choice) -> SubspaceStore:
    n = len(population.models)
    tensors = {}
    layers = []
    for f, kk in zip(fitted, ks):
        layer = f.layer
        dtype = storage_dtype(layer.dtype)
        m, nn = layer.shape
        name = layer.name
        if center == "mean":
            tensors[f"{name}::center"] = np.asarray(f.basis.center).astype(dtype)
        tensors[f"{name}::U"] = np.asarray(f.basis.u)[:, :kk].astype(dtype)
        tensors[f"{name}::V"] = np.asarray(f.basis.v)[:, :kk].astype(dtype)
        tensors[f"{name}::C"] = np.asarray(f.basis.coefficients)[:, :kk, :kk].astype(dtype)
        if layer.kind == "dense":
            original = n * m * nn * np.dtype(layer.dtype).itemsize
        else:
            original = sum(r * (m + nn) for r in layer.ranks) * np.dtype(layer.dtype).itemsize
        sizes = layer_bytes(m, nn, n, kk, dtype.itemsize, centred=center == "mean")
        layers.append(
            {
                "name": name,
                "kind": layer.kind,
                "shape": [m, nn],
                "stored_shape": list(layer.stored_shape) if layer.kind == "dense" else [m, nn],
                "dtype": str(np.dtype(layer.dtype)),
                "store_dtype": str(dtype),
                "k": int(kk),
                "kmax": len(f.captured) - 1,
                "total_energy": f.energy,
                "captured": float(f.captured[kk] / max(f.energy, 1e-300)),
                "tau_reached": (
                    None
                    if choice.get("tau") is None
                    else bool(f.captured[kk] / max(f.energy, 1e-300) >= choice["tau"] - 1e-9)
                ),
                "original_bytes": int(original),
                "bytes": sizes,
                "ratio": original / max(sizes["total"], 1),
                "ranks": list(layer.ranks) if layer.kind == "lora" else None,
            }
        )
    total_original = sum(entry["original_bytes"] for entry in layers)
    total_store = sum(entry["bytes"]["total"] for entry in layers)
    manifest = {
        "version": STORE_VERSION,
        "models": population.names,
        "sources": [
            {"name": mo.name, "path": mo.path, "format": mo.format} for mo in population.models
        ],
        "center": center,
        "choice": choice,
        "layers": layers,
        "accounting": {
            "original_bytes": total_original,
            "store_bytes": total_store,
            "ratio": total_original / max(total_store, 1),
            "captured": sum(e["captured"] * e["total_energy"] for e in layers)
            / max(sum(e["total_energy"] for e in layers), 1e-300),
        },
    }
    os.makedirs(out, exist_ok=True)
    io.write_safetensors(
        os.path.join(out, "store.safetensors"), tensors, {"format": "jsubspace-store"}
    )
    atomic_write_json(os.path.join(out, "store.json"), manifest)
    return SubspaceStore(out)


class SubspaceStore:
    """A store on disk, read lazily.

    Example:
        >>> store = SubspaceStore("out/store")          # doctest: +SKIP
        >>> store.reconstruct("model_03", "layers.0.w")  # doctest: +SKIP
    """

    def __init__(self, directory: str):
        self.directory = directory
        path = os.path.join(directory, "store.json")
        try:
            with open(path, encoding="utf-8") as f:
                self.manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{path}: not a readable store manifest ({e})") from None
        self._path = os.path.join(directory, "store.safetensors")
        self._header = io.read_header(self._path)
        self.layers = {entry["name"]: entry for entry in self.manifest["layers"]}
        self.models = list(self.manifest["models"])

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
        """Bytes of the original population and of the store, per layer and in total."""
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
