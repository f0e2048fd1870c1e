"""Helpers shared by the Pallas kernels: the Triton-specific primitives, launch shapes, mesh typing, and the
hash-grid level geometry of the four hash-grid kernels (:mod:`.hashgrid`, :mod:`.hashgrid_levels`,
:mod:`.density`, :mod:`.fd_hashgrid`).

GPU lowering is the Pallas Triton backend (masked ``plgpu.load`` / ``plgpu.store``, ``plgpu.atomic_add``,
``plgpu.CompilerParams``). Every Triton-specific call of the kernels goes through the primitives here
(:func:`gather`, :func:`scatter`, :func:`scatter_add`, :func:`compiler_params`, :func:`out_struct`), so a port to
another Pallas GPU backend replaces these, not the kernels' arithmetic.

Imports no kernel module (every kernel imports this one) and nothing of the renderer: only the jnp hash-grid
reference (:mod:`dreamcraft_jax.fields.hashgrid`, for its constants) and :mod:`dreamcraft_jax.parallel` (mesh
typing), neither of which imports a kernel.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dreamcraft_jax.fields import hashgrid as _ref
from dreamcraft_jax.fields.hashgrid import HashGridSpec
from dreamcraft_jax.parallel import as_varying, varying_axes

__all__ = [
    # Triton primitives and BlockSpecs
    "compiler_params", "load", "store", "gather", "scatter", "scatter_add", "when_else", "full_hbm_spec",
    "whole_spec", "rows_spec", "out_struct",
    # launch shapes, interpret mode, mesh typing
    "resolve_interpret", "block_and_padding", "block_size", "pad_to", "cast_varying",
    # hash-grid level geometry
    "Level", "CORNERS", "LEVEL_FIELDS", "N_LEADERS", "feature_chunks", "static_level", "level_arrays",
    "loaded_level", "level_geometry", "corner_row", "index_arrays", "valid_lanes", "level_lanes", "level_on",
    "point_inputs", "level_inputs", "split_level_refs", "padded_point_inputs", "pre_reduced_scatter",
]


# ----------------------------------------------------------------------------------------------------------
# Triton primitives (the only backend-specific code of the kernels)


def compiler_params(num_warps: int, num_stages: int | None):
    """Triton compiler parameters; ``num_stages`` None: the backend's default (3 on CUDA: software-pipelines the
    loads of a loop)."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def load(ref, idx):
    """Load a block (static slices / scalar indices) from a ref.

    Plain ref indexing (``get``), which Triton lowers to the same ``tt.load`` as ``plgpu.load``; the latter's
    interpret-mode discharge rejects Python-int indices on jax 0.12.
    """
    return ref[idx]


def store(ref, idx, val):
    """Store a block (static slices / scalar indices) into a ref (``swap``, lowered to ``tt.store``)."""
    ref[idx] = val


def gather(ref, idx, mask=None, other=0.0):
    """``ref[idx]`` for an int32 index array or a tuple of same-shape index arrays (one pointer gather); where the
    bool ``mask`` is False nothing is read (no memory access on a GPU) and the value is ``other``."""
    if mask is None:
        return plgpu.load(ref.at[idx])
    return plgpu.load(ref.at[idx], mask=mask, other=other)


def scatter(ref, idx, val, mask):
    """``ref[idx] = val`` where ``mask``. Masked-off lanes must still carry distinct in-bounds indices: interpret
    mode implements the masked store as read-select-write of every lane."""
    plgpu.store(ref.at[idx], val, mask=mask)


def scatter_add(ref, idx, vals, *, interpret: bool, mask=None):
    """``ref[idx] += vals`` for a tuple of same-shape int32 index arrays, correct under duplicate indices.

    Triton: hardware float atomics (``plgpu.atomic_add``), any number of programs may hit the same row.
    Interpret mode: Pallas discharges ``atomic_add`` with index arrays as a gather + scatter-*set*, which loses
    duplicate indices, so the whole buffer is updated with a functional scatter-add instead (programs run
    sequentially there, so this is exact). Where ``mask`` is False nothing is added.
    """
    if interpret:
        if mask is not None:
            vals = jnp.where(mask, vals, 0.0)
        ref[...] = ref[...].at[idx].add(vals)
    elif mask is None:
        plgpu.atomic_add(ref, idx, vals)
    else:
        plgpu.atomic_add(ref, idx, vals, mask=mask)


