"""Multi-resolution hash-grid encoding as a Pallas kernel (Triton backend), beside its pure-jnp reference.

``encode_pallas`` computes exactly what :func:`dreamcraft_jax.fields.hashgrid.encode` computes (see that
module for the tiny-cuda-nn conventions) with two hand-written kernels:

* forward: one program per block of ``B`` points; the ``L`` levels and 8 corners are unrolled statically.
  Per level ``l``: ``pos = scale_l * x + 0.5``, ``cell = max(floor(pos), 0)`` (uint32),
  ``frac = pos - floor(pos)``, corner rows ``offset_l + idx_l(cell + b) % size_l`` (dense index or prime
  hash in wrapping uint32), ``out[:, l*F:(l+1)*F] = mask_l * sum_b w_b * table[row_b]`` with
  ``w_b = prod_d (frac_d if b_d else 1 - frac_d)``; the table rows are gathered straight from HBM.
* backward (recomputes rows and weights from ``x``; nothing per corner is stored by the forward):
  ``d_table[row_b] += w_b * mask_l * g_l`` by atomic scatter-add into a zero-initialised
  ``(total_params, F)`` buffer, ``d_x_d = sum_l scale_l * sum_b (dw_b/dfrac_d) * <mask_l * g_l, table[row_b]>``
  with ``dw_b/dfrac_d = (+1 if b_d else -1) * prod_{e != d} w_{b,e}`` (``floor`` has zero derivative,
  exactly as the reference's autodiff), and per-block partial sums of the level-mask gradient
  ``d_mask_l = sum_points <feat_l, g_l>`` (``feat_l`` the unmasked level feature), summed outside.

The Triton-specific pieces (gather/scatter/atomics, compiler params) live in the small ``_gather``,
``_scatter_add``, ``_load``, ``_store`` and ``_compiler_params`` helpers, so that a port to another Pallas
GPU backend only replaces those.

Interpret mode (CPU, tests): Pallas discharges ``atomic_add`` with an index array as
``ref.at[idx].set(ref[idx] + val)``, which drops all but one update when ``idx`` has duplicates (common:
neighbouring points share corners). ``_scatter_add`` therefore uses a functional ``.at[].add`` on the whole
buffer in interpret mode and the hardware atomics only when lowering to Triton.

Inside ``jax.shard_map``: with ``check_vma=True`` the operands are cast to their common varying mesh axes
and the ``pallas_call`` outputs declared varying (so a replicated table's gradient is psum-ed by the
transpose of that cast, as for jnp code); jax 0.12's Pallas *interpret* mode cannot lower a blocked
``pallas_call`` under ``check_vma=True`` at all, so CPU runs inside shard_map need ``check_vma=False``
(then the per-shard table gradient must be psum-ed by the caller).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dreamcraft_jax.fields import hashgrid as _ref
from dreamcraft_jax.fields.hashgrid import HashGridSpec

__all__ = ["encode_pallas", "encode_xla"]

_HASH_PRIMES = tuple(np.uint32(p) for p in _ref._HASH_PRIMES)  # (1, 2654435761, 805459861)


def encode_xla(table: jax.Array, x: jax.Array, spec: HashGridSpec,
               level_mask: jax.Array | None = None, valid: jax.Array | None = None) -> jax.Array:
    """Pure-jnp reference: :func:`dreamcraft_jax.fields.hashgrid.encode` (same signature and result).

    Args:
        table: (spec.total_params, F) flat parameter table.
        x: (..., 3) points in [0, 1]^3.
        spec: grid description (static).
        level_mask: optional (L,) per-level multiplier.
        valid: optional bool of the batch shape (invalid points: zero features, no gradient).
    Returns:
        (..., L * F) level-major features.
    """
    return _ref.encode(table, x, spec, level_mask, valid)


# ------------------------------------------------------------------------------------------------
# Backend-specific helpers (Triton). A port to another Pallas GPU backend replaces only these.
# ------------------------------------------------------------------------------------------------

def _compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters of both kernels."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _load(ref, idx):
    """Load a block (static slices / scalar indices) from a ref.

    Plain ref indexing (``get``), which Triton lowers to the same ``tt.load`` as ``plgpu.load``; the
    latter's interpret-mode discharge rejects Python-int indices on jax 0.12.
    """
    return ref[idx]


def _store(ref, idx, val):
    """Store a block (static slices / scalar indices) into a ref (``swap``, lowered to ``tt.store``)."""
    ref[idx] = val


def _gather(table_ref, rows, cols, lanes=None):
    """``table[rows, cols]`` for same-shape int32 index arrays: one pointer gather from HBM; where the bool
    ``lanes`` (same shape) is False nothing is read and the value is 0."""
    if lanes is None:
        return plgpu.load(table_ref.at[rows, cols])
    return plgpu.load(table_ref.at[rows, cols], mask=lanes, other=0.0)


def _scatter_add(ref, rows, cols, vals, *, interpret: bool, lanes=None):
    """``ref[rows, cols] += vals`` for same-shape int32 index arrays, correct under duplicate indices.

    Triton: hardware float atomics (``plgpu.atomic_add``), any number of programs may hit the same row.
    Interpret mode: Pallas discharges ``atomic_add`` with index arrays as a gather + scatter-*set*, which
    loses duplicate indices, so the whole buffer is updated with a functional scatter-add instead
    (programs run sequentially there, so this is exact). Where ``lanes`` is False nothing is added.
    """
    if interpret:
        if lanes is not None:
            vals = jnp.where(lanes, vals, 0.0)
        ref[...] = ref[...].at[rows, cols].add(vals)
    elif lanes is None:
        plgpu.atomic_add(ref, (rows, cols), vals)
    else:
        plgpu.atomic_add(ref, (rows, cols), vals, mask=lanes)


# ------------------------------------------------------------------------------------------------
# Shared per-level geometry (traced inside both kernels)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel configuration (hashable; a nondiff argument of the custom_vjp)."""

    block_points: int
    interpret: bool
    num_warps: int
    num_stages: int
    grad_table_only: bool
    xla_backward: bool = False
    pre_reduce_max_scale: float = 0.0  # see encode_pallas


