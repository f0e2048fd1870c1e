"""Discrete-time diffusion noise schedules (diffusers ``DDIMScheduler`` semantics) as a pytree.

A :class:`NoiseSchedule` holds ``betas`` and ``alphas_cumprod`` (``alphabar_t``, shape ``(T,)``, float32) and the
static settings a sampler needs. It is built from a diffusers scheduler ``config.json``
(:meth:`NoiseSchedule.from_config`, :func:`load_schedule`) with the same formulas as diffusers:

* ``linear``:            beta_t = linspace(beta_start, beta_end, T)
* ``scaled_linear``:     beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2   (Stable Diffusion, Zero123)
* ``squaredcos_cap_v2``: beta_t = min(1 - f((t+1)/T) / f(t/T), 0.999), f(u) = cos((u + 0.008) / 1.008 * pi / 2)^2
* ``alphabar_t = prod_{s<=t} (1 - beta_s)``; optionally rescaled to zero terminal SNR (``rescale_betas_zero_snr``).

The arrays are computed in float64 and cast to float32, as the original LDM / Zero123 code does; diffusers computes
them in float32, so the two agree to ~1e-6 relative (the committed fixtures check this).

Forward process and parameterisations (``a = alphabar_t``, all per sample, broadcast over trailing axes):

* ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``                      (:func:`add_noise`)
* epsilon prediction: ``eps = out``,  ``x0 = (x_t - sqrt(1 - a) out) / sqrt(a)``
* v prediction:       ``v = sqrt(a) eps - sqrt(1 - a) x0``; ``x0 = sqrt(a) x_t - sqrt(1 - a) v``,
  ``eps = sqrt(a) v + sqrt(1 - a) x_t``
* sample prediction:  ``x0 = out``, ``eps = (x_t - sqrt(a) out) / sqrt(1 - a)``

Timesteps ``t`` are integer arrays of shape ``()`` or ``(B,)`` (one per leading sample of ``x``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Missing keys default as in diffusers' DDIMScheduler, so that a config read here and one read by
# DDIMScheduler.from_config describe the same schedule.
DDIM_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
    thresholding=False, timestep_spacing="leading", rescale_betas_zero_snr=False)

# Stable Diffusion 1.x/2.x-base and Zero123 / Stable Zero123 (threestudio builds the Zero123 DDIM scheduler with
# exactly these values).
SD_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    timestep_spacing="leading")


@flax.struct.dataclass
class NoiseSchedule:
    """A discrete noise schedule with diffusers DDIM settings (a pytree: arrays are leaves, settings static).

    betas: (T,) float32.
    alphas_cumprod: (T,) float32, ``alphabar_t``.
    final_alpha_cumprod: () float32, the ``alphabar`` DDIM steps to after the last timestep
        (1 if ``set_alpha_to_one`` else ``alphas_cumprod[0]``).
    num_train_timesteps: T.
    prediction_type: "epsilon" | "v_prediction" | "sample" (what the model outputs).
    steps_offset: added to "leading" inference timesteps (SD: 1).
    timestep_spacing: "leading" | "trailing" | "linspace" (how inference timesteps are placed).
    clip_sample, clip_sample_range: clamp the predicted x0 inside DDIM steps (SD: off).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    steps_offset: int = flax.struct.field(pytree_node=False, default=0)
    timestep_spacing: str = flax.struct.field(pytree_node=False, default="leading")
    clip_sample: bool = flax.struct.field(pytree_node=False, default=False)
    clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any]) -> NoiseSchedule:
        """Build from a diffusers scheduler config dict (DDIM/DDPM/PNDM/... ``config.json``; unknown keys ignored).

        Raises ValueError for settings this module does not implement (``thresholding``) or unknown names.
        """
        c = dict(DDIM_DEFAULTS)
        c.update({k: v for k, v in scheduler_config.items() if k in DDIM_DEFAULTS and v is not None})
        for key, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                             ("timestep_spacing", TIMESTEP_SPACINGS)):
            if c[key] not in allowed:
                raise ValueError(f"scheduler config {key}={c[key]!r} is not supported: expected one of "
                                 + ", ".join(repr(a) for a in allowed))
        if c["thresholding"]:
            raise ValueError("scheduler config thresholding=True (dynamic thresholding) is not supported; "
                             "set it to false")
        n = int(c["num_train_timesteps"])
        betas = betas_from_config(c)
        if c["rescale_betas_zero_snr"]:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = np.cumprod(1.0 - betas)
        final = 1.0 if c["set_alpha_to_one"] else alphas_cumprod[0]
        return cls(
            betas=jnp.asarray(betas, jnp.float32),
            alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
            final_alpha_cumprod=jnp.asarray(final, jnp.float32),
            num_train_timesteps=n,
            prediction_type=str(c["prediction_type"]),
            steps_offset=int(c["steps_offset"]),
            timestep_spacing=str(c["timestep_spacing"]),
            clip_sample=bool(c["clip_sample"]),
            clip_sample_range=float(c["clip_sample_range"]),
        )