def when_else(condition, work, otherwise) -> None:
    """``work()`` where the traced bool ``condition`` holds, else ``otherwise()`` (``condition`` None: always
    ``work``). The kernels' skip of a block with no valid point: ``otherwise`` writes the zeros its outputs
    would have had."""
    if condition is None:
        work()
        return
    pl.when(condition)(work)
    pl.when(jnp.logical_not(condition))(otherwise)


def full_hbm_spec():
    """BlockSpec of an array the kernel indexes itself (a table): left in HBM, no blocking."""
    return pl.BlockSpec(memory_space=pl.ANY)


def whole_spec(shape):
    """BlockSpec of a whole array every program of a 1-D grid sees (random access inside the kernel)."""
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def rows_spec(block: int):
    """BlockSpec of a 1-D array in ``block``-long blocks, one per program of a 1-D grid."""
    return pl.BlockSpec((block,), lambda i: (i,))


_STRUCT_PARAMS = inspect.signature(jax.ShapeDtypeStruct).parameters


def out_struct(shape, like, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    """``ShapeDtypeStruct`` of a kernel output (float32 unless told) varying over the same mesh axes as ``like``:
    ``pallas_call`` inside ``shard_map(check_vma=True)`` needs the outputs' varying axes spelled out (the keyword
    is ``manual_axis_type`` on jax 0.12, ``vma`` before); outside shard_map the field is ignored."""
    aval = jax.typeof(like)
    for name in ("manual_axis_type", "vma"):
        if name in _STRUCT_PARAMS and hasattr(aval, name):
            return jax.ShapeDtypeStruct(shape, dtype, **{name: getattr(aval, name)})
    return jax.ShapeDtypeStruct(shape, dtype)


# ----------------------------------------------------------------------------------------------------------
# launch shapes, interpret mode, mesh typing


def resolve_interpret(interpret: bool | None) -> bool:
    """None -> interpret mode unless the default backend is a GPU."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def block_and_padding(n: int, block: int) -> tuple[int, int]:
    """(rows per program, padded row count) for ``n`` rows and a requested power-of-two ``block`` (>= 16):
    small inputs get a smaller power-of-two block rather than mostly padding; the padded count is a multiple of
    it (at least one block, so zero rows still make a valid grid)."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"the block size must be a power of two >= 16, got {block}")
    block = min(block, max(16, 1 << (max(n, 1) - 1).bit_length()))
    return block, -(-max(n, 1) // block) * block


def block_size(n: int, block: int) -> int:
    """Power-of-two block: ``block`` (rounded up to a power of two), or less for small n."""
    return min(pl.next_power_of_2(max(int(block), 1)), pl.next_power_of_2(max(n, 1)))


def pad_to(x, n: int, value):
    """1-D ``x`` padded at the end with ``value`` to length ``n``."""
    return jnp.pad(x, (0, n - x.shape[0]), constant_values=value)


def cast_varying(v, axes: frozenset):
    """Mark ``v`` as varying over the mesh ``axes`` it does not vary over yet (a no-op in value; its transpose is
    a psum over the added axes, so the gradient of a replicated table comes out summed over the shards, as with
    the jnp reference). :func:`dreamcraft_jax.parallel.as_varying` of the missing axes."""
    return as_varying(v, tuple(sorted(frozenset(axes) - varying_axes(v))))


# ----------------------------------------------------------------------------------------------------------
# hash-grid level geometry (tiny-cuda-nn conventions, see dreamcraft_jax.fields.hashgrid), traced in the kernels

_HASH_PRIMES = tuple(np.uint32(p) for p in _ref._HASH_PRIMES)  # (1, 2654435761, 805459861)
CORNERS = tuple(tuple((k >> d) & 1 for d in range(3)) for k in range(8))  # bit d of k = offset along d
# Per-level constants of kernels whose level is a grid axis, in the order of level_arrays / loaded_level.
LEVEL_FIELDS = ("scale", "mult1", "mult2", "hashed", "size", "offset")
# Leader cells of the block pre-reduction of the coarse levels (those of lanes 0, B/4, B/2, 3B/4).
N_LEADERS = 4


def feature_chunks(F: int) -> tuple[int, int]:
    """(chunk width, number of chunks): Triton tensors need power-of-two sizes, so a non-power-of-two F is
    processed one feature at a time."""
    fw = F if F & (F - 1) == 0 else 1
    return fw, F // fw


@dataclasses.dataclass(frozen=True)
class Level:
    """Constants of one grid level: Python / numpy values (a level fixed at trace time) or scalars loaded in the
    kernel (the level a program handles, :func:`loaded_level`).

    ``mults``: per-dimension index multipliers (1, res, res^2 mod 2^32 on dense levels, the hash primes on hashed
    ones); the corner index is ``offset + (sum of terms) % size`` (dense) or ``offset + (xor of terms) & (size -
    1)`` (hashed, size a power of two).
    """

    scale: object
    mults: tuple
    hashed: object
    size: object
    offset: object


def static_level(spec: HashGridSpec, l: int) -> Level:
    """Level ``l`` of ``spec`` with its constants as numpy scalars (same float32 rounding of the scale as the
    reference's ``jnp.asarray(spec.scales, f32)``)."""
    res = int(spec.resolutions[l])
    dense = bool(spec.dense[l])
    mults = (np.uint32(1), np.uint32(res % 2**32), np.uint32(res * res % 2**32)) if dense else _HASH_PRIMES
    return Level(np.float32(spec.scales[l]), mults, not dense, np.uint32(int(spec.level_sizes[l])),
                 np.uint32(int(spec.offsets[l])))


def level_arrays(spec: HashGridSpec) -> list[np.ndarray]:
    """The per-level constants as (L,) arrays, in :data:`LEVEL_FIELDS` order, for kernels whose level is a grid
    axis (:func:`loaded_level` reads them back)."""
    levels = [static_level(spec, l) for l in range(spec.n_levels)]
    return [np.array([lv.scale for lv in levels], np.float32),
            np.array([lv.mults[1] for lv in levels], np.uint32),
            np.array([lv.mults[2] for lv in levels], np.uint32),
            np.array([lv.hashed for lv in levels], np.int32),
            np.array([lv.size for lv in levels], np.uint32),
            np.array([lv.offset for lv in levels], np.uint32)]


def loaded_level(level_refs, l) -> Level:
    """The constants of level ``l`` (traced) from the refs of :func:`level_arrays`."""
    scale, mult1, mult2, hashed, size, offset = (load(ref, l) for ref in level_refs)
    return Level(scale, (np.uint32(1), mult1, mult2), hashed != 0, size, offset)


def level_geometry(xs, level: Level):
    """Per-dimension weights and index terms of one level for a block of points.

    Args:
        xs: three (B,) float32 coordinates in [0, 1].
    Returns:
        w: w[d][bit] (B,) float32 trilinear factor of dimension d (``1 - frac_d`` for bit 0, ``frac_d`` for 1),
            with ``pos = x * scale + 0.5``, ``frac = pos - floor(pos)``.
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


def corner_row(terms, bits, level: Level):
    """(B,) int32 table row of corner ``bits``: ``offset + idx % size`` (see :class:`Level`)."""
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


def index_arrays(row, c: int, fw: int, B: int):
    """(rows, cols): (B, fw) int32 index arrays of feature chunk ``c`` for a :func:`gather` or
    :func:`scatter_add` of a (R, F) table."""
    rows = jnp.broadcast_to(row[:, None], (B, fw))
    if fw == 1:
        cols = jnp.full((B, 1), c, jnp.int32)
    else:
        cols = jnp.broadcast_to(c * fw + jnp.arange(fw, dtype=jnp.int32)[None, :], (B, fw))
    return rows, cols


def valid_lanes(valid_ref, B: int, fw: int):
    """(B, fw) bool lanes of the points of this block that are valid, or None without a valid mask."""
    if valid_ref is None:
        return None
    return jnp.broadcast_to((load(valid_ref, slice(None)) != 0)[:, None], (B, fw))


def level_lanes(lanes, mask_l, B: int, fw: int):
    """Lanes that touch the table at a level: none where the level mask is 0 (its features are 0 and its table
    gradient is 0, so the progressive band's switched-off levels cost no memory traffic)."""
    if mask_l is None:
        return lanes
    on = jnp.broadcast_to(mask_l != 0, (B, fw))
    return on if lanes is None else lanes & on


def level_on(valid_ref, mask_l, B: int):
    """(B,) lanes that touch the table at this level (valid points, level switched on)."""
    on = jnp.ones((B,), bool) if valid_ref is None else load(valid_ref, slice(None)) != 0
    return on if mask_l is None else on & (mask_l != 0)


def point_inputs(x, valid, B: int):
    """BlockSpecs and arrays of the per-point inputs of a 1-D grid of point blocks: x (N, 3) and, if given,
    valid (N,) int32."""
    in_specs = [pl.BlockSpec((B, 3), lambda i: (i, 0))]
    args = [x]
    if valid is not None:
        in_specs.append(pl.BlockSpec((B,), lambda i: (i,)))
        args.append(valid)
    return in_specs, args


def level_inputs(x, valid, mask, spec: HashGridSpec, B: int):
    """BlockSpecs (grid (point blocks, levels)) and arrays of x (N, 3), [valid (N,)], [mask (L,)] and the level
    constants of :func:`level_arrays`; the kernel unpacks them with :func:`split_level_refs`."""
    L = spec.n_levels
    in_specs, args = [pl.BlockSpec((B, 3), lambda i, l: (i, 0))], [x]
    if valid is not None:
        in_specs.append(pl.BlockSpec((B,), lambda i, l: (i,)))
        args.append(valid)
    whole = pl.BlockSpec((L,), lambda i, l: (0,))
    if mask is not None:
        in_specs.append(whole)
        args.append(mask)
    for constants in level_arrays(spec):
        in_specs.append(whole)
        args.append(cast_varying(jnp.asarray(constants), varying_axes(x)))
    return in_specs, args


def split_level_refs(refs, use_valid: bool, use_mask: bool):
    """The refs of :func:`level_inputs`: (x_ref, valid_ref or None, mask_ref or None, the level-constant refs,
    the remaining refs)."""
    refs = list(refs)
    x_ref = refs.pop(0)
    valid_ref = refs.pop(0) if use_valid else None
    mask_ref = refs.pop(0) if use_mask else None
    level_refs = [refs.pop(0) for _ in LEVEL_FIELDS]
    return x_ref, valid_ref, mask_ref, level_refs, refs


def padded_point_inputs(table, x, spec: HashGridSpec, level_mask, valid, block_points: int):
    """The checked, padded and mesh-cast inputs of a one-level-per-program point kernel: (table, x (n_pad, 3)
    float32 without gradient, mask (L,) or None, keep (n_pad,) int32 with the padding rows invalid, block, n)."""
    L, F = spec.n_levels, spec.n_features_per_level
    if table.shape != (spec.total_params, F) or table.dtype != jnp.float32:
        raise ValueError(f"table must be float32 {(spec.total_params, F)}, got {table.dtype} {table.shape}")
    if x.ndim != 2 or x.shape[-1] != 3:
        raise ValueError(f"x must be (N, 3), got {x.shape}")
    n = x.shape[0]
    block, n_pad = block_and_padding(n, block_points)
    x2 = jnp.pad(jax.lax.stop_gradient(x).astype(jnp.float32), ((0, n_pad - n), (0, 0)))
    keep = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    keep = jnp.pad(keep.astype(jnp.int32), (0, n_pad - n))  # padding points: invalid
    mask = None if level_mask is None else jax.lax.stop_gradient(jnp.asarray(level_mask, jnp.float32))
    if mask is not None and mask.shape != (L,):
        raise ValueError(f"level_mask must be ({L},), got {mask.shape}")
    axes = varying_axes(table) | varying_axes(x2) | varying_axes(keep)
    if mask is not None:
        axes |= varying_axes(mask)
        mask = cast_varying(mask, axes)
    table, x2, keep = (cast_varying(v, axes) for v in (table, x2, keep))
    return table, x2, mask, keep, block, n


def pre_reduced_scatter(dtable_ref, terms, level: Level, contribution, lanes_1d, B: int, fw: int,
                        n_chunks: int, interpret: bool, leaders: int = N_LEADERS):
    """d_table of one level for a block whose points crowd into few cells (coarse levels, points in ray order).

    ``contribution(k, c)``: the (B, fw) values each lane adds to its cell's corner ``CORNERS[k]``, feature chunk
    c (``w_b * g`` for plain points). Up to ``leaders`` leader cells (those of lanes 0, B/L, 2B/L, ...): the lanes
    in a leader's cell share its 8 corner rows, so their contributions are summed over the block and the leader
    lane adds the sum in place of its own; the others of its cell add nothing, every lane outside the leader
    cells adds its own. One (B, fw) atomic per corner and chunk, as in the plain scatter (the row of a leader lane
    is its cell's row), with far fewer active lanes on the rows that thousands of samples hit. Same sums as the
    plain scatter, in another order. ``leaders=0``: the plain scatter of every lane.
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
    for k, bits in enumerate(CORNERS):
        row = corner_row(terms, bits, level)
        for c in range(n_chunks):
            own = contribution(k, c)
            values = own
            for pick, same, _ in groups:
                total = jnp.sum(jnp.where(same[:, None], own, 0.0), axis=0, keepdims=True)  # (1, fw)
                values = jnp.where(pick[:, None], jnp.broadcast_to(total, (B, fw)), values)
            scatter_add(dtable_ref, index_arrays(row, c, fw, B), values, interpret=interpret, mask=active)