def _feature_chunks(F: int) -> tuple[int, int]:
    """(chunk width, number of chunks): Triton tensors need power-of-two sizes, so a non-power-of-two
    F is processed one feature at a time."""
    fw = F if F & (F - 1) == 0 else 1
    return fw, F // fw


@dataclasses.dataclass(frozen=True)
class _Level:
    """Constants of one grid level: Python / numpy values (a level fixed at trace time) or scalars loaded in
    the kernel (the level a program handles, :func:`_loaded_level`).

    ``mults``: per-dimension index multipliers (1, res, res^2 mod 2^32 on dense levels, the hash primes on
    hashed ones); the corner index is ``offset + (sum of terms) % size`` (dense) or ``offset + (xor of terms)
    & (size - 1)`` (hashed, size a power of two).
    """

    scale: object
    mults: tuple
    hashed: object
    size: object
    offset: object


def _static_level(spec: HashGridSpec, l: int) -> _Level:
    """Level ``l`` of ``spec`` with its constants as numpy scalars (same float32 rounding of the scale as the
    reference's ``jnp.asarray(spec.scales, f32)``)."""
    res = int(spec.resolutions[l])
    dense = bool(spec.dense[l])
    mults = (np.uint32(1), np.uint32(res % 2**32), np.uint32(res * res % 2**32)) if dense else _HASH_PRIMES
    return _Level(np.float32(spec.scales[l]), mults, not dense, np.uint32(int(spec.level_sizes[l])),
                  np.uint32(int(spec.offsets[l])))


_LEVEL_FIELDS = ("scale", "mult1", "mult2", "hashed", "size", "offset")


def _level_arrays(spec: HashGridSpec) -> list[np.ndarray]:
    """The per-level constants as (L,) arrays, in :data:`_LEVEL_FIELDS` order, for kernels whose level is a
    grid axis (:func:`_loaded_level` reads them back)."""
    levels = [_static_level(spec, l) for l in range(spec.n_levels)]
    return [np.array([lv.scale for lv in levels], np.float32),
            np.array([lv.mults[1] for lv in levels], np.uint32),
            np.array([lv.mults[2] for lv in levels], np.uint32),
            np.array([lv.hashed for lv in levels], np.int32),
            np.array([lv.size for lv in levels], np.uint32),
            np.array([lv.offset for lv in levels], np.uint32)]


def _loaded_level(level_refs, l) -> _Level:
    """The constants of level ``l`` (traced) from the refs of :func:`_level_arrays`."""
    scale, mult1, mult2, hashed, size, offset = (_load(ref, l) for ref in level_refs)
    return _Level(scale, (np.uint32(1), mult1, mult2), hashed != 0, size, offset)


