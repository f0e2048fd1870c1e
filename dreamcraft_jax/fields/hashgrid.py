"""Multi-resolution hash encoding (Instant-NGP), pure-functional, in the tiny-cuda-nn convention.

Layout and arithmetic follow tiny-cuda-nn's ``HashGrid`` encoding (3-D input, linear interpolation,
``Prime`` hash) so that values and behaviour match the CUDA implementation used by DreamCraft3D:

* level ``l`` in ``[0, L)`` has ``scale_l = 2^(l * log2(per_level_scale)) * base_resolution - 1``
  and ``res_l = ceil(scale_l) + 1``;
* it owns ``size_l = min(ceil8(res_l^3), 2^log2_hashmap_size)`` rows of one flat ``(total_params, F)``
  table, starting at row ``offset_l = sum_{k<l} size_k``;
* a point ``x`` in ``[0, 1]^3`` lands at ``pos = scale_l * x + 0.5``, in cell ``floor(pos)`` with
  fractional part ``frac = pos - floor(pos)``; its 8 corners are blended trilinearly;
* a corner ``c`` maps to the row ``offset_l + idx_l(c) % size_l`` with
  ``idx_l(c) = cx + cy * res_l + cz * res_l^2`` on dense levels (``res_l^3 <= size_l``) and
  ``idx_l(c) = cx ^ (cy * 2654435761) ^ (cz * 805459861)`` on hashed levels, all in wrapping uint32.

Features are level-major: ``[level0 f0..f(F-1), level1 f0..f(F-1), ...]``.

The table is a plain array, so the encoder composes with ``jax.jit``/``jax.grad``: the backward pass of
the gather is the scatter-add of tiny-cuda-nn, and the gradient w.r.t. ``x`` flows through the
trilinear weights (``floor`` has zero derivative, so ``d frac / d x = scale_l``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# tiny-cuda-nn's coherent prime hash: one odd constant per dimension (the first is 1 for cache coherence).
_HASH_PRIMES = (1, 2654435761, 805459861)

# (8, 3) corner offsets {0,1}^3; corner k has bit d of k as its offset along dimension d.
_CORNER_BITS = np.array([[(k >> d) & 1 for d in range(3)] for k in range(8)], dtype=np.uint32)

# Row indices are gathered as int32, so the whole table must stay addressable with it.
_MAX_TOTAL_PARAMS = 2**31 - 1

_INIT_SCALE = 1e-4


def _readonly(a: np.ndarray) -> np.ndarray:
    """Freeze a derived array: specs are hashed as static jit arguments, so they must not change."""
    a.setflags(write=False)
    return a


@dataclasses.dataclass(frozen=True)
class HashGridSpec:
    """Static description of a 3-D multi-resolution hash grid (hashable: usable as a static jit argument).

    Fields (the tiny-cuda-nn / threestudio config keys):
        n_levels: L, number of resolution levels.
        n_features_per_level: F, features stored per table row.
        log2_hashmap_size: log2 of the maximal number of rows of one level (T = 2^log2_hashmap_size).
        base_resolution: coarsest grid resolution (``res_0 = base_resolution`` when it is an integer scale).
        per_level_scale: geometric growth factor of the grid scale between consecutive levels.

    Derived (static NumPy / Python values computed once from the fields, never traced; read-only):
        scales: (L,) float64, ``2^(l * log2(per_level_scale)) * base_resolution - 1``.
        resolutions: (L,) int64, ``ceil(scales) + 1``.
        level_sizes: (L,) int64, ``min(ceil8(res^3), 2^log2_hashmap_size)`` rows per level.
        offsets: (L,) int64, first row of each level in the flat table (exclusive cumsum of level_sizes).
        dense: (L,) bool, ``res^3 <= level_size`` (direct indexing instead of hashing).
        total_params: int, number of table rows (sum of level_sizes).
        output_dim: int, ``L * F``.
    """

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.447269237440378

    def __post_init__(self):
        # Normalise the types so that specs built from configs (numpy / ConfigDict values) hash and
        # compare equal to specs built from Python literals: jit caches on this hash.
        for name, cast in (("n_levels", int), ("n_features_per_level", int), ("log2_hashmap_size", int),
                           ("base_resolution", int), ("per_level_scale", float)):
            object.__setattr__(self, name, cast(getattr(self, name)))
        if self.n_levels < 1 or self.n_features_per_level < 1:
            raise ValueError(f"n_levels and n_features_per_level must be >= 1, got {self}")
        if not 1 <= self.log2_hashmap_size <= 31:
            # Indices are uint32 and taken modulo the level size, which must fit in that range.
            raise ValueError(f"log2_hashmap_size must be in [1, 31], got {self.log2_hashmap_size}")
        if self.base_resolution < 1 or not self.per_level_scale >= 1.0:
            raise ValueError(f"need base_resolution >= 1 and per_level_scale >= 1, got {self}")
        if self.total_params > _MAX_TOTAL_PARAMS:
            raise ValueError(f"{self.total_params} table rows do not fit int32 row indices")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> HashGridSpec:
        """Build a spec from a mapping / ``ml_collections.ConfigDict`` holding the five field keys.

        Extra keys (``otype``, ``start_level``, ...) are ignored; a missing field key is an error rather
        than a silent default, so a typo in a config cannot change the grid unnoticed.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in cfg]
        if missing:
            raise KeyError(f"hash grid config lacks {missing}")
        return cls(**{n: cfg[n] for n in names})

    @functools.cached_property
    def scales(self) -> np.ndarray:
        """(L,) float64 grid scale of each level."""
        levels = np.arange(self.n_levels, dtype=np.float64)
        return _readonly(np.exp2(levels * np.log2(self.per_level_scale)) * self.base_resolution - 1.0)

    @functools.cached_property
    def resolutions(self) -> np.ndarray:
        """(L,) int64 grid resolution of each level, ``ceil(scale) + 1``."""
        return _readonly(np.ceil(self.scales).astype(np.int64) + 1)

    @functools.cached_property
    def level_sizes(self) -> np.ndarray:
        """(L,) int64 rows per level, ``min(ceil8(res^3), 2^log2_hashmap_size)``."""
        cap = 1 << self.log2_hashmap_size
        # Python ints: res^3 can exceed int64 for extreme specs.
        sizes = [min(-(-int(r) ** 3 // 8) * 8, cap) for r in self.resolutions]
        return _readonly(np.array(sizes, dtype=np.int64))

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """(L,) int64 first row of each level in the flat table."""
        return _readonly(np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]]).astype(np.int64))

    @functools.cached_property
    def dense(self) -> np.ndarray:
        """(L,) bool, whether the level indexes its table directly (``res^3 <= level_size``)."""
        return _readonly(np.array([int(r) ** 3 <= int(s) for r, s in zip(self.resolutions, self.level_sizes)],
                                  dtype=bool))

    @functools.cached_property
    def total_params(self) -> int:
        """Number of rows of the flat table."""
        return int(np.sum(self.level_sizes))

    @property
    def output_dim(self) -> int:
        """Width of the encoding, ``L * F``."""
        return self.n_levels * self.n_features_per_level


