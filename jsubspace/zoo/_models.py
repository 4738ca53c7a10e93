"""Small Flax architectures of the zoo. Weight names become checkpoint names (`Dense_0.kernel`).

Kernels of rank > 2 (convolutions, attention projections) are analysed in the contract's matrix
view `(shape[0], prod(shape[1:]))`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """Flattened image -> `depth` hidden ReLU layers of `hidden` units -> logits."""

    hidden: int = 64
    depth: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            x = nn.relu(nn.Dense(self.hidden, name=f"Dense_{i}")(x))
        return nn.Dense(self.num_classes, name=f"Dense_{self.depth}")(x)


class CNN(nn.Module):
    """Two 3x3 convolutions (8 and 16 channels) -> global average pool -> dense logits."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x[..., None]
        x = nn.relu(nn.Conv(8, (3, 3), name="Conv_0")(x))
        x = nn.relu(nn.Conv(16, (3, 3), name="Conv_1")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.relu(nn.Dense(32, name="Dense_0")(x))
        return nn.Dense(self.num_classes, name="Dense_1")(x)


class ViT(nn.Module):
    """A small vision transformer: 2x2 patches of the 8x8 digit, `depth` pre-norm blocks."""

    dim: int = 32
    depth: int = 1
    heads: int = 2
    patch: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.Conv(self.dim, (self.patch, self.patch), strides=self.patch, name="Embed")(
            x[..., None]
        )
        x = x.reshape(x.shape[0], -1, self.dim)
        pos = self.param("pos", nn.initializers.normal(0.02), (x.shape[1], self.dim))
        x = x + pos
        for i in range(self.depth):
            y = nn.LayerNorm(name=f"Norm_{i}_0")(x)
            x = x + nn.SelfAttention(self.heads, name=f"Attn_{i}")(y)
            y = nn.LayerNorm(name=f"Norm_{i}_1")(x)
            y = nn.gelu(nn.Dense(2 * self.dim, name=f"Mlp_{i}_0")(y))
            x = x + nn.Dense(self.dim, name=f"Mlp_{i}_1")(y)
        x = nn.LayerNorm(name="Norm_out")(x).mean(axis=1)
        return nn.Dense(self.num_classes, name="Head")(x)


ARCHITECTURES = {"mlp": MLP, "cnn": CNN, "vit": ViT}
