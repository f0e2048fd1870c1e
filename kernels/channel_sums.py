"""Per-channel sums of the GroupNorm passes as Pallas kernels that split the rows over many programs.

A GroupNorm of x (B, N, C) needs, per batch element and channel, sums over the N spatial rows: forward
sum(d) and sum(d^2) of d = x - x[first row] (one-pass moments about a shift), backward sum(dz) and
sum(dz * xhat) with xhat = (x - mean_c) * rstd_c, z = xhat * scale + bias, dz = dy * act'(z). XLA emits each
as a column reduction whose parallelism is B x C outputs; with 4-8 batch elements and a few hundred channels
that is too few threads for an H200's 132 SMs: at the priors' 8-64 px levels (and the VAE encoder's 64 px level)
the sums ran at 0.05-0.2 TB/s (``benchmarks/archive/profile/profile_sd_views4_kernels_h200.json``), and dropping them
altogether
would save 6.7 of the 42.8 ms SD 4-view SDS step (``benchmarks/archive/explore/explore_sd_views4_h200.json``).

Here the rows of each batch element are cut into ``splits`` stretches and the channels into blocks of
``block_channels``; one program per (batch element, stretch, channel block) streams its stretch in (chunk,
block_channels) tiles (rows contiguous in C: coalesced) into float32 accumulators and writes its partial sums.
The partials (B, splits, C) are summed by XLA afterwards (tiny). Only the reductions are kernels: the
elementwise passes stay XLA fusions, which run near memory bandwidth and fuse with their neighbours.

    forward:   shifted_channel_sums(x)                          -> (shift, sum_d, sum_d2), each (B, C) float32
    backward:  backward_channel_sums(x, dy, mean_c, rstd_c, scale, bias, silu) -> (sum_dz, sum_dz_xhat)

Each equals its ``*_reference`` (pure jnp) up to float32 summation order.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dreamcraft_jax.kernels.common import cast_varying, compiler_params, full_hbm_spec, out_struct, resolve_interpret
from dreamcraft_jax.kernels.spec import SUMS_PLAN_KEYS
from dreamcraft_jax.parallel import varying_axes

__all__ = ["shifted_channel_sums", "shifted_channel_sums_reference", "backward_channel_sums",
           "backward_channel_sums_reference", "plan", "PLAN_KEYS"]

# Programs to aim for: a few per SM of a large GPU, so that loads of several programs overlap on each SM.
TARGET_PROGRAMS = 1024
# Rows per loop iteration: (CHUNK, lanes) tiles, float32 accumulators in registers.
CHUNK = 32
# Large levels get 8 warps per program, and 16-row chunks between MID_ROWS and WIDE_ROWS rows per batch element
# (the VAE's 256 px level): on an H200 the whole GroupNorm + SiLU forward and backward of 4x512x512x128 took
# 0.566 ms with 32-row chunks and 8 warps against 0.676 with 32 and 4; of 4x256x256x256 0.303 ms with 16 and 8
# against 0.343 with 32 and 4; at 128 px and below the plans were within noise
# (benchmarks/kernels/gn_sums_h200.json, benchmarks/kernels/gn_sums_h200_all_shapes.json).
MID_ROWS, WIDE_ROWS = 1 << 16, 1 << 18
# The launch-plan keywords a caller may fix (``**plan_kw`` of the calls; the models' GroupNorms pass those of
# their KernelSpec's ``groupnorm_sums_plan``, which benches set to compare plans).
PLAN_KEYS = SUMS_PLAN_KEYS


class _Plan(NamedTuple):
    """Static launch shape of one call (hashable: a custom-call parameter)."""

    batch: int
    rows: int  # spatial rows per batch element (N)
    channels: int
    splits: int  # row stretches per batch element
    block_channels: int  # lanes per program (power of two; the last block masked when C is not a multiple)
    chunk: int  # rows per loop iteration
    num_warps: int
    num_stages: int
    interpret: bool
    fold: bool  # reduce each tile over its rows at once: (lanes,) accumulators instead of (chunk, lanes)

    @property
    def rows_per_split(self) -> int:
        return -(-self.rows // self.splits)

    @property
    def channel_blocks(self) -> int:
        return -(-self.channels // self.block_channels)


def plan(batch: int, rows: int, channels: int, *, chunk: int | None = None, num_warps: int | None = None,
         num_stages: int = 3, interpret: bool = False, target_programs: int | None = None,
         fold: bool = False) -> _Plan:
    """Launch shape for x (batch, rows, channels): 64-256 lane blocks (the widest power of two <= 256 that
    divides C, else 128 with a masked tail; below 64 channels the next power of two); splits a power of two,
    the fewest that reach ``target_programs`` programs while each stretch keeps at least one chunk of rows.
    ``chunk`` / ``target_programs`` None: the module's CHUNK (16 from MID_ROWS to WIDE_ROWS rows) /
    TARGET_PROGRAMS; ``num_warps`` None: 8 from MID_ROWS rows on, else 4. ``fold``: sum each (chunk, lanes) tile
    over its rows as it is loaded (accumulators of one row: larger chunks fit in registers) instead of once
    after the loop."""
    if chunk is None:
        chunk = 16 if MID_ROWS <= rows < WIDE_ROWS else CHUNK
    if num_warps is None:
        num_warps = 8 if rows >= MID_ROWS else 4
    target_programs = TARGET_PROGRAMS if target_programs is None else target_programs
    for name, value in (("chunk", chunk), ("num_warps", num_warps)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two (Triton tile shapes), got {value}")
    for block in (256, 128, 64):
        if channels % block == 0:
            break
    else:
        block = 128 if channels > 64 else max(1 << (channels - 1).bit_length(), 16)
    chunk = min(chunk, max(1 << (rows - 1).bit_length(), 1))
    blocks = -(-channels // block)
    splits = 1
    while batch * splits * blocks < target_programs and rows // (2 * splits) >= chunk:
        splits *= 2
    return _Plan(batch, rows, channels, splits, block, chunk, num_warps, num_stages, interpret, bool(fold))


def _tile_index(p: _Plan, b, s, c, i):
    """(rows, cols, mask) of iteration ``i``'s (chunk, block_channels) tile of program (b, s, c) of the
    (B * N, C) operand (program ids are read at the kernel's top level: interpret mode cannot read them in a
    loop)."""
    local = s * p.rows_per_split + i * p.chunk + jnp.arange(p.chunk, dtype=jnp.int32)
    lane = c * p.block_channels + jnp.arange(p.block_channels, dtype=jnp.int32)
    end = jnp.minimum((s + 1) * p.rows_per_split, p.rows)
    mask = (local < end)[:, None] & (lane < p.channels)[None, :]
    rows = jnp.broadcast_to((b * p.rows + local)[:, None], mask.shape)
    cols = jnp.broadcast_to(lane[None, :], mask.shape)
    return rows, cols, mask


def _lanes(p: _Plan, c):
    lane = c * p.block_channels + jnp.arange(p.block_channels, dtype=jnp.int32)
    return lane, lane < p.channels


def _zeros(p: _Plan):
    shape = (p.block_channels,) if p.fold else (p.chunk, p.block_channels)
    return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)


def _accumulate(p: _Plan, carry, a, b):
    """Add a tile's two (chunk, lanes) terms to the accumulators (summed over rows first when folding)."""
    if p.fold:
        return carry[0] + jnp.sum(a, axis=0), carry[1] + jnp.sum(b, axis=0)
    return carry[0] + a, carry[1] + b


