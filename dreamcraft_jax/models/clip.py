"""CLIP text / vision towers and the Zero123 camera projection in Flax, loading transformers / diffusers weights.

* :class:`CLIPTextModel`: the SD text encoder (SD1: CLIP-L, quick_gelu; SD2: OpenCLIP-H converted to the
  transformers layout, gelu, 23 layers). Returns the final-layer-normed hidden states that diffusers'
  ``StableDiffusionPipeline`` feeds to the UNet, the EOS-pooled vector, and optionally diffusers' ``clip_skip``.
* :class:`CLIPVisionModelWithProjection`: the Zero123 image encoder (ViT-L/14 with ``visual_projection``).
* :class:`Zero123CameraProjection`: Linear(image embedding + 4 camera numbers -> cross-attention width).
* Image preprocessing: :func:`clip_preprocess` (transformers' ``CLIPImageProcessor`` geometry: shortest side, centre
  crop) and :func:`zero123_clip_preprocess`, the official Zero123 conditioning path (``FrozenCLIPImageEmbedder``:
  a plain bicubic resize to 224 x 224 with ``align_corners=True``, no antialias, no crop) built on
  :func:`bicubic_resize_align_corners`, which reproduces ``torch.nn.functional.interpolate(mode="bicubic",
  align_corners=True)``.

Parameter paths mirror the transformers attribute names (``text_model/encoder/layers_0/self_attn/q_proj/kernel``)
so that :func:`dreamcraft_jax.models.loading.convert_state_dict` maps checkpoints onto them. Parameters are
float32; ``dtype`` sets the matmul / attention compute dtype, while layer norms, softmax, activations and the
residual stream stay float32 (cheap here: these towers run once per prompt or reference image).

Tokenisation uses transformers' ``CLIPTokenizer`` from local files (no torch needed).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.models import loading
from dreamcraft_jax.models.layers import Conv2d
from dreamcraft_jax.models.loading import WeightLoadingError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LEGACY_EOS_TOKEN_ID = 2  # configs written before transformers PR #24773: pool at argmax(input_ids)

Dtype = Any


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise WeightLoadingError(f"unsupported CLIP hidden_act {name!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------------- configs


def _fields_from(cls, d: Mapping[str, Any]) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``CLIPTextConfig`` that the forward pass uses (defaults: transformers')."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """From a ``text_encoder/config.json`` dict (or a full CLIPConfig holding ``text_config``)."""
        cfg = cls(**_fields_from(cls, d.get("text_config") or d))
        _activation(cfg.hidden_act)
        return cfg


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of a transformers ``CLIPVisionConfig`` that the forward pass uses (defaults: transformers')."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPVisionConfig:
        """From an ``image_encoder/config.json`` dict (or a full CLIPConfig holding ``vision_config``)."""
        sub = d.get("vision_config")
        if sub:
            sub = {"projection_dim": d.get("projection_dim", cls.projection_dim), **sub}
        cfg = cls(**_fields_from(cls, sub or d))
        _activation(cfg.hidden_act)
        return cfg


# ---------------------------------------------------------------------------------------------- shared layers


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # Two-pass variance in float32 like torch (the fast E[x^2] - E[x]^2 form loses digits on large activations).
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False,
                        name=name)


def _dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


class CLIPAttention(nn.Module):
    """Multi-head self-attention: (B, S, D) -> (B, S, D), optionally causal (text tower)."""

    embed_dim: int
    num_heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        head_dim = self.embed_dim // self.num_heads
        def heads(t):
            return t.reshape(b, s, self.num_heads, head_dim)

        q = heads(_dense(self.embed_dim, self.dtype, "q_proj")(x))
        k = heads(_dense(self.embed_dim, self.dtype, "k_proj")(x))
        v = heads(_dense(self.embed_dim, self.dtype, "v_proj")(x))
        # Scale 1/sqrt(head_dim) as in CLIP; the softmax runs in float32 inside dot_product_attention.
        o = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(head_dim), is_causal=self.causal)
        return _dense(self.embed_dim, self.dtype, "out_proj")(o.reshape(b, s, self.embed_dim))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2: (B, S, D) -> (B, S, D)."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _dense(self.intermediate_size, self.dtype, "fc1")(x)
        h = _activation(self.hidden_act)(h.astype(jnp.float32)).astype(self.dtype)
        return _dense(self.hidden_size, self.dtype, "fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(.)). (B, S, D) float32 -> same."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _layer_norm(self.layer_norm_eps, "layer_norm1")(x).astype(self.dtype)
        x = x + CLIPAttention(self.hidden_size, self.num_heads, self.causal, self.dtype, name="self_attn")(h)
        h = _layer_norm(self.layer_norm_eps, "layer_norm2")(x).astype(self.dtype)
        mlp = CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype, name="mlp")
        return x + mlp(h).astype(jnp.float32)


class CLIPEncoder(nn.Module):
    """``num_layers`` encoder layers named ``layers_{i}``. Returns every layer's output, (B, S, D) each."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outputs = []
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_heads, self.hidden_act,
                                 self.layer_norm_eps, self.causal, self.dtype, name=f"layers_{i}")(x)
            outputs.append(x)
        return outputs


