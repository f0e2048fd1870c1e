"""GroupNorm (+ SiLU) of small activations, forward and backward each as one Pallas kernel, beside the reference.

The diffusion priors run ~80 GroupNorms per SDS step (61 in the SD UNet, 22 in the VAE encoder), most of them on
small tensors: the UNet's 64 px and smaller latents, the encoder's 64-128 px levels. Through XLA each one is a
chain of ~5-9 fusions (per-channel partial sums, their reduction, the per-group combine, rsqrt, the affine pass,
and in the backward the same again), so at these sizes it is launch- and reduction-bound: 0.27 ms for the forward
+ backward of a 16 MB tensor on an H200, 0.5-0.9 TB/s (``benchmarks/archive/kernels/groupnorm_h200_explore.json``).
Here one program per (batch element, group) streams its group's rows twice:

    forward:   pass 1  per-channel sums of d = x - x[first row] and d^2 (the shift keeps one-pass moments
                       accurate), combined into the group's mean and 1/sqrt(var + eps) (parallel-variance rule)
               pass 2  y = act(x * gain_c + offset_c), gain_c = rstd * scale_c, offset_c = bias_c - mean * gain_c
    backward:  pass 1  per-channel sums of dz and dz * xhat (dz = dy * act'(z), recomputed from x)
               pass 2  dx = rstd * (dz * scale - mean_g(dz * scale) - xhat * mean_g(dz * scale * xhat))

reading x twice and writing y once (forward), reading x and dy twice and writing dx once (backward): one kernel
each instead of the chain. The per-channel sums also give the scale / bias gradients (summed over the batch
after the kernel).

Contract: ``group_norm_act_pallas(x, scale, bias, num_groups, eps, silu)`` equals
:func:`group_norm_act_reference` (x (B, ..., C), result in x.dtype, float32 math), differentiable w.r.t. x,
scale and bias. Each program reads rows of C / G contiguous channels (padded to a power of two with masked
lanes), so it is meant for tensors whose rows per batch element are few (:func:`suited`); large tensors stream
better through XLA's fusions, which read whole rows.
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
from dreamcraft_jax.parallel import varying_axes

__all__ = ["group_norm_act_pallas", "group_norm_act_reference", "suited", "MAX_ROWS"]

# Rows (spatial positions) per batch element up to which the kernel is the better choice: 64 x 64 latents and
# the VAE encoder's 64 / 128 px levels. One program streams all rows of its group.
MAX_ROWS = 128 * 128


def suited(shape, num_groups: int) -> bool:
    """Whether x of this (B, ..., C) shape suits the kernel: C splits into the groups and the rows per batch
    element are at most :data:`MAX_ROWS`."""
    if len(shape) < 3 or shape[-1] % num_groups:
        return False
    return int(np.prod(shape[1:-1])) <= MAX_ROWS


def group_norm_act_reference(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, eps: float,
                             silu: bool) -> jax.Array:
    """Pure-jnp reference, two-pass statistics: y = act((x - mean_g) / sqrt(var_g + eps) * scale + bias)."""
    b, c = x.shape[0], x.shape[-1]
    xg = x.astype(jnp.float32).reshape(b, -1, num_groups, c // num_groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    z = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias
    return (jax.nn.silu(z) if silu else z).astype(x.dtype)


class _Shape(NamedTuple):
    """Static sizes of one call (custom_vjp's hashable nondiff argument)."""

    batch: int
    rows: int  # spatial positions per batch element
    channels: int
    groups: int
    lanes: int  # channels per group, padded to a power of two
    chunk: int  # rows per loop iteration
    eps: float
    silu: bool
    interpret: bool
    num_warps: int
    num_stages: int  # Triton software pipelining of the row loops (loads of the next chunks in flight)


def _group_index(s: _Shape, b, g, i):
    """(row index (chunk, lanes), column index (chunk, lanes), mask) of chunk ``i`` of group ``g`` of batch
    element ``b`` (the program ids, read at the kernel's top level: interpret mode cannot read them in a loop)."""
    cg = s.channels // s.groups
    lane = jnp.arange(s.lanes, dtype=jnp.int32)
    row = i * s.chunk + jnp.arange(s.chunk, dtype=jnp.int32)
    mask = (row < s.rows)[:, None] & (lane < cg)[None, :]
    rows = jnp.broadcast_to((b * s.rows + row)[:, None], (s.chunk, s.lanes))
    cols = jnp.broadcast_to((g * cg + lane)[None, :], (s.chunk, s.lanes))
    return rows, cols, mask


def _channel_vector(ref, s: _Shape, g):
    """Group ``g``'s channels of a (C,) ref: (lanes,) float32, 0 on padding lanes."""
    cg = s.channels // s.groups
    lane = jnp.arange(s.lanes, dtype=jnp.int32)
    return plgpu.load(ref.at[g * cg + lane], mask=lane < cg, other=0.0).astype(jnp.float32)


def _load_chunk(ref, s: _Shape, b, g, i):
    rows, cols, mask = _group_index(s, b, g, i)
    return plgpu.load(ref.at[rows, cols], mask=mask, other=0.0).astype(jnp.float32), mask


def _n_chunks(s: _Shape) -> int:
    return -(-s.rows // s.chunk)


def _activation_and_slope(z, silu: bool):
    """(act(z), d act / dz); SiLU: z sigmoid(z) and sigmoid(z) (1 + z (1 - sigmoid(z)))."""
    if not silu:
        return z, jnp.ones_like(z)
    sig = jax.nn.sigmoid(z)
    return z * sig, sig * (1.0 + z * (1.0 - sig))


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, s: _Shape):
    """Refs: x, y (B * rows, C) in HBM, scale / bias (C,) in HBM; mean / rstd (1, 1) blocks of (B, G)."""
    b, g = pl.program_id(0), pl.program_id(1)
    cg = s.channels // s.groups
    lane = jnp.arange(s.lanes, dtype=jnp.int32)
    lane_on = lane < cg
    first_row = jnp.full((s.lanes,), b * s.rows, jnp.int32)
    shift = plgpu.load(x_ref.at[first_row, g * cg + lane], mask=lane_on, other=0.0).astype(jnp.float32)

    def moments(i, carry):  # elementwise accumulators: one cross-row reduction after the loop, not per chunk
        v, mask = _load_chunk(x_ref, s, b, g, i)
        d = jnp.where(mask, v - shift[None, :], 0.0)
        return carry[0] + d, carry[1] + d * d

    zeros = jnp.zeros((s.chunk, s.lanes), jnp.float32)
    acc_d, acc_d2 = jax.lax.fori_loop(0, _n_chunks(s), moments, (zeros, zeros))
    sum_d, sum_d2 = jnp.sum(acc_d, axis=0), jnp.sum(acc_d2, axis=0)
    mean_d = sum_d / s.rows
    var_c = jnp.maximum(sum_d2 / s.rows - mean_d * mean_d, 0.0)
    mean_c = mean_d + shift
    mean = jnp.sum(jnp.where(lane_on, mean_c, 0.0)) / cg
    var = jnp.sum(jnp.where(lane_on, var_c + jnp.square(mean_c - mean), 0.0)) / cg
    rstd = jax.lax.rsqrt(var + s.eps)
    gain = rstd * _channel_vector(scale_ref, s, g)
    offset = _channel_vector(bias_ref, s, g) - mean * gain

    def write(i, carry):
        v, mask = _load_chunk(x_ref, s, b, g, i)
        y, _ = _activation_and_slope(v * gain[None, :] + offset[None, :], s.silu)
        rows, cols, _ = _group_index(s, b, g, i)
        plgpu.store(y_ref.at[rows, cols], y.astype(y_ref.dtype), mask=mask)
        return carry

    jax.lax.fori_loop(0, _n_chunks(s), write, 0)
    mean_ref[0, 0] = mean
    rstd_ref[0, 0] = rstd


def _backward_kernel(x_ref, dy_ref, scale_ref, bias_ref, mean_ref, rstd_ref, dx_ref, sum_dz_ref, sum_dz_xhat_ref,
                     *, s: _Shape):
    """Refs: x, dy, dx (B * rows, C) in HBM, scale / bias (C,) in HBM, mean / rstd (1, 1) blocks of (B, G);
    sum_dz / sum_dz_xhat (1, 1, lanes) blocks of (B, G, lanes): this group's per-channel sums."""
    b, g = pl.program_id(0), pl.program_id(1)
    cg = s.channels // s.groups
    count = s.rows * cg
    mean, rstd = mean_ref[0, 0], rstd_ref[0, 0]
    scale, bias = _channel_vector(scale_ref, s, g), _channel_vector(bias_ref, s, g)

    def dz_and_xhat(i):
        v, mask = _load_chunk(x_ref, s, b, g, i)
        dy, _ = _load_chunk(dy_ref, s, b, g, i)
        xhat = (v - mean) * rstd
        _, slope = _activation_and_slope(xhat * scale[None, :] + bias[None, :], s.silu)
        return jnp.where(mask, dy * slope, 0.0), xhat, mask

    def sums(i, carry):
        dz, xhat, _ = dz_and_xhat(i)
        return carry[0] + dz, carry[1] + dz * xhat

    zeros = jnp.zeros((s.chunk, s.lanes), jnp.float32)
    acc_dz, acc_dz_xhat = jax.lax.fori_loop(0, _n_chunks(s), sums, (zeros, zeros))
    sum_dz, sum_dz_xhat = jnp.sum(acc_dz, axis=0), jnp.sum(acc_dz_xhat, axis=0)
    mean_dxhat = jnp.sum(sum_dz * scale) / count  # padding lanes: scale 0
    mean_dxhat_xhat = jnp.sum(sum_dz_xhat * scale) / count

    def write(i, carry):
        dz, xhat, mask = dz_and_xhat(i)
        dx = rstd * (dz * scale[None, :] - mean_dxhat - xhat * mean_dxhat_xhat)
        rows, cols, _ = _group_index(s, b, g, i)
        plgpu.store(dx_ref.at[rows, cols], dx.astype(dx_ref.dtype), mask=mask)
        return carry

    jax.lax.fori_loop(0, _n_chunks(s), write, 0)
    sum_dz_ref[0, 0, :] = sum_dz
    sum_dz_xhat_ref[0, 0, :] = sum_dz_xhat


def _stat_spec():
    return pl.BlockSpec((1, 1), lambda b, g: (b, g))


def _forward(x2, scale, bias, s: _Shape):
    hbm = full_hbm_spec()
    return pl.pallas_call(
        functools.partial(_forward_kernel, s=s),
        out_shape=(out_struct(x2.shape, x2, x2.dtype), out_struct((s.batch, s.groups), x2),
                   out_struct((s.batch, s.groups), x2)),
        grid=(s.batch, s.groups),
        in_specs=[hbm, hbm, hbm],
        out_specs=(hbm, _stat_spec(), _stat_spec()),
        compiler_params=compiler_params(s.num_warps, s.num_stages),
        interpret=s.interpret,
        name="group_norm_act_fwd",
    )(x2, scale, bias)


def _backward(x2, dy2, scale, bias, mean, rstd, s: _Shape):
    hbm = full_hbm_spec()
    lanes_spec = pl.BlockSpec((1, 1, s.lanes), lambda b, g: (b, g, 0))
    return pl.pallas_call(
        functools.partial(_backward_kernel, s=s),
        out_shape=(out_struct(x2.shape, x2, x2.dtype), out_struct((s.batch, s.groups, s.lanes), x2),
                   out_struct((s.batch, s.groups, s.lanes), x2)),
        grid=(s.batch, s.groups),
        in_specs=[hbm, hbm, hbm, hbm, _stat_spec(), _stat_spec()],
        out_specs=(hbm, lanes_spec, lanes_spec),
        compiler_params=compiler_params(s.num_warps, s.num_stages),
        interpret=s.interpret,
        name="group_norm_act_bwd",
    )(x2, dy2, scale, bias, mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _group_norm(x2, scale, bias, s: _Shape):
    return _forward(x2, scale, bias, s)[0]


def _group_norm_fwd(x2, scale, bias, s: _Shape):
    y, mean, rstd = _forward(x2, scale, bias, s)
    return y, (x2, scale, bias, mean, rstd)


def _group_norm_bwd(s: _Shape, residuals, dy2):
    x2, scale, bias, mean, rstd = residuals
    dx, sum_dz, sum_dz_xhat = _backward(x2, dy2, scale, bias, mean, rstd, s)
    cg = s.channels // s.groups
    # (B, G, lanes) per-channel sums -> (C,) parameter gradients: d scale = sum dz xhat, d bias = sum dz.
    d_scale = jnp.sum(sum_dz_xhat[:, :, :cg], axis=0).reshape(s.channels)
    d_bias = jnp.sum(sum_dz[:, :, :cg], axis=0).reshape(s.channels)
    return dx, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm_act_pallas(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, eps: float,
                          silu: bool, *, interpret: bool | None = None, chunk: int = 256,
                          num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """:func:`group_norm_act_reference` with one kernel per pass; x (B, ..., C), scale / bias (C,) float32.

    ``chunk``: rows per loop iteration, a power of two (its (chunk, lanes) tiles are what each iteration loads;
    the first chunk's load latency is paid once per pass, the rest overlap with ``num_stages`` >= 2);
    ``interpret`` None: interpret mode unless the default backend is GPU.
    """
    if x.ndim < 3 or scale.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ValueError(f"need x (B, ..., C) and scale / bias (C,); got {x.shape}, {scale.shape}, {bias.shape}")
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"GroupNorm: {c} channels do not split into {num_groups} groups")
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    interpret = resolve_interpret(interpret)
    batch, rows = x.shape[0], int(np.prod(x.shape[1:-1]))
    cg = c // num_groups
    chunk = min(chunk, max(1 << (rows - 1).bit_length(), 16))  # no mostly-masked chunk for few rows
    s = _Shape(batch, rows, c, num_groups, max(1 << (cg - 1).bit_length(), 2), chunk, float(eps), bool(silu),
               bool(interpret), num_warps, num_stages)
    operands = [x.reshape(batch * rows, c), scale.astype(jnp.float32), bias.astype(jnp.float32)]
    axes = frozenset().union(*(varying_axes(v) for v in operands))
    x2, scale2, bias2 = (cast_varying(v, axes) for v in operands)
    return _group_norm(x2, scale2, bias2, s).reshape(x.shape)
