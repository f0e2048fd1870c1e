"""The diffusion priors of a stage behind one interface: load once, then a pure loss on renders.

A prior is a static object (modules, schedule, settings; built outside jit) plus a pytree of frozen arrays
(weights and everything computed once per run: text embeddings of the view-dependent prompts, the reference
image's CLIP embedding and VAE latent). Its loss is a pure function::

    loss, stats = prior.loss(params, images (B, H, W, 3) in [0, 1], camera (B views), keys (B, 2), step)

with one PRNG key per view, so a view's noise does not depend on the device it is scored on. The gradient of
``loss`` w.r.t. ``images`` is the SDS gradient (see :mod:`dreamcraft_jax.guidance.sds`), averaged over the batch.

* :class:`StableDiffusionPrior` (the 2D prior, SD 2.1-base by default): view-dependent prompts
  (front / side / back / overhead) and optionally Perp-Neg, classifier-free guidance, SDS through the VAE
  encoder at 512 px. (DeepFloyd IF, the official 2D prior, is a later issue.)
* :class:`Zero123Prior` (the 3D prior): Zero123 or Stable Zero123 conditioned on the reference image, CFG 5,
  at 256 px. The reference's CLIP embedding follows the official Zero123 guidance: bicubic resize to 224 x 224 with
  ``align_corners=True``, no antialias, no crop, then the CLIP mean / std
  (:func:`~dreamcraft_jax.models.clip.zero123_clip_preprocess`).

Weights come from diffusers-format folders or the Hugging Face cache (:mod:`dreamcraft_jax.models`). A missing
folder raises :class:`PriorUnavailableError` naming what to download and which config key to set. The loaders take
the run's :class:`~dreamcraft_jax.kernels.spec.KernelSpec` (``kernels``) and build the UNets and VAEs with it: it
decides which Pallas kernels their GroupNorms take (default ``KernelSpec()``: XLA).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.config import schedule_value
from dreamcraft_jax.guidance import prompts as vd
from dreamcraft_jax.guidance.sds import images_to_model_input, resize_to_model, sds_loss
from dreamcraft_jax.guidance.zero123 import zero123_sds_loss
from dreamcraft_jax.kernels.spec import REFERENCE_KERNELS, KernelSpec
from dreamcraft_jax.models import loading
from dreamcraft_jax.models.clip import (
    load_camera_projection,
    load_clip_text,
    load_clip_vision,
    load_tokenizer,
    tokenize,
    zero123_clip_preprocess,
)
from dreamcraft_jax.models.demo_priors import WARNING as RANDOM_WARNING
from dreamcraft_jax.models.demo_priors import is_random_demo
from dreamcraft_jax.models.schedules import NoiseSchedule, load_schedule
from dreamcraft_jax.models.unet import UNet2DConditionModel, load_unet
from dreamcraft_jax.models.vae import AutoencoderKL, load_vae

log = logging.getLogger("dreamcraft_jax")

SD_HUB_ID = "stabilityai/stable-diffusion-2-1-base"


class PriorUnavailableError(ValueError):
    """A prior's weights cannot be found or read; the message says what to download and which key to set."""


def _compute_dtype(setting: str):
    if setting == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return {"bf16": jnp.bfloat16, "fp32": jnp.float32}[setting]


def _load(what: str, key: str, path: str, hint: str, fn, *args, **kwargs):
    """Call a loader; turn a missing / broken folder into one message naming the download and the config key."""
    if not path:
        raise PriorUnavailableError(f"{what}: --config.{key} is empty. {hint}")
    try:
        return fn(path, *args, **kwargs)
    except loading.WeightLoadingError as e:
        raise PriorUnavailableError(f"{what}: cannot load --config.{key}={path}: {' '.join(str(e).split())}. "
                                    f"{hint}") from None


def _encode_latents(vae: AutoencoderKL, vae_params, x: jax.Array, keys: jax.Array) -> jax.Array:
    """x (B, R, R, 3) in [-1, 1] -> scaled posterior samples (B, R/8, R/8, 4), one noise key per view."""
    mean, logvar = vae.apply({"params": vae_params}, x, method=AutoencoderKL.encode)
    noise = jax.vmap(lambda k, m: jax.random.normal(k, m.shape, m.dtype))(keys, mean)
    return (mean + jnp.exp(0.5 * logvar) * noise) * vae.scaling_factor


