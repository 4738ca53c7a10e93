"""Pure jittable linear algebra: mode Grams, factored LoRA Grams, eigen-solvers, HOSVD.

Kernels take arrays and keyword arguments, never paths or flags. Stacks are `[N, m, n]`
sharded over the `models` mesh axis; reductions over models are `psum`s inside `jax.shard_map`.
"""

from jsubspace.kernels._gram import (
    CENTERS,
    HIGHEST,
    ModeGrams,
    centered_block,
    mode_grams,
    ring_cross_gram,
    streaming_mode_grams,
)
from jsubspace.kernels._hosvd import Tucker, hosvd
from jsubspace.kernels._lora import (
    LoraGrams,
    centering_matrix,
    lora_grams,
    materialized_updates,
    psd_root,
)
from jsubspace.kernels._rsvd import (
    Eig,
    exact_eigh,
    orthonormalize,
    randomized_eigh,
    randomized_mode_eigh,
)

__all__ = [
    "CENTERS",
    "HIGHEST",
    "Eig",
    "LoraGrams",
    "ModeGrams",
    "Tucker",
    "centered_block",
    "centering_matrix",
    "exact_eigh",
    "hosvd",
    "lora_grams",
    "materialized_updates",
    "mode_grams",
    "orthonormalize",
    "psd_root",
    "randomized_eigh",
    "randomized_mode_eigh",
    "ring_cross_gram",
    "streaming_mode_grams",
]