def _level_geometry(xs, level: _Level):
    """Per-dimension weights and index terms of one level for a block of points.

    Args:
        xs: three (B,) float32 coordinates.
    Returns:
        w: w[d][bit] (B,) float32 trilinear factor of dimension d (``1 - frac_d`` for bit 0, ``frac_d`` for 1).
        terms: terms[d][bit] (B,) uint32 contribution of dimension d to the corner index, so that
            ``idx = terms[0][b0] + terms[1][b1] + terms[2][b2]`` (dense) or ``^`` of them (hashed).
    """
    w, terms = [], []
    for d in range(3):
        pos = xs[d] * level.scale + np.float32(0.5)
        pos_floor = jnp.floor(pos)
        frac = pos - pos_floor
        # Clamp like the reference so slightly negative inputs cannot wrap to huge uint32 cells.
        cell = jnp.maximum(pos_floor, np.float32(0.0)).astype(jnp.uint32)
        w.append((np.float32(1.0) - frac, frac))
        # All index arithmetic in wrapping uint32, term by term (wrapping distributes over + and the
        # per-dimension products are what the reference multiplies).
        terms.append(tuple((cell + np.uint32(bit)) * level.mults[d] for bit in (0, 1)))
    return w, terms


def _corner_row(terms, bits, level: _Level):
    """(B,) int32 table row of corner ``bits``: ``offset + idx % size`` (see :class:`_Level`)."""
    t0, t1, t2 = (terms[d][bits[d]] for d in range(3))

    def hashed():  # hashed levels: size = 2^log2_hashmap_size
        return (t0 ^ t1 ^ t2) & (level.size - np.uint32(1))

    def dense():  # dense sizes are multiples of 8, not powers of 2
        return jax.lax.rem(t0 + t1 + t2, jnp.broadcast_to(level.size, t0.shape).astype(jnp.uint32))

    if isinstance(level.hashed, bool):
        idx = hashed() if level.hashed else dense()
    else:
        idx = jnp.where(level.hashed, hashed(), dense())
    return (idx + level.offset).astype(jnp.int32)  # < total_params <= 2^31 - 1


_CORNERS = tuple(tuple((k >> d) & 1 for d in range(3)) for k in range(8))  # bit d of k = offset along d


def _index_arrays(row, c: int, fw: int, B: int):
    """(B, fw) int32 row / column index arrays of feature chunk ``c`` for a gather or scatter."""
    rows = jnp.broadcast_to(row[:, None], (B, fw))
    if fw == 1:
        cols = jnp.full((B, 1), c, jnp.int32)
    else:
        cols = jnp.broadcast_to(c * fw + jnp.arange(fw, dtype=jnp.int32)[None, :], (B, fw))
    return rows, cols


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

def _valid_lanes(valid_ref, B: int, fw: int):
    """(B, fw) bool lanes of the points of this block that are valid, or None without a valid mask."""
    if valid_ref is None:
        return None
    return jnp.broadcast_to((_load(valid_ref, slice(None)) != 0)[:, None], (B, fw))


def _when_else(condition, work, otherwise) -> None:
    """``work()`` where the traced bool ``condition`` holds, else ``otherwise()`` (``condition`` None: always
    ``work``). The kernels' skip of a block with no valid point: ``otherwise`` writes the zeros its outputs
    would have had."""
    if condition is None:
        work()
        return
    pl.when(condition)(work)
    pl.when(jnp.logical_not(condition))(otherwise)


def _level_lanes(lanes, mask_l, B: int, fw: int):
    """Lanes that touch the table at a level: none where the level mask is 0 (its features are 0 and its
    table gradient is 0, so the progressive band's switched-off levels cost no memory traffic)."""
    if mask_l is None:
        return lanes
    on = jnp.broadcast_to(mask_l != 0, (B, fw))
    return on if lanes is None else lanes & on


