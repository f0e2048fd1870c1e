"""View-dependent prompts and Perp-Neg, as threestudio's prompt processor (used by DreamCraft3D's 2D prior).

Directions, in threestudio's index order (the embedding tables below follow it):

    0 side:     everything not claimed below (``"{prompt}, side view"``)
    1 front:    -front_threshold < azimuth < front_threshold           (``"{prompt}, front view"``)
    2 back:     azimuth > 180 - back_threshold or < -180 + back_threshold  (``"{prompt}, back view"``)
    3 overhead: elevation > overhead_threshold                          (``"{prompt}, overhead view"``)

Later directions win (overhead over front/back over side); comparisons are strict. Angles are degrees in the
convention of :mod:`dreamcraft_jax.cameras` (azimuth 0 = the front / reference view), wrapped to [-180, 180)
first. Defaults: front and back thresholds 45, overhead 60 (threestudio's). The negative prompt of every direction
is the plain negative prompt (usually "", the unconditional embedding).

Perp-Neg (Armandpour et al. 2023, threestudio's ``get_text_embeddings_perp_neg``), per view with azimuth ``a``
(wrapped) that is not overhead:

* |a| < 90 (front-side): r = 1 - |a| / 90; positive embedding r * e_front + (1 - r) * e_side;
  negatives [e_front, e_side] with weights [-f_fs(r), -f_sf(1 - r)];
* |a| >= 90 (side-back): r = 2 - |a| / 90; positive r * e_side + (1 - r) * e_back;
  negatives [e_side, e_front] with weights [-f_sb(r), -f_fsb(r)];
* overhead: positive e_overhead; both negatives the unconditional embedding with weight 0;

with f(r) = a * exp(-b * r) + c and (a, b, c) = f_fs (4, 0.5, -2.426), f_sf (4, 0.5, -2.426),
f_sb (1, 0.5, -0.606), f_fsb (1, 0.5, 0.967). The guided noise (:func:`perp_neg_combine`) is

    eps = eps_u + s * (d_pos + sum_i w_i * perp(d_neg_i, d_pos)),  d_pos = eps_pos - eps_u, d_neg_i = eps_neg_i - eps_u
    perp(x, y) = x - (<x, y> / max(<y, y>, 1e-6)) * y      (inner products per sample over all other axes)

so only the part of each negative direction orthogonal to the positive one is pushed away from (w_i < 0).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

DIRECTIONS = ("side", "front", "back", "overhead")
SIDE, FRONT, BACK, OVERHEAD = 0, 1, 2, 3
UNCOND = -1  # a negative index meaning "the unconditional (negative-prompt) embedding"

PERP_NEG_F_FS = (4.0, 0.5, -2.426)
PERP_NEG_F_SF = (4.0, 0.5, -2.426)
PERP_NEG_F_SB = (1.0, 0.5, -0.606)
PERP_NEG_F_FSB = (1.0, 0.5, 0.967)


def view_prompts(prompt: str) -> tuple[str, ...]:
    """The four view-dependent prompts in :data:`DIRECTIONS` order: ``f"{prompt}, {direction} view"``."""
    return tuple(f"{prompt}, {d} view" for d in DIRECTIONS)


def wrap_azimuth(azimuth) -> jax.Array:
    """Degrees -> [-180, 180): (a + 180) mod 360 - 180."""
    return (jnp.asarray(azimuth, jnp.float32) + 180.0) % 360.0 - 180.0


def direction_index(elevation, azimuth, *, front_threshold: float = 45.0, back_threshold: float = 45.0,
                    overhead_threshold: float = 60.0) -> jax.Array:
    """int32 direction per view (same shape as the broadcast inputs): 0 side, 1 front, 2 back, 3 overhead."""
    elevation = jnp.asarray(elevation, jnp.float32)
    a = wrap_azimuth(azimuth)
    elevation, a = jnp.broadcast_arrays(elevation, a)
    idx = jnp.full(a.shape, SIDE, jnp.int32)
    idx = jnp.where((a > -front_threshold) & (a < front_threshold), FRONT, idx)
    idx = jnp.where((a > 180.0 - back_threshold) | (a < -180.0 + back_threshold), BACK, idx)
    return jnp.where(elevation > overhead_threshold, OVERHEAD, idx).astype(jnp.int32)


def view_dependent_embeddings(text_vd: jax.Array, uncond_vd: jax.Array, elevation, azimuth,
                              **thresholds) -> tuple[jax.Array, jax.Array]:
    """Per-view (cond, uncond) embeddings: text_vd, uncond_vd (4, L, D) in DIRECTIONS order -> 2 x (B, L, D)."""
    idx = direction_index(elevation, azimuth, **thresholds)
    return text_vd[idx], uncond_vd[idx]


def shifted_exponential_decay(params, r) -> jax.Array:
    """f(r) = a * exp(-b * r) + c with params = (a, b, c)."""
    a, b, c = params
    return a * jnp.exp(-b * r) + c


class PerpNegWeights(NamedTuple):
    """Which embeddings Perp-Neg combines, per view (B views, 2 negatives each).

    pos_coeffs: (B, 4) coefficients of the positive embedding over the DIRECTIONS embeddings.
    neg_index: (B, 2) int32 direction index of each negative, or UNCOND (-1) for the unconditional embedding.
    neg_weights: (B, 2) the weights w_i of :func:`perp_neg_combine` (<= 0).
    """

    pos_coeffs: jax.Array
    neg_index: jax.Array
    neg_weights: jax.Array


def perp_neg_weights(elevation, azimuth, *, front_threshold: float = 45.0, back_threshold: float = 45.0,
                     overhead_threshold: float = 60.0, f_fs=PERP_NEG_F_FS, f_sf=PERP_NEG_F_SF,
                     f_sb=PERP_NEG_F_SB, f_fsb=PERP_NEG_F_FSB) -> PerpNegWeights:
    """Perp-Neg interpolation and negative weights per view (module doc); elevation, azimuth (B,) degrees."""
    elevation = jnp.atleast_1d(jnp.asarray(elevation, jnp.float32))
    a = jnp.abs(wrap_azimuth(azimuth))
    elevation, a = jnp.broadcast_arrays(elevation, jnp.atleast_1d(a))
    overhead = direction_index(elevation, azimuth, front_threshold=front_threshold, back_threshold=back_threshold,
                               overhead_threshold=overhead_threshold) == OVERHEAD
    front_side = a < 90.0
    r_fs = 1.0 - a / 90.0  # 1 = front, 0 = side
    r_sb = 2.0 - a / 90.0  # 1 = side, 0 = back
    zeros = jnp.zeros_like(a)

    pos_fs = jnp.stack([1.0 - r_fs, r_fs, zeros, zeros], axis=-1)
    pos_sb = jnp.stack([r_sb, zeros, 1.0 - r_sb, zeros], axis=-1)
    pos_oh = jnp.stack([zeros, zeros, zeros, zeros + 1.0], axis=-1)
    pos = jnp.where(front_side[:, None], pos_fs, pos_sb)
    pos = jnp.where(overhead[:, None], pos_oh, pos)

    w_fs = jnp.stack([-shifted_exponential_decay(f_fs, r_fs), -shifted_exponential_decay(f_sf, 1.0 - r_fs)], -1)
    w_sb = jnp.stack([-shifted_exponential_decay(f_sb, r_sb), -shifted_exponential_decay(f_fsb, r_sb)], -1)
    weights = jnp.where(front_side[:, None], w_fs, w_sb)
    weights = jnp.where(overhead[:, None], 0.0, weights)

    idx_fs = jnp.asarray([FRONT, SIDE], jnp.int32)
    idx_sb = jnp.asarray([SIDE, FRONT], jnp.int32)
    index = jnp.where(front_side[:, None], idx_fs, idx_sb)
    index = jnp.where(overhead[:, None], UNCOND, index)
    return PerpNegWeights(pos.astype(jnp.float32), index.astype(jnp.int32), weights.astype(jnp.float32))


def perp_neg_embeddings(text_vd: jax.Array, uncond: jax.Array, weights: PerpNegWeights
                        ) -> tuple[jax.Array, jax.Array]:
    """Embeddings for a Perp-Neg UNet call.

    text_vd: (4, L, D) view-dependent prompt embeddings (DIRECTIONS order); uncond: (L, D) negative-prompt embedding.
    Returns pos (B, L, D) = sum_k pos_coeffs[:, k] * text_vd[k] and neg (B, 2, L, D) (UNCOND -> ``uncond``).
    """
    pos = jnp.einsum("bk,kld->bld", weights.pos_coeffs.astype(text_vd.dtype), text_vd)
    table = jnp.concatenate([text_vd, uncond[None]], axis=0)  # index -1 picks the last row: uncond
    neg = table[weights.neg_index]
    return pos, neg


def perpendicular_component(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per sample (axis 0): x - (<x, y> / max(<y, y>, 1e-6)) y, inner products over all other axes."""
    axes = tuple(range(1, x.ndim))
    xy = jnp.sum(x * y, axis=axes, keepdims=True)
    yy = jnp.maximum(jnp.sum(y * y, axis=axes, keepdims=True), 1e-6)
    return x - (xy / yy) * y


def perp_neg_combine(eps_uncond: jax.Array, eps_pos: jax.Array, eps_neg: jax.Array, neg_weights: jax.Array,
                     guidance_scale) -> jax.Array:
    """Perp-Neg guided noise (module doc).

    eps_uncond, eps_pos: (B, ...); eps_neg: (B, K, ...) one prediction per negative; neg_weights: (B, K).
    Returns eps_u + s * (d_pos + sum_i w_i perp(d_neg_i, d_pos)) with d = eps - eps_u, shape (B, ...).
    """
    d_pos = eps_pos - eps_uncond
    total = d_pos
    for i in range(eps_neg.shape[1]):
        w = neg_weights[:, i].reshape((-1,) + (1,) * (d_pos.ndim - 1)).astype(d_pos.dtype)
        total = total + w * perpendicular_component(eps_neg[:, i] - eps_uncond, d_pos)
    return eps_uncond + guidance_scale * total
