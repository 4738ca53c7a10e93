"""Real, bundled data and the tasks a zoo's models are trained on.

Default data: scikit-learn's digits (1797 8x8 images, bundled, no download). Fashion-MNIST is
read from Debian's `dataset-fashion-mnist` package when it is installed. A task picks a subset of
classes, may permute the labels, and may transform the inputs (rotation, noise, shift).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct

import jax.numpy as jnp
import numpy as np

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
TRANSFORMS = ("none", "rotate", "noise", "shift")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images `x: f32[S, H, W]` in [0, 1], labels `y: i32[S]`, and a fixed train/test split."""

    name: str
    x: np.ndarray
    y: np.ndarray
    train: np.ndarray  # bool[S]

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's bundled digits, 75% / 25% train / test (seeded)."""
    from sklearn.datasets import load_digits as sk_digits

    x, y = sk_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 8, 8).astype(np.float32)
    train = np.random.default_rng(seed).random(len(y)) < 0.75
    return Dataset("digits", x, y.astype(np.int32), train)


def _idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(directory: str = FASHION_DIR, *, limit: int = 10000) -> Dataset | None:
    """Fashion-MNIST from Debian's package, or None when it is not installed."""
    if not os.path.isdir(directory):
        return None
    files = {f.split(".")[0]: os.path.join(directory, f) for f in os.listdir(directory)}
    try:
        x_tr = _idx(files["train-images-idx3-ubyte"])[:limit]
        y_tr = _idx(files["train-labels-idx1-ubyte"])[:limit]
        x_te = _idx(files["t10k-images-idx3-ubyte"])[: limit // 4]
        y_te = _idx(files["t10k-labels-idx1-ubyte"])[: limit // 4]
    except (KeyError, OSError, ValueError):
        return None
    x = np.concatenate([x_tr, x_te]).astype(np.float32) / 255.0
    y = np.concatenate([y_tr, y_te]).astype(np.int32)
    train = np.arange(len(y)) < len(y_tr)
    return Dataset("fashion-mnist", x, y, train)


@dataclasses.dataclass(frozen=True)
class Task:
    """What one model is trained on.

    Attributes:
        classes: the labels it sees (others are masked out of its loss).
        permutation: label i is trained as permutation[i] (identity by default).
        transform: one of TRANSFORMS, applied to every input.
        seed: the seed of its initialisation and of the transform's randomness.
    """

    classes: tuple[int, ...]
    permutation: tuple[int, ...] | None = None
    transform: str = "none"
    seed: int = 0

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def apply_task(x: jnp.ndarray, y: jnp.ndarray, task: Task, num_classes: int):
    """`(x', y', mask)`: transformed inputs, relabelled targets, and the task's sample mask."""
    if task.transform == "rotate":
        x = jnp.rot90(x, k=1, axes=(1, 2))
    elif task.transform == "noise":
        rng = np.random.default_rng(task.seed)
        x = jnp.clip(x + 0.15 * rng.standard_normal(x.shape).astype(np.float32), 0.0, 1.0)
    elif task.transform == "shift":
        x = jnp.roll(x, shift=1, axis=2)
    elif task.transform != "none":
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {task.transform!r}")
    mask = jnp.isin(y, jnp.asarray(task.classes)).astype(jnp.float32)
    perm = np.arange(num_classes) if task.permutation is None else np.asarray(task.permutation)
    return x, jnp.asarray(perm)[y], mask
