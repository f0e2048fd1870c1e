"""Compositing over packed samples: a Pallas (Triton) kernel pair with a custom VJP, beside the jnp reference.

Inputs (the packed layout of :class:`dreamcraft_jax.render.samples.Samples`): M slots sorted by ray,
sigma (M,), color (M, C), t0, t1 (M,), ray_idx (M,) int32 (``n_rays`` on the invalid tail), valid (M,) bool.
Outputs: weights (M,), rgb (R, C), opacity (R,), depth (R,), with per ray r over its slots i (in order):

    tau_i = valid_i ? sigma_i (t1_i - t0_i) : 0
    T_i   = exp(-sum_{j<i} tau_j)                 (a running sum, never a cumulative product)
    w_i   = T_i (1 - exp(-tau_i))
    rgb_r = sum_i w_i color_i,  opacity_r = sum_i w_i,  depth_r = sum_i w_i (t0_i + t1_i) / 2

(no background here). Slots outside every ray's segment get weight 0.

Kernels: ray r's slots are the segment [start_r, start_r + len_r) (``searchsorted`` of the sorted ray_idx in
the wrapper). A program takes ``block_rays`` rays, one lane each, and loops to the longest segment of its block
with masked loads, so the per-sample transmittance never touches memory.

Backward (differentiable w.r.t. sigma and color; t0 / t1 / ray_idx / valid get no cotangent). With the
cotangents dw (M,), drgb (R, C), dopacity (R,), ddepth (R,), every output is linear in the weights, so

    g_i = dL/dw_i = dw_i + color_i . drgb_r + dopacity_r + t_mid_i ddepth_r.

dw_j/dtau_i = T_i exp(-tau_i) = T_{i+1} for j = i, -w_j for j > i (T_j holds exp(-tau_i)), 0 for j < i, so

    dL/dtau_i   = T_{i+1} g_i - sum_{j>i} w_j g_j,       dL/dsigma_i = (valid_i ? dt_i : 0) dL/dtau_i,
    dL/dcolor_i = w_i drgb_r.

The backward kernel walks each segment twice: first total_r = sum_j w_j g_j, then the suffix sum
sum_{j>i} w_j g_j = total_r - (inclusive prefix up to i), with T_{i+1} recomputed from the running sum of tau.
Both walks use the forward weights (a residual: they are an output anyway) in the same order, so the suffix
ends exactly at 0; its rounding error is that of a length-n running sum of w_j g_j, O(n eps max|g|) since
sum_j w_j <= 1.
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
from dreamcraft_jax.render.samples import Samples

DEFAULT_BLOCK_RAYS = 64
DEFAULT_NUM_WARPS = 2


# ----------------------------------------------------------------------------------------------------------
# reference


def composite_xla(sigma, color, t0, t1, ray_idx, valid, n_rays: int):
    """Reference: (weights (M,), rgb (R, C), opacity (R,), depth (R,)) via samples.compositing_weights and
    samples.accumulate (no background)."""
    samples = Samples(ray_idx=ray_idx, t0=t0, t1=t1, valid=valid, n_wanted=jnp.zeros((), jnp.int32))
    weights = _ref.compositing_weights(sigma, samples)[0]
    rgb = _ref.accumulate(weights, color, samples, n_rays)
    opacity = _ref.accumulate(weights, None, samples, n_rays)
    depth = _ref.accumulate(weights, samples.t_mid, samples, n_rays)
    return weights, rgb, opacity, depth


# ----------------------------------------------------------------------------------------------------------
# kernels


def _interval(idx, m, sigma_ref, t0_ref, t1_ref, valid_ref):
    """(tau, t_mid, dtau/dsigma) of slot idx per lane; masked-off lanes get tau = 0."""
    a = gather(t0_ref, idx, m, 0.0)
    b = gather(t1_ref, idx, m, 0.0)
    sigma = gather(sigma_ref, idx, m, 0.0)
    v = gather(valid_ref, idx, m, 0) != 0
    dt = b - a
    return jnp.where(v, sigma * dt, 0.0), 0.5 * (a + b), jnp.where(v, dt, 0.0)


def _fwd_kernel(start_ref, len_ref, sigma_ref, color_ref, t0_ref, t1_ref, valid_ref,
                w_ref, op_ref, depth_ref, *rgb_refs, n_samples, block):
    start, length = start_ref[...], len_ref[...]
    spare = n_samples + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)  # distinct dummy slots (see common.scatter)
    zero = jnp.zeros((block,), jnp.float32)

    def body(j, carry):
        acc, trans, opacity, depth, *rgb = carry
        m = j < length
        idx = jnp.where(m, start + j, 0)
        tau, t_mid, _ = _interval(idx, m, sigma_ref, t0_ref, t1_ref, valid_ref)
        w = trans * (1.0 - jnp.exp(-tau))
        scatter(w_ref, jnp.where(m, idx, spare), w, m)
        rgb = [r + w * gather(color_ref, (idx, c), m, 0.0) for c, r in enumerate(rgb)]
        acc = acc + tau
        return (acc, jnp.exp(-acc), opacity + w, depth + w * t_mid, *rgb)

    init = (zero, zero + 1.0, zero, zero) + (zero,) * len(rgb_refs)
    _, _, opacity, depth, *rgb = jax.lax.fori_loop(0, jnp.max(length), body, init)
    op_ref[...] = opacity
    depth_ref[...] = depth
    for ref, r in zip(rgb_refs, rgb):
        ref[...] = r


def _bwd_kernel(start_ref, len_ref, d_op_ref, d_depth_ref, *refs, n_ch, n_samples, block):
    d_rgb = [r[...] for r in refs[:n_ch]]
    sigma_ref, color_ref, t0_ref, t1_ref, valid_ref, w_ref, dw_ref, dsigma_ref, dcolor_ref = refs[n_ch:]
    start, length = start_ref[...], len_ref[...]
    d_op, d_depth = d_op_ref[...], d_depth_ref[...]
    spare = n_samples + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
    zero = jnp.zeros((block,), jnp.float32)
    n_iter = jnp.max(length)

    def slot(j):
        m = j < length
        return m, jnp.where(m, start + j, 0)

    def weighted_cotangent(idx, m, t_mid):
        """(w_i, w_i g_i) with g_i = dL/dw_i (see the module doc)."""
        g = gather(dw_ref, idx, m, 0.0) + d_op + t_mid * d_depth
        for c in range(n_ch):
            g = g + gather(color_ref, (idx, c), m, 0.0) * d_rgb[c]
        w = gather(w_ref, idx, m, 0.0)
        return w, g, w * g

    def total_body(j, total):
        m, idx = slot(j)
        a = gather(t0_ref, idx, m, 0.0)
        b = gather(t1_ref, idx, m, 0.0)
        return total + weighted_cotangent(idx, m, 0.5 * (a + b))[2]

    total = jax.lax.fori_loop(0, n_iter, total_body, zero)

    def grad_body(j, carry):
        acc, prefix = carry
        m, idx = slot(j)
        tau, t_mid, dtau_dsigma = _interval(idx, m, sigma_ref, t0_ref, t1_ref, valid_ref)
        acc = acc + tau
        w, g, wg = weighted_cotangent(idx, m, t_mid)
        prefix = prefix + wg
        d_sigma = dtau_dsigma * (jnp.exp(-acc) * g - (total - prefix))
        out = jnp.where(m, idx, spare)
        scatter(dsigma_ref, out, d_sigma, m)
        for c in range(n_ch):
            scatter(dcolor_ref, (out, c), w * d_rgb[c], m)
        return acc, prefix

    jax.lax.fori_loop(0, n_iter, grad_body, (zero, zero))


# ----------------------------------------------------------------------------------------------------------
# wrappers


def _segments(ray_idx, n_rays: int, n_pad: int):
    """Per-ray (start, length) padded to n_pad rays (padding: empty), and the end of the last segment."""
    bounds = jnp.searchsorted(ray_idx, jnp.arange(n_rays + 1, dtype=ray_idx.dtype), side="left")
    bounds = bounds.astype(jnp.int32)
    return pad_to(bounds[:-1], n_pad, 0), pad_to(bounds[1:] - bounds[:-1], n_pad, 0), bounds[-1]


def _forward(sigma, color, t0, t1, ray_idx, valid, n_rays, cfg):
    block_rays, num_warps, num_stages, interpret = cfg
    m, n_ch = color.shape
    block = block_size(n_rays, block_rays)
    n_pad = pl.cdiv(n_rays, block) * block
    start, length, end = _segments(ray_idx, n_rays, n_pad)
    valid8 = valid.astype(jnp.int8)
    per_ray = out_struct((n_pad,), sigma)
    w, opacity, depth, *rgb = pl.pallas_call(
        functools.partial(_fwd_kernel, n_samples=m, block=block),
        out_shape=(out_struct((m + block,), sigma), per_ray, per_ray) + (per_ray,) * n_ch,
        grid=(n_pad // block,),
        in_specs=[rows_spec(block), rows_spec(block), whole_spec((m,)), whole_spec((m, n_ch))]
        + [whole_spec((m,))] * 3,
        out_specs=(whole_spec((m + block,)), rows_spec(block), rows_spec(block)) + (rows_spec(block),) * n_ch,
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="composite_fwd",
    )(start, length, sigma, color, t0, t1, valid8)
    # Slots past the last segment (and the spare slots) were never written.
    covered = jnp.arange(m, dtype=jnp.int32) < end
    weights = jnp.where(covered, w[:m], 0.0)
    rgb = jnp.stack(rgb, axis=-1)[:n_rays]
    outs = (weights, rgb, opacity[:n_rays], depth[:n_rays])
    return outs, (sigma, color, t0, t1, valid8, start, length, covered, weights)


def _backward(n_rays, cfg, res, cts):
    block_rays, num_warps, num_stages, interpret = cfg
    sigma, color, t0, t1, valid8, start, length, covered, weights = res
    dw, d_rgb, d_op, d_depth = cts
    m, n_ch = color.shape
    block = block_size(n_rays, block_rays)
    n_pad = start.shape[0]
    pad = functools.partial(pad_to, n=n_pad, value=0.0)
    d_rgb_cols = [pad(d_rgb[:, c]) for c in range(n_ch)]
    d_sigma, d_color = pl.pallas_call(
        functools.partial(_bwd_kernel, n_ch=n_ch, n_samples=m, block=block),
        out_shape=(out_struct((m + block,), sigma),
                   out_struct((m + block, n_ch), sigma)),
        grid=(n_pad // block,),
        in_specs=[rows_spec(block)] * (4 + n_ch) + [whole_spec((m,)), whole_spec((m, n_ch))] + [whole_spec((m,))] * 5,
        out_specs=(whole_spec((m + block,)), whole_spec((m + block, n_ch))),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="composite_bwd",
    )(start, length, pad(d_op), pad(d_depth), *d_rgb_cols, sigma, color, t0, t1, valid8, weights, dw)
    d_sigma = jnp.where(covered, d_sigma[:m], 0.0)
    d_color = jnp.where(covered[:, None], d_color[:m], 0.0)
    return d_sigma, d_color, None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _composite(sigma, color, t0, t1, ray_idx, valid, n_rays, cfg):
    return _forward(sigma, color, t0, t1, ray_idx, valid, n_rays, cfg)[0]


_composite.defvjp(_forward, _backward)


def composite_pallas(sigma, color, t0, t1, ray_idx, valid, n_rays: int, *, block_rays: int = DEFAULT_BLOCK_RAYS,
                     num_warps: int = DEFAULT_NUM_WARPS, num_stages: int | None = None,
                     interpret: bool | None = None):
    """Same contract as :func:`composite_xla` (see the module doc); custom VJP w.r.t. sigma and color.

    sigma (M,), color (M, C), t0, t1 (M,) float32; ray_idx (M,) int32 sorted; valid (M,) bool; n_rays static.
    Returns (weights (M,), rgb (R, C), opacity (R,), depth (R,)) float32.
    block_rays: rays per program (power of two; lowered for small R); interpret: None = not on a GPU.
    """
    cfg = (int(block_rays), int(num_warps), num_stages, resolve_interpret(interpret))
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return _composite(f32(sigma), f32(color), f32(t0), f32(t1), jnp.asarray(ray_idx, jnp.int32),
                      jnp.asarray(valid, bool), int(n_rays), cfg)
