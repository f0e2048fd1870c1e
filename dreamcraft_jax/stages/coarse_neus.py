"""Stage 1b, coarse NeuS (dreamcraft3d-coarse-neus): the coarse NeRF's step with an SDF field.

Everything but the field is :class:`~dreamcraft_jax.stages.coarse_nerf.CoarseNerf`: views, losses, priors,
sharding, NaN guard. The field (:mod:`dreamcraft_jax.fields.neus`) starts from stage 1a's hash table and feature
MLP with a fresh SDF MLP biased to a sphere of radius 0.5; the learned variance sharpens the surface, and the
cosine annealing ratio follows the stage's step. Optimiser: Adam with per-group learning rates (encoding 0.01,
SDF / feature MLPs and variance 1e-3; eps 1e-15 from ``overrides.coarse_neus.optimizer``). The occupancy grid
starts fully occupied and is re-estimated from the SDF (isotropic NeuS alpha) during the warm-up; the same alpha
prunes the marched samples (below 0.01, or past transmittance 1e-4), as the official NeuS renderer's ``alpha_fn``.
"""

from __future__ import annotations

import dataclasses

import optax

from dreamcraft_jax.config import schedule_is_zero
from dreamcraft_jax.fields import neus
from dreamcraft_jax.render import volume
from dreamcraft_jax.stages.coarse_nerf import CoarseNerf


@dataclasses.dataclass(frozen=True)
class CoarseNeus(CoarseNerf):
    name = "coarse_neus"

    @staticmethod
    def field_spec(cfg, backend: str = "xla"):
        return neus.NeusFieldSpec.from_config(cfg, backend, cfg.kernels.hashgrid_backward,
                                              cfg.kernels.fused_finite_difference, cfg.kernels.fused_mlp,
                                              cfg.kernels.encoder_per_level, cfg.kernels.fused_mlp_precision,
                                              cfg.kernels.fd_columns)

    @property
    def optimizer(self) -> optax.GradientTransformation:
        o, n = self.cfg.optimizer, self.cfg.neus
        lrs = {"encoding": n.lr_encoding, "sdf_net": n.lr_sdf, "feature_net": n.lr_feature,
               "variance": n.lr_variance}
        groups = {name: optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps) for name, lr in lrs.items()}
        return optax.multi_transform(groups, {name: name for name in lrs})

    def init_params(self, key, previous=None):
        """Fresh SDF MLP + variance; hash table and feature MLP from ``previous`` (a coarse-NeRF TrainState)."""
        return neus.init_field(key, self.field, None if previous is None else previous.params)

    def level_mask(self, step):
        return neus.level_mask(step, self.field)

    def field_fns(self, params, mask, step=None) -> volume.FieldFns:
        spec, dt = self.field, self.render.step_size

        def radiance_dir(points, dirs, dts, valid=None):
            sigma, albedo, normal, grad = neus.alpha_radiance(params, points, dirs, dts, step, spec, mask, valid)
            return sigma, albedo, normal, {"sdf_grad": grad}

        return volume.FieldFns(
            density=lambda x, valid=None: neus.isotropic_density(params, x, spec, dt, mask, valid),
            radiance=None,
            normal=lambda x, valid=None: neus.normals(params, x, spec, mask, valid),
            radiance_dir=radiance_dir,
        )

    def extra_terms(self, out: dict, is_ref: bool) -> dict:
        if schedule_is_zero(self.cfg.loss.lambda_eikonal):
            return {}
        return {"eikonal": neus.eikonal(out["sample_sdf_grad"], out["valid"])}
