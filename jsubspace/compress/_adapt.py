"""Coefficient-only adaptation: train `C` in `W0 + U_k C V_k^T`, nothing else.

`SubspaceDense` is a Flax layer whose kernel is `W0 + U C V^T` (or, LoRA-style,
`W0 + (U L_B)(V L_A)^T`) with `W0`, `U`, `V` frozen; `subspace_params` does the same for any
pytree of weights; `train_coefficients` is a small optax loop over the coefficients only.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable

import flax.linen as nn
import jax
import optax

from jsubspace.kernels import matmul


class SubspaceDense(nn.Module):
    """`y = x @ (W0 + U C V^T) + b`, trainable `C` only.

    Attributes:
        w0: `[in, out]` frozen kernel (Flax layout: inputs first).
        u: `[in, k]` frozen basis of the input side.
        v: `[out, k]` frozen basis of the output side.
        bias: `[out]` frozen bias or None.
        mode: 'core' trains `C: [k, k]` (k^2 parameters); 'lora' trains `L_A: [k, r]` and
            `L_B: [k, r]` with kernel `W0 + (U L_A)(V L_B)^T` (2 k r parameters).
        rank: r for mode 'lora'.
    """

    w0: jax.Array
    u: jax.Array
    v: jax.Array
    bias: jax.Array | None = None
    mode: str = "core"
    rank: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ku, kv = self.u.shape[1], self.v.shape[1]
        if self.mode == "core":
            c = self.param("coefficients", nn.initializers.zeros, (ku, kv))
            delta = matmul(matmul(self.u, c), self.v.T)
        elif self.mode == "lora":
            la = self.param("l_a", nn.initializers.normal(0.01), (ku, self.rank))
            lb = self.param("l_b", nn.initializers.zeros, (kv, self.rank))
            delta = matmul(matmul(self.u, la), matmul(self.v, lb).T)
        else:
            raise ValueError(f"mode must be 'core' or 'lora', got {self.mode!r}")
        y = matmul(x, self.w0 + delta)
        return y if self.bias is None else y + self.bias


def subspace_params(params, bases, coefficients):
    """`W0 + U C V^T` for every leaf of `params` that has a basis, the leaf itself otherwise.

    Args:
        params: a pytree of frozen weights.
        bases: a pytree of the same structure whose leaves are `(U, V)` or None.
        coefficients: a pytree of the same structure whose leaves are `C` or None.
    """

    def one(w, basis, c):
        if basis is None:
            return w
        u, v = basis
        return w + matmul(matmul(u, c), v.T)

    return jax.tree.map(
        one, params, bases, coefficients, is_leaf=lambda x: x is None or isinstance(x, tuple)
    )


def count_parameters(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def train_coefficients(
    loss_fn: Callable,
    coefficients,
    batches: Iterable,
    *,
    optimizer: optax.GradientTransformation | None = None,
):
    """Minimises `loss_fn(coefficients, batch)` over the coefficients only.

    Returns:
        `(coefficients, losses)` with the loss of every step.
    """
    optimizer = optimizer or optax.adam(1e-2)
    state = optimizer.init(coefficients)

    @jax.jit
    def step(c, s, batch):
        loss, grads = jax.value_and_grad(loss_fn)(c, batch)
        updates, s = optimizer.update(grads, s, c)
        return optax.apply_updates(c, updates), s, loss

    losses = []
    for batch in batches:
        coefficients, state, loss = step(coefficients, state, batch)
        losses.append(float(loss))
    return coefficients, losses