def _encoder(cfg: CLIPTextConfig | CLIPVisionConfig, causal: bool, dtype: Dtype) -> CLIPEncoder:
    return CLIPEncoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                       cfg.hidden_act, cfg.layer_norm_eps, causal, dtype, name="encoder")


# ---------------------------------------------------------------------------------------------- text


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, S, D): final_layer_norm(last layer), or of layer -(clip_skip + 1)
    pooler_output: jax.Array  # (B, D): final hidden state at the EOS token


class CLIPTextEmbeddings(nn.Module):
    """token_embedding(ids) + position_embedding(arange(S)): (B, S) int -> (B, S, D) float32."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.float32, name="token_embedding")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, param_dtype=jnp.float32,
                       name="position_embedding")
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[-1]))[None]


class CLIPTextTransformer(nn.Module):
    """transformers' ``CLIPTextModel.text_model``: embeddings, causal encoder, final_layer_norm, EOS pooling."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, clip_skip: int | None = None) -> CLIPTextOutput:
        cfg = self.config
        x = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids)
        hidden = _encoder(cfg, True, self.dtype)(x)
        final_norm = _layer_norm(cfg.layer_norm_eps, "final_layer_norm")
        last = final_norm(hidden[-1])
        if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
            # Legacy configs: the EOS is the largest id of the CLIP vocabulary; argmax takes the first one.
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            # First EOS (the pad token may equal the EOS token).
            eos_pos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        if clip_skip:
            # diffusers encode_prompt: hidden_states[-(clip_skip + 1)] (index 0 = embeddings) + final_layer_norm.
            last = final_norm(x if clip_skip == cfg.num_hidden_layers else hidden[-(clip_skip + 1)])
        return CLIPTextOutput(last.astype(self.dtype), pooled.astype(self.dtype))