def _split_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, 2) keys -> (encoder keys (B, 2), SDS keys (B, 2))."""
    pairs = jax.vmap(lambda k: jax.random.split(k))(keys)
    return pairs[:, 0], pairs[:, 1]


def _mark_random(path: str, what: str) -> bool:
    random = is_random_demo(path)
    if random:
        log.warning("%s at %s: %s", what, path, RANDOM_WARNING)
    return random


# ----------------------------------------------------------------------------------------------------- SD


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusionPrior:
    """SDS with a Stable Diffusion UNet + VAE; params {"unet", "vae", "text_vd" (4, 77, D), "text", "uncond" (77, D)}.

    Per view the prompt embedding follows the camera (:mod:`dreamcraft_jax.guidance.prompts`): with
    ``perp_neg`` the UNet runs on [positive, negative 1, negative 2, unconditional] (4B samples) and the noise is
    :func:`~dreamcraft_jax.guidance.prompts.perp_neg_combine`d; otherwise on [view prompt, unconditional] (2B)
    with eps_u + s (eps_c - eps_u).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    schedule: NoiseSchedule
    guidance_scale: float
    perp_neg: bool
    view_dependent: bool
    weighting: str
    min_step_percent: Any
    max_step_percent: Any
    grad_clip: Any
    resolution: int
    thresholds: tuple  # (front, back, overhead) degrees
    random_weights: bool = False
    name: str = "sd"

    def loss(self, params, images: jax.Array, camera, keys: jax.Array, step) -> tuple[jax.Array, dict]:
        k_enc, k_sds = _split_keys(keys)
        latents = _encode_latents(self.vae, params["vae"], images_to_model_input(images, self.resolution), k_enc)
        front, back, overhead = self.thresholds
        th = dict(front_threshold=front, back_threshold=back, overhead_threshold=overhead)
        text_vd, uncond = params["text_vd"], params["uncond"]
        batch = images.shape[0]
        uncond_b = jnp.broadcast_to(uncond, (batch,) + uncond.shape)

        def unet(x, t, context):
            return self.unet.apply({"params": params["unet"]}, x, t, context.astype(self.unet.dtype))

        if self.perp_neg:
            weights = vd.perp_neg_weights(camera.elevation, camera.azimuth, **th)
            pos, neg = vd.perp_neg_embeddings(text_vd, uncond, weights)

            def eps_fn(x_t, t):
                context = jnp.concatenate([pos, neg[:, 0], neg[:, 1], uncond_b], axis=0)
                out = unet(jnp.concatenate([x_t] * 4), jnp.concatenate([t] * 4), context)
                e_pos, e_n0, e_n1, e_u = jnp.split(out.astype(jnp.float32), 4)
                return vd.perp_neg_combine(e_u, e_pos, jnp.stack([e_n0, e_n1], axis=1), weights.neg_weights,
                                           self.guidance_scale)

            scale = None
        else:
            if self.view_dependent:
                cond = text_vd[vd.direction_index(camera.elevation, camera.azimuth, **th)]
            else:
                cond = jnp.broadcast_to(params["text"], uncond_b.shape)

            def eps_fn(x_t, t):
                out = unet(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                           jnp.concatenate([cond, uncond_b]))
                return tuple(jnp.split(out.astype(jnp.float32), 2))

            scale = self.guidance_scale
        return sds_loss(latents, k_sds, step, eps_fn=eps_fn, schedule=self.schedule, guidance_scale=scale,
                        weighting=self.weighting, min_step_percent=self.min_step_percent,
                        max_step_percent=self.max_step_percent, grad_clip=self.grad_clip)


SD_HINT = (f"The 2D prior needs a diffusers-format Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, "
           f"scheduler/), e.g. `huggingface-cli download {SD_HUB_ID}`, then set --config.guidance.sd.pretrained "
           f"to that folder or hub id (or --config.loss.lambda_sd=0 to run without it).")


