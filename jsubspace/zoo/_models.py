"""Small Flax architectures of the zoo. Weight names become checkpoint names (`Dense_0.kernel`)."""

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


ARCHITECTURES = {"mlp": MLP, "cnn": CNN}
