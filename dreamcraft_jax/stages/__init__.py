"""The stages of a run, by name (:func:`dreamcraft_jax.stages.base.build_stage`); importing this package
registers them. A full run's order: ``dreamcraft_jax.config.STAGES``."""

from dreamcraft_jax.stages import coarse_nerf, coarse_neus, geometry  # noqa: F401  (register)