def load_sd_prior(cfg_sd, prompt: str, mesh=None, kernels: KernelSpec = REFERENCE_KERNELS
                  ) -> tuple[StableDiffusionPrior, dict]:
    """Load SD and embed the view-dependent prompts once. cfg_sd: the ``guidance.sd`` ConfigDict; kernels: the
    GroupNorm kernels of its UNet and VAE."""
    path = str(cfg_sd.pretrained)
    what = "2D prior (Stable Diffusion)"
    key = "guidance.sd.pretrained"
    dtype = _compute_dtype(cfg_sd.precision)
    variant = cfg_sd.variant or None
    unet, unet_params = _load(what, key, path, SD_HINT, load_unet, dtype, variant=variant,
                              param_dtype=dtype, attention_impl=_attention_impl(), remat=bool(cfg_sd.remat),
                              kernels=kernels)
    vae, vae_params = _load(what, key, path, SD_HINT, load_vae, dtype, variant=variant, param_dtype=dtype,
                            attention_impl=_attention_impl(), kernels=kernels)
    tokenizer = _load(what, key, path, SD_HINT, load_tokenizer)
    text_model, text_params = _load(what, key, path, SD_HINT, load_clip_text, jnp.float32, variant=variant)
    schedule = _load(what, key, path, SD_HINT, load_schedule)
    texts = list(vd.view_prompts(prompt)) + [prompt, str(cfg_sd.negative_prompt)]
    ids = jnp.asarray(tokenize(tokenizer, texts, max_length=min(int(tokenizer.model_max_length), 77)))
    emb = text_model.apply({"params": text_params}, ids).last_hidden_state.astype(dtype)
    params = {"unet": unet_params, "vae": vae_params, "text_vd": emb[:4], "text": emb[4], "uncond": emb[5]}
    prior = StableDiffusionPrior(
        unet=unet, vae=vae, schedule=schedule, guidance_scale=float(cfg_sd.guidance_scale),
        perp_neg=bool(cfg_sd.perp_neg), view_dependent=bool(cfg_sd.view_dependent), weighting=cfg_sd.weighting,
        min_step_percent=cfg_sd.min_step_percent, max_step_percent=cfg_sd.max_step_percent,
        grad_clip=cfg_sd.grad_clip, resolution=int(cfg_sd.resolution),
        thresholds=(float(cfg_sd.front_threshold), float(cfg_sd.back_threshold), float(cfg_sd.overhead_threshold)),
        random_weights=_mark_random(path, what))
    return prior, params


# ----------------------------------------------------------------------------------------------------- Zero123


@dataclasses.dataclass(frozen=True, eq=False)
class Zero123Prior:
    """SDS with Zero123 / Stable Zero123; params {"unet", "vae", "proj", "embedding" (1, D), "ref_latent"}.

    ``embedding`` is the CLIP ViT-L/14 image embedding of the reference view and ``ref_latent`` its VAE posterior
    mode (unscaled, (1, 32, 32, 4) at 256 px), both computed once at load time.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    proj: Any
    schedule: NoiseSchedule
    variant: str
    guidance_scale: float
    weighting: str
    min_step_percent: Any
    max_step_percent: Any
    grad_clip: Any
    resolution: int
    ref_camera: tuple  # (elevation, azimuth, distance) of the reference view
    random_weights: bool = False
    name: str = "zero123"

    def loss(self, params, images: jax.Array, camera, keys: jax.Array, step) -> tuple[jax.Array, dict]:
        k_enc, k_sds = _split_keys(keys)
        e, a, d = self.ref_camera
        return zero123_sds_loss(
            images, camera, k_sds, step,
            unet_fn=lambda x, t, c: self.unet.apply({"params": params["unet"]}, x, t, c.astype(self.unet.dtype)),
            encode_fn=lambda x: _encode_latents(self.vae, params["vae"], x, k_enc),
            image_embedding=params["embedding"], ref_latent=params["ref_latent"],
            cc_projection_fn=lambda x: self.proj.apply({"params": params["proj"]}, x), variant=self.variant,
            ref_elevation=e, ref_azimuth=a, ref_distance=d, guidance_scale=self.guidance_scale,
            schedule=self.schedule, weighting=self.weighting, min_step_percent=self.min_step_percent,
            max_step_percent=self.max_step_percent, grad_clip=self.grad_clip, resolution=self.resolution)


ZERO123_HINT = ("The 3D prior needs a diffusers-format Zero123 folder (unet/ with 8 input channels, vae/, "
                "image_encoder/, cc_projection/ or clip_camera_projection/, scheduler/). Stable Zero123 "
                "(stabilityai/stable-zero123, an LDM .ckpt) converts with `python -m dreamcraft_jax.models."
                "convert_ldm`. Set --config.guidance.zero123.pretrained to the folder (and "
                "--config.guidance.zero123.variant=zero123 for the original Zero123), or --config.loss.lambda_3d_sd=0 "
                "to run without it.")


def reference_rgb_on_white(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3), (H, W) -> (H, W, 3) the reference composited on white, as Zero123 was trained and conditioned."""
    return rgb * mask[..., None] + (1.0 - mask[..., None])


