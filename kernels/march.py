"""Occupancy-grid ray marching with compaction: a Pallas (Triton) kernel pair beside the jnp reference.

Contract (identical to :func:`dreamcraft_jax.render.samples.march`, also ``volume.march``): rays_o, rays_d (R, 3)
unit directions, ``grid`` an :class:`OccupancyGrid`, ``budget`` M packed slots. Ray r walks
``S = spec.max_steps_per_ray`` steps ``t0 = t_start[r] + s dt`` (``t_start`` the box entry, clamped to the near
plane, jittered by U(0,1) dt when stratified); step s is a sample when ``t0 + dt <= t_far[r]`` and its midpoint's
cell is inside the box and occupied. Samples are packed ray-major, step-minor into the first slots; ``n_wanted``
counts all of them. Over ``budget``, ray r keeps every k_r-th of its candidates (:func:`samples.merge_strides`),
each interval k_r steps long (shorter for the last of the ray), so no ray loses its samples.

The reference materialises an (R, S) mask (S ~ 514 at 512 samples/ray) and compacts it with ``jnp.nonzero``.
Here:

1. ``_count_kernel`` (one lane per ray, ``block_rays`` rays per program): walk the steps, count samples per ray.
2. In jnp (R elements): the strides ``k_r`` (all 1 when the budget holds every candidate), the kept counts
   ``ceil(c_r / k_r)`` and ``offsets = exclusive_cumsum(kept)``: the first slot of each ray.
3. ``_write_kernel``: walk again and scatter (ray, step) of the j-th candidate of ray r into slot
   ``offsets[r] + j / k_r`` when ``j % k_r == 0`` and the slot is below the budget (a masked scatter store).

Each program loops only to the largest step count of its rays (``floor((t_far - t_start) / dt) + 2``, an upper
bound; the exact ``t0 + dt <= t_far`` test decides), and rays whose first slot is past the budget skip the
second walk. Every float op (t0, midpoint, cell index) is written exactly as the reference writes it, so in
interpret mode (XLA CPU) the output equals the reference bit for bit. On GPU, Triton may contract ``o + d t`` to
an FMA where XLA does not, which can move a midpoint lying within an ulp of a cell face to the neighbouring cell:
the sample set may then differ from the reference in such rare boundary cases (both are valid marchings).

t0 is formed in jnp from (ray, step) with the reference's own tail, ``pos = ray S + step;
t0 = t_start[pos // S] + (pos % S) dt``: XLA contracts ``a + b c`` to an FMA in some fusions and not in others,
and only the very same expression gave the same rounding (an equivalent formula differed by an ulp on XLA CPU).
Invalid slots (past ``min(n_wanted, budget)``) are normalised to what the reference returns: ray_idx = n_rays,
t0 = t_start[0] (the reference's fill position 0 is ray 0, step 0), t1 = t0 + dt.

``select`` (the re-packing after alpha / transmittance pruning, :func:`samples.select`) stays in jnp
(:func:`select_xla`): its mask is already packed (M1 ~ 64 R elements, not R * S), ``jnp.nonzero(size=...)`` over
it is a linear cumsum + scatter that XLA fuses well, and a kernel would need the same global prefix sum across
programs, so no kernel was written for it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dreamcraft_jax.kernels.common import (
    block_size,
    compiler_params,
    gather,
    out_struct,
    pad_to,
    resolve_interpret,
    rows_spec,
    scatter,
    whole_spec,
)
from dreamcraft_jax.render import samples as _ref
from dreamcraft_jax.render.samples import OccupancyGrid, RenderSpec, Samples

DEFAULT_BLOCK_RAYS = 64
DEFAULT_NUM_WARPS = 2


# ----------------------------------------------------------------------------------------------------------
# reference


def march_xla(rays_o: jax.Array, rays_d: jax.Array, grid: OccupancyGrid, key, spec: RenderSpec,
              budget: int) -> Samples:
    """The pure-jnp reference (:func:`dreamcraft_jax.render.samples.march`)."""
    return _ref.march(rays_o, rays_d, grid, key, spec, budget)


def select_xla(samples: Samples, keep: jax.Array, budget: int, n_rays: int) -> Samples:
    """The pruning re-pack; jnp only (see the module doc for why there is no kernel)."""
    return _ref.select(samples, keep, budget, n_rays)


# ----------------------------------------------------------------------------------------------------------
# kernels


def _step_samples(s, o, d, t_start, t_far, binary_ref, *, spec: RenderSpec):
    """Step s (scalar int32) of a block of rays: is it a sample? (B,) bool.

    Same float ops, in the same order, as samples.march / samples.cell_index.
    """
    dt = spec.step_size
    t0 = t_start + s.astype(jnp.float32) * dt
    take = t0 + dt <= t_far
    if not spec.grid_prune:
        return take
    t_mid = t0 + 0.5 * dt
    g = spec.grid_resolution
    inside = take
    cell = None
    for axis in range(3):
        p = o[axis] + d[axis] * t_mid
        unit = (p + spec.radius) / (2.0 * spec.radius)
        inside = inside & (unit >= 0.0) & (unit <= 1.0)
        # clip in float, then convert: equal to the reference's convert-then-clip for every non-NaN value,
        # and never an out-of-range float -> int conversion.
        c = jnp.clip(jnp.floor(unit * g), 0.0, g - 1.0).astype(jnp.int32)
        cell = c if cell is None else cell + c * (g ** axis)
    occupied = gather(binary_ref, cell, inside, 0) != 0
    return inside & occupied


def _count_kernel(ox, oy, oz, dx, dy, dz, ts_ref, tf_ref, nt_ref, binary_ref, count_ref, *, spec):
    o = (ox[...], oy[...], oz[...])
    d = (dx[...], dy[...], dz[...])
    t_start, t_far = ts_ref[...], tf_ref[...]
    n_steps = jnp.max(nt_ref[...])  # this block's walk length

    def body(s, count):
        take = _step_samples(s, o, d, t_start, t_far, binary_ref, spec=spec)
        return count + take.astype(jnp.int32)

    count_ref[...] = jax.lax.fori_loop(0, n_steps, body, jnp.zeros(t_start.shape, jnp.int32))


def _write_kernel(ox, oy, oz, dx, dy, dz, ts_ref, tf_ref, nt_ref, off_ref, stride_ref, binary_ref, ray_out,
                  step_out, *, spec, budget, block):
    o = (ox[...], oy[...], oz[...])
    d = (dx[...], dy[...], dz[...])
    t_start, t_far = ts_ref[...], tf_ref[...]
    first, stride = off_ref[...], stride_ref[...]
    n_steps = jnp.max(nt_ref[...])  # 0 for rays whose first slot is past the budget
    lane = jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
    ray = pl.program_id(0) * block + lane
    dummy = budget + lane  # distinct spare slots for masked-off lanes (see common.scatter)

    def body(s, rank):  # rank: candidates of the ray so far; every stride-th one is written
        take = _step_samples(s, o, d, t_start, t_far, binary_ref, spec=spec)
        slot = first + rank // stride
        write = take & (rank % stride == 0) & (slot < budget)
        idx = jnp.where(write, slot, dummy)
        scatter(ray_out, idx, ray, write)
        scatter(step_out, idx, jnp.full((block,), s, jnp.int32), write)
        return rank + take.astype(jnp.int32)

    jax.lax.fori_loop(0, n_steps, body, jnp.zeros((block,), jnp.int32))


# ----------------------------------------------------------------------------------------------------------
# wrapper


def march_pallas(rays_o: jax.Array, rays_d: jax.Array, grid: OccupancyGrid, key, spec: RenderSpec,
                 budget: int, *, block_rays: int = DEFAULT_BLOCK_RAYS, num_warps: int = DEFAULT_NUM_WARPS,
                 num_stages: int | None = None, interpret: bool | None = None) -> Samples:
    """Same contract and output as :func:`march_xla` (see the module doc), no (R, S) intermediate.

    rays_o, rays_d: (R, 3) float32; returns :class:`Samples` with ``budget`` slots.
    block_rays: rays per program (power of two; lowered for small R); interpret: None = not on a GPU.
    """
    interpret = resolve_interpret(interpret)
    n_rays = rays_o.shape[0]
    n_steps = spec.max_steps_per_ray
    dt = spec.step_size
    # Entry / exit and jitter exactly as samples.march.
    t_near, t_far = _ref.ray_box_intersect(rays_o, rays_d, spec.radius)
    t_near = jnp.maximum(t_near, spec.near_plane)
    hit = t_far > t_near
    if spec.stratified and key is not None:
        t_near = t_near + jax.random.uniform(key, (n_rays,), jnp.float32) * dt
    t_far = jnp.where(hit, t_far, -jnp.inf)  # a miss takes no step
    # Upper bound on the steps that pass t0 + dt <= t_far (the test is monotone in s).
    n_try = jnp.clip(jnp.floor((t_far - t_near) / dt) + 2.0, 0.0, float(n_steps)).astype(jnp.int32)

    block = block_size(n_rays, block_rays)
    n_pad = pl.cdiv(n_rays, block) * block
    pad = functools.partial(pad_to, n=n_pad)
    rays = [pad(rays_o[:, a], value=0.0) for a in range(3)] + [pad(rays_d[:, a], value=0.0) for a in range(3)]
    t_start_p = pad(t_near, value=0.0)
    t_far_p = pad(t_far, value=-jnp.inf)
    n_try_p = pad(n_try, value=0)
    binary = grid.binary.astype(jnp.int8)
    n_cells = binary.shape[0]
    grid_dims = (n_pad // block,)
    params = compiler_params(num_warps, num_stages)
    ray_specs = [rows_spec(block)] * 9

    counts = pl.pallas_call(
        functools.partial(_count_kernel, spec=spec),
        out_shape=out_struct((n_pad,), t_start_p, jnp.int32),
        grid=grid_dims,
        in_specs=ray_specs + [whole_spec((n_cells,))],
        out_specs=rows_spec(block),
        compiler_params=params,
        interpret=interpret,
        name="march_count",
    )(*rays, t_start_p, t_far_p, n_try_p, binary)

    # Over budget, long rays keep every stride-th candidate (samples.merge_strides); padded rays have no count.
    stride = _ref.merge_strides(counts, budget, n_steps)
    kept = (counts + stride - 1) // stride
    inclusive = jnp.cumsum(kept, dtype=jnp.int32)
    total_kept = inclusive[-1]
    offsets = inclusive - kept
    n_try_w = jnp.where(offsets < budget, n_try_p, 0)

    n_out = budget + block  # + spare slots for masked-off lanes
    slot_shape = out_struct((n_out,), t_start_p, jnp.int32)
    ray_slots, step_slots = pl.pallas_call(
        functools.partial(_write_kernel, spec=spec, budget=budget, block=block),
        out_shape=(slot_shape, slot_shape),
        grid=grid_dims,
        in_specs=ray_specs + [rows_spec(block), rows_spec(block), whole_spec((n_cells,))],
        out_specs=(whole_spec((n_out,)), whole_spec((n_out,))),
        compiler_params=params,
        interpret=interpret,
        name="march_write",
    )(*rays, t_start_p, t_far_p, n_try_w, offsets, stride, binary)

    # Slots never written hold garbage: normalise them to the reference's fill (ray 0, step 0), and form t0
    # with the reference's expression so that XLA rounds it the same way (it may fuse it into an FMA).
    slot = jnp.arange(budget, dtype=jnp.int32)
    valid = slot < jnp.minimum(total_kept, budget)
    pos = jnp.where(valid, ray_slots[:budget] * n_steps + step_slots[:budget], 0)
    ray = pos // n_steps
    t0 = t_near[ray] + (pos % n_steps).astype(jnp.float32) * dt
    # The g-th kept sample of a ray stands for min(stride, count - g stride) candidates.
    group = jnp.where(valid, jnp.minimum(stride[ray], counts[ray] - (slot - offsets[ray]) * stride[ray]), 1)
    return Samples(ray_idx=jnp.where(valid, ray, n_rays), t0=t0, t1=t0 + group.astype(jnp.float32) * dt,
                   valid=valid, n_wanted=jnp.sum(counts))
