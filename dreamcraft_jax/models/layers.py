"""Flax Linen building blocks shared by the diffusers-compatible UNet and VAE.

(About 600 lines: one module so that every layer the loaders map diffusers names onto sits in one place.)

Every submodule is named after the diffusers attribute it mirrors, with list indices glued on by "_"
(``resnets_0``, ``to_out_0``, ``net_2``), so that :func:`dreamcraft_jax.models.loading.convert_state_dict` maps a
diffusers state dict onto these modules with renames and transposes only. Images are NHWC.

Numerics:

* parameters are created in float32 (``param_dtype``); activations are computed in the module's ``dtype``
  (bfloat16 on GPU, float32 in tests);
* GroupNorm and LayerNorm run in float32 (input cast up, output cast back); GroupNorm has its own VJP and
  fuses the SiLU that follows it, so that each takes two passes over memory forward and two backward. Which
  kernels a GroupNorm takes is the ``kernels`` (:class:`~dreamcraft_jax.kernels.spec.KernelSpec`) field of the
  modules (default ``KernelSpec()``: XLA): on a GPU, with ``fused_groupnorm`` the small ones run as one Pallas
  kernel per pass (:mod:`dreamcraft_jax.kernels.groupnorm`); otherwise, with ``groupnorm_sums_max_rows``, the
  per-channel sums of both passes go through split-row Pallas kernels (:mod:`dreamcraft_jax.kernels.channel_sums`):
  XLA's column reductions have too little parallelism at these batch sizes;
* attention goes through :func:`jax.nn.dot_product_attention`: its XLA path accumulates the logits in float32
  and takes the softmax in float32; cuDNN flash attention (``attention_impl="cudnn"``) does the same on chip.

LoRA (``lora_rank > 0`` on :class:`Attention`): each of ``to_q``, ``to_k``, ``to_v``, ``to_out_0`` gets a sibling
``<proj>_lora`` holding ``down/kernel`` (in, r), initialised N(0, 1/r), and ``up/kernel`` (r, out), initialised to
zero; the projection returns ``proj(x) + lora_scale * up(down(x))``. A diffusers checkpoint has no such keys: load
with ``allow_missing=("*_lora/*",)`` and then :func:`init_lora` (the loader fills allowed-missing leaves with
zeros, which would leave the down-projections dead).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.kernels import channel_sums as channel_sums_kernel
from dreamcraft_jax.kernels import groupnorm as groupnorm_kernel
from dreamcraft_jax.kernels.common import cast_varying
from dreamcraft_jax.kernels.spec import REFERENCE_KERNELS, KernelSpec
from dreamcraft_jax.parallel import varying_axes

Dtype = Any

LORA_SUFFIX = "_lora"
LORA_ALLOW_MISSING = ("*" + LORA_SUFFIX + "/*",)
ATTENTION_IMPLS = (None, "xla", "cudnn")


# ---------------------------------------------------------------------------------------------- primitives


def dense(features: int, name: str, dtype: Dtype, use_bias: bool = True, **kw) -> nn.Dense:
    """A linear layer (diffusers ``nn.Linear``): float32 params, computed in ``dtype``."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name, **kw)