class CLIPTextModel(nn.Module):
    """transformers ``CLIPTextModel`` (params under ``text_model/``).

    __call__(input_ids (B, S) int, clip_skip=None) -> CLIPTextOutput(last_hidden_state (B, S, D),
    pooler_output (B, D)) in ``dtype``. S <= max_position_embeddings (77 for SD). ``clip_skip`` k in
    [0, num_hidden_layers] replaces last_hidden_state by the output of layer -(k + 1) through final_layer_norm,
    like diffusers' ``clip_skip``; the pooled output always comes from the last layer, as in transformers.
    No padding mask, like the SD pipelines (the causal mask keeps the prompt tokens away from the padding).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | CLIPTextConfig, dtype: Dtype = jnp.float32) -> CLIPTextModel:
        if not isinstance(config, CLIPTextConfig):
            config = CLIPTextConfig.from_dict(config)
        return cls(config, dtype)

    @nn.compact
    def __call__(self, input_ids: jax.Array, clip_skip: int | None = None) -> CLIPTextOutput:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids must be (B, S <= {self.config.max_position_embeddings}), "
                             f"got {input_ids.shape}")
        if clip_skip is not None and not 0 <= clip_skip <= self.config.num_hidden_layers:
            raise ValueError(f"clip_skip must be in [0, {self.config.num_hidden_layers}], got {clip_skip}")
        return CLIPTextTransformer(self.config, self.dtype, name="text_model")(input_ids, clip_skip)

    def init_params(self, rng: jax.Array | None = None) -> dict:
        """Random parameters (``rng`` None: abstract ShapeDtypeStructs, for loading)."""
        ids = jnp.zeros((1, self.config.max_position_embeddings), jnp.int32)
        if rng is None:
            return jax.eval_shape(self.init, jax.random.key(0), ids)["params"]
        return self.init(rng, ids)["params"]


# ---------------------------------------------------------------------------------------------- vision


class CLIPVisionOutput(NamedTuple):
    image_embeds: jax.Array  # (B, projection_dim): visual_projection(post_layernorm(CLS))
    last_hidden_state: jax.Array  # (B, 1 + num_patches, D): encoder output (before post_layernorm)


class CLIPVisionEmbeddings(nn.Module):
    """[class_embedding, patch_embedding(pixels)] + position_embedding: (B, H, W, C) -> (B, 1 + N, D) float32."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        cls_emb = self.param("class_embedding", nn.initializers.normal(cfg.hidden_size ** -0.5),
                             (cfg.hidden_size,), jnp.float32)
        patches = Conv2d(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                         dtype=self.dtype, name="patch_embedding")(pixel_values)
        b = patches.shape[0]
        # (B, H/p, W/p, D) -> (B, N, D) row-major, the order of torch's flatten(2).transpose(1, 2).
        patches = patches.reshape(b, -1, cfg.hidden_size).astype(jnp.float32)
        n_pos = (cfg.image_size // p) ** 2 + 1
        pos = nn.Embed(n_pos, cfg.hidden_size, param_dtype=jnp.float32, name="position_embedding")
        x = jnp.concatenate([jnp.broadcast_to(cls_emb, (b, 1, cfg.hidden_size)), patches], axis=1)
        return x + pos(jnp.arange(n_pos))[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' ``vision_model``: embeddings, pre_layrnorm, encoder, post_layernorm(CLS).

    Returns (last_hidden_state (B, 1 + N, D), pooled (B, D)), both float32.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = _layer_norm(cfg.layer_norm_eps, "pre_layrnorm")(x)  # (sic) transformers' attribute name
        last = _encoder(cfg, False, self.dtype)(x)[-1]
        pooled = _layer_norm(cfg.layer_norm_eps, "post_layernorm")(last[:, 0])
        return last, pooled


class CLIPVisionModelWithProjection(nn.Module):
    """transformers ``CLIPVisionModelWithProjection`` (params ``vision_model/``, ``visual_projection/``).

    __call__(pixel_values (B, image_size, image_size, C) NHWC, already CLIP-normalised, see
    :func:`clip_preprocess` and :func:`zero123_clip_preprocess`) -> CLIPVisionOutput(image_embeds
    (B, projection_dim), last_hidden_state (B, 1 + N, D)) in ``dtype``. Zero123 uses ``image_embeds`` unnormalised.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | CLIPVisionConfig,
                    dtype: Dtype = jnp.float32) -> CLIPVisionModelWithProjection:
        if not isinstance(config, CLIPVisionConfig):
            config = CLIPVisionConfig.from_dict(config)
        return cls(config, dtype)

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be NHWC (B, {', '.join(map(str, expected))}), "
                             f"got {pixel_values.shape}")
        last, pooled = CLIPVisionTransformer(cfg, self.dtype, name="vision_model")(pixel_values)
        embeds = _dense(cfg.projection_dim, self.dtype, "visual_projection", use_bias=False)(pooled)
        return CLIPVisionOutput(embeds.astype(self.dtype), last.astype(self.dtype))

    def init_params(self, rng: jax.Array | None = None) -> dict:
        """Random parameters (``rng`` None: abstract ShapeDtypeStructs, for loading)."""
        cfg = self.config
        x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
        if rng is None:
            return jax.eval_shape(self.init, jax.random.key(0), x)["params"]
        return self.init(rng, x)["params"]


def clip_preprocess(images: jax.Array, size: int = 224, *, antialias: bool = True) -> jax.Array:
    """RGB images (B, H, W, 3) in [0, 1] -> CLIP pixel values (B, size, size, 3), NHWC, float32.

    Resizes the shortest side to ``size`` (bicubic, antialiased when shrinking), center-crops ``size`` x ``size``,
    clips to [0, 1] (PIL's uint8 output cannot overshoot) and normalises with the CLIP mean / std. This
    approximates transformers' PIL-based ``CLIPImageProcessor`` (same geometry; for square inputs a plain resize);
    the values differ by the uint8 rounding and PIL's filter details, up to a few 1/255. Differentiable. (Zero123's
    reference embedding uses :func:`zero123_clip_preprocess` instead, the official path.)
    """
    b, h, w, c = images.shape
    # CLIPImageProcessor's get_resize_output_image_size: short side -> size, long side -> int(size * long / short).
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = images.astype(jnp.float32)
    if (new_h, new_w) != (h, w):
        x = jax.image.resize(x, (b, new_h, new_w, c), method="bicubic", antialias=antialias)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = jnp.clip(x[:, top:top + size, left:left + size], 0.0, 1.0)
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


BICUBIC_A = -0.75  # torch's cubic convolution coefficient (PIL and jax.image.resize use Keys' -0.5)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Cubic convolution kernel k(x): (a+2)|x|^3 - (a+3)|x|^2 + 1 on |x| <= 1, a|x|^3 - 5a|x|^2 + 8a|x| - 4a on
    1 < |x| < 2, 0 beyond."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_align_corners_matrix(n_in: int, n_out: int, a: float = BICUBIC_A) -> np.ndarray:
    """(n_out, n_in) float32 matrix M with resize(x) = M @ x along one axis, torch's bicubic ``align_corners=True``.

    Output i reads the source position s_i = i (n_in - 1) / (n_out - 1) (s = 0 when n_out = 1; float32 as in
    torch), so the corner samples map onto each other. With j = floor(s_i) and t = s_i - j it mixes the inputs
    j-1, j, j+1, j+2 with the weights k(1 + t), k(t), k(1 - t), k(2 - t) (:func:`_cubic`, a = -0.75); indices
    outside [0, n_in - 1] are clamped to the border, so a border pixel can collect two weights. Every row sums to 1
    (constants are kept); linear ramps are not (that needs a = -0.5): in the interior a ramp comes out as
    s + 0.5 t (1 - t) (1 - 2t). No antialiasing: when shrinking, each output still reads only 4 inputs (as torch's
    ``interpolate`` with ``antialias=False``). Works for up- and downscaling and any sizes >= 1.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
    # Source positions in float32, computed as torch does (scale rounded first): across a 256-px axis the exact
    # positions differ from torch's by up to ~1e-5 px, which moves the output by as much on busy images.
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0.0)
    s = np.arange(n_out, dtype=np.float32) * scale
    j = np.minimum(np.floor(s), n_in - 1)
    t = np.clip(s - j, 0.0, 1.0).astype(np.float64)
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    for offset in (-1, 0, 1, 2):
        cols = np.clip(j.astype(np.int64) + offset, 0, n_in - 1)
        np.add.at(m, (rows, cols), _cubic(t - offset, a))  # add.at: clamped taps may land on the same column
    return m.astype(np.float32)


def bicubic_resize_align_corners(images: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """(B, H, W, C) -> (B, out_h, out_w, C) float32: ``F.interpolate(x, (out_h, out_w), mode="bicubic",
    align_corners=True)`` (no antialias) in NHWC.

    Separable: y = M_h x M_w^T per image and channel, with M_h = bicubic_align_corners_matrix(H, out_h) and
    M_w likewise, two small constant matmuls. Linear in ``images``, hence differentiable (the gradient is the
    transposed resize). No clipping: bicubic overshoot near edges is kept, as in torch.
    """
    _, h, w, _ = images.shape
    m_h = jnp.asarray(bicubic_align_corners_matrix(h, out_h))
    m_w = jnp.asarray(bicubic_align_corners_matrix(w, out_w))
    hp = jax.lax.Precision.HIGHEST  # full float32 on GPUs too (TF32 would cost ~1e-3)
    x = jnp.einsum("oh,bhwc->bowc", m_h, images.astype(jnp.float32), precision=hp)
    return jnp.einsum("pw,bowc->bopc", m_w, x, precision=hp)


def zero123_clip_preprocess(images: jax.Array, size: int = 224) -> jax.Array:
    """RGB images (B, H, W, 3) in [0, 1] -> CLIP pixel values (B, size, size, 3) NHWC float32, as Zero123 does.

    The official path (``FrozenCLIPImageEmbedder.preprocess`` of the Zero123 LDM code, reached through
    ``get_learned_conditioning(image * 2 - 1)``): x = 2 * images - 1; kornia ``resize(x, (224, 224),
    interpolation="bicubic", align_corners=True, antialias=False)`` (:func:`bicubic_resize_align_corners`; the whole
    image is resized to a square, no aspect-preserving resize and no centre crop); x = (x + 1) / 2; then
    (x - CLIP_MEAN) / CLIP_STD. No clipping to [0, 1] after the resize. Differentiable.
    """
    x = images.astype(jnp.float32) * 2.0 - 1.0  # the conditioning image lives in [-1, 1] there
    x = (bicubic_resize_align_corners(x, size, size) + 1.0) / 2.0
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


# ---------------------------------------------------------------------------------------------- camera projection


class Zero123CameraProjection(nn.Module):
    """Zero123's ``cc_projection``: (..., in_features) -> (..., out_features), one Dense named ``proj``.

    The input is [CLIP image embedding (768), camera (4)]: 772 -> 768 in the released models.
    """

    in_features: int = 772
    out_features: int = 768
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"camera projection expects {self.in_features} input features, got {x.shape}")
        return _dense(self.out_features, self.dtype, "proj")(x)

    def init_params(self, rng: jax.Array | None = None) -> dict:
        """Random parameters (``rng`` None: abstract ShapeDtypeStructs, for loading)."""
        x = jnp.zeros((1, self.in_features), jnp.float32)
        if rng is None:
            return jax.eval_shape(self.init, jax.random.key(0), x)["params"]
        return self.init(rng, x)["params"]


# ---------------------------------------------------------------------------------------------- loaders

_IGNORED = ("*position_ids",)  # a persistent buffer in transformers-4 checkpoints, not a parameter


def _load(folder: Path, abstract, prefix: str, variant: str | None, what: str) -> dict:
    state = loading.read_safetensors(loading.weight_files(folder, variant))
    if not any(k.startswith(prefix) for k in state):
        # transformers >= 5 saves CLIPTextModel without the "text_model." level that SD checkpoints have.
        state = {prefix + k: v for k, v in state.items()}
    return loading.convert_state_dict(state, abstract, what=f"{what} ({folder})", ignore_unexpected=_IGNORED,
                                      dtype=jnp.float32)


def load_clip_text(path: str | Path, dtype: Dtype = jnp.float32, *, variant: str | None = None, mesh=None,
                   subfolder: str = "text_encoder") -> tuple[CLIPTextModel, dict]:
    """A transformers CLIPTextModel folder (``config.json`` + ``model.safetensors``) -> (module, params).

    ``path``: an SD pipeline folder, its ``text_encoder/`` folder, a hub cache entry or a cached hub id.
    ``variant="fp16"`` reads ``model.fp16.safetensors``. Params are float32 (replicated over ``mesh`` if given);
    ``dtype`` is the compute dtype. Raises WeightLoadingError on any missing / unexpected / mis-shaped tensor.
    """
    folder = loading.resolve_component_dir(path, subfolder)
    module = CLIPTextModel.from_config(loading.read_config(folder), dtype)
    params = _load(folder, module.init_params(), "text_model.", variant, "CLIP text encoder")
    return module, loading.place(params, mesh)


def load_clip_vision(path: str | Path, dtype: Dtype = jnp.float32, *, variant: str | None = None, mesh=None,
                     subfolder: str = "image_encoder") -> tuple[CLIPVisionModelWithProjection, dict]:
    """A transformers CLIPVisionModelWithProjection folder -> (module, params); see :func:`load_clip_text`."""
    folder = loading.resolve_component_dir(path, subfolder)
    module = CLIPVisionModelWithProjection.from_config(loading.read_config(folder), dtype)
    params = _load(folder, module.init_params(), "vision_model.", variant, "CLIP image encoder")
    return module, loading.place(params, mesh)


CAMERA_PROJECTION_FOLDERS = ("clip_camera_projection", "cc_projection")
_CAMERA_PREFIXES = ("proj.", "projection.")  # clip_camera_projection/ and cc_projection/ key names


def _local_root(path: str | Path) -> Path:
    """A local folder, hub cache entry or cached hub id -> an existing folder (snapshot resolved)."""
    p = Path(path)
    if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):  # "org/name": a cached hub id
        p = loading.hub_cache_dir(str(path))
    if not p.is_dir():
        raise WeightLoadingError(f"folder {path} does not exist (nor is it a model in the Hugging Face cache)")
    return loading._snapshot_dir(p)