def _forward_kernel(*refs, spec: HashGridSpec, B: int, use_mask: bool, use_valid: bool):
    """Refs: x (B, 3) block, [valid (B,) int32 block], [mask (L,)], table (R, F) in HBM -> out (B, L*F) block.

    Invalid points read nothing (masked gathers) and get zero features, so a block of unused slots costs
    no memory traffic.
    """
    refs = list(refs)
    x_ref = refs.pop(0)
    valid_ref = refs.pop(0) if use_valid else None
    mask_ref = refs.pop(0) if use_mask else None
    table_ref, out_ref = refs
    F = spec.n_features_per_level
    fw, n_chunks = _feature_chunks(F)
    lanes = _valid_lanes(valid_ref, B, fw)
    xs = [_load(x_ref, (slice(None), d)) for d in range(3)]
    for l in range(spec.n_levels):
        level = _static_level(spec, l)
        w, terms = _level_geometry(xs, level)
        mask_l = _load(mask_ref, l) if use_mask else None
        lanes_l = _level_lanes(lanes, mask_l, B, fw)
        acc = [jnp.zeros((B, fw), jnp.float32) for _ in range(n_chunks)]
        for bits in _CORNERS:
            row = _corner_row(terms, bits, level)
            weight = (w[0][bits[0]] * w[1][bits[1]]) * w[2][bits[2]]  # reference order: (w0 * w1) * w2
            for c in range(n_chunks):
                rows, cols = _index_arrays(row, c, fw, B)
                acc[c] = acc[c] + weight[:, None] * _gather(table_ref, rows, cols, lanes_l)
        for c in range(n_chunks):
            val = acc[c] * mask_l if use_mask else acc[c]
            _store(out_ref, (slice(None), pl.ds(l * F + c * fw, fw)), val)


# Leader cells of the block pre-reduction of the coarse levels (those of lanes 0, B/4, B/2, 3B/4).
_N_LEADERS = 4


def _pre_reduced_scatter(dtable_ref, terms, level: _Level, contribution, lanes_1d, B: int, fw: int,
                         n_chunks: int, interpret: bool, leaders: int = _N_LEADERS):
    """d_table of one level for a block whose points crowd into few cells (coarse levels, points in ray order).

    ``contribution(k, c)``: the (B, fw) values each lane adds to its cell's corner ``_CORNERS[k]``, feature
    chunk c (``w_b * g`` for plain points). Up to ``leaders`` leader cells (those of lanes 0, B/L, 2B/L, ...):
    the lanes in a leader's cell share its 8 corner rows, so their contributions are summed over the block and
    the leader lane adds the sum in place of its own; the others of its cell add nothing, every lane outside
    the leader cells adds its own. One (B, fw) atomic per corner and chunk, as in the plain scatter (the row of
    a leader lane is its cell's row), with far fewer active lanes on the rows that thousands of samples hit.
    Same sums as the plain scatter, in another order. ``leaders=0``: the plain scatter of every lane.
    """
    lane = jnp.arange(B, dtype=jnp.int32)
    remaining = lanes_1d
    groups = []
    for k in range(leaders):
        pick = lane == (k * B) // leaders
        # The leader cell, as the uint32 index terms of its corner 0 (equal terms <=> equal cells: the
        # per-dimension multipliers are 1, res, res^2 on dense levels, odd primes mod 2^32 on hashed ones).
        key = [jnp.sum(jnp.where(pick, terms[d][0], np.uint32(0))) for d in range(3)]
        same = remaining & (terms[0][0] == key[0]) & (terms[1][0] == key[1]) & (terms[2][0] == key[2])
        remaining = remaining & ~same
        # The leader lane writes its cell's sum when the cell has any contributing lane. A leader lane is
        # never among ``remaining`` afterwards: it is in its own cell's group or in an earlier group's.
        groups.append((pick, same, pick & (jnp.max(same.astype(jnp.int32)) > 0)))
    active = remaining
    for _, _, writes in groups:
        active = active | writes
    active = jnp.broadcast_to(active[:, None], (B, fw))
    for k, bits in enumerate(_CORNERS):
        row = _corner_row(terms, bits, level)
        for c in range(n_chunks):
            own = contribution(k, c)
            values = own
            for pick, same, _ in groups:
                total = jnp.sum(jnp.where(same[:, None], own, 0.0), axis=0, keepdims=True)  # (1, fw)
                values = jnp.where(pick[:, None], jnp.broadcast_to(total, (B, fw)), values)
            _scatter_add(dtable_ref, *_index_arrays(row, c, fw, B), values, interpret=interpret, lanes=active)


