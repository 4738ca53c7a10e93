"""Use the subspace: basis + coefficients, reconstruction, export, merge, adapt."""

from jsubspace.compress._adapt import SubspaceDense
from jsubspace.compress._adapt import count_parameters
from jsubspace.compress._adapt import subspace_params
from jsubspace.compress._adapt import train_coefficients
from jsubspace.compress._basis import LayerBasis
from jsubspace.compress._basis import dense_basis
from jsubspace.compress._basis import lora_basis
from jsubspace.compress._basis import project_dense
from jsubspace.compress._export import export_all
from jsubspace.compress._export import export_model
from jsubspace.compress._export import refactor_lora
from jsubspace.compress._merge import METHODS
from jsubspace.compress._merge import dare
from jsubspace.compress._merge import merge
from jsubspace.compress._merge import subspace_merge
from jsubspace.compress._merge import ties
from jsubspace.compress._merge import trim
from jsubspace.compress._store import StoreError
from jsubspace.compress._store import SubspaceStore
from jsubspace.compress._store import fit_store
from jsubspace.compress._store import layer_bytes

__all__ = [
    "METHODS",
    "LayerBasis",
    "StoreError",
    "SubspaceDense",
    "SubspaceStore",
    "count_parameters",
    "dare",
    "dense_basis",
    "export_all",
    "export_model",
    "fit_store",
    "layer_bytes",
    "lora_basis",
    "merge",
    "project_dense",
    "refactor_lora",
    "subspace_merge",
    "subspace_params",
    "ties",
    "train_coefficients",
    "trim",
]