def init_hashgrid(key: jax.Array, spec: HashGridSpec, dtype=jnp.float32) -> jax.Array:
    """Initial table, U(-1e-4, 1e-4) as in tiny-cuda-nn.

    Args:
        key: PRNG key.
        spec: grid description.
        dtype: table dtype.
    Returns:
        (spec.total_params, spec.n_features_per_level) array of ``dtype``.
    """
    shape = (spec.total_params, spec.n_features_per_level)
    return jax.random.uniform(key, shape, dtype, minval=-_INIT_SCALE, maxval=_INIT_SCALE)


def _corner_rows(cell: jax.Array, spec: HashGridSpec) -> jax.Array:
    """Flat-table rows of the 8 corners of each cell.

    Args:
        cell: (..., L, 3) uint32 integer cell coordinates per level.
    Returns:
        (..., L, 8) int32 rows, ``offset_l + idx_l(corner) % size_l``.
    """
    corner = cell[..., None, :] + _CORNER_BITS  # (..., L, 8, 3)
    cx, cy, cz = corner[..., 0], corner[..., 1], corner[..., 2]
    # Per-level constants as (L, 1) so they broadcast against the corner axis.
    res = spec.resolutions.astype(np.uint64)
    res1 = jnp.asarray(res % 2**32, jnp.uint32)[:, None]
    res2 = jnp.asarray(res * res % 2**32, jnp.uint32)[:, None]
    size = jnp.asarray(spec.level_sizes, jnp.uint32)[:, None]
    offset = jnp.asarray(spec.offsets, jnp.uint32)[:, None]
    dense = jnp.asarray(spec.dense)[:, None]
    # Both branches in wrapping uint32; the dense one may wrap only on hashed levels, where it is discarded.
    dense_idx = cx + cy * res1 + cz * res2
    p0, p1, p2 = (jnp.uint32(p) for p in _HASH_PRIMES)
    hash_idx = (cx * p0) ^ (cy * p1) ^ (cz * p2)
    # The modulo also folds the dense corners at coordinate res_l (reached at x = 1) back into the level,
    # exactly like tiny-cuda-nn.
    idx = jnp.where(dense, dense_idx, hash_idx) % size
    return (idx + offset).astype(jnp.int32)  # < total_params <= 2^31 - 1, checked by the spec


