"""Score Distillation Sampling (SDS) as pure functions, with threestudio's / DreamCraft3D's conventions.

For latents ``z`` (B, h, w, c) of the current renders, at training ``step``:

    min_step, max_step = timestep_range(step, ...)           annealed [a, v0, v1, b] percent schedules
    t ~ U{min_step, ..., max_step} per sample (both ends included), eps ~ N(0, I)
    x_t = sqrt(alphabar_t) z + sqrt(1 - alphabar_t) eps      (z under stop_gradient)
    eps_hat = eps_u + s (eps_c - eps_u)                      (the model under stop_gradient: XLA drops its backward)
    grad = nan_to_num(w(t) (eps_hat - eps)), then optionally clipped to [-c, c]
    loss = 0.5 * sum((z - sg(z - grad))^2) / B               so  d loss / d z = grad / B

Weightings w(t): "sds" 1 - alphabar_t (DreamFusion), "uniform" 1, "fantasia3d" sqrt(alphabar_t) (1 - alphabar_t).

Randomness (reproducible from the key): ``k_t, k_noise = jax.random.split(key)``,
``t = jax.random.randint(k_t, (B,), min_step, max_step + 1)``, ``eps = jax.random.normal(k_noise, z.shape)``.
With one key per sample (``key`` of shape (B, 2)) each sample draws its own t and eps from its key
(:func:`draw_timesteps_and_noise`): a view's draws then do not depend on which device or batch it lands in.

Model contract (``eps_fn(x_t, t)``, t int32 (B,)): see :mod:`dreamcraft_jax.models.sampling`: return
``(out_cond, out_uncond)`` and give ``guidance_scale``, or one already-guided output (e.g. Perp-Neg via
:func:`dreamcraft_jax.guidance.prompts.perp_neg_combine`) with ``guidance_scale=None``. Outputs are in the
schedule's prediction type and converted to a noise estimate. Note: threestudio's plain (non-Perp-Neg) SD and
DeepFloyd guidance combine as ``eps_c + s (eps_c - eps_u)``, i.e. the standard form with scale s + 1; its
Perp-Neg, Zero123 and BSD paths use the standard form implemented here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamcraft_jax.config import schedule_value
from dreamcraft_jax.models.sampling import EpsFn, model_output
from dreamcraft_jax.models.schedules import NoiseSchedule, add_noise, alphabar, predict_eps

WEIGHTINGS = ("sds", "uniform", "fantasia3d")


def percent_to_step(percent, num_train_timesteps: int = 1000) -> jax.Array:
    """int(T * percent) as threestudio's set_min_max_steps; int32 (traced ok).

    A 1e-3 guard absorbs float32 rounding of the product (float32(0.02) * 1000 = 19.9999996 must give 20).
    """
    return jnp.floor(num_train_timesteps * jnp.asarray(percent, jnp.float32) + 1e-3).astype(jnp.int32)


def timestep_range(step, min_step_percent, max_step_percent, num_train_timesteps: int = 1000
                   ) -> tuple[jax.Array, jax.Array]:
    """(min_step, max_step) int32 at training ``step``; each percent is a number or an [a, v0, v1, b] schedule.

    E.g. min_step_percent (0, 0.7, 0.2, 200) with T = 1000: step 0 -> 700, 100 -> 450, >= 200 -> 200.
    """
    lo = percent_to_step(schedule_value(min_step_percent, step), num_train_timesteps)
    hi = percent_to_step(schedule_value(max_step_percent, step), num_train_timesteps)
    return lo, hi


def sds_weight(schedule: NoiseSchedule, t, kind: str = "sds") -> jax.Array:
    """w(t) for integer timesteps t (any shape): "sds" 1 - ab, "uniform" 1, "fantasia3d" sqrt(ab) (1 - ab)."""
    ab = alphabar(schedule, t)
    if kind == "sds":
        return 1.0 - ab
    if kind == "uniform":
        return jnp.ones_like(ab)
    if kind == "fantasia3d":
        return jnp.sqrt(ab) * (1.0 - ab)
    raise ValueError(f"unknown SDS weighting {kind!r}: expected one of {', '.join(WEIGHTINGS)}")


def clip_grad(grad: jax.Array, step, grad_clip) -> jax.Array:
    """nan_to_num, then clamp to [-c, c] with c = schedule_value(grad_clip, step) unless grad_clip is None."""
    grad = jnp.nan_to_num(grad)
    if grad_clip is None:
        return grad
    c = jnp.asarray(schedule_value(grad_clip, step), grad.dtype)
    return jnp.clip(grad, -c, c)


def sds_surrogate(latents: jax.Array, grad: jax.Array) -> jax.Array:
    """Scalar whose value is 0.5 * sum(grad^2) / B and whose gradient w.r.t. latents is grad / B.

    The value and gradient of threestudio's 0.5 * ||z - sg(z - grad)||^2 / B, written as
    (L - sg(L)) + sg(0.5 * sum(grad^2) / B) with L = sum(z * sg(grad)) / B: z - (z - grad) loses grad's low bits in
    float32 when |grad| << |z|; this form gives the value and the gradient to full precision.
    """
    grad = jax.lax.stop_gradient(grad).astype(latents.dtype)
    batch = latents.shape[0]
    linear = jnp.sum(latents * grad) / batch
    value = 0.5 * jnp.sum(jnp.square(grad)) / batch
    return (linear - jax.lax.stop_gradient(linear)) + jax.lax.stop_gradient(value)


def is_key_batch(key: jax.Array) -> bool:
    """True for a batch of raw uint32 keys (B, 2) (one per sample), False for one key."""
    return not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 2


def draw_timesteps_and_noise(key: jax.Array, latents: jax.Array, min_step, max_step):
    """(t (B,) int32 in [min_step, max_step], eps like latents) from one key or from one key per sample."""
    batch = latents.shape[0]

    def draw(k, shape):
        k_t, k_noise = jax.random.split(k)
        t = jax.random.randint(k_t, shape[:1], min_step, max_step + 1, dtype=jnp.int32)
        return t, jax.random.normal(k_noise, shape, latents.dtype)

    if is_key_batch(key):
        if key.shape[0] != batch:
            raise ValueError(f"{key.shape[0]} keys for a batch of {batch}")
        t, noise = jax.vmap(lambda k: draw(k, (1,) + latents.shape[1:]))(key)
        return t[:, 0], noise[:, 0]
    return draw(key, latents.shape)


def sds_loss(latents: jax.Array, key: jax.Array, step, *, eps_fn: EpsFn, schedule: NoiseSchedule, guidance_scale,
             weighting: str = "sds", min_step_percent=0.02, max_step_percent=0.98, grad_clip=None
             ) -> tuple[jax.Array, dict]:
    """SDS loss on latents (B, h, w, c) (module doc for every formula and the random draws).

    min/max_step_percent, grad_clip: numbers or [a, v0, v1, b] schedules of ``step`` (grad_clip None: no clip).
    Returns (loss, stats): loss with d loss / d latents = grad / B; stats = {"grad_mean_abs", "grad_norm",
    "t" (B,), "min_step", "max_step"}.
    """
    batch = latents.shape[0]
    min_step, max_step = timestep_range(step, min_step_percent, max_step_percent, schedule.num_train_timesteps)
    t, noise = draw_timesteps_and_noise(key, latents, min_step, max_step)
    x_t = add_noise(schedule, jax.lax.stop_gradient(latents), noise, t)
    out = model_output(eps_fn, x_t, t, guidance_scale)
    eps_hat = jax.lax.stop_gradient(predict_eps(schedule, out, x_t, t))
    w = sds_weight(schedule, t, weighting).reshape((batch,) + (1,) * (latents.ndim - 1)).astype(latents.dtype)
    grad = jax.lax.stop_gradient(clip_grad(w * (eps_hat - noise), step, grad_clip))
    loss = sds_surrogate(latents, grad)
    stats = {"grad_mean_abs": jnp.mean(jnp.abs(grad)), "grad_norm": jnp.sqrt(jnp.sum(jnp.square(grad))),
             "t": t, "min_step": min_step, "max_step": max_step}
    return loss, stats


def images_to_model_input(images: jax.Array, resolution: int) -> jax.Array:
    """(B, H, W, 3) in [0, 1] -> (B, R, R, 3) in [-1, 1]: bilinear resize without antialiasing.

    Same sampling as torch's F.interpolate(bilinear, align_corners=False, antialias=False), which threestudio uses
    (half-pixel centres; no low-pass filter when shrinking 1024 renders).
    """
    return resize_to_model(images, resolution) * 2.0 - 1.0


def resize_to_model(images: jax.Array, resolution: int) -> jax.Array:
    """(B, H, W, C) -> (B, R, R, C), the bilinear resize of :func:`images_to_model_input` (the identity when
    the images already are R x R)."""
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, resolution, resolution, c), method="bilinear", antialias=False)


def sd_sds_from_images(images: jax.Array, key: jax.Array, step, *, encode_fn, eps_fn: EpsFn,
                       schedule: NoiseSchedule, guidance_scale, resolution: int = 512, **sds_kwargs
                       ) -> tuple[jax.Array, dict]:
    """SDS on rendered images (B, H, W, 3) in [0, 1] for a latent (or pixel-space) diffusion prior.

    Images are resized to ``resolution`` (512 for SD 2.1-base) and scaled to [-1, 1]
    (:func:`images_to_model_input`), then ``encode_fn(x) -> latents`` (B, R/8, R/8, 4): the VAE encoder with the
    scaling factor applied (threestudio: posterior sample * 0.18215); the gradient flows through it back to the
    images. ``encode_fn=None`` uses the resized images as the model input (DeepFloyd IF: resolution 64; its
    eps_fn must drop IF's predicted-variance channels). ``sds_kwargs``: weighting, min/max_step_percent,
    grad_clip of :func:`sds_loss`. Returns (loss, stats) of :func:`sds_loss`.
    """
    x = images_to_model_input(images, resolution)
    latents = x if encode_fn is None else encode_fn(x)
    return sds_loss(latents, key, step, eps_fn=eps_fn, schedule=schedule, guidance_scale=guidance_scale,
                    **sds_kwargs)
