"""diffusers ``UNet2DConditionModel`` in Flax Linen (SD 1.x, SD 2.x, Zero123), loading diffusers weights.

Parameter paths mirror the diffusers names (see layers.py and loading.py), e.g.
``down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel``. Tensors are NHWC.

diffusers' naming trap, reproduced: the config key ``attention_head_dim`` is the NUMBER OF HEADS per block (an
int for all blocks, or a per-block list such as SD 2's [5, 10, 20, 20]); the per-head width is
``block_channels // heads`` (SD 1: 8 heads of 40/80/160; SD 2: 5/10/20 heads of 64). ``num_attention_heads``
is refused as diffusers itself refuses it.

Usage::

    unet, params = load_unet("path/to/stable-diffusion-2-1-base", dtype=jnp.bfloat16)
    eps = unet.apply({"params": params}, latents, t, text_embeddings)      # latents (B, 64, 64, 4)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.kernels.spec import REFERENCE_KERNELS, KernelSpec

from . import loading
from .layers import (
    LORA_ALLOW_MISSING,
    Downsample2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    conv,
    group_norm,
    init_lora,
    resnet_cls,
    timestep_embedding,
)

Dtype = Any

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
CLASS_EMBED_TYPES = (None, "projection")


# ---------------------------------------------------------------------------------------------- blocks


class _BlockSettings(nn.Module):
    """Fields shared by the UNet's down / mid / up blocks (not a module of its own)."""

    out_channels: int
    num_layers: int = 1
    resnet_groups: int = 32
    resnet_eps: float = 1e-5
    output_scale_factor: float = 1.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    kernels: KernelSpec = REFERENCE_KERNELS  # of the GroupNorms (layers.group_norm_act)

    def resnet(self, name: str):
        return resnet_cls(self.remat)(self.out_channels, groups=self.resnet_groups, eps=self.resnet_eps,
                                      output_scale_factor=self.output_scale_factor, dtype=self.dtype,
                                      kernels=self.kernels, name=name)


class _AttnSettings(_BlockSettings):
    """Fields of the cross-attention blocks: heads, transformer depth, projection kind, LoRA."""

    heads: int = 8
    transformer_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str | None = None
    lora_rank: int = 0
    lora_scale: float = 1.0

    def transformer(self, name: str):
        return Transformer2DModel(self.heads, self.out_channels // self.heads, num_layers=self.transformer_layers,
                                  norm_num_groups=self.resnet_groups,
                                  use_linear_projection=self.use_linear_projection,
                                  upcast_attention=self.upcast_attention, attention_impl=self.attention_impl,
                                  lora_rank=self.lora_rank, lora_scale=self.lora_scale, remat=self.remat,
                                  dtype=self.dtype, kernels=self.kernels, name=name)


class DownBlock2D(_BlockSettings):
    """Resnets then an optional stride-2 downsampler. Returns (h, skips): one skip per resnet (+ downsampler)."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context=None):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnDownBlock2D(_AttnSettings):
    """(resnet, transformer) pairs then an optional downsampler. Returns (h, skips) as DownBlock2D."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            x = self.transformer(f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock2DCrossAttn(_AttnSettings):
    """resnets_0, then (attentions_i, resnets_{i+1}) for each layer. Channels unchanged."""

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet("resnets_0")(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(f"attentions_{i}")(x, context)
            x = self.resnet(f"resnets_{i + 1}")(x, temb)
        return x


class UpBlock2D(_BlockSettings):
    """Each resnet eats the concatenation [h, last skip]; then an optional nearest-x2 upsampler.

    skips: the tuple of skip tensors for this block, consumed from the end. upsample_size: the spatial size to
    upsample to (the next skip's), which differs from 2x only for inputs not divisible by 2**num_upsamplers.
    """

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context=None, upsample_size=None):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


class CrossAttnUpBlock2D(_AttnSettings):
    """As UpBlock2D with a transformer after every resnet."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
            x = self.transformer(f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


# ---------------------------------------------------------------------------------------------- the UNet


def _per_block(value, n: int, key: str) -> tuple:
    """An int (or None) for all blocks, or a per-block list -> a tuple of n values."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config {key!r} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


# Config keys that change the architecture in ways this port does not implement -> the values it accepts
# (absent keys take diffusers' defaults, which are accepted).
_SUPPORTED_VALUES = {
    "num_attention_heads": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),  # or a per-block list of False
    "mid_block_only_cross_attention": (None, False),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "act_fn": ("silu", "swish"),
    "dropout": (0.0,),  # inference and fine-tuning here run without dropout
}