def encode(table: jax.Array, x: jax.Array, spec: HashGridSpec, level_mask: jax.Array | None = None,
           valid: jax.Array | None = None, skip_masked_levels: bool = False) -> jax.Array:
    """Encode points with the multi-resolution hash grid.

    ``out[..., l*F:(l+1)*F] = mask_l * sum_{b in {0,1}^3} w_b * table[row_l(cell + b)]`` with
    ``w_b = prod_d (frac_d if b_d else 1 - frac_d)``, ``pos = scale_l * x + 0.5``, ``cell = floor(pos)``
    (clamped at 0) and ``frac = pos - floor(pos)``.

    Args:
        table: (spec.total_params, F) flat parameter table (all levels, see ``HashGridSpec.offsets``).
        x: (..., 3) points in [0, 1]^3; any leading batch shape.
        spec: grid description (static).
        level_mask: optional (L,) per-level multiplier (e.g. :func:`progressive_level_mask`); a zero entry
            zeroes that level's features and hence its table gradient.
        valid: optional (...) bool; an invalid point gets zero features and adds nothing to any gradient.
            Its corner rows point past the table (gather fills 0, the transposed scatter-add drops them):
            the unused slots of a packed sample buffer then cost no atomics on one shared row, which is
            where they would otherwise all land.
        skip_masked_levels: levels whose ``level_mask`` entry is 0 read nothing and scatter nothing (same
            features and table gradient; the gradient w.r.t. ``level_mask`` is then 0 on those levels
            instead of the unmasked features' product, so only for callers that do not differentiate the
            mask, like the fields, whose mask is a function of the step).
    Returns:
        (..., L * F) level-major features, in the promotion of ``table.dtype``, ``x.dtype`` and float32
        (float32 for the usual float32 / bfloat16 inputs; float64 for float64 inputs under x64). Positions
        and trilinear weights are computed at ``x``'s precision (at least float32).
    """
    table, x = jnp.asarray(table), jnp.asarray(x)
    L, F = spec.n_levels, spec.n_features_per_level
    if table.shape != (spec.total_params, F):
        raise ValueError(f"table shape {table.shape} != {(spec.total_params, F)}")
    if x.shape[-1] != 3:
        raise ValueError(f"x must be (..., 3), got {x.shape}")
    # At least float32: positions reach ~res_max, so bfloat16 would lose the fractional part. Positions and
    # weights at x's precision, products and sums at the table's too: a float64 table with float32 points
    # gives the float32 weights, accumulated in float64 (a reference for float32 summation order).
    pdt = jnp.promote_types(x.dtype, jnp.float32)
    cdt = jnp.promote_types(jnp.promote_types(table.dtype, x.dtype), jnp.float32)
    batch_shape = x.shape[:-1]

    scales = jnp.asarray(spec.scales, pdt)  # (L,)
    pos = x.astype(pdt)[..., None, :] * scales[:, None] + 0.5  # (..., L, 3)
    pos_floor = jnp.floor(pos)
    frac = pos - pos_floor  # (..., L, 3), in [0, 1)
    # Clamp so that slightly negative inputs cannot wrap to huge uint32 cells.
    cell = jnp.maximum(pos_floor, 0).astype(jnp.uint32)

    # Trilinear weights of the 8 corners, (..., L, 8): per dimension frac for offset 1, 1 - frac for 0.
    bits = jnp.asarray(_CORNER_BITS, bool)  # (8, 3)
    w_dim = jnp.where(bits, frac[..., None, :], 1.0 - frac[..., None, :])  # (..., L, 8, 3)
    weights = (w_dim[..., 0] * w_dim[..., 1] * w_dim[..., 2]).astype(cdt)

    rows = _corner_rows(cell, spec)  # (..., L, 8)
    # Rows of points / levels that must not touch the table point past its end: the gather fills 0 and
    # its transpose (the scatter-add of the backward) drops them.
    keep = None
    if valid is not None:
        valid = jnp.asarray(valid, bool)
        if valid.shape != batch_shape:
            raise ValueError(f"valid must have the batch shape {batch_shape}, got {valid.shape}")
        keep = valid[..., None, None]
    if skip_masked_levels and level_mask is not None:
        level_on = (jnp.asarray(level_mask) != 0)[:, None]  # (L, 1)
        keep = level_on if keep is None else keep & level_on
    if keep is None:
        # One gather for all levels and corners; rows are in range by construction (modulo level size).
        corner_feats = table.at[rows].get(mode="promise_in_bounds").astype(cdt)  # (..., L, 8, F)
    else:
        rows = jnp.where(keep, rows, spec.total_params)
        corner_feats = table.at[rows].get(mode="fill", fill_value=0).astype(cdt)
    feats = jnp.sum(corner_feats * weights[..., None], axis=-2)  # (..., L, F)
    if level_mask is not None:
        feats = feats * jnp.asarray(level_mask, cdt)[:, None]
    return feats.reshape(*batch_shape, L * F)