def load_zero123_prior(cfg_z, reference_rgb: np.ndarray, ref_camera: tuple, mesh=None,
                       kernels: KernelSpec = REFERENCE_KERNELS) -> tuple[Zero123Prior, dict]:
    """Load Zero123 and embed the reference once.

    cfg_z: the ``guidance.zero123`` ConfigDict; reference_rgb: (R, R, 3) in [0, 1] on white at the prior's
    resolution (see :func:`reference_rgb_on_white`); ref_camera: (elevation, azimuth, distance) of the input view;
    kernels: the GroupNorm kernels of its UNet and VAE.

    The reference embedding is ``image_embeds`` of the CLIP image encoder on
    :func:`~dreamcraft_jax.models.clip.zero123_clip_preprocess` (reference), the official Zero123 guidance's
    ``get_learned_conditioning(2 * rgb - 1)``: torch-style bicubic resize with ``align_corners=True`` (a = -0.75, no
    antialias, no crop) to the encoder's ``image_size`` (224), then CLIP mean / std. The reference latent is the VAE
    posterior mean of the reference at ``cfg_z.resolution``.
    """
    path = str(cfg_z.pretrained)
    what = "3D prior (Zero123)"
    key = "guidance.zero123.pretrained"
    dtype = _compute_dtype(cfg_z.precision)
    unet, unet_params = _load(what, key, path, ZERO123_HINT, load_unet, dtype, param_dtype=dtype,
                              attention_impl=_attention_impl(), remat=bool(cfg_z.remat), kernels=kernels)
    vae, vae_params = _load(what, key, path, ZERO123_HINT, load_vae, dtype, param_dtype=dtype,
                            attention_impl=_attention_impl(), kernels=kernels)
    vision, vision_params = _load(what, key, path, ZERO123_HINT, load_clip_vision, jnp.float32)
    proj, proj_params = _load(what, key, path, ZERO123_HINT, load_camera_projection)
    schedule = _load(what, key, path, ZERO123_HINT, load_schedule)
    if unet.in_channels != 8:
        raise PriorUnavailableError(f"{what}: {path} has a UNet with {unet.in_channels} input channels; Zero123 "
                                    f"needs 8 (noisy latent + reference latent). {ZERO123_HINT}")
    image = jnp.asarray(reference_rgb, jnp.float32)[None]
    pixels = zero123_clip_preprocess(image, size=int(vision.config.image_size))
    embedding = vision.apply({"params": vision_params}, pixels).image_embeds  # (1, D)
    x = images_to_model_input(image, int(cfg_z.resolution))
    mean, _ = vae.apply({"params": vae_params}, x, method=AutoencoderKL.encode)
    params = {"unet": unet_params, "vae": vae_params, "proj": proj_params,
              "embedding": embedding.astype(jnp.float32), "ref_latent": mean.astype(jnp.float32)}
    prior = Zero123Prior(
        unet=unet, vae=vae, proj=proj, schedule=schedule, variant=cfg_z.variant,
        guidance_scale=float(cfg_z.guidance_scale), weighting=cfg_z.weighting,
        min_step_percent=cfg_z.min_step_percent, max_step_percent=cfg_z.max_step_percent,
        grad_clip=cfg_z.grad_clip, resolution=int(cfg_z.resolution),
        ref_camera=tuple(float(v) for v in ref_camera), random_weights=_mark_random(path, what))
    return prior, params


def _attention_impl():
    return "cudnn" if jax.default_backend() == "gpu" else None


# ----------------------------------------------------------------------------------------------------- stage


