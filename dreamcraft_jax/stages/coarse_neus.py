"""Stage 1b, coarse NeuS (dreamcraft3d-coarse-neus): the volume stage with the NeuS (SDF) field.

The field (:mod:`dreamcraft_jax.fields.neus`) starts from stage 1a's hash table and feature MLP with a fresh SDF
MLP biased to a sphere of radius 0.5; the learned variance sharpens the surface, and the cosine annealing ratio
follows the stage's step. Optimiser: Adam with per-group learning rates (encoding 0.01, SDF / feature MLPs and
variance 1e-3; eps 1e-15 from ``overrides.coarse_neus.optimizer``). The occupancy grid is stage 1a's (its EMA
occupancies and binary mask, as the official 1b loads ``estimator.occs`` / ``binaries``; fully occupied when there is
no 1a state) and keeps being updated with max(0.95 * occ, alpha), alpha the isotropic NeuS alpha of the SDF; the same
alpha prunes the marched samples (below 0.01, or past transmittance 1e-4), as the official NeuS renderer's
``alpha_fn``. Random views span the full ranges from step 0 (``progressive_until`` 0). Everything else is
:class:`~dreamcraft_jax.stages.volume_stage.VolumeStage`.
"""

from __future__ import annotations

import dataclasses

import optax

from dreamcraft_jax.config import schedule_is_zero
from dreamcraft_jax.fields import neus
from dreamcraft_jax.kernels.spec import KernelSpec
from dreamcraft_jax.render import volume
from dreamcraft_jax.stages.base import register
from dreamcraft_jax.stages.volume_stage import VolumeStage, build_volume_stage


@dataclasses.dataclass(frozen=True)
class NeusField:
    """The coarse NeuS's field as a :class:`~dreamcraft_jax.stages.volume_stage.FieldModel`."""

    spec: neus.NeusFieldSpec

    def optimizer(self, cfg) -> optax.GradientTransformation:
        o, n = cfg.optimizer, cfg.neus
        lrs = {"encoding": n.lr_encoding, "sdf_net": n.lr_sdf, "feature_net": n.lr_feature,
               "variance": n.lr_variance}
        groups = {name: optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps) for name, lr in lrs.items()}
        return optax.multi_transform(groups, {name: name for name in lrs})

    def init_params(self, key, previous=None):
        """Fresh SDF MLP + variance; hash table and feature MLP from ``previous`` (a coarse-NeRF TrainState)."""
        return neus.init_field(key, self.spec, None if previous is None else previous.params)

    def level_mask(self, step):
        return neus.level_mask(step, self.spec)

    def field_fns(self, params, mask, step, render: volume.RenderSpec) -> volume.FieldFns:
        spec, dt = self.spec, render.step_size

        def radiance_dir(points, dirs, dts, valid=None):
            sigma, albedo, normal, grad = neus.alpha_radiance(params, points, dirs, dts, step, spec, mask, valid)
            return sigma, albedo, normal, {"sdf_grad": grad}

        return volume.FieldFns(
            density=lambda x, valid=None: neus.isotropic_density(params, x, spec, dt, mask, valid),
            radiance=None,
            normal=lambda x, valid=None: neus.normals(params, x, spec, mask, valid),
            radiance_dir=radiance_dir,
        )

    def extra_terms(self, cfg, out: dict, is_ref: bool) -> dict:
        del is_ref
        if schedule_is_zero(cfg.loss.lambda_eikonal):
            return {}
        return {"eikonal": neus.eikonal(out["sample_sdf_grad"], out["valid"])}


def field_model(cfg, kernels: KernelSpec) -> NeusField:
    return NeusField(neus.NeusFieldSpec.from_config(cfg, kernels))


@register("coarse_neus")
def build(cfg, mesh, priors=None, prior_params=None) -> VolumeStage:
    kernels = KernelSpec.from_config(cfg.kernels)
    return build_volume_stage("coarse_neus", field_model(cfg, kernels), cfg, mesh, priors, prior_params, kernels)
