"""Small MLPs for the fields (the official VanillaMLP: no biases, ReLU hidden layers, linear output)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's nn.Linear default (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which the
# official fields' VanillaMLP keeps (threestudio/models/networks.py); variance_scaling's uniform bound is
# sqrt(3 * scale / fan_in), so scale = 1/3.
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class MLP(nn.Module):
    """x (N, in) -> (N, out): ``n_hidden_layers`` Dense(width) + ReLU, then Dense(out), all without bias,
    weights initialised U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PyTorch's nn.Linear.

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
            x = nn.Dense(size, use_bias=self.use_bias, kernel_init=TORCH_LINEAR_INIT,
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