def _check_supported(config: dict) -> None:
    for key, allowed in _SUPPORTED_VALUES.items():
        if key not in config:
            continue
        value = config[key]
        values = value if isinstance(value, (list, tuple)) and key == "only_cross_attention" else [value]
        if any(v not in allowed for v in values):
            only = " or ".join(map(repr, allowed))
            raise ValueError(f"UNet config {key!r} = {value!r} is not supported (only {only})")


class UNet2DConditionModel(nn.Module):
    """Conditional UNet: (noisy latents, timesteps, context[, class labels]) -> noise prediction.

    Build with :meth:`from_config` (a diffusers ``unet/config.json`` dict) or :func:`load_unet`. Call::

        module.apply({"params": p}, sample, timesteps, encoder_hidden_states, class_labels=None)

    sample (B, H, W, in_channels) NHWC; timesteps () or (B,), int or float; encoder_hidden_states (B, S, D);
    class_labels (B, projection_class_embeddings_input_dim) when ``class_embed_type == "projection"`` (e.g. a
    flattened camera pose), else None. Returns (B, H, W, out_channels) float32. Compute runs in ``dtype``;
    ``kernels`` says which Pallas kernels its GroupNorms may take (default: none, XLA).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embedding_dim: int | None = None
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    resnet_out_scale_factor: float = 1.0
    center_input_sample: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    class_embed_type: str | None = None
    projection_class_embeddings_input_dim: int | None = None
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    lora_rank: int = 0
    lora_scale: float = 1.0
    remat: bool = False
    kernels: KernelSpec = REFERENCE_KERNELS

    @classmethod
    def from_config(cls, config: dict, dtype: Dtype = jnp.float32, attention_impl: str | None = None,
                    lora_rank: int = 0, remat: bool = False, lora_scale: float = 1.0,
                    kernels: KernelSpec = REFERENCE_KERNELS) -> UNet2DConditionModel:
        """Module from a diffusers ``unet/config.json`` dict; ValueError naming the key of anything unsupported.
        ``kernels``: the GroupNorms' kernel choice (``KernelSpec.from_config(cfg.kernels)`` in a run)."""
        cls_name = config.get("_class_name", "UNet2DConditionModel")
        if cls_name != "UNet2DConditionModel":
            raise ValueError(f"UNet config '_class_name' is {cls_name!r}; only UNet2DConditionModel is supported")
        _check_supported(config)
        down = tuple(config.get("down_block_types", cls.down_block_types))
        up = tuple(config.get("up_block_types", cls.up_block_types))
        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        channels = tuple(config.get("block_out_channels", cls.block_out_channels))
        n = len(channels)
        for key, types, known in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
            if len(types) != n:
                raise ValueError(f"UNet config {key!r} has {len(types)} entries for {n} block_out_channels")
            for t in types:
                if t not in known:
                    raise ValueError(f"UNet config {key!r}: block type {t!r} is not supported (only {known})")
        if mid not in MID_BLOCKS:
            raise ValueError(f"UNet config 'mid_block_type' = {mid!r} is not supported (only {MID_BLOCKS})")
        groups = config.get("norm_num_groups", 32)
        if groups is None:
            raise ValueError("UNet config 'norm_num_groups' = None is not supported (needs GroupNorm)")
        heads = _per_block(config.get("attention_head_dim", 8), n, "attention_head_dim")
        for c, h, t_down, t_up in zip(channels, heads, down, reversed(up)):
            if ("CrossAttn" in t_down or "CrossAttn" in t_up) and c % h:
                raise ValueError(f"UNet config 'attention_head_dim' (= heads) {h} does not divide {c} channels")
        cross = _per_block(config.get("cross_attention_dim", 1280), n, "cross_attention_dim")
        if len(set(cross)) != 1:
            raise ValueError(f"UNet config 'cross_attention_dim' = {cross}: per-block context widths are not "
                             f"supported (one context tensor feeds every block)")
        transformer_layers = _per_block(config.get("transformer_layers_per_block", 1), n,
                                        "transformer_layers_per_block")
        if any(not isinstance(t, int) for t in transformer_layers):
            raise ValueError("UNet config 'transformer_layers_per_block': nested per-layer lists are not supported")
        class_type = config.get("class_embed_type")
        if class_type not in CLASS_EMBED_TYPES:
            raise ValueError(f"UNet config 'class_embed_type' = {class_type!r} is not supported "
                             f"(only {CLASS_EMBED_TYPES})")
        class_dim = config.get("projection_class_embeddings_input_dim")
        if class_type == "projection" and class_dim is None:
            raise ValueError("UNet config 'class_embed_type' = 'projection' needs "
                             "'projection_class_embeddings_input_dim'")
        return cls(
            in_channels=config.get("in_channels", 4),
            out_channels=config.get("out_channels", 4),
            block_out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            mid_block_type=mid,
            layers_per_block=_per_block(config.get("layers_per_block", 2), n, "layers_per_block"),
            transformer_layers_per_block=transformer_layers,
            num_heads=heads,
            cross_attention_dim=cross[0],
            use_linear_projection=bool(config.get("use_linear_projection", False)),
            upcast_attention=bool(config.get("upcast_attention", False)),
            norm_num_groups=groups,
            norm_eps=float(config.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
            freq_shift=float(config.get("freq_shift", 0)),
            time_embedding_dim=config.get("time_embedding_dim"),
            downsample_padding=int(config.get("downsample_padding", 1)),
            mid_block_scale_factor=float(config.get("mid_block_scale_factor", 1.0)),
            resnet_out_scale_factor=float(config.get("resnet_out_scale_factor", 1.0)),
            center_input_sample=bool(config.get("center_input_sample", False)),
            conv_in_kernel=int(config.get("conv_in_kernel", 3)),
            conv_out_kernel=int(config.get("conv_out_kernel", 3)),
            class_embed_type=class_type,
            projection_class_embeddings_input_dim=class_dim,
            dtype=dtype,
            attention_impl=attention_impl,
            lora_rank=int(lora_rank),
            lora_scale=float(lora_scale),
            remat=bool(remat),
            kernels=kernels,
        )

    def dummy_inputs(self, batch: int = 1) -> tuple:
        """Small inputs with the right ranks and widths, for ``init`` / ``jax.eval_shape``."""
        size = 2 ** len(self.block_out_channels)
        sample = jnp.zeros((batch, size, size, self.in_channels), jnp.float32)
        timesteps = jnp.zeros((batch,), jnp.float32)
        context = jnp.zeros((batch, 1, self.cross_attention_dim), jnp.float32)
        class_labels = None
        if self.class_embed_type == "projection":
            class_labels = jnp.zeros((batch, self.projection_class_embeddings_input_dim), jnp.float32)
        return sample, timesteps, context, class_labels

    def _attn_kwargs(self, heads: int, transformer_layers: int) -> dict:
        return dict(heads=heads, transformer_layers=transformer_layers,
                    use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention,
                    attention_impl=self.attention_impl, lora_rank=self.lora_rank, lora_scale=self.lora_scale)

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 class_labels: jax.Array | None = None) -> jax.Array:
        batch = sample.shape[0]
        channels = self.block_out_channels
        n = len(channels)
        common = dict(resnet_groups=self.norm_num_groups, resnet_eps=self.norm_eps, remat=self.remat,
                      dtype=self.dtype, kernels=self.kernels)

        # time (+ class) embedding
        t = jnp.broadcast_to(jnp.ravel(jnp.asarray(timesteps, jnp.float32)), (batch,))
        t_emb = timestep_embedding(t, channels[0], self.flip_sin_to_cos, self.freq_shift).astype(self.dtype)
        emb = TimestepEmbedding(self.time_embedding_dim or 4 * channels[0], self.dtype, name="time_embedding")(t_emb)
        if self.class_embed_type == "projection":
            if class_labels is None:
                raise ValueError("this UNet has a class embedding (class_embed_type 'projection'): pass class_labels "
                                 f"of shape (B, {self.projection_class_embeddings_input_dim})")
            emb = emb + TimestepEmbedding(emb.shape[-1], self.dtype, name="class_embedding")(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given but this UNet has no class embedding (class_embed_type None)")

        context = encoder_hidden_states.astype(self.dtype)
        x = sample.astype(self.dtype)
        if self.center_input_sample:
            x = 2 * x - 1.0
        x = conv(channels[0], "conv_in", self.dtype, kernel_size=self.conv_in_kernel)(x)

        # down
        skips = [x]
        for i, block_type in enumerate(self.down_block_types):
            kw = dict(out_channels=channels[i], num_layers=self.layers_per_block[i], add_downsample=i < n - 1,
                      downsample_padding=self.downsample_padding, output_scale_factor=self.resnet_out_scale_factor,
                      name=f"down_blocks_{i}", **common)
            if block_type == "CrossAttnDownBlock2D":
                block = CrossAttnDownBlock2D(**kw, **self._attn_kwargs(self.num_heads[i],
                                                                       self.transformer_layers_per_block[i]))
            else:
                block = DownBlock2D(**kw)
            x, res = block(x, emb, context)
            skips.extend(res)

        # mid
        if self.mid_block_type is not None:
            x = UNetMidBlock2DCrossAttn(
                out_channels=channels[-1], output_scale_factor=self.mid_block_scale_factor, name="mid_block",
                **common, **self._attn_kwargs(self.num_heads[-1], self.transformer_layers_per_block[-1]))(
                    x, emb, context)

        # up: each block consumes layers + 1 skips; non-final blocks upsample to the next skip's size
        rev_channels = channels[::-1]
        rev_layers = self.layers_per_block[::-1]
        rev_heads = self.num_heads[::-1]
        rev_transformer = self.transformer_layers_per_block[::-1]
        for i, block_type in enumerate(self.up_block_types):
            num = rev_layers[i] + 1
            res, skips = tuple(skips[-num:]), skips[:-num]
            final = i == n - 1
            upsample_size = None if final else skips[-1].shape[1:3]
            kw = dict(out_channels=rev_channels[i], num_layers=num, add_upsample=not final,
                      output_scale_factor=self.resnet_out_scale_factor, name=f"up_blocks_{i}", **common)
            if block_type == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(**kw, **self._attn_kwargs(rev_heads[i], rev_transformer[i]))
            else:
                block = UpBlock2D(**kw)
            x = block(x, res, emb, context, upsample_size)

        x = group_norm(x, self.norm_num_groups, self.norm_eps, "conv_norm_out", silu=True, kernels=self.kernels)
        x = conv(self.out_channels, "conv_out", self.dtype, kernel_size=self.conv_out_kernel)(x)
        return x.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------- loading


def load_unet(path, dtype: Dtype = jnp.float32, *, variant: str | None = None, mesh=None, lora_rank: int = 0,
              param_dtype: Dtype = jnp.float32, lora_key: jax.Array | None = None,
              **module_kwargs) -> tuple[UNet2DConditionModel, dict]:
    """Load a diffusers UNet folder into (module, params).

    path: a pipeline folder (holding ``unet/``), the ``unet`` folder itself, a hub cache entry or a cached hub id.
    dtype: compute dtype of the module; params are float32 (``param_dtype`` to store them otherwise, e.g.
    bfloat16 for a frozen guidance UNet). variant: e.g. "fp16" for ``diffusion_pytorch_model.fp16.safetensors``.
    mesh: replicate the params over this mesh (else default device). lora_rank > 0 adds LoRA to every attention
    projection, initialised by :func:`init_lora` with ``lora_key`` (default key 0): outputs equal the base model's.
    module_kwargs: more :meth:`UNet2DConditionModel.from_config` options (attention_impl, remat, lora_scale,
    kernels).
    Raises :class:`loading.WeightLoadingError` on a missing folder or a config / weights mismatch.
    """
    folder = loading.resolve_component_dir(path, "unet")
    config = loading.read_config(folder)
    try:
        module = UNet2DConditionModel.from_config(config, dtype=dtype, lora_rank=lora_rank, **module_kwargs)
    except ValueError as e:
        raise loading.WeightLoadingError(f"{folder / 'config.json'}: {e}") from None
    abstract = jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())["params"]
    state = loading.read_safetensors(loading.weight_files(folder, variant))
    params = loading.convert_state_dict(state, abstract, what=f"UNet {folder}",
                                        allow_missing=LORA_ALLOW_MISSING if lora_rank else (), dtype=np.float32)
    if lora_rank:
        params = init_lora(params, jax.random.key(0) if lora_key is None else lora_key)
    params = jax.tree.map(lambda a: np.asarray(a, param_dtype), params)
    return module, loading.place(params, mesh)


__all__ = ["UNet2DConditionModel", "load_unet", "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
           "UpBlock2D", "CrossAttnUpBlock2D"]
