"""Loss terms of the coarse stages (official definitions; images are (H, W, C) of one view).

rgb          mean((gt_rgb * m + bg * (1 - m) - rgb)^2) with the mask m (the reference composited on the background)
mask         mean((m - opacity)^2)
depth_rel    1 - Pearson(rendered depth, reference depth) over pixels with m > 0.5
normal_smooth (2D) mean((n[1:, :] - n[:-1, :])^2) + mean((n[:, 1:] - n[:, :-1])^2) on the display normal image
3d_normal_smooth  mean |n(x) - n(x + N(0, 0.01^2))| over valid samples
orient       sum(stop_grad(w) * max(0, n . d)^2) / #(rays with opacity > 0): normals must face the camera
sparsity     mean(sqrt(opacity^2 + 0.01))
opaque       mean binary entropy of clip(opacity, 1e-3, 1 - 1e-3)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rgb_mse(rgb: jax.Array, gt_rgb: jax.Array, gt_mask: jax.Array, background) -> jax.Array:
    """rgb, gt_rgb (H, W, 3); gt_mask (H, W) in [0, 1]."""
    m = gt_mask[..., None]
    target = gt_rgb * m + jnp.asarray(background, rgb.dtype) * (1.0 - m)
    return jnp.mean((target - rgb) ** 2)


def mask_mse(opacity: jax.Array, gt_mask: jax.Array) -> jax.Array:
    return jnp.mean((gt_mask - opacity) ** 2)


def depth_pearson(depth: jax.Array, gt_depth: jax.Array, gt_mask: jax.Array) -> jax.Array:
    """1 - Pearson correlation of depth and gt_depth over pixels with gt_mask > 0.5 (shapes (H, W)).

    As the official loss: no sign flip. Rendered depth is a distance, so gt_depth must be larger = farther
    (the official convention; :mod:`dreamcraft_jax.data.reference` converts a disparity map when it loads it).
    A perfect fit scores 0, an inverted relief 2.
    """
    w = (gt_mask > 0.5).astype(depth.dtype)
    n = jnp.maximum(jnp.sum(w), 1.0)
    x = depth
    y = gt_depth
    mx = jnp.sum(w * x) / n
    my = jnp.sum(w * y) / n
    cov = jnp.sum(w * (x - mx) * (y - my))
    var_x = jnp.sum(w * (x - mx) ** 2)
    var_y = jnp.sum(w * (y - my) ** 2)
    return 1.0 - cov / jnp.sqrt(jnp.maximum(var_x * var_y, 1e-20))


def normal_smooth_2d(normal_image: jax.Array) -> jax.Array:
    """normal_image (H, W, 3)."""
    dy = normal_image[1:, :, :] - normal_image[:-1, :, :]
    dx = normal_image[:, 1:, :] - normal_image[:, :-1, :]
    return jnp.mean(dy ** 2) + jnp.mean(dx ** 2)


def _masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    v = valid.astype(values.dtype)
    while v.ndim < values.ndim:
        v = v[..., None]
    count = jnp.maximum(jnp.sum(valid), 1) * (values.size // valid.size)
    return jnp.sum(values * v) / count


def normal_smooth_3d(normals: jax.Array, normals_perturbed: jax.Array, valid: jax.Array) -> jax.Array:
    """normals, normals_perturbed (M, 3); valid (M,)."""
    return _masked_mean(jnp.abs(normals - normals_perturbed), valid)


def orientation(weights: jax.Array, normals: jax.Array, dirs: jax.Array, valid: jax.Array,
                opacity: jax.Array) -> jax.Array:
    """weights (M,), normals/dirs (M, 3), valid (M,), opacity (R,)."""
    facing_away = jnp.maximum(jnp.sum(normals * dirs, axis=-1), 0.0) ** 2
    total = jnp.sum(jax.lax.stop_gradient(weights) * facing_away * valid)
    return total / jnp.maximum(jnp.sum(opacity > 0), 1)


def sparsity(opacity: jax.Array) -> jax.Array:
    return jnp.mean(jnp.sqrt(opacity ** 2 + 0.01))


def opaque_entropy(opacity: jax.Array) -> jax.Array:
    o = jnp.clip(opacity, 1e-3, 1.0 - 1e-3)
    return jnp.mean(-(o * jnp.log(o) + (1.0 - o) * jnp.log(1.0 - o)))


def psnr(rgb: jax.Array, target: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB for images in [0, 1]."""
    return -10.0 * jnp.log10(jnp.maximum(jnp.mean((rgb - target) ** 2), 1e-12))
