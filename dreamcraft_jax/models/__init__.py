"""Flax diffusion models loading diffusers / transformers weights (no torch at run time).

Public loaders, each returning ``(module, params)``; ``path`` is a diffusers pipeline folder, the component
subfolder itself, or a Hugging Face hub id already in the local cache; images and latents are NHWC:

* :func:`load_unet` (``unet/``): ``module.apply({"params": p}, sample (B,H,W,C), timesteps (B,),
  encoder_hidden_states (B,S,D), class_labels=None) -> eps (B,H,W,4)``
* :func:`load_vae` (``vae/``): ``apply(..., x in [-1,1], method=AutoencoderKL.encode) -> (mean, logvar)``,
  ``method=AutoencoderKL.decode`` for latents -> images; latents are unscaled (multiply by
  ``module.scaling_factor`` for the UNet)
* :func:`load_clip_text` (``text_encoder/``): ``apply(..., input_ids (B,77)) -> .last_hidden_state (B,77,D)``
* :func:`load_clip_vision` (``image_encoder/``): ``apply(..., pixels (B,224,224,3) normalised) -> .image_embeds``
* :func:`load_camera_projection` (``cc_projection/`` or ``clip_camera_projection/``): Zero123's 772 -> 768
* :func:`load_tokenizer`, :func:`tokenize`, :func:`load_schedule`

All take ``dtype`` (compute dtype; params stay float32), ``variant="fp16"`` for fp16 weight files, and ``mesh`` to
place the params replicated on a device mesh. Errors are :class:`WeightLoadingError` with what to fix.
"""

from dreamcraft_jax.models.clip import (
                                        load_camera_projection,
                                        load_clip_text,
                                        load_clip_vision,
                                        load_tokenizer,
                                        tokenize,
)
from dreamcraft_jax.models.loading import WeightLoadingError
from dreamcraft_jax.models.schedules import load_schedule
from dreamcraft_jax.models.unet import load_unet
from dreamcraft_jax.models.vae import load_vae

__all__ = ["load_unet", "load_vae", "load_clip_text", "load_clip_vision", "load_camera_projection",
           "load_tokenizer", "tokenize", "load_schedule", "WeightLoadingError"]