def _camera_projection_dir(path: str | Path) -> Path:
    root = _local_root(path)
    for candidate in [root / sub for sub in CAMERA_PROJECTION_FOLDERS] + [root]:
        if candidate.is_dir() and any(candidate.glob("*.safetensors")):
            return candidate
    raise WeightLoadingError(
        f"no Zero123 camera projection under {path}: expected {' or '.join(CAMERA_PROJECTION_FOLDERS)}/ with "
        f"diffusion_pytorch_model.safetensors (a pipeline folder), or that folder itself")


def _camera_projection_sizes(config: Mapping[str, Any], weight: np.ndarray | None, folder: Path) -> tuple[int, int]:
    """(in, out) from config.json (any of the known key pairs) or else from the weight's (out, in) shape."""
    if "embedding_dim" in config:  # diffusers CLIPCameraProjection
        return config["embedding_dim"] + config.get("additional_embeddings", 4), config["embedding_dim"]
    for a, b in (("in_channel", "out_channel"), ("in_channels", "out_channels")):  # CCProjection variants
        if a in config and b in config:
            return config[a], config[b]
    if weight is None or weight.ndim != 2:
        raise WeightLoadingError(f"cannot infer the camera projection size in {folder}: no config sizes and no "
                                 f"2-D proj.weight / projection.weight tensor")
    return int(weight.shape[1]), int(weight.shape[0])


