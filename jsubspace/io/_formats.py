"""Model formats: each is read as a table of lazily readable tensors (headers only up front).

A model is one of
  * a `*.safetensors` file;
  * a directory holding `model.safetensors` or a sharded `model.safetensors.index.json`;
  * a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`);
  * an Orbax / Flax checkpoint directory (structure from its metadata, keys joined with '.');
  * an `.npz` archive (no pickled objects).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zipfile
from collections.abc import Callable

import numpy as np

from jsubspace.errors import CheckpointError
from jsubspace.io import _remote
from jsubspace.io import _safetensors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """One tensor of one model, known by its header; `read()` maps or loads its values."""

    path: str
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    reader: Callable[[], np.ndarray] = dataclasses.field(repr=False, compare=False)

    def read(self) -> np.ndarray:
        """The tensor's values in their stored dtype and shape."""
        array = self.reader()
        if tuple(array.shape) != self.shape:
            raise CheckpointError(
                self.path, f"tensor {self.name!r} has shape {array.shape}, header said {self.shape}"
            )
        return array


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module: `dW = scale * B @ A`, with A: (r, n) and B: (m, r)."""

    name: str
    a: TensorRef
    b: TensorRef
    rank: int
    alpha: float
    scale: float


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The fields of a PEFT `adapter_config.json` that decide each module's scale."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    target_modules: tuple[str, ...] | str | None = None
    base_model_name_or_path: str | None = None

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """PEFT's rule: a pattern key matches a module name when it matches a dotted suffix."""
        rank = self.r
        alpha = self.lora_alpha
        for key, value in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                rank = int(value)
                break
        for key, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                alpha = float(value)
                break
        return rank, alpha

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


@dataclasses.dataclass(frozen=True)
class Model:
    """A model of a population: its name, where it lives and its tensors (nothing read yet)."""

    name: str
    path: str
    format: str
    tensors: dict[str, TensorRef]
    lora: LoraConfig | None = None
    lora_modules: dict[str, LoraModule] | None = None


def _safetensors_refs(path: str) -> dict[str, TensorRef]:
    header = _safetensors.read_header(path)
    return {
        name: TensorRef(
            path,
            name,
            info.shape,
            info.dtype,
            lambda p=path, i=info: _safetensors.read_tensor(p, i),
        )
        for name, info in header.tensors.items()
    }