class Conv2d(nn.Module):
    """A 2-D convolution on NHWC input whose kernel is stored (out, kh, kw, in) ("OHWI"), not Flax's HWIO.

    OHWI row-major is the filter layout XLA gives cuDNN for NHWC bfloat16 convolutions: with an HWIO
    parameter every step began with a transpose of each conv kernel (~0.65 ms of the 1-view SD and Zero123 SDS
    steps on an H200, ``benchmarks/archive/profile/profile_views1_h200.json``); stored this way the kernel is read as
    it is. Every 4-D ``kernel`` leaf of the models is laid out so (the loaders turn torch's OIHW into it).

    y = conv(x, kernel) + bias: x (B, H, W, I) -> (B, H', W', O), computed in ``dtype``.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] | str = ((0, 0), (0, 0))
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=0),
                            (self.features, kh, kw, x.shape[-1]), self.param_dtype)
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
                                         self.padding, dimension_numbers=("NHWC", "OHWI", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y


def conv(features: int, name: str | None, dtype: Dtype, kernel_size: int = 3, stride: int = 1,
         padding: int | tuple[tuple[int, int], tuple[int, int]] | None = None) -> Conv2d:
    """A 2-D convolution on NHWC input (diffusers ``nn.Conv2d``); padding defaults to "same" for odd kernels.

    ``padding``: one int for all sides, or ((top, bottom), (left, right)). name None: for ``setup``, where the
    attribute name names the module.
    """
    pad = (kernel_size - 1) // 2 if padding is None else padding
    pads = ((pad, pad), (pad, pad)) if isinstance(pad, int) else tuple(tuple(p) for p in pad)
    return Conv2d(features, (kernel_size, kernel_size), strides=(stride, stride), padding=pads, dtype=dtype,
                  name=name)


def _group_statistics(x: jax.Array, num_groups: int, eps: float, kernels: KernelSpec) -> tuple[jax.Array, jax.Array]:
    """Per-(batch, group) mean and 1/sqrt(var + eps) of x (B, ..., C), float32, each (B, G).

    One read of x: per-channel sums of d = x - x[first pixel] and d^2 (:func:`_shifted_channel_sums`), then
    per-group moments by the parallel-variance rule var_g = mean_c(var_c + (mean_c - mean_g)^2). The shift keeps
    the one-pass E[d^2] - E[d]^2 accurate when a channel's mean dwarfs its spread.
    """
    b, c = x.shape[0], x.shape[-1]
    n = int(np.prod(x.shape[1:-1]))
    shift, sum_d, sum_d2 = _shifted_channel_sums(x, kernels)
    mean_d = sum_d / n
    var_c = jnp.maximum(sum_d2 / n - mean_d * mean_d, 0.0)
    mean_c = (mean_d + shift).reshape(b, num_groups, c // num_groups)
    mean_g = jnp.mean(mean_c, axis=-1)
    var_g = jnp.mean(var_c.reshape(mean_c.shape) + (mean_c - mean_g[..., None]) ** 2, axis=-1)
    return mean_g, jax.lax.rsqrt(var_g + eps)


def _shifted_channel_sums(x: jax.Array, kernels: KernelSpec) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (B, ..., C) -> (shift, sum_d, sum_d2), each (B, C) float32: shift = x[:, first pixel], sums over the
    spatial axes of d = x - shift and d^2 (one multi-output reduction, or the split-row kernel: see
    :func:`_sums_take_kernel`)."""
    if _sums_take_kernel(x, kernels):
        return channel_sums_kernel.shifted_channel_sums(x, **kernels.sums_plan_kw)
    b, c = x.shape[0], x.shape[-1]
    xs = x.reshape(b, -1, c).astype(jnp.float32)
    shift = xs[:, 0, :]
    d = xs - shift[:, None, :]
    return shift, jnp.sum(d, axis=1), jnp.sum(d * d, axis=1)


def _backward_channel_sums(x: jax.Array, dy: jax.Array, mean_c: jax.Array, rstd_c: jax.Array, scale: jax.Array,
                           bias: jax.Array, silu: bool, kernels: KernelSpec) -> tuple[jax.Array, jax.Array]:
    """(sum_dz, sum_dz_xhat), each (B, C) float32: sums over the spatial axes of dz and dz * xhat, where
    xhat = (x - mean_c) * rstd_c, z = xhat * scale + bias and dz = dy * act'(z).

    x, dy (B, ..., C); mean_c, rstd_c (B, 1, ..., 1, C) float32; scale, bias (C,).
    """
    if _sums_take_kernel(x, kernels):
        return channel_sums_kernel.backward_channel_sums(x, dy, mean_c, rstd_c, scale, bias, silu,
                                                         **kernels.sums_plan_kw)
    xhat, dz = _backward_dz(x, dy, mean_c, rstd_c, scale, bias, silu)
    reduce_axes = tuple(range(1, x.ndim - 1))
    return jnp.sum(dz, axis=reduce_axes), jnp.sum(dz * xhat, axis=reduce_axes)


def _backward_dz(x, dy, mean_c, rstd_c, scale, bias, silu):
    """(xhat, dz) in float32, as in :func:`_backward_channel_sums`."""
    xhat = (x.astype(jnp.float32) - mean_c) * rstd_c
    dz = dy.astype(jnp.float32)
    if silu:  # d silu(z) / dz = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
        z = xhat * scale + bias
        sig = jax.nn.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    return xhat, dz