def load_camera_projection(path: str | Path, *, mesh=None) -> tuple[Zero123CameraProjection, dict]:
    """Zero123 camera projection -> (module, params {"proj": {"kernel", "bias"}}), float32.

    ``path``: a Zero123 pipeline folder holding ``clip_camera_projection/`` (keys ``proj.*``, config
    ``embedding_dim`` / ``additional_embeddings``) or ``cc_projection/`` (keys ``projection.*``, config
    ``in_channel(s)`` / ``out_channel(s)`` or none at all: sizes then come from the weight), or that folder itself.
    """
    folder = _camera_projection_dir(path)
    config = loading.read_config(folder) if (folder / "config.json").is_file() else {}
    state = loading.read_safetensors(loading.weight_files(folder))
    # Both layouts load into the same Dense("proj"), so callers see one params tree.
    renamed = any(k.startswith("projection.") for k in state)
    state = {("proj." + k[len("projection."):] if k.startswith("projection.") else k): v for k, v in state.items()}
    in_f, out_f = _camera_projection_sizes(config, state.get("proj.weight"), folder)
    module = Zero123CameraProjection(int(in_f), int(out_f))
    what = f"Zero123 camera projection ({folder}{'; its projection.* keys read as proj.*' if renamed else ''})"
    params = loading.convert_state_dict(state, module.init_params(), what=what, dtype=jnp.float32)
    return module, loading.place(params, mesh)


# ---------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | Path, subfolder: str = "tokenizer"):
    """A transformers ``CLIPTokenizer`` from local files (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``).

    ``path``: a pipeline folder, its ``tokenizer/`` folder, a hub cache entry or a cached hub id.
    """
    root = _local_root(path)
    for folder in (root / subfolder, root):
        if (folder / "tokenizer.json").is_file() or (
                (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
            break
    else:
        raise WeightLoadingError(f"no CLIP tokenizer under {path}: expected {subfolder}/ (or the folder itself) "
                                 f"with vocab.json and merges.txt (or tokenizer.json)")
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # malformed vocabulary / merges files
        raise WeightLoadingError(f"cannot read the CLIP tokenizer in {folder}: {e}") from None


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
    """Prompts -> token ids (B, max_length) int32: [BOS, tokens, EOS, pad...], truncated to keep the EOS.

    Same call as the diffusers SD pipelines (``padding="max_length"``, ``truncation=True``); the pad id is the
    tokenizer's (EOS for SD1, "!" = 0 for SD2).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    return np.asarray(ids, np.int32)
