"""The renderer's data types and pure-jnp reference passes that the Pallas kernels share: imports no kernel.

:class:`RenderSpec` (static settings), :class:`OccupancyGrid`, :class:`Samples` (packed samples), marching
(:func:`march`, :func:`select`) and compositing (:func:`compositing_weights`, :func:`accumulate`). The kernels
(:mod:`dreamcraft_jax.kernels.march`, :mod:`dreamcraft_jax.kernels.composite`) import these as their contracts
and references; :mod:`dreamcraft_jax.render.volume` imports the kernels and re-exports everything here, so the
import graph has no cycle.

Packed samples (:class:`Samples`): ``M`` slots sorted by ray; slot k holds ray ``ray_idx[k]`` and the interval
``[t0[k], t1[k]]``; ``valid[k]`` says whether it is a real sample. Invalid slots carry ``ray_idx = n_rays`` (one
past the last ray) so sortedness holds and segment sums drop them.

Marching (nerfacc ``OccGridEstimator.sampling`` semantics): uniform steps ``dt`` from the ray's entry into the box
[-r, r]^3 (start jittered by U(0, dt) per ray when stratified), an interval is a candidate when its midpoint lies
in an occupied cell; candidates are compacted into a budget of ``M1`` slots. Over a budget no ray loses all its
samples: the march samples rays with many candidates coarser (every k-th candidate, its interval k steps long),
the pruning re-pack (:func:`select`) keeps the first m samples of every ray.

Compositing: alpha_i = 1 - exp(-sigma_i dt_i); T_i = exp(-sum_{j<i} sigma_j dt_j) (exclusive *segmented* cumsum,
never a cumulative product); w_i = T_i alpha_i; rgb = sum w c, opacity = sum w, depth = sum w t_mid.

Occupancy grid (nerfacc semantics): a G^3 grid (cell index x + y G + z G^2, x fastest) of EMA occupancies and a
binary mask (its update is :func:`dreamcraft_jax.render.volume.update_occupancy_grid`).
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.kernels.spec import REFERENCE_KERNELS, KernelSpec


@dataclasses.dataclass(frozen=True)
class RenderSpec:
    """Static renderer settings; build with :meth:`from_config` outside jit."""

    radius: float = 2.0
    num_samples_per_ray: int = 512  # defines the step: dt = 1.732 * 2 r / num_samples_per_ray (official)
    candidate_samples_per_ray: float = 64.0  # budget M1 = ceil(n_rays * this) after occupancy skipping
    samples_per_ray: float = 32.0  # budget M2 = ceil(n_rays * this) after alpha / transmittance pruning
    alpha_threshold: float = 0.01
    early_stop_eps: float = 1e-4
    stratified: bool = True
    near_plane: float = 0.0
    grid_resolution: int = 32
    grid_prune: bool = True
    grid_update_every: int = 16
    grid_warmup_steps: int = 256
    grid_ema_decay: float = 0.95
    grid_threshold: float = 0.01
    background: tuple = (1.0, 1.0, 1.0)
    normal_perturb_std: float = 0.01
    ambient: float = 0.1
    diffuse: float = 0.9
    backend: str = "xla"  # marching: "xla" (jnp) or "pallas" (dreamcraft_jax.kernels.march); KernelSpec.backend

    @classmethod
    def from_config(cls, cfg, radius: float, kernels: KernelSpec = REFERENCE_KERNELS) -> RenderSpec:
        """cfg: the ``render`` ConfigDict (see dreamcraft_jax/config.py); kernels: the run's kernel choices (the
        marching backend); None means ``KernelSpec()``, the jnp reference."""
        kernels = REFERENCE_KERNELS if kernels is None else kernels
        return cls(
            backend=kernels.backend,
            radius=float(radius),
            num_samples_per_ray=int(cfg.num_samples_per_ray),
            candidate_samples_per_ray=float(cfg.candidate_samples_per_ray),
            samples_per_ray=float(cfg.samples_per_ray),
            alpha_threshold=float(cfg.alpha_threshold),
            early_stop_eps=float(cfg.early_stop_eps),
            stratified=bool(cfg.stratified),
            near_plane=float(cfg.near_plane),
            grid_resolution=int(cfg.grid.resolution),
            grid_prune=bool(cfg.grid.prune),
            grid_update_every=int(cfg.grid.update_every),
            grid_warmup_steps=int(cfg.grid.warmup_steps),
            grid_ema_decay=float(cfg.grid.ema_decay),
            grid_threshold=float(cfg.grid.threshold),
            background=tuple(float(c) for c in cfg.background),
            normal_perturb_std=float(cfg.normal_perturb_std),
            ambient=float(cfg.ambient),
            diffuse=float(cfg.diffuse),
        )

    @property
    def step_size(self) -> float:
        return 1.732 * 2.0 * self.radius / self.num_samples_per_ray

    @property
    def max_steps_per_ray(self) -> int:
        """Candidate steps along one ray: enough to cross the box diagonal 2 sqrt(3) r."""
        return int(math.ceil(2.0 * math.sqrt(3.0) * self.radius / self.step_size)) + 1

    def budgets(self, n_rays: int) -> tuple[int, int]:
        """(M1, M2) packed sizes for ``n_rays`` rays, never above the dense candidate count."""
        dense = n_rays * self.max_steps_per_ray
        m1 = min(dense, int(math.ceil(n_rays * self.candidate_samples_per_ray)))
        m2 = min(m1, int(math.ceil(n_rays * self.samples_per_ray)))
        return m1, m2

    def replace(self, **kw) -> RenderSpec:
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------------------
# occupancy grid


@flax.struct.dataclass
class OccupancyGrid:
    """occs: (G^3,) float32 EMA occupancy; binary: (G^3,) bool occupied mask."""

    occs: jax.Array
    binary: jax.Array


def init_occupancy_grid(spec: RenderSpec) -> OccupancyGrid:
    """All cells start occupied (so the first renders see the whole box) with zero EMA."""
    n = spec.grid_resolution ** 3
    return OccupancyGrid(occs=jnp.zeros((n,), jnp.float32), binary=jnp.ones((n,), bool))


def cell_coords(resolution: int) -> np.ndarray:
    """(G^3, 3) integer cell coordinates in index order (x fastest)."""
    g = np.arange(resolution)
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=-1).astype(np.int32)


def cell_index(points: jax.Array, spec: RenderSpec) -> tuple[jax.Array, jax.Array]:
    """(..., 3) world points -> (cell index (...) int32, inside-the-box mask (...))."""
    g = spec.grid_resolution
    unit = (points + spec.radius) / (2.0 * spec.radius)
    inside = jnp.all((unit >= 0.0) & (unit <= 1.0), axis=-1)
    c = jnp.clip(jnp.floor(unit * g).astype(jnp.int32), 0, g - 1)
    return c[..., 0] + c[..., 1] * g + c[..., 2] * (g * g), inside


def is_occupied(grid: OccupancyGrid, points: jax.Array, spec: RenderSpec) -> jax.Array:
    idx, inside = cell_index(points, spec)
    return inside & grid.binary[idx]


# ----------------------------------------------------------------------------------------------------------
# marching


@flax.struct.dataclass
class Samples:
    """Packed samples, M slots sorted by ray (see the module doc).

    ray_idx (M,) int32 (n_rays on invalid slots); t0, t1 (M,) float32; valid (M,) bool;
    n_wanted () int32: how many samples wanted a slot before any merging / capping (overflow = max(0, n_wanted - M):
    how many were over the budget).
    """

    ray_idx: jax.Array
    t0: jax.Array
    t1: jax.Array
    valid: jax.Array
    n_wanted: jax.Array

    @property
    def t_mid(self) -> jax.Array:
        return 0.5 * (self.t0 + self.t1)

    @property
    def overflow(self) -> jax.Array:
        return jnp.maximum(self.n_wanted - self.valid.shape[0], 0)


def ray_box_intersect(rays_o: jax.Array, rays_d: jax.Array, radius: float):
    """Slab test against [-r, r]^3: (R, 3), (R, 3) -> (t_near (R,), t_far (R,)); a miss has t_far <= t_near."""
    inv = 1.0 / jnp.where(jnp.abs(rays_d) < 1e-10, jnp.where(rays_d < 0, -1e-10, 1e-10), rays_d)
    ta = (-radius - rays_o) * inv
    tb = (radius - rays_o) * inv
    t_near = jnp.max(jnp.minimum(ta, tb), axis=-1)
    t_far = jnp.min(jnp.maximum(ta, tb), axis=-1)
    return t_near, t_far


def compact(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Positions of the first ``size`` True entries of a flat mask, in order.

    Returns (positions (size,) int32 with 0 on empty slots, valid (size,) bool, count () int32 of all True).
    """
    count = jnp.sum(mask, dtype=jnp.int32)
    (pos,) = jnp.nonzero(mask, size=size, fill_value=0)
    valid = jnp.arange(size, dtype=jnp.int32) < count
    return pos.astype(jnp.int32), valid, count