def _backward_kernel(*refs, spec: HashGridSpec, B: int, use_mask: bool, use_valid: bool, need_x: bool,
                     interpret: bool, pre_reduce_max_scale: float = 0.0):
    """Refs: x (B, 3) block, [valid (B,) int32 block], [mask (L,)], table (R, F), g (B, L*F) block, zeros (R, F)
    (aliased to d_table) -> [d_x (B, 3) block], [d_mask partial (L,) of this block], d_table (R, F) accumulated
    with atomics.

    ``need_x`` False (``grad_table_only``) drops d_x and d_mask: only the scatter of d_table remains. Invalid
    points issue no atomics and no gathers (their d_x is 0).
    """
    refs = list(refs)
    x_ref = refs.pop(0)
    valid_ref = refs.pop(0) if use_valid else None
    mask_ref = refs.pop(0) if use_mask else None
    table_ref, g_ref, _zeros_ref = refs[:3]
    refs = refs[3:]
    dx_ref = refs.pop(0) if need_x else None
    mask_grad = use_mask and need_x
    dmask_ref = refs.pop(0) if mask_grad else None
    (dtable_ref,) = refs
    F = spec.n_features_per_level
    fw, n_chunks = _feature_chunks(F)
    lanes = _valid_lanes(valid_ref, B, fw)
    xs = [_load(x_ref, (slice(None), d)) for d in range(3)]
    dx = [jnp.zeros((B,), jnp.float32) for _ in range(3)]
    for l in range(spec.n_levels):
        level = _static_level(spec, l)
        w, terms = _level_geometry(xs, level)
        g = [_load(g_ref, (slice(None), pl.ds(l * F + c * fw, fw))) for c in range(n_chunks)]
        if use_mask:
            mask_l = _load(mask_ref, l)
            gm = [gc * mask_l for gc in g]
        else:
            mask_l, gm = None, g
        # Atomics skip switched-off levels (they would add exact zeros); the gathers keep them when the
        # level-mask gradient (the unmasked features) is wanted.
        scatter_lanes = _level_lanes(lanes, mask_l, B, fw)
        if not need_x and spec.scales[l] <= pre_reduce_max_scale and B >= 2 * _N_LEADERS:
            # From the valid block itself: Triton cannot slice a column out of the (B, fw) lanes.
            lanes_1d = jnp.ones((B,), bool) if valid_ref is None else _load(valid_ref, slice(None)) != 0
            if mask_l is not None:
                lanes_1d = lanes_1d & (mask_l != 0)
            weights = [(w[0][b[0]] * w[1][b[1]]) * w[2][b[2]] for b in _CORNERS]
            _pre_reduced_scatter(dtable_ref, terms, level, lambda k, c: weights[k][:, None] * gm[c], lanes_1d,
                                 B, fw, n_chunks, interpret)
            continue
        if mask_grad:
            feat = [jnp.zeros((B, fw), jnp.float32) for _ in range(n_chunks)]
        dfrac = [jnp.zeros((B,), jnp.float32) for _ in range(3)]
        for bits in _CORNERS:
            row = _corner_row(terms, bits, level)
            wd = [w[d][bits[d]] for d in range(3)]
            weight = (wd[0] * wd[1]) * wd[2]
            dot = jnp.zeros((B,), jnp.float32)  # <mask_l * g_l, table[row_b]>: cotangent of w_b
            for c in range(n_chunks):
                rows, cols = _index_arrays(row, c, fw, B)
                _scatter_add(dtable_ref, rows, cols, weight[:, None] * gm[c], interpret=interpret,
                             lanes=scatter_lanes)
                if need_x:  # the gathers serve d_x and d_mask only; d_table alone is a pure scatter
                    t = _gather(table_ref, rows, cols, lanes)
                    dot = dot + jnp.sum(gm[c] * t, axis=1)
                    if mask_grad:
                        feat[c] = feat[c] + weight[:, None] * t
            if need_x:
                # d w_b / d frac_d = (+1 for bit 1, -1 for bit 0) * product of the other two factors.
                partial = (wd[1] * wd[2], wd[0] * wd[2], wd[0] * wd[1])
                for d in range(3):
                    term = dot * partial[d]
                    dfrac[d] = dfrac[d] + term if bits[d] else dfrac[d] - term
        if need_x:
            scale = np.float32(spec.scales[l])  # d frac / d x = scale_l
            dx = [dx[d] + dfrac[d] * scale for d in range(3)]
        if mask_grad:
            total = jnp.float32(0.0)
            for c in range(n_chunks):
                total = total + jnp.sum(feat[c] * g[c])
            _store(dmask_ref, l, total)
    if need_x:
        for d in range(3):
            _store(dx_ref, (slice(None), d), dx[d])


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers and custom_vjp
# ------------------------------------------------------------------------------------------------

