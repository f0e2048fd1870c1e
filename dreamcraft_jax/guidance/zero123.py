"""Zero123 / Stable Zero123 guidance: camera vectors, conditioning and the SDS loss (threestudio's conventions).

Camera vector T of a target view (elevation e, azimuth a, distance d; degrees, :mod:`dreamcraft_jax.cameras`
convention) relative to the input view (e_ref, a_ref, d_ref), as threestudio's ``zero123_guidance.py`` /
``stable_zero123_guidance.py`` build it:

    T = [deg2rad((90 - e) - (90 - e_ref)),   delta polar angle (polar = 90 - elevation), so = -delta elevation
         sin(deg2rad(a - a_ref)),
         cos(deg2rad(a - a_ref)),
         d - d_ref]                           Zero123;  Stable Zero123: deg2rad(90 - e_ref), the input's polar angle

The target 30 deg above the input has T[0] = -pi/6; the same view has T = [0, 0, 1, 0].

Conditioning: the UNet has 8 input channels, [x_t (4), c_concat (4)], where c_concat is the VAE posterior MODE of
the input image, unscaled; its cross-attention context is ONE token, cc_projection([CLIP image embedding, T])
(772 -> 768). Classifier-free guidance uses zeros for both the context token (zeros of the projected token, as
threestudio) and c_concat. The UNet is called once on the batch [uncond (B), cond (B)], CFG scale 5.

The noisy latents come from ``encode_fn`` with the scaling factor applied (posterior sample * 0.18215: LDM's
``get_first_stage_encoding``), while c_concat stays unscaled, exactly as the official code feeds Zero123.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dreamcraft_jax.guidance.sds import images_to_model_input, sds_loss
from dreamcraft_jax.models.schedules import NoiseSchedule, default_schedule

VARIANTS = ("zero123", "stable_zero123")


def _angles(elevation, azimuth, ref_elevation, ref_azimuth):
    e, a = jnp.broadcast_arrays(jnp.asarray(elevation, jnp.float32), jnp.asarray(azimuth, jnp.float32))
    d_polar = jnp.deg2rad((90.0 - e) - (90.0 - jnp.asarray(ref_elevation, jnp.float32)))
    d_azimuth = jnp.deg2rad(a - jnp.asarray(ref_azimuth, jnp.float32))
    return e, d_polar, d_azimuth


def zero123_T(elevation, azimuth, distance, ref_elevation=0.0, ref_azimuth=0.0, ref_distance=3.8) -> jax.Array:
    """(B, 4) original Zero123 camera vector [delta polar (rad), sin dAz, cos dAz, delta radius] (module doc)."""
    e, d_polar, d_az = _angles(elevation, azimuth, ref_elevation, ref_azimuth)
    d_radius = jnp.broadcast_to(jnp.asarray(distance, jnp.float32) - jnp.asarray(ref_distance, jnp.float32),
                                e.shape)
    return jnp.stack([d_polar, jnp.sin(d_az), jnp.cos(d_az), d_radius], axis=-1)


def stable_zero123_T(elevation, azimuth, distance=None, ref_elevation=0.0, ref_azimuth=0.0, ref_distance=None
                     ) -> jax.Array:
    """(B, 4) Stable Zero123 camera vector [delta polar, sin dAz, cos dAz, deg2rad(90 - ref_elevation)].

    Same argument order as :func:`zero123_T`; the distances are unused (Stable Zero123 has no radius input).
    """
    e, d_polar, d_az = _angles(elevation, azimuth, ref_elevation, ref_azimuth)
    ref_polar = jnp.broadcast_to(jnp.deg2rad(90.0 - jnp.asarray(ref_elevation, jnp.float32)), e.shape)
    return jnp.stack([d_polar, jnp.sin(d_az), jnp.cos(d_az), ref_polar], axis=-1)


def camera_T(variant: str, elevation, azimuth, distance, ref_elevation=0.0, ref_azimuth=0.0, ref_distance=3.8
             ) -> jax.Array:
    """:func:`zero123_T` or :func:`stable_zero123_T` by name ("zero123" | "stable_zero123")."""
    if variant == "zero123":
        return zero123_T(elevation, azimuth, distance, ref_elevation, ref_azimuth, ref_distance)
    if variant == "stable_zero123":
        return stable_zero123_T(elevation, azimuth, distance, ref_elevation, ref_azimuth, ref_distance)
    raise ValueError(f"unknown Zero123 variant {variant!r}: expected one of {', '.join(VARIANTS)}")


def zero123_conditioning(image_embedding: jax.Array, T: jax.Array, cc_projection_fn: Callable[[jax.Array], jax.Array]
                         ) -> tuple[jax.Array, jax.Array]:
    """Cross-attention contexts (cond, uncond), each (B, 1, 768).

    image_embedding: (1, 768) or (1, 1, 768) CLIP ViT-L/14 image embedding of the input view; T: (B, 4).
    cond = cc_projection_fn(concat([embedding, T], -1)) with input (B, 1, 772); uncond = zeros_like(cond).
    """
    emb = jnp.reshape(image_embedding, (1, 1, -1)).astype(jnp.float32)
    emb = jnp.broadcast_to(emb, (T.shape[0], 1, emb.shape[-1]))
    cond = cc_projection_fn(jnp.concatenate([emb, T.astype(emb.dtype)[:, None, :]], axis=-1))
    return cond, jnp.zeros_like(cond)


def zero123_eps_fn(unet_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], ref_latent: jax.Array,
                   context_cond: jax.Array, context_uncond: jax.Array):
    """The (cond, uncond) ``eps_fn`` of :func:`~dreamcraft_jax.guidance.sds.sds_loss` for a Zero123 UNet.

    unet_fn(x_in (2B, h, w, 8), t (2B,), context (2B, 1, 768)) -> eps (2B, h, w, 4), called once on the batch
    [uncond (B), cond (B)]: x_in = [x_t, 0] for the uncond half and [x_t, ref_latent] for the cond half.
    ref_latent: (1, h, w, 4) VAE posterior mode of the input image (unscaled); contexts: (B, 1, 768).
    """

    def eps_fn(x_t: jax.Array, t: jax.Array):
        batch = x_t.shape[0]
        concat = jnp.broadcast_to(ref_latent.astype(x_t.dtype), x_t.shape[:-1] + (ref_latent.shape[-1],))
        x_in = jnp.concatenate([jnp.concatenate([x_t, jnp.zeros_like(concat)], axis=-1),
                                jnp.concatenate([x_t, concat], axis=-1)], axis=0)
        context = jnp.concatenate([context_uncond, context_cond], axis=0)
        eps = unet_fn(x_in, jnp.concatenate([t, t], axis=0), context)
        return eps[batch:], eps[:batch]

    return eps_fn


def zero123_sds_loss(images: jax.Array, camera, key: jax.Array, step, *, unet_fn, encode_fn, image_embedding,
                     ref_latent, cc_projection_fn, variant: str = "stable_zero123", ref_elevation=0.0,
                     ref_azimuth=0.0, ref_distance=3.8, guidance_scale=5.0, schedule: NoiseSchedule | None = None,
                     weighting: str = "sds", min_step_percent=0.02, max_step_percent=0.98, grad_clip=None,
                     resolution: int = 256) -> tuple[jax.Array, dict]:
    """Zero123 SDS on renders (B, H, W, 3) in [0, 1] of ``camera`` (anything with (B,) elevation, azimuth,
    distance in degrees / world units, e.g. :class:`dreamcraft_jax.cameras.Camera`).

    Renders are resized to ``resolution`` (256), scaled to [-1, 1] and encoded by ``encode_fn`` (scaled latents,
    (B, 32, 32, 4); gradients flow through it). T per view (``variant``, module doc) -> contexts
    (:func:`zero123_conditioning`) -> UNet eps (:func:`zero123_eps_fn`) -> :func:`sds_loss` with CFG
    ``guidance_scale`` (5). ``schedule`` defaults to Zero123's (scaled-linear 0.00085-0.012, 1000 steps, epsilon).
    The conditioning sits under stop_gradient. Returns (loss, stats) of :func:`sds_loss`.
    """
    schedule = default_schedule() if schedule is None else schedule
    T = camera_T(variant, camera.elevation, camera.azimuth, camera.distance, ref_elevation, ref_azimuth,
                 ref_distance)
    cond, uncond = jax.lax.stop_gradient(zero123_conditioning(image_embedding, T, cc_projection_fn))
    latents = encode_fn(images_to_model_input(images, resolution))
    eps_fn = zero123_eps_fn(unet_fn, jax.lax.stop_gradient(ref_latent), cond, uncond)
    return sds_loss(latents, key, step, eps_fn=eps_fn, schedule=schedule, guidance_scale=guidance_scale,
                    weighting=weighting, min_step_percent=min_step_percent, max_step_percent=max_step_percent,
                    grad_clip=grad_clip)
