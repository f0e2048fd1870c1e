"""diffusers ``AutoencoderKL`` (the Stable Diffusion VAE) in Flax Linen, loading diffusers weights.

Images are NHWC in [-1, 1]; latents NHWC with ``latent_channels`` channels, unscaled (multiply by
``module.scaling_factor`` before the UNet, as diffusers pipelines do). Parameter paths mirror diffusers, e.g.
``encoder/mid_block/attentions_0/to_q/kernel``.

Usage::

    vae, params = load_vae("path/to/stable-diffusion-2-1-base")
    mean, logvar = vae.apply({"params": params}, images, method="encode")
    latents = AutoencoderKL.sample(mean, logvar, key) * vae.scaling_factor
    images = vae.apply({"params": params}, latents / vae.scaling_factor, method="decode")
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.kernels.spec import REFERENCE_KERNELS, KernelSpec

from . import loading
from .layers import Attention, Downsample2D, Upsample2D, conv, group_norm, resnet_cls

Dtype = Any

VAE_EPS = 1e-6  # diffusers hard-codes this epsilon for every VAE norm


class DownEncoderBlock2D(nn.Module):
    """Resnets (no time embedding) then an optional downsampler with the VAE's bottom/right padding."""

    out_channels: int
    num_layers: int = 1
    groups: int = 32
    add_downsample: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32
    kernels: KernelSpec = REFERENCE_KERNELS  # of the GroupNorms (layers.group_norm_act)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = resnet_cls(self.remat)(self.out_channels, self.groups, VAE_EPS, dtype=self.dtype,
                                       kernels=self.kernels, name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """Resnets (no time embedding) then an optional nearest-x2 upsampler."""

    out_channels: int
    num_layers: int = 2
    groups: int = 32
    add_upsample: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32
    kernels: KernelSpec = REFERENCE_KERNELS  # of the GroupNorms (layers.group_norm_act)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = resnet_cls(self.remat)(self.out_channels, self.groups, VAE_EPS, dtype=self.dtype,
                                       kernels=self.kernels, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnets_0, single-head spatial self-attention with GroupNorm and residual (attentions_0), resnets_1."""

    groups: int = 32
    add_attention: bool = True
    attention_impl: str | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    kernels: KernelSpec = REFERENCE_KERNELS  # of the GroupNorms (layers.group_norm_act)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        resnet = resnet_cls(self.remat)
        x = resnet(c, self.groups, VAE_EPS, dtype=self.dtype, kernels=self.kernels, name="resnets_0")(x)
        if self.add_attention:
            x = Attention(heads=1, head_dim=c, qkv_bias=True, norm_num_groups=self.groups, norm_eps=VAE_EPS,
                          residual_connection=True, attention_impl=self.attention_impl, dtype=self.dtype,
                          kernels=self.kernels, name="attentions_0")(x)
        return resnet(c, self.groups, VAE_EPS, dtype=self.dtype, kernels=self.kernels, name="resnets_1")(x)


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels), f = 2**(blocks - 1)."""

    block_out_channels: tuple[int, ...]
    latent_channels: int
    layers_per_block: int = 2
    groups: int = 32
    mid_block_add_attention: bool = True
    attention_impl: str | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    kernels: KernelSpec = REFERENCE_KERNELS  # of the GroupNorms (layers.group_norm_act)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ch = self.block_out_channels
        x = conv(ch[0], "conv_in", self.dtype)(x)
        for i, c in enumerate(ch):
            x = DownEncoderBlock2D(c, self.layers_per_block, self.groups, add_downsample=i < len(ch) - 1,
                                   remat=self.remat, dtype=self.dtype, kernels=self.kernels,
                                   name=f"down_blocks_{i}")(x)
        x = UNetMidBlock2D(self.groups, self.mid_block_add_attention, self.attention_impl, self.remat, self.dtype,
                           kernels=self.kernels, name="mid_block")(x)
        x = group_norm(x, self.groups, VAE_EPS, "conv_norm_out", silu=True, kernels=self.kernels)
        return conv(2 * self.latent_channels, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h * f, w * f, out_channels)."""

    block_out_channels: tuple[int, ...]
    out_channels: int = 3
    layers_per_block: int = 2
    groups: int = 32
    mid_block_add_attention: bool = True
    attention_impl: str | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    kernels: KernelSpec = REFERENCE_KERNELS  # of the GroupNorms (layers.group_norm_act)

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        ch = self.block_out_channels[::-1]
        x = conv(ch[0], "conv_in", self.dtype)(z)
        x = UNetMidBlock2D(self.groups, self.mid_block_add_attention, self.attention_impl, self.remat, self.dtype,
                           kernels=self.kernels, name="mid_block")(x)
        for i, c in enumerate(ch):
            x = UpDecoderBlock2D(c, self.layers_per_block + 1, self.groups, add_upsample=i < len(ch) - 1,
                                 remat=self.remat, dtype=self.dtype, kernels=self.kernels, name=f"up_blocks_{i}")(x)
        x = group_norm(x, self.groups, VAE_EPS, "conv_norm_out", silu=True, kernels=self.kernels)
        return conv(self.out_channels, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
    """KL autoencoder. Methods (call through ``apply(..., method=...)``):

    * ``encode(x)``: images (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels)
      float32, logvar clipped to [-30, 20];
    * ``decode(z)``: unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, 3) float32;
    * ``__call__(x, key=None)``: decode(sample or mode of encode(x)) (also what ``init`` traces).

    Static helpers (no params): :meth:`sample` (mean + exp(logvar / 2) * N(0, 1)) and :meth:`mode` (the mean).
    ``scaling_factor`` (and ``shift_factor`` where the config has one) come from the config; ``kernels`` says which
    Pallas kernels its GroupNorms may take (default: none, XLA).
    """

    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool = False
    kernels: KernelSpec = REFERENCE_KERNELS

    @classmethod
    def from_config(cls, config: dict, dtype: Dtype = jnp.float32, attention_impl: str | None = None,
                    remat: bool = False, kernels: KernelSpec = REFERENCE_KERNELS) -> AutoencoderKL:
        """Module from a diffusers ``vae/config.json`` dict; ValueError naming the key of anything unsupported.
        ``kernels``: the GroupNorms' kernel choice (``KernelSpec.from_config(cfg.kernels)`` in a run)."""
        cls_name = config.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ValueError(f"VAE config '_class_name' is {cls_name!r}; only AutoencoderKL is supported")
        channels = tuple(config.get("block_out_channels", (64,)))
        for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(config.get(key, (allowed,) * len(channels)))
            if len(types) != len(channels) or any(t != allowed for t in types):
                raise ValueError(f"VAE config {key!r} = {types} is not supported (only {allowed} per block)")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"VAE config 'act_fn' = {config['act_fn']!r} is not supported (only 'silu')")
        return cls(
            block_out_channels=channels,
            layers_per_block=int(config.get("layers_per_block", 1)),
            latent_channels=int(config.get("latent_channels", 4)),
            in_channels=int(config.get("in_channels", 3)),
            out_channels=int(config.get("out_channels", 3)),
            norm_num_groups=int(config.get("norm_num_groups", 32)),
            scaling_factor=float(config.get("scaling_factor", 0.18215)),
            shift_factor=config.get("shift_factor"),
            use_quant_conv=bool(config.get("use_quant_conv", True)),
            use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
            dtype=dtype,
            attention_impl=attention_impl,
            remat=bool(remat),
            kernels=kernels,
        )

    def setup(self):
        kw = dict(layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                  mid_block_add_attention=self.mid_block_add_attention, attention_impl=self.attention_impl,
                  remat=self.remat, dtype=self.dtype, kernels=self.kernels)
        self.encoder = Encoder(self.block_out_channels, self.latent_channels, **kw)
        self.decoder = Decoder(self.block_out_channels, self.out_channels, **kw)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, None, self.dtype, kernel_size=1)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, None, self.dtype, kernel_size=1)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, C) in [-1, 1] -> posterior (mean, logvar), each (B, H/f, W/f, latent_channels)."""
        moments = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels), float32."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        mean, logvar = self.encode(x)
        z = self.mode(mean, logvar) if key is None else self.sample(mean, logvar, key)
        return self.decode(z)

    @staticmethod
    def sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
        """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, 1)."""
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    @staticmethod
    def mode(mean: jax.Array, logvar: jax.Array | None = None) -> jax.Array:
        """The posterior mode (its mean), e.g. Zero123's conditioning latent."""
        del logvar
        return mean


