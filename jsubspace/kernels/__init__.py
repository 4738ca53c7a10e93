"""Pure jittable linear algebra: mode Grams, factored LoRA Grams, eigen-solvers, HOSVD.

Kernels take arrays and keyword arguments, never paths or flags. Stacks are `[N, m, n]`
sharded over the `models` mesh axis; reductions over models are `psum`s inside `jax.shard_map`.
"""

from jsubspace.kernels._gram import CENTERS
from jsubspace.kernels._gram import CHUNKED_COMPILE
from jsubspace.kernels._gram import HIGHEST
from jsubspace.kernels._gram import LONG_DOT_SLICE
from jsubspace.kernels._gram import ModeGrams
from jsubspace.kernels._gram import centered_block
from jsubspace.kernels._gram import centred_chunk
from jsubspace.kernels._gram import chunkable_jit
from jsubspace.kernels._gram import cross_gram
from jsubspace.kernels._gram import dual_mode_gram
from jsubspace.kernels._gram import exchanged_cross_gram
from jsubspace.kernels._gram import long_dot
from jsubspace.kernels._gram import matmul
from jsubspace.kernels._gram import mode_gram
from jsubspace.kernels._gram import mode_grams
from jsubspace.kernels._gram import mode_product
from jsubspace.kernels._gram import model_chunk_map
from jsubspace.kernels._gram import model_chunks
from jsubspace.kernels._gram import model_mask
from jsubspace.kernels._gram import models_sum
from jsubspace.kernels._gram import ring_cross_gram
from jsubspace.kernels._gram import self_gram
from jsubspace.kernels._gram import shard_centre
from jsubspace.kernels._gram import sharded_cross_gram
from jsubspace.kernels._gram import sliced_models_gram
from jsubspace.kernels._gram import stack_t_times
from jsubspace.kernels._gram import stack_times
from jsubspace.kernels._gram import streaming_mode_grams
from jsubspace.kernels._gram import t_matmul
from jsubspace.kernels._hosvd import Tucker
from jsubspace.kernels._hosvd import hosvd
from jsubspace.kernels._hosvd import mode_bases
from jsubspace.kernels._lora import LoraGrams
from jsubspace.kernels._lora import centering_matrix
from jsubspace.kernels._lora import factor_root
from jsubspace.kernels._lora import lora_grams
from jsubspace.kernels._lora import materialized_updates
from jsubspace.kernels._lora import mode_matrices
from jsubspace.kernels._lora import psd_root
from jsubspace.kernels._lora_rsvd import randomized_factor_pca
from jsubspace.kernels._lora_rsvd import randomized_lora_eigh
from jsubspace.kernels._lora_side import BLOCK_ROWS
from jsubspace.kernels._lora_side import FACTORS
from jsubspace.kernels._lora_side import SideModels
from jsubspace.kernels._lora_side import factor_block_samples
from jsubspace.kernels._lora_side import factor_covariance
from jsubspace.kernels._lora_side import factor_mean
from jsubspace.kernels._lora_side import shifted_lora
from jsubspace.kernels._lora_side import side_block_factors
from jsubspace.kernels._lora_side import side_block_models
from jsubspace.kernels._lora_side import side_block_terms
from jsubspace.kernels._lora_side import side_means
from jsubspace.kernels._lora_side import side_mode_matrix
from jsubspace.kernels._lora_side import side_models
from jsubspace.kernels._lora_side import uses_side_space
from jsubspace.kernels._rsvd import Eig
from jsubspace.kernels._rsvd import exact_eigh
from jsubspace.kernels._rsvd import orthonormalize
from jsubspace.kernels._rsvd import randomized_eigh
from jsubspace.kernels._rsvd import randomized_mode_eigh

__all__ = [
    "CENTERS",
    "CHUNKED_COMPILE",
    "HIGHEST",
    "LONG_DOT_SLICE",
    "Eig",
    "LoraGrams",
    "ModeGrams",
    "Tucker",
    "centered_block",
    "centred_chunk",
    "chunkable_jit",
    "centering_matrix",
    "exact_eigh",
    "hosvd",
    "lora_grams",
    "factor_root",
    "materialized_updates",
    "matmul",
    "mode_bases",
    "mode_matrices",
    "cross_gram",
    "long_dot",
    "dual_mode_gram",
    "mode_gram",
    "mode_grams",
    "mode_product",
    "stack_t_times",
    "stack_times",
    "model_chunk_map",
    "model_chunks",
    "model_mask",
    "models_sum",
    "orthonormalize",
    "psd_root",
    "randomized_eigh",
    "randomized_mode_eigh",
    "randomized_factor_pca",
    "randomized_lora_eigh",
    "ring_cross_gram",
    "shard_centre",
    "sharded_cross_gram",
    "sliced_models_gram",
    "exchanged_cross_gram",
    "self_gram",
    "BLOCK_ROWS",
    "FACTORS",
    "factor_block_samples",
    "factor_covariance",
    "factor_mean",
    "SideModels",
    "side_block_factors",
    "side_block_models",
    "side_block_terms",
    "side_means",
    "side_mode_matrix",
    "side_models",
    "shifted_lora",
    "uses_side_space",
    "streaming_mode_grams",
    "t_matmul",
]
