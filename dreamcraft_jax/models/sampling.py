"""DDIM sampling and SDEdit in pure jnp (one ``jax.lax.scan`` over a static number of steps).

Matches diffusers' ``DDIMScheduler`` (``set_timesteps`` + ``step``) for every setting a
:class:`~dreamcraft_jax.models.schedules.NoiseSchedule` holds. One DDIM step from ``t`` to ``t_prev``
(``a = alphabar_t``, ``a' = alphabar_{t_prev}``, or ``final_alpha_cumprod`` when ``t_prev < 0``):

    x0   = predicted x0 (clamped to +-clip_sample_range when clip_sample), eps = predicted noise (unclamped)
    sigma = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))
    x_prev = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z,   z ~ N(0, I)

As in diffusers, ``t_prev = t - num_train_timesteps // num_steps`` for every spacing (for "leading" spacing this is
the next inference timestep).

Model contract (``eps_fn``): ``eps_fn(x_t, t) -> output`` with ``x_t`` of shape ``(B, ...)`` and ``t`` an int32
array of shape ``(B,)``. The output is in the schedule's ``prediction_type`` (epsilon for SD 2.1-base and Zero123):
either one array ``(B, ...)`` that is used as is (guidance, e.g. Perp-Neg, already applied; pass
``guidance_scale=None``), or a pair ``(out_cond, out_uncond)`` combined here by classifier-free guidance
``out = out_uncond + s * (out_cond - out_uncond)`` with ``s = guidance_scale``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.models.schedules import NoiseSchedule, predict_eps, predict_x0

EpsFn = Callable[[jax.Array, jax.Array], "jax.Array | tuple[jax.Array, jax.Array]"]


def cfg_combine(out_cond: jax.Array, out_uncond: jax.Array, guidance_scale) -> jax.Array:
    """Classifier-free guidance: out_uncond + s * (out_cond - out_uncond)."""
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def model_output(eps_fn: EpsFn, x_t: jax.Array, t: jax.Array, guidance_scale) -> jax.Array:
    """Call ``eps_fn`` and apply CFG per the module's model contract; the result has ``x_t``'s dtype."""
    out = eps_fn(x_t, t)
    if isinstance(out, (tuple, list)):
        if guidance_scale is None:
            raise ValueError("eps_fn returned (cond, uncond) outputs but guidance_scale is None")
        cond, uncond = out
        out = cfg_combine(cond.astype(x_t.dtype), uncond.astype(x_t.dtype), guidance_scale)
    elif guidance_scale is not None:
        raise ValueError("eps_fn returned one array (guidance already applied): pass guidance_scale=None, or "
                         "return (cond, uncond) to have guidance applied here")
    return out.astype(x_t.dtype)


def ddim_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """(num_steps,) int32 inference timesteps, descending, exactly as ``DDIMScheduler.set_timesteps``.

    leading:  (arange(N) * (T // N)).round()[::-1] + steps_offset   (SD with offset 1, N=25: 961, 921, ..., 1)
    trailing: round(arange(T, 0, -T / N)) - 1
    linspace: linspace(0, T - 1, N).round()[::-1]
    """
    n, total = int(num_steps), schedule.num_train_timesteps
    if not 1 <= n <= total:
        raise ValueError(f"num_steps={num_steps} must be in [1, num_train_timesteps={total}]")
    if schedule.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (total // n)).round()[::-1].astype(np.int64) + schedule.steps_offset
    elif schedule.timestep_spacing == "trailing":
        ts = np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
    else:
        ts = np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
    return ts.astype(np.int32)


def ddim_step(schedule: NoiseSchedule, model_out: jax.Array, x_t: jax.Array, t, t_prev, *, eta: float = 0.0,
              noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One DDIM update (module doc). x_t, model_out: (B, ...); t, t_prev: () or (B,) int (t_prev < 0: final).

    eta: a Python number. noise: the z of the stochastic term, required when eta > 0.
    Returns (x_prev, predicted x0).
    """
    t = jnp.asarray(t, jnp.int32)
    t_prev = jnp.asarray(t_prev, jnp.int32)
    a_t = schedule.alphas_cumprod[t]
    a_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], schedule.final_alpha_cumprod)
    expand = (1,) * (x_t.ndim - a_t.ndim)
    a_t, a_prev = a_t.reshape(a_t.shape + expand), a_prev.reshape(a_prev.shape + expand)

    x0 = predict_x0(schedule, model_out, x_t, t)
    eps = predict_eps(schedule, model_out, x_t, t)
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - std ** 2) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + std * noise
    return x_prev.astype(x_t.dtype), x0.astype(x_t.dtype)


