"""Mesh construction, placement rules and multi-host start-up."""

from jsubspace.sharding._mesh import MODELS
from jsubspace.sharding._mesh import host_array
from jsubspace.sharding._mesh import initialize_distributed
from jsubspace.sharding._mesh import models_mesh
from jsubspace.sharding._mesh import padded_count
from jsubspace.sharding._mesh import replicated
from jsubspace.sharding._mesh import stacked_sharding

__all__ = [
    "MODELS",
    "host_array",
    "initialize_distributed",
    "models_mesh",
    "padded_count",
    "replicated",
    "stacked_sharding",
]