def _largest_cap(kept, budget: int, max_cap: int, counts: jax.Array) -> jax.Array:
    """Largest integer m in [1, max_cap] with ``kept(m) <= budget`` (``kept`` non-decreasing in m); 1 if none.

    Bisection with a static number of steps (max_cap is static: the steps per ray), a few reductions over R,
    skipped at run time when everything fits (the usual case: the cap is then max_cap).
    """
    zero = jnp.max(counts) * 0  # varies over the same mesh axes as counts (inside shard_map)
    top = zero + max(int(max_cap), 1)

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi + 1) // 2
        fits = kept(mid) <= budget
        return jnp.where(fits, mid, lo), jnp.where(fits, hi, mid - 1)

    def bisect(_):
        return jax.lax.fori_loop(0, int(np.ceil(np.log2(max(int(max_cap), 1) + 1))) + 1, body, (zero + 1, top))[0]

    return jax.lax.cond(kept(top) <= budget, lambda _: top, bisect, None)


def merge_strides(counts: jax.Array, budget: int, max_count: int) -> jax.Array:
    """(R,) candidates per ray -> (R,) int32 stride k_r >= 1: ray r keeps every k_r-th candidate.

    ``k_r = ceil(c_r / m)`` for the largest cap m with ``sum_r ceil(c_r / k_r) <= budget``: rays with at most m
    candidates keep all of them (k = 1); longer rays are sampled coarser, each kept sample standing for the k
    candidates of its group (its interval k dt long). All ones when everything fits.
    """
    counts = counts.astype(jnp.int32)

    def strides(m):
        return jnp.maximum((counts + m - 1) // m, 1)

    def kept(m):
        k = strides(m)
        return jnp.sum((counts + k - 1) // k)

    return strides(_largest_cap(kept, budget, max_count, counts))


def front_cap(counts: jax.Array, budget: int, max_count: int) -> jax.Array:
    """() int32: the largest m with ``sum_r min(c_r, m) <= budget``; every ray keeps its first m samples."""
    counts = counts.astype(jnp.int32)
    return _largest_cap(lambda m: jnp.sum(jnp.minimum(counts, m)), budget, max_count, counts)


def march(rays_o: jax.Array, rays_d: jax.Array, grid: OccupancyGrid, key, spec: RenderSpec,
          budget: int) -> Samples:
    """Occupancy-grid marching into ``budget`` packed slots. rays_o, rays_d: (R, 3), rays_d unit length.

    Over budget, rays with many candidates are sampled coarser (:func:`merge_strides`): the g-th kept sample of
    ray r starts at its group's first candidate and is ``min(k_r, c_r - g k_r) dt`` long, so every ray keeps
    samples over its whole occupied length (what a fixed budget must not do is drop the last rays' samples).
    """
    n_rays = rays_o.shape[0]
    n_steps = spec.max_steps_per_ray
    dt = spec.step_size
    t_near, t_far = ray_box_intersect(rays_o, rays_d, spec.radius)
    t_near = jnp.maximum(t_near, spec.near_plane)
    hit = t_far > t_near
    if spec.stratified and key is not None:
        t_near = t_near + jax.random.uniform(key, (n_rays,), jnp.float32) * dt
    i = jnp.arange(n_steps, dtype=jnp.float32)
    t0 = t_near[:, None] + i[None, :] * dt  # (R, S)
    t_mid = t0 + 0.5 * dt
    inside = hit[:, None] & (t0 + dt <= t_far[:, None])
    mid_points = rays_o[:, None, :] + rays_d[:, None, :] * t_mid[..., None]
    occupied = is_occupied(grid, mid_points, spec) if spec.grid_prune else jnp.ones_like(inside)
    take = inside & occupied
    counts = jnp.sum(take, axis=1, dtype=jnp.int32)
    stride = merge_strides(counts, budget, n_steps)
    rank = jnp.cumsum(take, axis=1, dtype=jnp.int32) - 1  # index of the candidate along its ray
    keep = take & (rank % stride[:, None] == 0)
    pos, valid, _ = compact(keep.reshape(-1), budget)
    ray = pos // n_steps
    t0_packed = t_near[ray] + (pos % n_steps).astype(jnp.float32) * dt
    group = jnp.where(valid, jnp.minimum(stride[ray], counts[ray] - rank.reshape(-1)[pos]), 1)
    return Samples(ray_idx=jnp.where(valid, ray, n_rays), t0=t0_packed,
                   t1=t0_packed + group.astype(jnp.float32) * dt, valid=valid, n_wanted=jnp.sum(counts))


def select(samples: Samples, keep: jax.Array, budget: int, n_rays: int) -> Samples:
    """Re-pack the kept samples (keep (M,) bool, implies valid) into ``budget`` slots, order preserved.

    Over budget every ray keeps its first m kept samples (:func:`front_cap`; the front of a ray carries the
    weight once the transmittance pruning has cut its back), never whole rays lost.
    """
    keep = keep & samples.valid
    counts = jax.ops.segment_sum(keep.astype(jnp.int32), samples.ray_idx, num_segments=n_rays + 1,
                                 indices_are_sorted=True)[:n_rays]
    first = jnp.concatenate([jnp.cumsum(counts) - counts, jnp.zeros((1,), jnp.int32)])  # ray n_rays: padding
    rank = jnp.cumsum(keep, dtype=jnp.int32) - 1 - first[samples.ray_idx]
    keep = keep & (rank < front_cap(counts, budget, samples.valid.shape[0]))
    pos, valid, _ = compact(keep, budget)
    return Samples(ray_idx=jnp.where(valid, samples.ray_idx[pos], n_rays), t0=samples.t0[pos],
                   t1=samples.t1[pos], valid=valid, n_wanted=jnp.sum(counts))


# ----------------------------------------------------------------------------------------------------------
# compositing


def segment_starts(ray_idx: jax.Array) -> jax.Array:
    """(M,) sorted ray ids -> (M,) bool, True at the first slot of each ray."""
    return jnp.concatenate([jnp.ones((1,), bool), ray_idx[1:] != ray_idx[:-1]])


def segmented_exclusive_cumsum(x: jax.Array, starts: jax.Array) -> jax.Array:
    """Exclusive cumsum of x (M,) restarting at every True of ``starts`` (M,); parallel associative scan."""

    def combine(a, b):
        a_start, a_sum = a
        b_start, b_sum = b
        return a_start | b_start, jnp.where(b_start, b_sum, a_sum + b_sum)

    _, inclusive = jax.lax.associative_scan(combine, (starts, x))
    return inclusive - x


def compositing_weights(sigma: jax.Array, samples: Samples):
    """(M,) densities -> (weights, transmittance, alpha), each (M,); invalid slots get 0 weight."""
    dt = samples.t1 - samples.t0
    tau = jnp.where(samples.valid, sigma * dt, 0.0)
    trans = jnp.exp(-segmented_exclusive_cumsum(tau, segment_starts(samples.ray_idx)))
    alpha = 1.0 - jnp.exp(-tau)
    return trans * alpha, trans, alpha


def accumulate(weights: jax.Array, values: jax.Array | None, samples: Samples, n_rays: int) -> jax.Array:
    """sum over each ray of w (and w * values): (M,), (M, C) -> (R,) or (R, C)."""
    if values is None:
        v = weights
    else:
        v = weights.reshape(weights.shape + (1,) * (values.ndim - 1)) * values
    return jax.ops.segment_sum(v, samples.ray_idx, num_segments=n_rays, indices_are_sorted=True)