def ddim_sample(eps_fn: EpsFn, schedule: NoiseSchedule, x_T: jax.Array, num_steps: int, *, guidance_scale=None,
                eta: float = 0.0, key: jax.Array | None = None, start_step=0, return_trajectory: bool = False):
    """Run DDIM over ``ddim_timesteps(schedule, num_steps)[start_step:]`` starting from ``x_T`` (B, ...).

    eps_fn / guidance_scale: see the module doc (model contract).
    eta: a Python number; 0 = deterministic DDIM, > 0 adds sigma * z with z = normal(fold_in(key, i)) at step
        index i (needs key).
    start_step: index of the first inference step to run, 0..num_steps (num_steps runs none and returns x_T).
        A Python int trims the scan statically; a traced int scans all steps and skips those before it with
        ``lax.cond`` (one compilation for every start, e.g. an annealed SDEdit strength).
    Returns x_0 (B, ...), or (x_0, trajectory) with trajectory (steps run, B, ...) the state after each step
    (for a traced start_step, skipped steps repeat x_T).
    """
    if eta > 0 and key is None:
        raise ValueError("ddim_sample with eta > 0 needs a key")
    timesteps = ddim_timesteps(schedule, num_steps)
    ratio = schedule.num_train_timesteps // num_steps
    batch = x_T.shape[0]
    static_start = isinstance(start_step, (int, np.integer))
    if static_start and not 0 <= start_step <= num_steps:
        raise ValueError(f"start_step={start_step} must be in [0, num_steps={num_steps}]")
    indices = np.arange(num_steps, dtype=np.int32)[int(start_step):] if static_start else \
        np.arange(num_steps, dtype=np.int32)
    if indices.size == 0:
        return (x_T, jnp.zeros((0,) + x_T.shape, x_T.dtype)) if return_trajectory else x_T

    def step(x, i, t):
        t_b = jnp.full((batch,), t, jnp.int32)
        out = model_output(eps_fn, x, t_b, guidance_scale)
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) if eta > 0 else None
        x_prev, _ = ddim_step(schedule, out, x, t_b, t_b - ratio, eta=eta, noise=z)
        return x_prev

    def body(x, inputs):
        i, t = inputs
        if static_start:
            x = step(x, i, t)
        else:
            x = jax.lax.cond(i >= start_step, lambda y: step(y, i, t), lambda y: y, x)
        return x, x

    x, trajectory = jax.lax.scan(body, x_T, (jnp.asarray(indices), jnp.asarray(timesteps[indices])))
    return (x, trajectory) if return_trajectory else x


def sdedit_start_index(num_steps: int, t_start, num_train_timesteps: int = 1000):
    """First inference-step index of SDEdit from timestep ``t_start`` (DreamCraft3D's / diffusers' img2img rule).

    init = clip(floor(num_steps * t_start / T), 1, num_steps); start = num_steps - init. With SD's 25 "leading"
    steps, t_start = 500 gives start 13 (timestep 441). Python ints in -> int out; traced in -> int32 array.
    """
    if isinstance(t_start, (int, np.integer)):
        init = max(1, min(int(num_steps * int(t_start) / num_train_timesteps), num_steps))
        return num_steps - init
    init = jnp.floor(num_steps * jnp.asarray(t_start, jnp.float32) / num_train_timesteps).astype(jnp.int32)
    return num_steps - jnp.clip(init, 1, num_steps)


def sdedit(eps_fn: EpsFn, schedule: NoiseSchedule, x0: jax.Array, key: jax.Array, *, num_steps: int,
           start_index=None, t_start=None, guidance_scale=None, eta: float = 0.0) -> jax.Array:
    """SDEdit: noise ``x0`` (B, ...) to the start of a DDIM sampler, then denoise its remaining steps.

    Give ``start_index`` (0..num_steps, Python int or traced) or ``t_start`` (a timestep, mapped by
    :func:`sdedit_start_index`). With ``ts = ddim_timesteps(schedule, num_steps)`` and ``k = start_index``:

        k_noise, k_steps = split(key); z = normal(k_noise, x0.shape)
        a = alphabar[ts[k]] if k < num_steps else final_alpha_cumprod   (the level the sampler leaves off at)
        x = sqrt(a) x0 + sqrt(1 - a) z;  return ddim_sample(..., x, start_step=k, key=k_steps)

    So the noise level and the first denoising step agree, and ``k = num_steps`` (no steps left) returns the noised
    input. DreamCraft3D's BSD augmentation: ``t_start`` = current max step, 25 steps, CFG 7.5.
    """
    if (start_index is None) == (t_start is None):
        raise ValueError("sdedit needs exactly one of start_index and t_start")
    if start_index is None:
        start_index = sdedit_start_index(num_steps, t_start, schedule.num_train_timesteps)
    timesteps = jnp.asarray(ddim_timesteps(schedule, num_steps))
    k_noise, k_steps = jax.random.split(key)
    z = jax.random.normal(k_noise, x0.shape, x0.dtype)
    k = jnp.asarray(start_index, jnp.int32)
    a = jnp.where(k < num_steps, schedule.alphas_cumprod[timesteps[jnp.minimum(k, num_steps - 1)]],
                  schedule.final_alpha_cumprod).astype(x0.dtype)
    x = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * z
    return ddim_sample(eps_fn, schedule, x, num_steps, guidance_scale=guidance_scale, eta=eta, key=k_steps,
                       start_step=start_index)
