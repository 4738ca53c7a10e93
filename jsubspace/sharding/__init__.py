"""Mesh construction, placement rules and multi-host start-up."""

from jsubspace.sharding._mesh import (
    MODELS,
    host_array,
    initialize_distributed,
    models_mesh,
    padded_count,
    replicated,
    stacked_sharding,
)

__all__ = [
    "MODELS",
    "host_array",
    "initialize_distributed",
    "models_mesh",
    "padded_count",
    "replicated",
    "stacked_sharding",
]
