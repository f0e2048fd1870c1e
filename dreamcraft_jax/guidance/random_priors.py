"""Diffusion priors with the real SD 2.1-base / Zero123 shapes (or tiny ones) and random weights.

For what needs the real sizes but no weights: the benchmarks, and ``train.py`` with
``--config.guidance.random_real_size=True`` (a timed run of the real-size computation; its guidance is noise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.config import schedule_is_zero
from dreamcraft_jax.kernels.spec import REFERENCE_KERNELS, KernelSpec
from dreamcraft_jax.models.reference_configs import SD21_BASE_UNET, SD_VAE, ZERO123_UNET

# CPU smoke-test sizes: same code path, tiny widths.
TINY_UNET = dict(SD21_BASE_UNET, block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=[2, 4],
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=8, cross_attention_dim=32)
TINY_VAE = dict(SD_VAE, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


# Random weights are cut from one pool of normals at random offsets: drawing ~1e9 normals on the host takes tens of
# seconds per process (a benchmark's setup), copying slices of a pool a few.
_POOL_SIZE = 1 << 24


def random_params(module, *inputs, seed: int = 0, std: float = 0.02, dtype=jnp.float32):
    """Random N(0, std) weights (norm scales around 1) in ``dtype``, made on the host: each leaf a slice of a pool
    of 2^24 normals at a random offset (weights of different leaves may repeat; for timings and smoke tests,
    where a jitted ``module.init`` would spend minutes compiling per-leaf random initialisers)."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"]
    rng = np.random.default_rng(seed)
    pool = std * rng.standard_normal(_POOL_SIZE, np.float32)
    pool = np.concatenate([pool, pool])  # any window of up to _POOL_SIZE values is one slice
    np_dtype = np.dtype(dtype)

    def make(path, leaf):
        n = int(np.prod(leaf.shape))
        values = pool[(start := int(rng.integers(0, _POOL_SIZE))):start + n] if n <= _POOL_SIZE else \
            np.resize(pool[:_POOL_SIZE], n)
        values = values.reshape(leaf.shape)
        if "scale" in str(path[-1]):
            values = 1.0 + values
        return jnp.asarray(values.astype(np_dtype))

    return jax.tree_util.tree_map_with_path(make, shapes)


def random_priors(cfg, tiny: bool, param_dtype=jnp.bfloat16, kernels: KernelSpec = REFERENCE_KERNELS):
    """(Priors, params) with the real SD 2.1-base / Zero123 shapes (or tiny ones) and random weights; kernels: the
    run's kernel choices, given to the UNets and the VAE (their GroupNorms)."""
    from dreamcraft_jax.guidance.priors import Priors, StableDiffusionPrior, Zero123Prior
    from dreamcraft_jax.models.clip import Zero123CameraProjection
    from dreamcraft_jax.models.schedules import default_schedule
    from dreamcraft_jax.models.unet import UNet2DConditionModel
    from dreamcraft_jax.models.vae import AutoencoderKL

    gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    impl = "cudnn" if gpu else None
    vae = AutoencoderKL.from_config(TINY_VAE if tiny else SD_VAE, dtype=dtype, attention_impl=impl, kernels=kernels)
    vae_params = random_params(vae, jnp.zeros((1, 32, 32, 3)), seed=2, dtype=param_dtype)
    sd_cfg = dict(TINY_UNET if tiny else SD21_BASE_UNET)
    z_cfg = dict(TINY_UNET if tiny else ZERO123_UNET)
    z_cfg.update(in_channels=8, use_linear_projection=False, cross_attention_dim=32 if tiny else 768,
                 attention_head_dim=2 if tiny else 8)
    priors, params = {}, {}
    g = cfg.guidance
    common = lambda c: dict(guidance_scale=float(c.guidance_scale), weighting=c.weighting,  # noqa: E731
                            min_step_percent=c.min_step_percent, max_step_percent=c.max_step_percent,
                            grad_clip=c.grad_clip)
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    if not schedule_is_zero(cfg.loss.lambda_sd):
        unet = UNet2DConditionModel.from_config(sd_cfg, dtype=dtype, attention_impl=impl, kernels=kernels)
        up = random_params(unet, *unet.dummy_inputs(), seed=1, dtype=param_dtype)
        d = sd_cfg["cross_attention_dim"]
        priors["sd"] = StableDiffusionPrior(
            unet=unet, vae=vae, schedule=default_schedule(), perp_neg=bool(g.sd.perp_neg),
            view_dependent=bool(g.sd.view_dependent), resolution=64 if tiny else int(g.sd.resolution),
            thresholds=(45.0, 45.0, 60.0), random_weights=True, **common(g.sd))
        params["sd"] = {"unet": up, "vae": vae_params, "text_vd": jax.random.normal(keys[0], (4, 77, d), dtype),
                        "text": jax.random.normal(keys[1], (77, d), dtype),
                        "uncond": jax.random.normal(keys[2], (77, d), dtype)}
    if not schedule_is_zero(cfg.loss.lambda_3d_sd):
        unet = UNet2DConditionModel.from_config(z_cfg, dtype=dtype, attention_impl=impl, kernels=kernels)
        up = random_params(unet, *unet.dummy_inputs(), seed=3, dtype=param_dtype)
        d = z_cfg["cross_attention_dim"]
        proj = Zero123CameraProjection(in_features=d + 4, out_features=d)
        res = 32 if tiny else int(g.zero123.resolution)
        f = vae.downsample_factor
        priors["3d_sd"] = Zero123Prior(
            unet=unet, vae=vae, proj=proj, schedule=default_schedule(), variant=g.zero123.variant,
            resolution=res, ref_camera=(0.0, 0.0, 3.8), random_weights=True, **common(g.zero123))
        params["3d_sd"] = {"unet": up, "vae": vae_params, "proj": proj.init(keys[3], jnp.zeros((1, d + 4)))["params"],
                           "embedding": jax.random.normal(keys[3], (1, d)),
                           "ref_latent": jax.random.normal(keys[3], (1, res // f, res // f, 4))}
    return Priors(priors), params
