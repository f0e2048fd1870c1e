"""The coarse-NeuS field (stage 1b): hash grid -> SDF MLP and feature MLP, learned variance, NeuS alpha.

Params ``{"encoding": (P, F) table, "sdf_net": ..., "feature_net": ..., "variance": ()}``; the table and the
feature MLP are carried over from the coarse NeRF (same hash grid spec), the SDF MLP starts fresh.

sdf(x)    = sdf_net(enc(x)) + (|x| - r_s)      sphere bias: at init the surface is the sphere of radius r_s (0.5)
normal(x) = normalize(grad sdf), grad by central finite differences (eps 0.01) or autodiff; points outward
albedo(x) = sigmoid(feature_net(enc(x))[:3])
inv_s     = clip(exp(10 * variance), 1e-6, 1e6)       (variance starts at 0.3: inv_s = e^3 ~ 20)

NeuS alpha of an interval of length dt along a unit direction d (Wang et al. 2021, threestudio's ``get_alpha``),
with cos = <d, normal> and the cosine annealed from the half-cosine to the true one over training:

    iter_cos  = -(relu(-cos / 2 + 1/2) (1 - r) + relu(-cos) r),   r = min(1, step / cos_anneal_end_steps)
    sdf_prev  = sdf - iter_cos dt / 2,   sdf_next = sdf + iter_cos dt / 2
    alpha     = clip((sigmoid(sdf_prev inv_s) - sigmoid(sdf_next inv_s) + 1e-5)
                     / (sigmoid(sdf_prev inv_s) + 1e-5), 0, 1)

The renderer composites with T_i = prod_{j<i} (1 - alpha_j); it takes an effective density
sigma = -log(1 - alpha) / dt so that the NeRF compositing (T = exp(-sum sigma dt)) gives exactly those weights.
The occupancy grid is updated with the isotropic alpha (cos = -1, as threestudio's ``occ_eval_fn``) of a step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dreamcraft_jax.fields import hashgrid
from dreamcraft_jax.fields.mlp import MLP, init_mlp
from dreamcraft_jax.fields.nerf import (
    NORMAL_TYPES,
    NerfFieldSpec,
    albedo_of_encoding,
    encode_points,
    encoding_and_fd_gradient,
    finite_difference_gradient,
    fused_finite_difference_gradient,
    scalar_mlp,
    unit_coordinates,
    uses_fd_kernel,
)
from dreamcraft_jax.kernels.spec import REFERENCE_KERNELS, KernelSpec

ALPHA_MAX = 1.0 - 1e-6  # keeps -log(1 - alpha) finite


@dataclasses.dataclass(frozen=True)
class NeusFieldSpec:
    """Static description; the hash grid, MLP sizes and progressive band come from the NeRF field spec."""

    base: NerfFieldSpec
    sphere_radius: float = 0.5
    variance_init: float = 0.3
    cos_anneal_end_steps: int = 5000
    normal_type: str = "finite_difference"
    finite_difference_eps: float = 0.01
    progressive_band: bool = False  # the official NeuS encoding is a plain HashGrid: all levels on

    @classmethod
    def from_config(cls, cfg, kernels: KernelSpec = REFERENCE_KERNELS) -> NeusFieldSpec:
        """cfg: the whole config (``field`` for the shared parts, ``neus`` for these); kernels: the run's kernel
        choices, as :meth:`NerfFieldSpec.from_config` (``fused_density`` unused: NeuS has no fused density pass)."""
        if cfg.neus.normal_type not in NORMAL_TYPES:
            raise ValueError(f"neus.normal_type must be one of {NORMAL_TYPES}, got {cfg.neus.normal_type!r}")
        base = NerfFieldSpec.from_config(cfg.field, kernels)
        return cls(base=base, sphere_radius=float(cfg.neus.sphere_radius),
                   variance_init=float(cfg.neus.variance_init),
                   cos_anneal_end_steps=int(cfg.neus.cos_anneal_end_steps), normal_type=cfg.neus.normal_type,
                   finite_difference_eps=float(cfg.field.finite_difference_eps),
                   progressive_band=bool(cfg.neus.get("progressive_band", False)))

    @property
    def grid(self) -> hashgrid.HashGridSpec:
        return self.base.grid

    @property
    def radius(self) -> float:
        return self.base.radius

    @property
    def sdf_net(self) -> MLP:
        return MLP(self.base.mlp_width, self.base.mlp_hidden_layers, 1)


def init_field(key, spec: NeusFieldSpec, nerf_params: dict | None = None) -> dict:
    """Fresh SDF MLP and variance; the table and feature MLP from ``nerf_params`` (stage 1a) when given."""
    k_grid, k_sdf, k_feature = jax.random.split(key, 3)
    in_dim = spec.grid.output_dim
    if nerf_params is None:
        encoding = hashgrid.init_hashgrid(k_grid, spec.grid)
        feature = init_mlp(k_feature, spec.base.feature_net, in_dim)
    else:
        encoding, feature = nerf_params["encoding"], nerf_params["feature_net"]
        if encoding.shape != (spec.grid.total_params, spec.grid.n_features_per_level):
            raise ValueError(f"the coarse NeRF's hash table {encoding.shape} does not match this grid "
                             f"{(spec.grid.total_params, spec.grid.n_features_per_level)}: keep field.hashgrid equal")
    return {"encoding": jnp.asarray(encoding), "sdf_net": init_mlp(k_sdf, spec.sdf_net, in_dim),
            "feature_net": jax.tree.map(jnp.asarray, feature),
            "variance": jnp.asarray(spec.variance_init, jnp.float32)}


def level_mask(step, spec: NeusFieldSpec) -> jax.Array:
    """(L,) level mask at ``step``: all ones (the official plain HashGrid) unless ``progressive_band``."""
    b = spec.base
    if not spec.progressive_band:
        return jnp.ones((spec.grid.n_levels,), jnp.float32)
    return hashgrid.progressive_level_mask(step, b.grid, b.progressive_start_level, b.progressive_start_step,
                                           b.progressive_update_steps)


def _encode(params: dict, x: jax.Array, spec: NeusFieldSpec, mask, valid=None) -> jax.Array:
    return encode_points(params["encoding"], unit_coordinates(x, spec.base), spec.grid, mask, backend=spec.base.backend,
                         remat=spec.base.remat_encoding, need_x_grad=spec.normal_type == "analytic", valid=valid,
                         backward=spec.base.hashgrid_backward, per_level=spec.base.encoder_per_level)


def sdf(params: dict, x: jax.Array, spec: NeusFieldSpec, mask=None, valid=None) -> jax.Array:
    """(N, 3) world points -> (N,) signed distance (negative inside); ``valid`` as in ``nerf.encode_points``."""
    return _sdf_from_encoding(params, _encode(params, x, spec, mask, valid), x, spec, valid)


def _sdf_from_encoding(params: dict, enc: jax.Array, x: jax.Array, spec: NeusFieldSpec, valid=None) -> jax.Array:
    return scalar_mlp(spec.sdf_net, params["sdf_net"], enc, spec.base, valid) + (
        jnp.linalg.norm(x, axis=-1) - spec.sphere_radius)


def sdf_gradient(params: dict, x: jax.Array, spec: NeusFieldSpec, mask=None, valid=None, center=None) -> jax.Array:
    """(N, 3) -> (N, 3) grad sdf (finite differences with step eps, or autodiff). ``center``: the sdf at x (N,)
    when the caller has it (forward differences reuse it, as the official geometry does)."""
    if spec.normal_type == "analytic":
        return jax.grad(lambda p: jnp.sum(sdf(params, p, spec, mask, valid)))(x)
    if uses_fd_kernel(spec.base, spec.normal_type):
        return fused_finite_difference_gradient(params["encoding"], x, spec.base,
                                                lambda enc, p: _sdf_from_encoding(params, enc, p, spec, valid),
                                                mask, valid, spec.normal_type, center)
    return finite_difference_gradient(lambda p, v=None: sdf(params, p, spec, mask, v), x,
                                      spec.finite_difference_eps, spec.radius, valid, spec.normal_type, center)


def normals(params: dict, x: jax.Array, spec: NeusFieldSpec, mask=None, valid=None, center=None) -> jax.Array:
    g = sdf_gradient(params, x, spec, mask, valid, center)
    return g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-12)


def inv_s(params: dict) -> jax.Array:
    return jnp.clip(jnp.exp(10.0 * params["variance"]), 1e-6, 1e6)


def cos_anneal_ratio(step, spec: NeusFieldSpec) -> jax.Array:
    if spec.cos_anneal_end_steps <= 0:
        return jnp.asarray(1.0, jnp.float32)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / spec.cos_anneal_end_steps)


def neus_alpha(sdf_values, cos, dt, inv_std, anneal_ratio) -> jax.Array:
    """Module-doc formula; all inputs broadcast to (N,)."""
    iter_cos = -(jax.nn.relu(-cos * 0.5 + 0.5) * (1.0 - anneal_ratio) + jax.nn.relu(-cos) * anneal_ratio)
    prev_cdf = jax.nn.sigmoid((sdf_values - iter_cos * dt * 0.5) * inv_std)
    next_cdf = jax.nn.sigmoid((sdf_values + iter_cos * dt * 0.5) * inv_std)
    return jnp.clip((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5), 0.0, 1.0)


def alpha_to_density(alpha, dt) -> jax.Array:
    """Effective density -log(1 - alpha) / dt (alpha clipped below 1)."""
    return -jnp.log1p(-jnp.minimum(alpha, ALPHA_MAX)) / dt


def isotropic_density(params: dict, x: jax.Array, spec: NeusFieldSpec, dt: float, mask=None,
                      valid=None) -> jax.Array:
    """(N, 3) -> (N,) the density of the occupancy grid: alpha with cos = -1 (fully facing), no annealing."""
    alpha = neus_alpha(sdf(params, x, spec, mask, valid), -1.0, dt, inv_s(params), 1.0)
    return alpha_to_density(alpha, dt)


def alpha_radiance(params: dict, x: jax.Array, dirs: jax.Array, dt: jax.Array, step, spec: NeusFieldSpec,
                   mask=None, valid=None):
    """(N, 3) points, (N, 3) unit dirs, (N,) interval lengths -> (sigma_eff (N,), albedo (N, 3), normal (N, 3)).

    One encoding serves the SDF, the feature MLP and (analytic normals) the gradient.
    """
    if uses_fd_kernel(spec.base, spec.normal_type):
        # x's own encoding from the finite-difference kernel's call (its own corners): no separate encoder.
        sdf_of = lambda e, p: _sdf_from_encoding(params, e, p, spec, valid)  # noqa: E731
        enc, sdf_values, grad = encoding_and_fd_gradient(params["encoding"], x, spec.base, sdf_of, mask, valid,
                                                         spec.normal_type)
    else:
        enc = _encode(params, x, spec, mask, valid)
        sdf_values = _sdf_from_encoding(params, enc, x, spec, valid)
        grad = sdf_gradient(params, x, spec, mask, valid, center=sdf_values)
    normal = grad / jnp.maximum(jnp.linalg.norm(grad, axis=-1, keepdims=True), 1e-12)
    cos = jnp.sum(dirs * normal, axis=-1)
    alpha = neus_alpha(sdf_values, cos, dt, inv_s(params), cos_anneal_ratio(step, spec))
    albedo = albedo_of_encoding(params, enc, spec.base, valid)
    return alpha_to_density(alpha, dt), albedo, normal, grad


def eikonal(grad: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over valid samples of (|grad sdf| - 1)^2."""
    v = valid.astype(jnp.float32)
    return jnp.sum(jnp.square(jnp.linalg.norm(grad, axis=-1) - 1.0) * v) / jnp.maximum(jnp.sum(v), 1.0)