def default_schedule() -> NoiseSchedule:
    """The Stable Diffusion / Zero123 schedule: scaled-linear betas 0.00085-0.012, 1000 steps, epsilon."""
    return NoiseSchedule.from_config(SD_SCHEDULER_CONFIG)


def load_schedule(path: str | Path) -> NoiseSchedule:
    """Read ``scheduler/scheduler_config.json`` (diffusers' name; ``config.json`` accepted too) of a pipeline
    folder, the scheduler folder itself, or a cached hub id."""
    from dreamcraft_jax.models.loading import read_config, resolve_component_dir

    names = ("scheduler_config.json", "config.json")
    return NoiseSchedule.from_config(read_config(resolve_component_dir(path, "scheduler", names), names))


def betas_from_config(config: Mapping[str, Any]) -> np.ndarray:
    """(T,) float64 betas of a (defaults-filled) scheduler config; see the module doc for the formulas."""
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float64)
    start, end = float(config["beta_start"]), float(config["beta_end"])
    kind = config["beta_schedule"]
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        def f(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1.0 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], np.float64)
    raise ValueError(f"unknown beta_schedule {kind!r}: expected one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so that alphabar_{T-1} = 0 (Lin et al. 2023, Algorithm 1), as diffusers does."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab ** 2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


# ---------------------------------------------------------------------------------------------- per-sample maths


def _at(values: jax.Array, t, like: jax.Array) -> jax.Array:
    """values[t] reshaped to broadcast against ``like``: t () or (B,) -> (B, 1, ..., 1)."""
    v = values[jnp.asarray(t, jnp.int32)]
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)).astype(like.dtype)


def alphabar(schedule: NoiseSchedule, t) -> jax.Array:
    """alphabar_t for integer timesteps t (any shape), float32."""
    return schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) noise.  x0, noise: (B, ...); t: () or (B,) int."""
    a = _at(schedule.alphas_cumprod, t, x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def get_velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """The v-prediction target v = sqrt(alphabar_t) noise - sqrt(1 - alphabar_t) x0."""
    a = _at(schedule.alphas_cumprod, t, x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """What the model is trained to output at (x_t, t): noise, v or x0 per ``schedule.prediction_type``."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return get_velocity(schedule, x0, noise, t)
    return x0


def predict_eps(schedule: NoiseSchedule, model_output: jax.Array, x_t: jax.Array, t) -> jax.Array:
    """The noise estimate implied by a model output of type ``schedule.prediction_type`` (module doc)."""
    if schedule.prediction_type == "epsilon":
        return model_output
    a = _at(schedule.alphas_cumprod, t, x_t)
    if schedule.prediction_type == "v_prediction":
        return jnp.sqrt(a) * model_output + jnp.sqrt(1.0 - a) * x_t
    return (x_t - jnp.sqrt(a) * model_output) / jnp.sqrt(1.0 - a)


def predict_x0(schedule: NoiseSchedule, model_output: jax.Array, x_t: jax.Array, t) -> jax.Array:
    """The clean-sample estimate implied by a model output of type ``schedule.prediction_type`` (module doc)."""
    if schedule.prediction_type == "sample":
        return model_output
    a = _at(schedule.alphas_cumprod, t, x_t)
    if schedule.prediction_type == "v_prediction":
        return jnp.sqrt(a) * x_t - jnp.sqrt(1.0 - a) * model_output
    return (x_t - jnp.sqrt(1.0 - a) * model_output) / jnp.sqrt(a)