def progressive_level_mask(step, spec: HashGridSpec, start_level: int, start_step: int,
                           update_steps: int) -> jax.Array:
    """Per-level mask of threestudio's ``ProgressiveBandHashGrid`` at training ``step``.

    ``n_active = min(L, start_level + max(0, step - start_step) // update_steps)``; levels ``< n_active``
    get 1.0, the others 0.0. This is the formula of DreamCraft3D's ``threestudio/models/networks.py``
    (``ProgressiveBandHashGrid.update_step``): with L=16, start_level=8, start_step=2000, update_steps=500
    levels 0..7 are on until step 2499, level 8 joins at step 2500 and one more every 500 steps after.

    Args:
        step: scalar integer training step; Python int or (traced) jnp integer, so changing it never
            recompiles a jitted caller.
        spec: grid description (only ``n_levels`` is used).
        start_level: number of levels active from the start.
        start_step: step from which levels are added.
        update_steps: steps between two added levels (> 0).
    Returns:
        (L,) float32 mask.
    """
    if update_steps <= 0:
        raise ValueError(f"update_steps must be > 0, got {update_steps}")
    step = jnp.asarray(step)
    n_active = jnp.minimum(spec.n_levels, start_level + jnp.maximum(step - start_step, 0) // update_steps)
    return (jnp.arange(spec.n_levels) < n_active).astype(jnp.float32)