@dataclasses.dataclass(frozen=True, eq=False)
class Priors:
    """The priors a stage uses, by loss name: ``sd`` (lambda_sd) and ``3d_sd`` (lambda_3d_sd)."""

    priors: dict  # loss name -> prior object

    def configured(self, cfg) -> Priors:
        """The same weights with one stage's guidance settings (CFG, timestep ranges, weighting, clip)."""
        from dreamcraft_jax.config import schedule_is_zero

        out = {}
        for name, prior in self.priors.items():
            if schedule_is_zero(cfg.loss[f"lambda_{name}"]):
                continue  # this stage does not use it
            g = cfg.guidance.sd if name == "sd" else cfg.guidance.zero123
            out[name] = dataclasses.replace(
                prior, guidance_scale=float(g.guidance_scale), weighting=g.weighting,
                min_step_percent=g.min_step_percent, max_step_percent=g.max_step_percent, grad_clip=g.grad_clip)
        return Priors(out)

    @property
    def random_weights(self) -> bool:
        return any(p.random_weights for p in self.priors.values())

    @functools.cached_property
    def _traced_once(self) -> dict:
        """{loss name: jit(prior.loss)}: each prior's loss as a nested jitted function. The programs of a stage
        that score inputs of one shape (renders pre-resized by :meth:`resized`) then reuse its traced jaxpr
        (JAX's tracing cache) instead of tracing both diffusion models again for every resolution and step kind
        (half of a random-view step's tracing). XLA inlines it: the compiled step is the same."""
        return {name: jax.jit(prior.loss) for name, prior in self.priors.items()}

    def resized(self, images) -> dict:
        """{loss name: images (B, R, R, 3)} at each prior's input size R (the resize its loss makes first, which
        is then the identity): renders of any size become inputs of fixed size."""
        return {name: resize_to_model(images, p.resolution) for name, p in self.priors.items()}

    def schedules_at(self, step) -> dict:
        """{loss name: {setting: float32 scalar}}: each prior's step-dependent settings (timestep range, and the
        gradient clip where set) evaluated at ``step``. Given to :meth:`losses` as ``schedules``, they make the
        priors' program independent of the stage's schedules, so stages with other ranges share it."""
        out = {}
        for name, prior in self.priors.items():
            values = {"min_step_percent": prior.min_step_percent, "max_step_percent": prior.max_step_percent}
            if prior.grad_clip is not None:
                values["grad_clip"] = prior.grad_clip
            out[name] = {k: jnp.asarray(schedule_value(v, step), jnp.float32) for k, v in values.items()}
        return out

    def losses(self, params: dict, images, camera, keys, step, schedules: dict | None = None
               ) -> tuple[dict, dict]:
        """({loss name: value}, {stat name: value}) of every prior on the batch (per-view keys (B, 2)). ``images``
        (B, H, W, 3) in [0, 1], or {loss name: images} per prior (:meth:`resized`). ``schedules``: the output of
        :meth:`schedules_at` (possibly traced), used instead of the priors' own schedules."""
        terms, stats = {}, {}
        for i, (name, prior) in enumerate(self.priors.items()):
            if schedules is not None:
                prior = dataclasses.replace(prior, **schedules[name])
            view_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
            # Fixed-size inputs and the priors' own schedules: the loss traced once per stage (see _traced_once).
            loss = self._traced_once[name] if schedules is None and isinstance(images, dict) else prior.loss
            value, s = loss(params[name], images[name] if isinstance(images, dict) else images, camera, view_keys,
                            step)
            terms[name] = value
            stats[f"{name}_grad_norm"] = s["grad_norm"]
            stats[f"{name}_t"] = jnp.mean(s["t"].astype(jnp.float32))
        return terms, stats


def load_priors(cfg, reference_rgb_256: np.ndarray | None, mesh=None, kernels: KernelSpec = REFERENCE_KERNELS
                ) -> tuple[Priors, dict]:
    """The priors whose loss weights are not zero. reference_rgb_256: the reference on white at Zero123's size;
    kernels: the run's kernel choices (``KernelSpec.from_config(cfg.kernels)``), given to the priors' models."""
    from dreamcraft_jax.config import schedule_is_zero

    priors, params = {}, {}
    if not schedule_is_zero(cfg.loss.lambda_sd):
        priors["sd"], params["sd"] = load_sd_prior(cfg.guidance.sd, cfg.prompt, mesh, kernels)
    if not schedule_is_zero(cfg.loss.lambda_3d_sd):
        ref = (cfg.camera.elevation_deg, cfg.camera.azimuth_deg, cfg.camera.distance)
        priors["3d_sd"], params["3d_sd"] = load_zero123_prior(cfg.guidance.zero123, reference_rgb_256, ref, mesh,
                                                              kernels)
    return Priors(priors), params


def demo_prior_paths(root: str | Path) -> tuple[str, str]:
    """Write (once) and return the tiny random demo priors (see :mod:`dreamcraft_jax.models.demo_priors`)."""
    from dreamcraft_jax.models.demo_priors import ensure_demo_priors

    sd, z123 = ensure_demo_priors(root)
    return str(sd), str(z123)
