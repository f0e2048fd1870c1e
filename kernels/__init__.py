"""Pallas kernels for the renderer (issue [3]); installed as ``dreamcraft_jax.kernels``.

Each kernel will sit beside its pure-jnp reference (``dreamcraft_jax.render`` / ``dreamcraft_jax.fields``)
with the same signature, a ``custom_vjp`` and a CPU interpret-mode test. Until then the renderer uses the
pure-jnp path only (``kernels.backend = "xla"``).
"""

AVAILABLE_KERNELS: tuple[str, ...] = ()
