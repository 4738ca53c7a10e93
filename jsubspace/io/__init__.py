"""Checkpoints -> index -> aligned layers -> sharded arrays (safetensors, PEFT, Orbax, npz)."""

from jsubspace.io._formats import LoraConfig, LoraModule, Model, TensorRef, load_model
from jsubspace.io._placement import (
    Placed,
    PlacedDense,
    PlacedLora,
    iter_model_blocks,
    nonfinite_report,
    place_layer,
    stream_layers,
)
from jsubspace.io._population import (
    DenseLayer,
    Layer,
    LoraLayer,
    Population,
    open_population,
    resolve_sources,
)
from jsubspace.io._safetensors import SafetensorsHeader, TensorInfo, read_header, read_tensor

__all__ = [
    "DenseLayer",
    "Layer",
    "LoraConfig",
    "LoraLayer",
    "LoraModule",
    "Model",
    "Placed",
    "PlacedDense",
    "PlacedLora",
    "Population",
    "SafetensorsHeader",
    "TensorInfo",
    "TensorRef",
    "iter_model_blocks",
    "load_model",
    "nonfinite_report",
    "open_population",
    "place_layer",
    "read_header",
    "read_tensor",
    "resolve_sources",
    "stream_layers",
]
