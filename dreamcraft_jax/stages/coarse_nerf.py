"""Stage 1a, coarse NeRF (dreamcraft3d-coarse-nerf): the volume stage with the NeRF field.

Field (:mod:`dreamcraft_jax.fields.nerf`): hash grid with a progressive band of levels, density MLP with the
blob bias, albedo MLP; one Adam over every param (``optimizer``). The occupancy grid starts fully occupied and is
re-estimated from the density. Everything else (views, losses, priors, sharding) is
:class:`~dreamcraft_jax.stages.volume_stage.VolumeStage`.
"""

from __future__ import annotations

import dataclasses

import optax

from dreamcraft_jax.fields import nerf
from dreamcraft_jax.kernels.spec import KernelSpec
from dreamcraft_jax.render import volume
from dreamcraft_jax.stages.base import register
from dreamcraft_jax.stages.volume_stage import VolumeStage, build_volume_stage


@dataclasses.dataclass(frozen=True)
class NerfField:
    """The coarse NeRF's field as a :class:`~dreamcraft_jax.stages.volume_stage.FieldModel`."""

    spec: nerf.NerfFieldSpec

    def optimizer(self, cfg) -> optax.GradientTransformation:
        o = cfg.optimizer
        return optax.adam(o.lr, b1=o.b1, b2=o.b2, eps=o.eps)

    def init_params(self, key, previous=None):
        del previous  # the first stage starts fresh
        return nerf.init_field(key, self.spec)

    def level_mask(self, step):
        return nerf.level_mask(step, self.spec)

    def field_fns(self, params, mask, step, render: volume.RenderSpec) -> volume.FieldFns:
        del step, render
        spec = self.spec
        return volume.FieldFns(
            density=lambda x, valid=None: nerf.density_no_grad(params, x, spec, mask, valid),
            radiance=lambda x, valid=None: nerf.density_and_albedo(params, x, spec, mask, valid),
            normal=lambda x, valid=None: nerf.normals(params, x, spec, mask, valid),
            radiance_normal=lambda x, valid=None: nerf.density_albedo_and_normals(params, x, spec, mask, valid),
        )

    def extra_terms(self, cfg, out: dict, is_ref: bool) -> dict:
        del cfg, out, is_ref
        return {}


def field_model(cfg, kernels: KernelSpec) -> NerfField:
    return NerfField(nerf.NerfFieldSpec.from_config(cfg.field, kernels))


@register("coarse_nerf")
def build(cfg, mesh, priors=None, prior_params=None) -> VolumeStage:
    kernels = KernelSpec.from_config(cfg.kernels)
    return build_volume_stage("coarse_nerf", field_model(cfg, kernels), cfg, mesh, priors, prior_params, kernels)