def _per_channel(v: jax.Array, x: jax.Array, group_size: int) -> jax.Array:
    """(B, G) -> (B, 1, ..., 1, C) broadcastable against x (B, ..., C)."""
    v = jnp.repeat(v, group_size, axis=-1)
    return v.reshape((v.shape[0],) + (1,) * (x.ndim - 2) + (v.shape[-1],))


def _sums_take_kernel(x: jax.Array, kernels: KernelSpec) -> bool:
    """Whether the per-channel sums of x (B, ..., C) go through :mod:`dreamcraft_jax.kernels.channel_sums`: on a
    GPU backend, with at most ``kernels.groupnorm_sums_max_rows`` spatial positions per batch element (0: never)."""
    rows = kernels.groupnorm_sums_max_rows
    return rows > 0 and _on_gpu() and x.ndim >= 3 and int(np.prod(x.shape[1:-1])) <= rows


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _groupnorm_takes_kernel(x: jax.Array, num_groups: int, kernels: KernelSpec) -> bool:
    """Whether the whole GroupNorm of x goes through :mod:`dreamcraft_jax.kernels.groupnorm`: on a GPU backend,
    with ``kernels.fused_groupnorm``, for shapes the kernel suits (:func:`~dreamcraft_jax.kernels.groupnorm.suited`)."""
    return kernels.fused_groupnorm and _on_gpu() and groupnorm_kernel.suited(x.shape, num_groups)


