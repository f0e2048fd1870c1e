"""dreamcraft-jax: DreamCraft3D in JAX."""

__version__ = "0.1.0"