def _read_json(path: str) -> dict:
    try:
        if _remote.is_url(path):
            value = json.loads(bytes(_remote.read_json_bytes(path)).decode("utf-8"))
        else:
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
    except OSError as e:
        raise CheckpointError(path, f"cannot read file: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, f"expected a JSON object, found a {type(value).__name__}")
    return value


def _join(directory: str, name: str) -> str:
    return (
        _remote.join(directory, name)
        if _remote.is_url(directory)
        else os.path.join(directory, name)
    )


def _isfile(path: str) -> bool:
    return _remote.exists(path) if _remote.is_url(path) else os.path.isfile(path)


def _name(path: str) -> str:
    """A model's name from its path: the basename (for a URL, see `_remote.model_name`)."""
    return (
        _remote.model_name(path)
        if _remote.is_url(path)
        else os.path.basename(os.path.normpath(path))
    )


def _link_roots(directory: str) -> tuple[str, str | None]:
    """Where the files of a checkpoint directory may really live: the directory itself, and,
    for a snapshot of a Hugging Face cache (`models--ORG--NAME/snapshots/REV/...`, whose files
    are links to `../../blobs/`), that repository's blob store -- only when it is a real folder
    (not itself a link), and only for files directly inside it, as the cache lays them out."""
    root = os.path.realpath(directory)
    parts = root.split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            blobs = os.sep.join(parts[:i] + ["blobs"])
            if os.path.isdir(blobs) and not os.path.islink(blobs):
                return root, os.path.realpath(blobs)
            break
    return root, None


def _within(path: str, roots: tuple[str, str | None]) -> bool:
    target = os.path.realpath(path)
    root, blobs = roots
    if os.path.commonpath([target, root]) == root:
        return True
    return blobs is not None and os.path.dirname(target) == blobs and os.path.isfile(target)


def _inside(directory: str, filename: str, source: str) -> str:
    """Joins a file name from metadata to its directory, refusing anything that leaves it (by
    name, or through a link that leads outside; see `_link_roots`)."""
    if _remote.is_url(directory):
        return _remote.join_inside(directory, filename, source)
    if not isinstance(filename, str) or not filename:
        raise CheckpointError(source, f"bad file name {filename!r}")
    joined = os.path.normpath(os.path.join(directory, filename))
    top = os.path.normpath(directory)
    if os.path.isabs(filename) or os.path.commonpath([joined, top]) != top:
        raise CheckpointError(source, f"file name {filename!r} points outside {directory}")
    if not _within(joined, _link_roots(directory)):
        raise CheckpointError(source, f"file name {filename!r} points outside {directory}")
    return os.path.realpath(joined)


def load_sharded_index(path: str) -> dict[str, TensorRef]:
    """Tensors of a sharded `model.safetensors.index.json`, each from the shard that holds it."""
    index = _read_json(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(path, "index has no 'weight_map' object")
    directory = _remote.parent(path) if _remote.is_url(path) else os.path.dirname(path)
    shards: dict[str, dict[str, TensorRef]] = {}
    refs = {}
    for name, filename in weight_map.items():
        shard = _inside(directory, filename, path)
        if shard not in shards:
            if not _isfile(shard):
                raise CheckpointError(path, f"shard {filename!r} listed in the index is missing")
            shards[shard] = _safetensors_refs(shard)
        if name not in shards[shard]:
            raise CheckpointError(shard, f"tensor {name!r} listed in {path} is not in this shard")
        refs[name] = shards[shard][name]
    return refs


_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)


def load_peft(directory: str) -> Model:
    """A PEFT LoRA adapter directory, exposing each adapted module in factored form."""
    config_path = _join(directory, "adapter_config.json")
    cfg = _read_json(config_path)
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise CheckpointError(config_path, f"peft_type {peft_type!r} is not supported (LORA only)")
    try:
        targets = cfg.get("target_modules")
        config = LoraConfig(
            r=int(cfg["r"]),
            lora_alpha=float(cfg.get("lora_alpha", cfg["r"])),
            use_rslora=bool(cfg.get("use_rslora", False)),
            rank_pattern={str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
            target_modules=tuple(targets) if isinstance(targets, list) else targets,
            base_model_name_or_path=cfg.get("base_model_name_or_path"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(config_path, f"bad LoRA config field: {e!r}") from None
    if config.r <= 0:
        raise CheckpointError(config_path, f"r must be positive, found {config.r}")
    weights = _join(directory, "adapter_model.safetensors")
    if not _isfile(weights):
        if any(_isfile(_join(directory, "adapter_model" + s)) for s in PICKLE_SUFFIXES):
            raise CheckpointError(
                directory,
                "adapter weights are pickled (adapter_model.bin); pickles are never loaded. "
                "Convert with PEFT: model.save_pretrained(dir, safe_serialization=True)",
            )
        raise CheckpointError(
            directory, "adapter_config.json found but no adapter_model.safetensors"
        )
    tensors = _safetensors_refs(weights)
    factors: dict[str, dict[str, TensorRef]] = {}
    for key, ref in tensors.items():
        match = _LORA_KEY.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["ab"]] = ref
    modules = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise CheckpointError(weights, f"module {module!r} has lora_{''.join(pair)} only")
        a, b = pair["A"], pair["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                weights, f"module {module!r}: lora_A {a.shape} and lora_B {b.shape} do not chain"
            )
        rank, alpha = config.rank_and_alpha(module)
        if rank != a.shape[0]:
            raise CheckpointError(
                weights,
                f"module {module!r}: stored rank {a.shape[0]} but adapter_config.json "
                f"gives r={rank}",
            )
        modules[module] = LoraModule(module, a, b, rank, alpha, config.scale(rank, alpha))
    if not modules:
        raise CheckpointError(weights, "no lora_A / lora_B tensors found")
    return Model(_name(directory), directory, "peft", tensors, config, modules)


MAX_TENSOR_BYTES = 2**40  # A tensor claiming more than 1 TiB is refused outright.


def check_links_inside(directory: str) -> None:
    """Refuses a checkpoint directory holding a symlink that leads outside it."""
    roots = _link_roots(directory)
    for here, dirs, files in os.walk(directory, followlinks=False):
        for name in dirs + files:
            path = os.path.join(here, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not _within(path, roots):
                    raise CheckpointError(
                        directory,
                        f"symlink {os.path.relpath(path, directory)!r} points outside the "
                        f"checkpoint directory (to {target})",
                    )


def _check_orbax_leaf(directory: str, keys: tuple[str, ...], shape, dtype) -> None:
    for key in keys:
        if not key or key in (".", "..") or "/" in key or "\\" in key or "\x00" in key:
            raise CheckpointError(
                directory,
                f"Orbax metadata key {'.'.join(keys)!r} could name a path outside "
                "the checkpoint; refused",
            )
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        raise CheckpointError(directory, f"tensor {'.'.join(keys)!r}: bad shape {shape!r}")
    nbytes = math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise CheckpointError(
            directory,
            f"tensor {'.'.join(keys)!r} claims {nbytes} bytes (shape {list(shape)}); "
            "refused as absurd",
        )


def _check_orbax_metadata_file(directory: str) -> None:
    """Checks the keys in `_METADATA` before Orbax turns them into storage paths."""
    path = os.path.join(directory, "_METADATA")
    if not os.path.isfile(path):
        return
    meta = _read_json(path)
    tree = meta.get("tree_metadata", {})
    if not isinstance(tree, dict):
        raise CheckpointError(path, "'tree_metadata' is not an object")
    for entry in tree.values():
        keys = entry.get("key_metadata", []) if isinstance(entry, dict) else []
        names = tuple(str(k.get("key", "")) if isinstance(k, dict) else "" for k in keys)
        _check_orbax_leaf(directory, names, (), np.float32)


def load_orbax(directory: str) -> Model:
    """An Orbax PyTree checkpoint; structure from its metadata, each leaf restored on demand.

    Untrusted: symlinks out of the directory, metadata keys that could become paths, and absurd
    shapes are refused before Orbax opens any array.
    """
    import orbax.checkpoint as ocp  # Imported here: it is slow and only this format needs it.

    check_links_inside(directory)
    _check_orbax_metadata_file(directory)

    checkpointer = ocp.PyTreeCheckpointer()
    try:
        meta = checkpointer.metadata(directory)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    except Exception as e:  # Orbax raises many types for unreadable metadata.
        raise CheckpointError(directory, f"cannot read Orbax metadata: {e}") from None
    if not isinstance(tree, dict):
        raise CheckpointError(directory, "Orbax metadata holds no tree of arrays")

    def restore(path_keys: tuple[str, ...], leaf_meta) -> np.ndarray:
        item: dict = {}
        node = item
        for k in path_keys[:-1]:
            node = node.setdefault(k, {})
        node[path_keys[-1]] = leaf_meta
        args = {}
        node_args = args
        for k in path_keys[:-1]:
            node_args = node_args.setdefault(k, {})
        node_args[path_keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
        try:
            out = checkpointer.restore(
                directory,
                args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
            )
        except Exception as e:
            raise CheckpointError(
                directory, f"cannot restore {'.'.join(path_keys)!r}: {e}"
            ) from None
        for k in path_keys:
            out = out[k]
        return np.asarray(out)

    tensors = {}

    def walk(node, keys):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, keys + (str(k),))
            return
        shape = getattr(node, "shape", None)
        dtype = getattr(node, "dtype", None)
        if shape is None or dtype is None:
            return
        _check_orbax_leaf(directory, keys, shape, dtype)
        name = ".".join(keys)
        tensors[name] = TensorRef(
            directory,
            name,
            tuple(int(d) for d in shape),
            np.dtype(dtype),
            lambda k=keys, m=node: restore(k, m),
        )

    walk(tree, ())
    return Model(os.path.basename(os.path.normpath(directory)), directory, "orbax", tensors)


def load_npz(path: str) -> Model:
    """An `.npz` archive: shapes and dtypes from each member's .npy header; no pickles."""
    tensors = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                if dtype.hasobject:
                    raise CheckpointError(path, f"member {member!r} holds Python objects (pickle)")
                name = member[: -len(".npy")]

                def read(name=name):
                    with np.load(path, allow_pickle=False) as z:
                        return z[name]

                tensors[name] = TensorRef(path, name, tuple(shape), dtype, read)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(path, f"not a valid .npz archive ({e})") from None
    return Model(os.path.splitext(os.path.basename(path))[0], path, "npz", tensors)


_NOT_MODELS = ("optimizer", "scheduler", "rng_state", "training_args", "trainer_state")


def pickled_model(path: str) -> bool:
    """A model only in a pickle format (`*.bin`, `*.pt`, ...; or a directory holding
    `pytorch_model.bin` and no safetensors weights), which is never loaded."""
    if _remote.is_url(path):
        return _remote.pickled_model(path)
    if os.path.isfile(path):
        # Training state that sits beside models (optimizer.pt, rng_state.pth, ...) is no model.
        return path.endswith(PICKLE_SUFFIXES) and not os.path.basename(path).startswith(_NOT_MODELS)
    if not os.path.isdir(path) or model_kind(path) is not None:
        return False
    if any(f.endswith(".safetensors") for f in os.listdir(path)):
        return False  # a directory of models, among them perhaps a pickled one
    return any(
        os.path.isfile(os.path.join(path, stem + suffix))
        for stem in ("pytorch_model", "model")
        for suffix in PICKLE_SUFFIXES
    ) or os.path.isfile(os.path.join(path, "pytorch_model.bin.index.json"))


def model_kind(path: str) -> str | None:
    """The format of `path` if it is a model, else None (a directory of models, say)."""
    if _remote.is_url(path):
        return _remote.model_kind(path)
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "safetensors"
        if path.endswith(".npz"):
            return "npz"
        return None
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "peft"
    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return "safetensors-index"
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return "safetensors"
    if os.path.isfile(os.path.join(path, "_METADATA")) or os.path.isfile(
        os.path.join(path, "_CHECKPOINT_METADATA")
    ):
        return "orbax"
    return None


def load_model(path: str) -> Model:
    """Reads the headers of one model; raises CheckpointError if `path` is no known format."""
    kind = model_kind(path)
    remote = _remote.is_url(path)
    name = _name(path)
    is_dir = not _remote.is_file_url(path) if remote else os.path.isdir(path)
    if kind == "safetensors" and is_dir:
        file = _join(path, "model.safetensors")
        return Model(name, path, kind, _safetensors_refs(file))
    if kind == "safetensors":
        return Model(
            name if remote else os.path.splitext(name)[0], path, kind, _safetensors_refs(path)
        )
    if kind == "safetensors-index":
        index = _join(path, "model.safetensors.index.json") if is_dir else path
        return Model(name, path, kind, load_sharded_index(index))
    if kind == "peft":
        return load_peft(path)
    if kind == "orbax":
        return load_orbax(path)
    if kind == "npz":
        return load_npz(path)
    if pickled_model(path):
        raise CheckpointError(
            path,
            "pickle-based checkpoints are never loaded (they can run code). Convert to "
            "safetensors first, in a trusted environment: load the state dict with torch "
            "(weights_only=True) and write it with safetensors.torch.save_file",
        )
    if remote:
        raise CheckpointError(path, _remote.missing_problem(path))
    if not os.path.exists(path):
        raise CheckpointError(path, "no such file or directory")
    raise CheckpointError(
        path,
        "not a known model format (expected *.safetensors, *.npz, a directory with "
        "model.safetensors[.index.json], a PEFT adapter directory or an Orbax checkpoint)",
    )