def load_vae(path, dtype: Dtype = jnp.float32, *, variant: str | None = None, mesh=None,
             param_dtype: Dtype = jnp.float32, **module_kwargs) -> tuple[AutoencoderKL, dict]:
    """Load a diffusers VAE folder into (module, params).

    path: a pipeline folder (holding ``vae/``), the ``vae`` folder itself, a hub cache entry or a cached hub id.
    dtype: compute dtype; params are float32 unless ``param_dtype`` says otherwise. variant: e.g. "fp16".
    mesh: replicate the params over this mesh. module_kwargs: :meth:`AutoencoderKL.from_config` options
    (attention_impl, remat, kernels). Raises :class:`loading.WeightLoadingError` on a missing folder or a mismatch.
    """
    folder = loading.resolve_component_dir(path, "vae")
    config = loading.read_config(folder)
    try:
        module = AutoencoderKL.from_config(config, dtype=dtype, **module_kwargs)
    except ValueError as e:
        raise loading.WeightLoadingError(f"{folder / 'config.json'}: {e}") from None
    size = 2 * module.downsample_factor
    dummy = jnp.zeros((1, size, size, module.in_channels), jnp.float32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), dummy)["params"]
    state = loading.read_safetensors(loading.weight_files(folder, variant))
    params = loading.convert_state_dict(state, abstract, what=f"VAE {folder}", dtype=np.float32)
    params = jax.tree.map(lambda a: np.asarray(a, param_dtype), params)
    return module, loading.place(params, mesh)


__all__ = ["AutoencoderKL", "Encoder", "Decoder", "load_vae"]
