"""Small MLPs for the fields (tiny-cuda-nn style: no biases, ReLU hidden layers, linear output)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """x (N, in) -> (N, out): ``n_hidden_layers`` Dense(width) + ReLU, then Dense(out), all without bias.

    Parameter paths: ``layers_0/kernel`` ... ``layers_{n_hidden_layers}/kernel``.
    """

    width: int
    n_hidden_layers: int
    out_dim: int
    use_bias: bool = False
    precision: jax.lax.Precision | None = None  # of the matmuls; None: XLA's default (TF32 on recent GPUs)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        sizes: Sequence[int] = [self.width] * self.n_hidden_layers + [self.out_dim]
        for i, size in enumerate(sizes):
            # Xavier-uniform like tiny-cuda-nn's fully fused MLP initialisation.
            x = nn.Dense(size, use_bias=self.use_bias, kernel_init=nn.initializers.xavier_uniform(),
                         precision=self.precision, name=f"layers_{i}")(x)
            if i < len(sizes) - 1:
                x = nn.relu(x)
        return x


def init_mlp(key, module: MLP, in_dim: int) -> dict:
    """Parameters of ``module`` for inputs of width ``in_dim`` (a plain dict pytree)."""
    return module.init(key, jnp.zeros((1, in_dim), jnp.float32))["params"]


def apply_mlp(module: MLP, params: dict, x: jax.Array) -> jax.Array:
    """Pure apply: (N, in) -> (N, out)."""
    return module.apply({"params": params}, x)
