"""Checkpoints -> index -> aligned layers -> sharded arrays (safetensors, PEFT, Orbax, npz;
from paths, from the Hugging Face Hub as `hf://ORG/NAME[@REVISION][/SUBFOLDER]`, or from
`https://`, `http://`, `s3://` and `gs://` URLs read by byte ranges, see `io._remote`)."""

from jsubspace.io._formats import LoraConfig
from jsubspace.io._formats import LoraModule
from jsubspace.io._formats import Model
from jsubspace.io._formats import TensorRef
from jsubspace.io._formats import load_model
from jsubspace.io._hub import HubModel
from jsubspace.io._hub import resolve as resolve_hub
from jsubspace.io._placement import Placed
from jsubspace.io._placement import PlacedDense
from jsubspace.io._placement import PlacedLora
from jsubspace.io._placement import iter_model_blocks
from jsubspace.io._placement import nonfinite_report
from jsubspace.io._placement import place_layer
from jsubspace.io._placement import stream_layers
from jsubspace.io._population import DenseLayer
from jsubspace.io._population import Layer
from jsubspace.io._population import LoraLayer
from jsubspace.io._population import Population
from jsubspace.io._population import base_refs
from jsubspace.io._population import open_population
from jsubspace.io._population import resolve_sources
from jsubspace.io._safetensors import SafetensorsHeader
from jsubspace.io._safetensors import TensorInfo
from jsubspace.io._safetensors import read_header
from jsubspace.io._safetensors import read_tensor
from jsubspace.io._safetensors import write_file as write_safetensors

__all__ = [
    "base_refs",
    "DenseLayer",
    "HubModel",
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
    "resolve_hub",
    "resolve_sources",
    "stream_layers",
    "write_safetensors",
]
