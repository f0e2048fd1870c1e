"""Volume rendering, pure jnp: occupancy grid, fixed-budget marching, packed compositing, shading.

This is the first-class reference path (the Pallas kernels of ``dreamcraft_jax.kernels`` accelerate it with the
same contracts; ``RenderSpec.backend`` picks the marching, from the run's ``KernelSpec``). No array shape depends on
data: samples live in fixed-size *packed* arrays with a validity mask. The data types and the jnp passes the kernels
share (spec, grid, samples, marching, compositing) live in :mod:`dreamcraft_jax.render.samples`, which imports no
kernel, and are re-exported here.

Packed samples (:class:`Samples`): ``M`` slots sorted by ray; slot k holds ray ``ray_idx[k]`` and the interval
``[t0[k], t1[k]]``; ``valid[k]`` says whether it is a real sample. Invalid slots carry ``ray_idx = n_rays`` (one
past the last ray) so sortedness holds and segment sums drop them.

Marching (nerfacc ``OccGridEstimator.sampling`` semantics): uniform steps ``dt`` from the ray's entry into the box
[-r, r]^3 (start jittered by U(0, dt) per ray when stratified), an interval is a candidate when its midpoint lies
in an occupied cell; candidates are compacted into a budget of ``M1`` slots. With ``alpha_threshold > 0`` or
``early_stop_eps > 0`` a second pass evaluates density (no gradient), drops samples with alpha below the threshold
or transmittance below ``early_stop_eps`` and compacts again into ``M2`` slots. Over a budget no ray loses all its
samples: the march samples rays with many candidates coarser (every k-th candidate, its interval k steps long),
the second pass keeps the first m samples of every ray; the stats count the candidates over the budget as overflow.

Compositing: alpha_i = 1 - exp(-sigma_i dt_i); T_i = exp(-sum_{j<i} sigma_j dt_j) (exclusive *segmented* cumsum,
never a cumulative product); w_i = T_i alpha_i; rgb = sum w c, opacity = sum w, depth = sum w t_mid; the image is
rgb + background * (1 - opacity).

Occupancy grid (nerfacc semantics): a G^3 grid (cell index x + y G + z G^2, x fastest) of EMA occupancies and a
binary mask. Every ``update_every`` steps: during the first ``warmup_steps`` all cells, afterwards G^3/4 uniformly
random cells plus G^3/4 cells drawn from the occupied ones, are evaluated at a jittered point of the cell;
occ = sigma(x) * dt; occs = max(occs * decay, occ); binary = occs > min(mean(occs), threshold). Where a cell is
drawn twice in one update it takes the larger value (nerfacc keeps the last write; the difference is immaterial).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dreamcraft_jax.kernels import march as march_kernel
from dreamcraft_jax.render.samples import (
    OccupancyGrid,
    RenderSpec,
    Samples,
    accumulate,
    cell_coords,
    cell_index,
    compact,
    compositing_weights,
    front_cap,
    init_occupancy_grid,
    is_occupied,
    march,
    merge_strides,
    ray_box_intersect,
    segment_starts,
    segmented_exclusive_cumsum,
    select,
)

# The data types and jnp passes the kernels share live in dreamcraft_jax.render.samples (which imports no kernel);
# re-exported here, the renderer's public namespace.
__all__ = ["SHADING_MODES", "RenderSpec", "OccupancyGrid", "Samples", "FieldFns", "init_occupancy_grid",
           "update_occupancy_grid", "cell_coords", "cell_index", "is_occupied", "ray_box_intersect", "compact",
           "merge_strides", "front_cap", "march", "select", "segment_starts", "segmented_exclusive_cumsum",
           "compositing_weights", "accumulate", "shade", "sample_rays", "render_rays"]

SHADING_MODES = ("albedo", "lambertian", "textureless")


# ----------------------------------------------------------------------------------------------------------
# occupancy grid update


def update_occupancy_grid(grid: OccupancyGrid, key, step, density_fn: Callable, spec: RenderSpec) -> OccupancyGrid:
    """One nerfacc-style update if ``step % update_every == 0`` (traced ``step`` ok); see the module doc.

    density_fn: (N, 3) world points -> (N,) sigma (evaluated without gradient).
    """
    if not spec.grid_prune:
        return grid
    n_cells = spec.grid_resolution ** 3
    coords = jnp.asarray(cell_coords(spec.grid_resolution), jnp.float32)
    step = jnp.asarray(step, jnp.int32)

    def evaluate(indices, k):
        jitter = jax.random.uniform(k, (indices.shape[0], 3), jnp.float32)
        unit = (coords[indices] + jitter) / spec.grid_resolution
        x = unit * (2.0 * spec.radius) - spec.radius
        occ = jax.lax.stop_gradient(density_fn(x)) * spec.step_size
        return _ema_update(grid, indices, occ, spec)

    def warmup(k):
        return evaluate(jnp.arange(n_cells, dtype=jnp.int32), k)

    def sampled(k):
        k_uniform, k_occupied, k_eval = jax.random.split(k, 3)
        n = max(n_cells // 4, 1)
        uniform = jax.random.randint(k_uniform, (n,), 0, n_cells, dtype=jnp.int32)
        occupied_count = jnp.sum(grid.binary)
        # Draw from the occupied cells; with none occupied fall back to uniform draws.
        p = jnp.where(occupied_count > 0, grid.binary.astype(jnp.float32), 1.0)
        occupied = jax.random.choice(k_occupied, n_cells, (n,), p=p / jnp.sum(p)).astype(jnp.int32)
        return evaluate(jnp.concatenate([uniform, occupied]), k_eval)

    def update(k):
        return jax.lax.cond(step < spec.grid_warmup_steps, warmup, sampled, k)

    return jax.lax.cond(step % spec.grid_update_every == 0, update, lambda k: grid, key)


def _ema_update(grid: OccupancyGrid, indices, occ, spec: RenderSpec) -> OccupancyGrid:
    fresh = jnp.full_like(grid.occs, -jnp.inf).at[indices].max(occ)
    touched = fresh > -jnp.inf
    occs = jnp.where(touched, jnp.maximum(grid.occs * spec.grid_ema_decay, fresh), grid.occs)
    threshold = jnp.minimum(jnp.mean(occs), spec.grid_threshold)
    return OccupancyGrid(occs=occs, binary=occs > threshold)


# ----------------------------------------------------------------------------------------------------------
# shading


def shade(albedo, normal, points, light_pos, mode: str, spec: RenderSpec):
    """Per-sample colour: albedo | lambertian albedo (ambient + diffuse max(0, n.l)) | textureless (albedo = 1)."""
    if mode == "albedo":
        return albedo
    light_dir = light_pos - points
    light_dir = light_dir / jnp.maximum(jnp.linalg.norm(light_dir, axis=-1, keepdims=True), 1e-12)
    lit = spec.ambient + spec.diffuse * jnp.maximum(jnp.sum(normal * light_dir, axis=-1, keepdims=True), 0.0)
    if mode == "lambertian":
        return albedo * lit
    if mode == "textureless":
        return jnp.broadcast_to(lit, albedo.shape)
    raise ValueError(f"unknown shading mode {mode!r}; expected one of {SHADING_MODES}")


# ----------------------------------------------------------------------------------------------------------
# rendering


@dataclasses.dataclass(frozen=True)
class FieldFns:
    """The field as closures over its params.

    density (N,3) -> (N,) (the pruning pass); radiance (N,3) -> (sigma (N,), albedo (N,3)); normal (N,3) -> (N,3).
    ``radiance_normal`` (optional): (N,3) -> (sigma, albedo, normal), the main pass when normals are needed, for a
    field that computes them together (forward differences reuse the sample's own sigma, as the official geometry
    does: 3 extra field evaluations, not 4; a fused kernel also encodes the sample once for all of them).
    A direction-dependent field (NeuS) sets ``radiance_dir`` instead of using ``radiance`` for the main pass:
    (points (N,3), dirs (N,3), dt (N,)) -> (sigma (N,), albedo (N,3), normal (N,3), aux dict of per-sample arrays).
    Each takes an optional keyword ``valid`` (N,) bool: the renderer passes the used slots of its packed sample
    buffer, and the field may skip the others (zero features, no gradient, no memory traffic).
    """

    density: Callable
    radiance: Callable | None
    normal: Callable
    radiance_dir: Callable | None = None
    radiance_normal: Callable | None = None


def sample_rays(rays_o, rays_d, grid, key, fns: FieldFns, spec: RenderSpec) -> tuple[Samples, dict]:
    """March and (optionally) prune by alpha / transmittance: the samples the field is evaluated on.

    Returns (samples, stats) with stats ``n_candidates`` (occupied intervals before the first budget),
    ``overflow`` (samples over either budget: merged into coarser ones by the march, cut from the back of their
    rays by the pruning re-pack).
    """
    n_rays = rays_o.shape[0]
    m1, m2 = spec.budgets(n_rays)
    if spec.backend == "pallas":
        samples = march_kernel.march_pallas(rays_o, rays_d, grid, key, spec, m1)
    else:
        samples = march(rays_o, rays_d, grid, key, spec, m1)
    if spec.alpha_threshold > 0 or spec.early_stop_eps > 0:
        ray = jnp.minimum(samples.ray_idx, n_rays - 1)
        points = rays_o[ray] + rays_d[ray] * samples.t_mid[:, None]
        sigma = jax.lax.stop_gradient(fns.density(points, valid=samples.valid))
        _, trans, alpha = compositing_weights(sigma, samples)
        keep = (alpha > spec.alpha_threshold) & (trans > spec.early_stop_eps)
        pruned = select(samples, keep, m2, n_rays)
        stats = {"n_candidates": samples.n_wanted, "overflow": samples.overflow + pruned.overflow}
        return pruned, stats
    return samples, {"n_candidates": samples.n_wanted, "overflow": samples.overflow}


def render_rays(rays_o: jax.Array, rays_d: jax.Array, grid: OccupancyGrid, key, fns: FieldFns,
                spec: RenderSpec, *, need_normals: bool = False, need_normal_perturb: bool = False,
                shading: str = "albedo", light_pos: jax.Array | None = None) -> dict:
    """Render R rays. rays_o, rays_d: (R, 3). Returns a dict:

    per ray: ``rgb`` (R, 3) composited over the background, ``opacity`` (R,), ``depth`` (R,) (expected t),
    ``normal`` (R, 3) = (n + 1) / 2 * opacity for display and losses (n the normalised weighted sum of normals;
    zeros when not requested), ``normal_world`` (R, 3);
    per sample (packed, M2 slots): ``weights``, ``valid``, ``ray_idx``, ``dirs`` (M2, 3), ``sample_normal`` and
    ``sample_normal_perturb`` (M2, 3) when requested, ``sample_<name>`` for every aux array of ``radiance_dir``;
    stats: ``n_samples`` (valid samples), ``n_candidates``, ``overflow`` (see :func:`sample_rays`).
    """
    n_rays = rays_o.shape[0]
    k_march, k_perturb = jax.random.split(key) if key is not None else (None, None)
    samples, stats = sample_rays(rays_o, rays_d, grid, k_march, fns, spec)
    ray = jnp.minimum(samples.ray_idx, n_rays - 1)
    dirs = rays_d[ray]
    points = rays_o[ray] + dirs * samples.t_mid[:, None]
    normal = None
    aux = {}
    want_normals = need_normals or shading != "albedo"
    if fns.radiance_dir is not None:
        sigma, albedo, normal, aux = fns.radiance_dir(points, dirs, samples.t1 - samples.t0, valid=samples.valid)
    elif want_normals and fns.radiance_normal is not None:
        sigma, albedo, normal = fns.radiance_normal(points, valid=samples.valid)
    else:
        sigma, albedo = fns.radiance(points, valid=samples.valid)
    weights, _, _ = compositing_weights(sigma, samples)
    out = {"weights": weights, "valid": samples.valid, "ray_idx": samples.ray_idx, "dirs": dirs,
           "n_samples": jnp.sum(samples.valid, dtype=jnp.int32), **stats,
           **{f"sample_{k}": v for k, v in aux.items()}}
    if want_normals:
        if normal is None:
            normal = fns.normal(points, valid=samples.valid)
        out["sample_normal"] = normal
    if need_normal_perturb:
        noise = spec.normal_perturb_std * jax.random.normal(k_perturb, points.shape, jnp.float32)
        out["sample_normal_perturb"] = fns.normal(points + noise, valid=samples.valid)
    if shading != "albedo":
        light = jnp.broadcast_to(light_pos, points.shape)
        color = shade(albedo, normal, points, light, shading, spec)
    else:
        color = albedo
    opacity = accumulate(weights, None, samples, n_rays)
    rgb_fg = accumulate(weights, color, samples, n_rays)
    background = jnp.asarray(spec.background, jnp.float32)
    out["rgb"] = rgb_fg + background * (1.0 - opacity[:, None])
    out["opacity"] = opacity
    out["depth"] = accumulate(weights, samples.t_mid, samples, n_rays)
    if normal is not None:
        n_sum = accumulate(weights, normal, samples, n_rays)
        n_world = n_sum / jnp.maximum(jnp.linalg.norm(n_sum, axis=-1, keepdims=True), 1e-12)
    else:
        n_world = jnp.zeros_like(rgb_fg)
    out["normal_world"] = n_world
    out["normal"] = (n_world + 1.0) * 0.5 * opacity[:, None]
    return out