def _full_hbm_spec():
    """BlockSpec of an array the kernel indexes itself (the table): left in HBM, no blocking."""
    return pl.BlockSpec(memory_space=pl.ANY)


def varying_axes(v) -> frozenset:
    """Mesh axes along which ``v`` varies inside ``jax.shard_map(check_vma=True)`` (empty elsewhere).

    jax 0.12 keeps them in ``aval.manual_axis_type.varying``, earlier versions in ``aval.vma``.
    """
    aval = jax.typeof(v)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def cast_varying(v, axes: frozenset):
    """Mark ``v`` as varying over ``axes`` (a no-op in value; its transpose is a psum over the added axes,
    so the gradient of a replicated table comes out summed over the shards, as with the jnp reference)."""
    missing = tuple(sorted(axes - varying_axes(v)))
    if not missing:
        return v
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(v, missing, to="varying")
    return jax.lax.pvary(v, missing)


def block_and_padding(n: int, block: int) -> tuple[int, int]:
    """(rows per program, padded row count) for ``n`` rows and a requested power-of-two ``block`` (>= 16):
    small inputs get a smaller power-of-two block rather than mostly padding; the padded count is a multiple of
    it (at least one block, so zero rows still make a valid grid)."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"the block size must be a power of two >= 16, got {block}")
    block = min(block, max(16, 1 << (max(n, 1) - 1).bit_length()))
    return block, -(-max(n, 1) // block) * block


def _out_struct(shape, like, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    """``ShapeDtypeStruct`` (float32 unless told) varying over the same mesh axes as ``like``: ``pallas_call``
    inside ``shard_map(check_vma=True)`` needs the outputs' varying axes spelled out (``manual_axis_type`` on
    jax 0.12, ``vma`` before); outside shard_map the field is ignored."""
    params = inspect.signature(jax.ShapeDtypeStruct).parameters
    aval = jax.typeof(like)
    if "manual_axis_type" in params:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=aval.manual_axis_type)
    if "vma" in params:
        return jax.ShapeDtypeStruct(shape, dtype, vma=aval.vma)
    return jax.ShapeDtypeStruct(shape, dtype)


def _point_inputs(x, valid, B: int):
    """BlockSpecs and arrays of the per-point kernel inputs: x (N, 3) and, if given, valid (N,) int32."""
    in_specs = [pl.BlockSpec((B, 3), lambda i: (i, 0))]
    args = [x]
    if valid is not None:
        in_specs.append(pl.BlockSpec((B,), lambda i: (i,)))
        args.append(valid)
    return in_specs, args


def _forward(table, x, mask, valid, spec: HashGridSpec, cfg: _Config):
    """(N, 3) x, N a multiple of the block -> (N, L*F) float32 features."""
    N = x.shape[0]
    B = cfg.block_points
    L, F = spec.n_levels, spec.n_features_per_level
    use_mask = mask is not None
    in_specs, args = _point_inputs(x, valid, B)
    if use_mask:
        in_specs.append(pl.BlockSpec((L,), lambda i: (0,)))
        args.append(mask)
    in_specs.append(_full_hbm_spec())
    args.append(table)
    kernel = functools.partial(_forward_kernel, spec=spec, B=B, use_mask=use_mask, use_valid=valid is not None)
    return pl.pallas_call(
        kernel,
        out_shape=_out_struct((N, L * F), x),
        grid=(N // B,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((B, L * F), lambda i: (i, 0)),
        compiler_params=_compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="hashgrid_encode_fwd",
    )(*args)


def _backward(table, x, mask, valid, g, spec: HashGridSpec, cfg: _Config):
    """Cotangents (d_table (R, F), d_x (N, 3), d_mask (L,) or None) of :func:`_forward` for ``g`` (N, L*F).

    With ``cfg.grad_table_only`` d_x and d_mask are zeros (not computed by the kernel).
    """
    N = x.shape[0]
    B = cfg.block_points
    L, F = spec.n_levels, spec.n_features_per_level
    R = spec.total_params
    n_blocks = N // B
    use_mask = mask is not None
    need_x = not cfg.grad_table_only
    in_specs, args = _point_inputs(x, valid, B)
    if use_mask:
        in_specs.append(pl.BlockSpec((L,), lambda i: (0,)))
        args.append(mask)
    in_specs += [_full_hbm_spec(), pl.BlockSpec((B, L * F), lambda i: (i, 0)), _full_hbm_spec()]
    # The d_table output aliases a zero input: Triton outputs start uninitialised and programs cannot
    # synchronise to zero it in-kernel; in interpret mode the alias likewise gives the initial value.
    zeros_index = len(args) + 2
    args += [table, g, cast_varying(jnp.zeros((R, F), jnp.float32), varying_axes(x))]
    out_shape, out_specs = [], []
    if need_x:
        out_shape.append(_out_struct((N, 3), x))
        out_specs.append(pl.BlockSpec((B, 3), lambda i: (i, 0)))
    if use_mask and need_x:
        out_shape.append(_out_struct((n_blocks, L), x))
        out_specs.append(pl.BlockSpec((None, L), lambda i: (i, 0)))
    out_shape.append(_out_struct((R, F), x))
    out_specs.append(_full_hbm_spec())
    kernel = functools.partial(_backward_kernel, spec=spec, B=B, use_mask=use_mask, use_valid=valid is not None,
                               need_x=need_x, interpret=cfg.interpret,
                               pre_reduce_max_scale=cfg.pre_reduce_max_scale)
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(n_blocks,),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        input_output_aliases={zeros_index: len(out_shape) - 1},
        compiler_params=_compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="hashgrid_encode_bwd",
    )(*args)
    *outs, dtable = outs
    # Cotangents the kernel does not compute (grad_table_only) are zeros.
    dx = outs.pop(0) if need_x else jnp.zeros_like(x)
    if mask is None:
        dmask = None
    elif need_x:
        dmask = jnp.sum(outs.pop(0), axis=0)  # per-block partial sums -> (L,)
    else:
        dmask = jnp.zeros_like(mask)
    return dtable, dx, dmask


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _encode_core(table, x, mask, valid, spec: HashGridSpec, cfg: _Config):
    return _forward(table, x, mask, valid, spec, cfg)


def _encode_core_fwd(table, x, mask, valid, spec, cfg):
    # Residuals: the inputs only (the table is needed for d_x and is alive anyway); rows and weights are
    # recomputed in the backward kernel.
    return _forward(table, x, mask, valid, spec, cfg), (table, x, mask, valid)


def _encode_core_bwd(spec, cfg, res, g):
    table, x, mask, valid = res
    if cfg.xla_backward:
        # XLA's scatter-add of the reference (faster than float atomics when many points share rows,
        # measured on H100, kernels/README.md).
        g = g.astype(jnp.float32)
        keep = None if valid is None else valid != 0
        if cfg.grad_table_only:
            (dtable,) = jax.vjp(lambda t: _ref.encode(t, x, spec, mask, keep, skip_masked_levels=True), table)[1](g)
            return dtable, jnp.zeros_like(x), None if mask is None else jnp.zeros_like(mask), None
        if mask is None:
            dtable, dx = jax.vjp(lambda t, p: _ref.encode(t, p, spec, None, keep), table, x)[1](g)
            return dtable, dx, None, None
        return (*jax.vjp(lambda t, p, m: _ref.encode(t, p, spec, m, keep), table, x, mask)[1](g), None)
    return (*_backward(table, x, mask, valid, g.astype(jnp.float32), spec, cfg), None)


_encode_core.defvjp(_encode_core_fwd, _encode_core_bwd)


def encode_pallas(table: jax.Array, x: jax.Array, spec: HashGridSpec, level_mask: jax.Array | None = None,
                  *, interpret: bool | None = None, block_points: int = 256, num_warps: int = 4,
                  num_stages: int = 1, grad_table_only: bool = False, xla_backward: bool = False,
                  valid: jax.Array | None = None, pre_reduce_max_scale: float = 0.0) -> jax.Array:
    """Hash-grid encoding with Pallas kernels; same result as :func:`encode_xla`, differentiable.

    ``out[..., l*F:(l+1)*F] = mask_l * sum_{b in {0,1}^3} w_b * table[row_l(cell + b)]`` (see the module
    docstring and :func:`dreamcraft_jax.fields.hashgrid.encode`). Gradients (``jax.custom_vjp``, backward
    kernel recomputing rows and weights from ``x``): ``d_table`` (scatter-add with atomics), ``d_x``
    (through the trilinear weights, ``d frac / d x = scale_l``) and the true ``d_level_mask``
    (``sum_points <unmasked feat_l, g_l>``), all matching the reference's autodiff.

    Computation is float32 throughout (the reference computes in float32 for float32 inputs).

    Args:
        table: (spec.total_params, F) float32 flat parameter table.
        x: (..., 3) points in [0, 1]^3 (cast to float32); any leading batch shape.
        spec: grid description (static).
        level_mask: optional (L,) float per-level multiplier (may be traced); a zero entry zeroes that
            level's features and its table gradient (exactly).
        interpret: run the kernels in Pallas interpret mode; None means interpret unless the default
            backend is GPU.
        block_points: points per program, a power of two (Triton tensor sizes); N is padded up to a
            multiple of it (capped at the next power of two >= N for small inputs).
        num_warps: Triton warps per program.
        num_stages: Triton software-pipelining stages (the kernels have no loops; 1 is enough).
        grad_table_only: if True the backward computes only ``d_table`` (a pure scatter, no gathers) and
            returns zero cotangents for ``x`` and ``level_mask``; for callers that differentiate the
            table only (e.g. density/colour fields without analytic normals).
        xla_backward: compute the backward with XLA (the reference's vjp: gather rows again, scatter-add)
            instead of the atomic kernel; the forward stays Pallas.
        valid: optional bool of the batch shape; invalid points get zero features and add nothing to any
            gradient, and their gathers and atomics are masked off (the unused slots of a packed sample
            buffer cost no memory traffic and do not pile atomics onto one row).
        pre_reduce_max_scale: with ``grad_table_only``, the levels whose grid scale is at most this are
            scattered with a per-block pre-reduction (``_pre_reduced_scatter``): lanes that share a leader
            cell add their summed contribution with one atomic per corner. It pays where neighbouring points
            (packed samples of one ray, a sample's finite-difference points) share cells; 0 turns it off.
    Returns:
        (..., L * F) float32 level-major features.
    """
    table = jnp.asarray(table)
    x = jnp.asarray(x)
    L, F = spec.n_levels, spec.n_features_per_level
    if table.shape != (spec.total_params, F):
        raise ValueError(f"table shape {table.shape} != {(spec.total_params, F)}")
    if table.dtype != jnp.float32:
        raise TypeError(f"encode_pallas needs a float32 table (float atomics), got {table.dtype}")
    if x.shape[-1] != 3:
        raise ValueError(f"x must be (..., 3), got {x.shape}")
    if level_mask is not None:
        level_mask = jnp.asarray(level_mask, jnp.float32)
        if level_mask.shape != (L,):
            raise ValueError(f"level_mask must be ({L},), got {level_mask.shape}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"

    batch_shape = x.shape[:-1]
    n = int(np.prod(batch_shape, dtype=np.int64))
    x2 = x.reshape(n, 3).astype(jnp.float32)
    block, n_pad = block_and_padding(n, block_points)
    # Padding points sit at the origin (valid rows) and get zero cotangents from the slice below, so
    # they add nothing to any gradient.
    x2 = jnp.pad(x2, ((0, n_pad - n), (0, 0)))
    if valid is not None:
        valid = jnp.asarray(valid, bool)
        if valid.shape != batch_shape:
            raise ValueError(f"valid must have the batch shape {batch_shape}, got {valid.shape}")
        # Padding points are invalid too: no gathers, no atomics.
        valid = jnp.pad(valid.reshape(n).astype(jnp.int32), (0, n_pad - n))
    # Inside shard_map(check_vma=True): give all kernel operands the union of their varying mesh axes
    # (what jnp ops do implicitly), so the custom_vjp cotangents have the primal types and a replicated
    # table / mask gets its gradient psum-ed over the shards by the transpose of the cast.
    axes = varying_axes(table) | varying_axes(x2)
    if level_mask is not None:
        axes |= varying_axes(level_mask)
    if valid is not None:
        axes |= varying_axes(valid)
    table, x2 = cast_varying(table, axes), cast_varying(x2, axes)
    if valid is not None:
        valid = cast_varying(valid, axes)
    if level_mask is not None:
        level_mask = cast_varying(level_mask, axes)
    cfg = _Config(block_points=block, interpret=bool(interpret), num_warps=num_warps, num_stages=num_stages,
                  grad_table_only=grad_table_only, xla_backward=xla_backward,
                  pre_reduce_max_scale=float(pre_reduce_max_scale))
    out = _encode_core(table, x2, level_mask, valid, spec, cfg)
    return out[:n].reshape(*batch_shape, L * F)