def group_norm_act(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, eps: float,
                   silu: bool, kernels: KernelSpec = REFERENCE_KERNELS) -> jax.Array:
    """y = act((x - mean_g) / sqrt(var_g + eps) * scale + bias), x (B, ..., C), scale/bias (C,), y in x.dtype.

    Groups are contiguous channel ranges as in PyTorch; statistics, affine and the optional SiLU run in float32.
    Forward: one reduction pass over x and one elementwise pass. Backward (custom VJP, the closed-form GroupNorm
    gradient): one pass for the per-channel sums of dz and dz * xhat, one elementwise pass for
    dx = rstd * (dz * scale - mean_g(dz * scale) - xhat * mean_g(dz * scale * xhat)), where dz = dy * act'(z).
    Inside shard_map, scale and bias are first marked varying like x: a custom VJP must return cotangents of
    its inputs' types, and the transpose of that mark sums the per-shard parameter gradients, as autodiff would.
    ``kernels``: which Pallas kernels may run (on a GPU only; see :func:`_groupnorm_takes_kernel` and
    :func:`_sums_take_kernel`); the default is XLA throughout.
    """
    if _groupnorm_takes_kernel(x, num_groups, kernels):
        return groupnorm_kernel.group_norm_act_pallas(x, scale, bias, num_groups, eps, silu)
    axes = varying_axes(x)
    return _group_norm_act(x, cast_varying(scale, axes), cast_varying(bias, axes), num_groups, eps, silu, kernels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _group_norm_act(x, scale, bias, num_groups, eps, silu, kernels):
    return _group_norm_act_fwd(x, scale, bias, num_groups, eps, silu, kernels)[0]


def _group_norm_act_fwd(x, scale, bias, num_groups, eps, silu, kernels):
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"GroupNorm: {c} channels do not split into {num_groups} groups")
    mean, rstd = _group_statistics(x, num_groups, eps, kernels)
    gain = _per_channel(rstd, x, c // num_groups) * scale  # z = x * gain + offset
    offset = bias - _per_channel(mean, x, c // num_groups) * gain
    z = x.astype(jnp.float32) * gain + offset
    y = jax.nn.silu(z) if silu else z
    return y.astype(x.dtype), (x, scale, bias, mean, rstd)


def _group_norm_act_bwd(num_groups, eps, silu, kernels, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    c = x.shape[-1]
    group_size = c // num_groups
    rstd_c, mean_c = _per_channel(rstd, x, group_size), _per_channel(mean, x, group_size)
    sum_dz, sum_dz_xhat = _backward_channel_sums(x, dy, mean_c, rstd_c, scale, bias, silu, kernels)  # (B, C) each
    count = group_size * int(np.prod(x.shape[1:-1]))
    mean_dxhat = jnp.sum((sum_dz * scale).reshape(-1, num_groups, group_size), axis=-1) / count  # (B, G)
    mean_dxhat_xhat = jnp.sum((sum_dz_xhat * scale).reshape(-1, num_groups, group_size), axis=-1) / count
    xhat, dz = _backward_dz(x, dy, mean_c, rstd_c, scale, bias, silu)
    dx = rstd_c * (dz * scale - _per_channel(mean_dxhat, x, group_size)
                   - xhat * _per_channel(mean_dxhat_xhat, x, group_size))
    return dx.astype(x.dtype), jnp.sum(sum_dz_xhat, axis=0).astype(scale.dtype), \
        jnp.sum(sum_dz, axis=0).astype(bias.dtype)


_group_norm_act.defvjp(_group_norm_act_fwd, _group_norm_act_bwd)


class GroupNorm(nn.Module):
    """diffusers / PyTorch ``nn.GroupNorm`` (params ``scale``, ``bias``, float32) with an optional fused SiLU;
    ``kernels``: the Pallas kernels it may take (:func:`group_norm_act`)."""

    num_groups: int
    eps: float
    silu: bool = False
    kernels: KernelSpec = REFERENCE_KERNELS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm_act(x, scale, bias, self.num_groups, self.eps, self.silu, self.kernels)


def group_norm(x: jax.Array, num_groups: int, eps: float, name: str, silu: bool = False,
               kernels: KernelSpec = REFERENCE_KERNELS) -> jax.Array:
    """GroupNorm (then SiLU when ``silu``) over the channel axis of (..., C); float32 math, result in x.dtype.

    See :func:`group_norm_act` for the formula, the memory passes it takes and ``kernels``.
    """
    return GroupNorm(num_groups, eps, silu, kernels, name=name)(x)


def layer_norm(x: jax.Array, eps: float, name: str) -> jax.Array:
    """LayerNorm over the last axis in float32, result in x.dtype."""
    norm = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False,
                        name=name)
    return norm(x.astype(jnp.float32)).astype(x.dtype)


def nearest_resize(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Nearest-neighbour resize of (B, H, W, C) to (B, *size, C) as torch ``F.interpolate(mode="nearest")``.

    Source index = floor(dst * in / out); for an exact factor 2 this is a plain repeat.
    """
    _, h, w, _ = x.shape
    oh, ow = int(size[0]), int(size[1])
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = np.floor(np.arange(oh) * (h / oh)).astype(np.int32)
    cols = np.floor(np.arange(ow) * (w / ow)).astype(np.int32)
    return x[:, rows][:, :, cols]


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32, as diffusers ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


# ---------------------------------------------------------------------------------------------- attention


def resolve_attention_impl(requested: str | None, dtype: Dtype, head_dim: int) -> str | None:
    """The ``implementation`` to pass to :func:`jax.nn.dot_product_attention`, decided statically.

    ``"cudnn"`` is honoured only where cuDNN flash attention can run: GPU backend, bf16/fp16 compute and a head
    dim that is a multiple of 8 and at most 128; anything else falls back to XLA (None). ``"xla"`` and None
    both mean XLA.
    """
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {requested!r}")
    if requested != "cudnn":
        return None
    ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim % 8 == 0 and head_dim <= 128)
    return "cudnn" if ok else None


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                         implementation: str | None = None) -> jax.Array:
    """Scaled dot-product attention of projected tokens.

    q: (B, T, heads * D); k, v: (B, S, heads * D) -> (B, T, heads * D). Logits scaled by 1/sqrt(D); logits
    accumulate in float32 and the softmax is float32 whatever the input dtype.
    """
    b, t, inner = q.shape
    s = k.shape[1]
    d = inner // heads
    out = jax.nn.dot_product_attention(q.reshape(b, t, heads, d), k.reshape(b, s, heads, d),
                                       v.reshape(b, s, heads, d), implementation=implementation)
    return out.reshape(b, t, inner)


class LoRA(nn.Module):
    """Low-rank residual ``up(down(x))``: down (in -> rank) ~ N(0, 1/rank), up (rank -> features) = 0."""

    features: int
    rank: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        down = dense(self.rank, "down", self.dtype, use_bias=False,
                     kernel_init=nn.initializers.normal(stddev=1.0 / self.rank))(x)
        return dense(self.features, "up", self.dtype, use_bias=False, kernel_init=nn.initializers.zeros)(down)


class Attention(nn.Module):
    """diffusers ``Attention``: to_q / to_k / to_v / to_out_0, optional GroupNorm and residual (VAE style).

    Call with x (B, T, C) and optional context (B, S, Dc) (self-attention when None) -> (B, T, C); or with a
    spatial x (B, H, W, C) -> (B, H, W, C). ``norm_num_groups`` adds ``group_norm`` before the projections;
    ``residual_connection`` adds the input back; the result is divided by ``rescale_output_factor``.

    ``upcast_attention`` (diffusers: cast q, k to float32 before q k^T) needs no extra work here: the logits of
    half-precision q, k are accumulated in float32 (products of bf16/fp16 numbers are exact in float32) and the
    softmax is float32 in both the XLA and the cuDNN paths. The flag is kept so the module mirrors the config.
    """

    heads: int
    head_dim: int
    qkv_bias: bool = False
    norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    upcast_attention: bool = False
    attention_impl: str | None = None
    lora_rank: int = 0
    lora_scale: float = 1.0
    dtype: Dtype = jnp.float32
    kernels: KernelSpec = REFERENCE_KERNELS  # of the GroupNorm (see group_norm_act)

    def _project(self, name: str, features: int, x: jax.Array, use_bias: bool) -> jax.Array:
        y = dense(features, name, self.dtype, use_bias=use_bias)(x)
        if self.lora_rank:
            y = y + self.lora_scale * LoRA(features, self.lora_rank, self.dtype, name=name + LORA_SUFFIX)(x)
        return y

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        residual = x
        spatial_shape = x.shape if x.ndim == 4 else None
        if spatial_shape is not None:
            b, h, w, c = x.shape
            x = x.reshape(b, h * w, c)
        if self.norm_num_groups is not None:
            x = group_norm(x, self.norm_num_groups, self.norm_eps, "group_norm", kernels=self.kernels)
        context = x if context is None else context.astype(self.dtype)
        inner = self.heads * self.head_dim
        q = self._project("to_q", inner, x, self.qkv_bias)
        k = self._project("to_k", inner, context, self.qkv_bias)
        v = self._project("to_v", inner, context, self.qkv_bias)
        impl = resolve_attention_impl(self.attention_impl, self.dtype, self.head_dim)
        out = multi_head_attention(q, k, v, self.heads, impl)
        out = self._project("to_out_0", residual.shape[-1], out, True)
        if spatial_shape is not None:
            out = out.reshape(spatial_shape)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


def init_lora(params: dict, key: jax.Array) -> dict:
    """Re-initialise every ``*_lora`` subtree of a params tree: ``down`` ~ N(0, 1/rank), ``up`` = 0.

    For trees that came out of the loader with the LoRA leaves allowed missing (filled with zeros). Each
    subtree's key is folded from ``key`` and a hash of its path, so the result does not depend on tree order.
    """

    def walk(node, path):
        if not isinstance(node, dict):
            return node
        out = {}
        for name, child in node.items():
            child_path = path + (name,)
            if name.endswith(LORA_SUFFIX) and isinstance(child, dict) and "down" in child:
                down = child["down"]["kernel"]
                sub = jax.random.fold_in(key, zlib.crc32("/".join(child_path).encode()))
                rank = down.shape[-1]
                out[name] = {
                    "down": {"kernel": (jax.random.normal(sub, down.shape, jnp.float32) / rank).astype(down.dtype)},
                    "up": {"kernel": jnp.zeros_like(child["up"]["kernel"])},
                }
            else:
                out[name] = walk(child, child_path)
        return out

    return walk(params, ())


# ---------------------------------------------------------------------------------------------- conv blocks


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (pre-norm, "default" time embedding: added after conv1).

    x (B, H, W, Cin), temb (B, Dt) or None (VAE: no ``time_emb_proj``) -> (B, H, W, out_channels).
    ``conv_shortcut`` (1x1) appears when Cin != out_channels.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    kernels: KernelSpec = REFERENCE_KERNELS  # of the GroupNorms (see group_norm_act)

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = group_norm(x, self.groups, self.eps, "norm1", silu=True, kernels=self.kernels)
        h = conv(self.out_channels, "conv1", self.dtype)(h)
        if temb is not None:
            h = h + dense(self.out_channels, "time_emb_proj", self.dtype)(jax.nn.silu(temb))[:, None, None, :]
        h = group_norm(h, self.groups, self.eps, "norm2", silu=True, kernels=self.kernels)
        h = conv(self.out_channels, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, "conv_shortcut", self.dtype, kernel_size=1)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


def resnet_cls(remat: bool):
    """ResnetBlock2D, rematerialised (activations recomputed in the backward pass) when ``remat``."""
    return nn.remat(ResnetBlock2D) if remat else ResnetBlock2D


class Downsample2D(nn.Module):
    """3x3 conv, stride 2 (``downsamplers_0/conv``). (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_channels).

    ``padding`` 1 pads all sides (UNet); ``padding`` 0 pads one row/column at the bottom/right only, as
    diffusers does for the VAE encoder.
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # The VAE's one-sided padding goes into the convolution itself: a separate jnp.pad copies the whole
        # activation (and its backward slices the gradient back).
        padding = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv(self.out_channels, "conv", self.dtype, stride=2, padding=padding)(x)


class Upsample2D(nn.Module):
    """Nearest upsampling (x2, or to ``output_size``) then a 3x3 conv (``upsamplers_0/conv``)."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Sequence[int] | None = None) -> jax.Array:
        size = (2 * x.shape[1], 2 * x.shape[2]) if output_size is None else output_size
        return conv(self.out_channels, "conv", self.dtype)(nearest_resize(x, size))


class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: linear_1 -> SiLU -> linear_2. (B, Din) -> (B, features)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = dense(self.features, "linear_1", self.dtype)(x.astype(self.dtype))
        return dense(self.features, "linear_2", self.dtype)(jax.nn.silu(x))


# ---------------------------------------------------------------------------------------------- transformer


class GEGLU(nn.Module):
    """``proj`` to 2 * features, split into (value, gate), value * gelu(gate) (exact erf gelu)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(dense(2 * self.features, "proj", self.dtype)(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net_0`` (GEGLU to 4 * dim), ``net_2`` (back to dim)."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, self.dtype, name="net_0")(x)
        return dense(dim, "net_2", self.dtype)(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm with a residual.

    x (B, T, dim), context (B, S, Dc) -> (B, T, dim). dim = heads * head_dim.
    """

    heads: int
    head_dim: int
    norm_eps: float = 1e-5
    upcast_attention: bool = False
    attention_impl: str | None = None
    lora_rank: int = 0
    lora_scale: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        attn = dict(heads=self.heads, head_dim=self.head_dim, upcast_attention=self.upcast_attention,
                    attention_impl=self.attention_impl, lora_rank=self.lora_rank, lora_scale=self.lora_scale,
                    dtype=self.dtype)
        x = x + Attention(**attn, name="attn1")(layer_norm(x, self.norm_eps, "norm1"))
        x = x + Attention(**attn, name="attn2")(layer_norm(x, self.norm_eps, "norm2"), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(layer_norm(x, self.norm_eps, "norm3"))


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` on continuous input (the UNet's spatial transformer).

    x (B, H, W, C), context (B, S, Dc) -> (B, H, W, C). GroupNorm (eps 1e-6), ``proj_in`` (Dense when
    ``use_linear_projection``, else 1x1 conv), ``num_layers`` BasicTransformerBlocks, ``proj_out``, residual.
    """

    heads: int
    head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str | None = None
    lora_rank: int = 0
    lora_scale: float = 1.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    kernels: KernelSpec = REFERENCE_KERNELS  # of the GroupNorm (see group_norm_act)

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        residual = x
        x = group_norm(x, self.norm_num_groups, 1e-6, "norm", kernels=self.kernels)
        if self.use_linear_projection:
            x = dense(inner, "proj_in", self.dtype)(x.reshape(b, h * w, c))
        else:
            x = conv(inner, "proj_in", self.dtype, kernel_size=1)(x).reshape(b, h * w, inner)
        block = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            x = block(self.heads, self.head_dim, upcast_attention=self.upcast_attention,
                      attention_impl=self.attention_impl, lora_rank=self.lora_rank, lora_scale=self.lora_scale,
                      dtype=self.dtype, name=f"transformer_blocks_{i}")(x, context)
        if self.use_linear_projection:
            x = dense(c, "proj_out", self.dtype)(x).reshape(b, h, w, c)
        else:
            x = conv(c, "proj_out", self.dtype, kernel_size=1)(x.reshape(b, h, w, inner))
        return x + residual