def _row_total(p: _Plan, acc):
    return acc if p.fold else jnp.sum(acc, axis=0)


def _n_chunks(p: _Plan) -> int:
    return -(-p.rows_per_split // p.chunk)


def _forward_kernel(x_ref, sum_d_ref, sum_d2_ref, *, p: _Plan):
    """x (B * N, C) in HBM; sum_d / sum_d2 (1, 1, block) blocks of (B, splits, C_padded)."""
    b, s, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lane, lane_on = _lanes(p, c)
    first = jnp.full((p.block_channels,), b * p.rows, jnp.int32)
    shift = plgpu.load(x_ref.at[first, lane], mask=lane_on, other=0.0).astype(jnp.float32)

    def body(i, carry):
        rows, cols, mask = _tile_index(p, b, s, c, i)
        v = plgpu.load(x_ref.at[rows, cols], mask=mask, other=0.0).astype(jnp.float32)
        d = jnp.where(mask, v - shift[None, :], 0.0)
        return _accumulate(p, carry, d, d * d)

    acc_d, acc_d2 = jax.lax.fori_loop(0, _n_chunks(p), body, _zeros(p))
    sum_d_ref[0, 0, :] = _row_total(p, acc_d)
    sum_d2_ref[0, 0, :] = _row_total(p, acc_d2)


def _backward_kernel(x_ref, dy_ref, mean_ref, rstd_ref, scale_ref, bias_ref, sum_dz_ref, sum_dz_xhat_ref, *,
                     p: _Plan, silu: bool):
    """x, dy (B * N, C) in HBM; mean / rstd (B, C) and scale / bias (C,) float32 in HBM; outputs as forward."""
    b, s, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lane, lane_on = _lanes(p, c)
    batch_lane = b * p.channels + lane
    mean = plgpu.load(mean_ref.at[batch_lane], mask=lane_on, other=0.0)
    rstd = plgpu.load(rstd_ref.at[batch_lane], mask=lane_on, other=0.0)
    scale = plgpu.load(scale_ref.at[lane], mask=lane_on, other=0.0)
    bias = plgpu.load(bias_ref.at[lane], mask=lane_on, other=0.0)

    def body(i, carry):
        rows, cols, mask = _tile_index(p, b, s, c, i)
        v = plgpu.load(x_ref.at[rows, cols], mask=mask, other=0.0).astype(jnp.float32)
        dy = plgpu.load(dy_ref.at[rows, cols], mask=mask, other=0.0).astype(jnp.float32)
        xhat = (v - mean[None, :]) * rstd[None, :]
        dz = _slope_times(dy, xhat * scale[None, :] + bias[None, :], silu)
        dz = jnp.where(mask, dz, 0.0)
        return _accumulate(p, carry, dz, dz * xhat)

    acc_dz, acc_dz_xhat = jax.lax.fori_loop(0, _n_chunks(p), body, _zeros(p))
    sum_dz_ref[0, 0, :] = _row_total(p, acc_dz)
    sum_dz_xhat_ref[0, 0, :] = _row_total(p, acc_dz_xhat)


def _slope_times(dy, z, silu: bool):
    """dy * act'(z); SiLU: act'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))."""
    if not silu:
        return dy
    sig = jax.nn.sigmoid(z)
    return dy * sig * (1.0 + z * (1.0 - sig))


def _partial_specs(p: _Plan):
    spec = pl.BlockSpec((1, 1, p.block_channels), lambda b, s, c: (b, s, c))
    shape = (p.batch, p.splits, p.channel_blocks * p.block_channels)
    return spec, shape


def _finish(partials, p: _Plan):
    """(B, splits, C_padded) partial sums -> (B, C)."""
    return tuple(jnp.sum(v, axis=1)[:, :p.channels] for v in partials)


def _as_rows(x):
    b, c = x.shape[0], x.shape[-1]
    return x.reshape(b * int(np.prod(x.shape[1:-1])), c)


def _plan_for(x, interpret, **kw) -> _Plan:
    """The launch plan of x (B, ..., C): :func:`plan` with the caller's keywords (:data:`PLAN_KEYS`)."""
    if x.ndim < 3:
        raise ValueError(f"need x (B, ..., C) with at least one spatial axis, got shape {x.shape}")
    unknown = set(kw) - set(PLAN_KEYS)
    if unknown:
        raise ValueError(f"unknown plan keywords {sorted(unknown)}; known: {PLAN_KEYS}")
    return plan(x.shape[0], int(np.prod(x.shape[1:-1])), x.shape[-1], interpret=resolve_interpret(interpret), **kw)


def shifted_channel_sums(x: jax.Array, *, interpret: bool | None = None, **plan_kw):
    """x (B, ..., C) -> (shift, sum_d, sum_d2), each (B, C) float32: shift = x at the first spatial position,
    sums over the spatial axes of d = x - shift and d^2. ``interpret`` None: interpret mode off GPU."""
    p = _plan_for(x, interpret, **plan_kw)
    x2 = _as_rows(x)
    spec, shape = _partial_specs(p)
    partials = pl.pallas_call(
        functools.partial(_forward_kernel, p=p),
        out_shape=(out_struct(shape, x2), out_struct(shape, x2)),
        grid=(p.batch, p.splits, p.channel_blocks),
        in_specs=[full_hbm_spec()],
        out_specs=(spec, spec),
        compiler_params=compiler_params(p.num_warps, p.num_stages),
        interpret=p.interpret,
        name="group_norm_sums_fwd",
    )(x2)
    shift = x.reshape(p.batch, p.rows, p.channels)[:, 0, :].astype(jnp.float32)
    return (shift,) + _finish(partials, p)


def backward_channel_sums(x: jax.Array, dy: jax.Array, mean_c: jax.Array, rstd_c: jax.Array, scale: jax.Array,
                          bias: jax.Array, silu: bool, *, interpret: bool | None = None, **plan_kw):
    """(sum_dz, sum_dz_xhat), each (B, C) float32, as :func:`backward_channel_sums_reference`.

    x, dy (B, ..., C); mean_c, rstd_c broadcastable to (B, 1, ..., 1, C) (per batch element and channel);
    scale, bias (C,).
    """
    if dy.shape != x.shape:
        raise ValueError(f"dy {dy.shape} must have the shape of x {x.shape}")
    p = _plan_for(x, interpret, **plan_kw)
    b, c = p.batch, p.channels
    operands = [_as_rows(x), _as_rows(dy),
                jnp.broadcast_to(mean_c.reshape(b, -1), (b, c)).astype(jnp.float32).reshape(-1),
                jnp.broadcast_to(rstd_c.reshape(b, -1), (b, c)).astype(jnp.float32).reshape(-1),
                scale.astype(jnp.float32), bias.astype(jnp.float32)]
    axes = frozenset().union(*(varying_axes(v) for v in operands))
    operands = [cast_varying(v, axes) for v in operands]
    spec, shape = _partial_specs(p)
    partials = pl.pallas_call(
        functools.partial(_backward_kernel, p=p, silu=bool(silu)),
        out_shape=(out_struct(shape, operands[0]), out_struct(shape, operands[0])),
        grid=(p.batch, p.splits, p.channel_blocks),
        in_specs=[full_hbm_spec()] * 6,
        out_specs=(spec, spec),
        compiler_params=compiler_params(p.num_warps, p.num_stages),
        interpret=p.interpret,
        name="group_norm_sums_bwd",
    )(*operands)
    return _finish(partials, p)


# ---------------------------------------------------------------------------------------------- references


def shifted_channel_sums_reference(x: jax.Array):
    """Pure jnp: (shift, sum_d, sum_d2) as :func:`shifted_channel_sums`."""
    b, c = x.shape[0], x.shape[-1]
    xs = x.reshape(b, -1, c).astype(jnp.float32)
    shift = xs[:, 0, :]
    d = xs - shift[:, None, :]
    return shift, jnp.sum(d, axis=1), jnp.sum(d * d, axis=1)


def backward_channel_sums_reference(x, dy, mean_c, rstd_c, scale, bias, silu: bool):
    """Pure jnp: sums over the spatial axes of dz and dz * xhat (see the module docstring)."""
    xhat = (x.astype(jnp.float32) - mean_c) * rstd_c
    dz = _slope_times(dy.astype(jnp.float32), xhat * scale + bias, silu)
    axes = tuple(range(1, x.ndim - 1))
    return jnp.sum(dz, axis=axes), jnp.sum(dz * xhat, axis=axes)
