"""The hash-grid encoding with one level per program: the same result as :mod:`kernels.hashgrid`, a 16x smaller
Triton program.

:func:`kernels.hashgrid.encode_pallas` unrolls all levels in one program per block of points; its forward and
backward are the largest Triton programs of a training step (169 k and 251 k characters of IR at 16 levels,
against 58-73 k for the finite-difference kernel, which handles one level per program). Lowering the 384 px
reference step for an H200 spends 5.3 of its 7.2 s of lowering in the Pallas kernels' Triton lowering, and XLA then
compiles each kernel to PTX, a cost that grows faster than the code. Here the grid is (point blocks, levels) and a
program loads its level's constants (:func:`kernels.common.loaded_level`), as the finite-difference kernel does:

    forward:   out[:, l*F:(l+1)*F] = mask_l * sum_b w_b * table[row_l(cell + b)]          (program (i, l))
    backward:  d_table[row_l(cell + b)] += w_b * mask_l * g[:, l*F:(l+1)*F]              (atomics; the coarse
               levels, grid scale <= ``pre_reduce_max_scale``, pre-reduced per block of points first)

Contract: ``encode_levels_pallas(table, x, spec, level_mask, valid)`` equals :func:`kernels.hashgrid.encode_xla`
(same gathers, same weight order; the level's scale is a loaded value, so the cell fraction may round an ulp
apart from the reference's constant) for x (N, 3) in [0, 1]^3; differentiable w.r.t. the
table only (the fields' renders never differentiate positions through this path; analytic normals use
:func:`kernels.hashgrid.encode_pallas`). Behind ``kernels.encoder_per_level`` (off until timed on a GPU: the
levels of a block run as separate programs, each loading the block's points again).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dreamcraft_jax.fields.hashgrid import HashGridSpec
from dreamcraft_jax.kernels.common import (
    CORNERS,
    N_LEADERS,
    cast_varying,
    compiler_params,
    corner_row,
    feature_chunks,
    full_hbm_spec,
    gather,
    index_arrays,
    level_geometry,
    level_inputs,
    level_on,
    load,
    loaded_level,
    out_struct,
    padded_point_inputs,
    pre_reduced_scatter,
    resolve_interpret,
    split_level_refs,
    store,
)
from dreamcraft_jax.parallel import varying_axes

__all__ = ["encode_levels_pallas"]


class _Static(NamedTuple):
    spec: HashGridSpec
    block: int
    num_warps: int
    interpret: bool
    pre_reduce_max_scale: float


def _forward_kernel(*refs, spec: HashGridSpec, B: int, use_mask: bool, use_valid: bool):
    """Grid (point blocks, levels). Refs: x (B, 3), [valid (B,)], [mask (L,)], the level constants (L,) each,
    table (R, F) in HBM -> the (B, L*F) block, of which this program writes level ``program_id(1)``'s columns."""
    x_ref, valid_ref, mask_ref, level_refs, (table_ref, out_ref) = split_level_refs(refs, use_valid, use_mask)
    F = spec.n_features_per_level
    fw, n_chunks = feature_chunks(F)
    xs = [load(x_ref, (slice(None), d)) for d in range(3)]
    l = pl.program_id(1)
    level = loaded_level(level_refs, l)
    mask_l = load(mask_ref, l) if use_mask else None
    lanes = jnp.broadcast_to(level_on(valid_ref, mask_l, B)[:, None], (B, fw))
    w, terms = level_geometry(xs, level)
    acc = [jnp.zeros((B, fw), jnp.float32) for _ in range(n_chunks)]
    for bits in CORNERS:
        row = corner_row(terms, bits, level)
        weight = (w[0][bits[0]] * w[1][bits[1]]) * w[2][bits[2]]  # the reference's order: (w0 * w1) * w2
        for c in range(n_chunks):
            acc[c] = acc[c] + weight[:, None] * gather(table_ref, index_arrays(row, c, fw, B), lanes)
    for c in range(n_chunks):
        store(out_ref, (slice(None), pl.ds(l * F + c * fw, fw)), acc[c] * mask_l if use_mask else acc[c])


def _backward_kernel(*refs, spec: HashGridSpec, B: int, use_mask: bool, use_valid: bool, interpret: bool,
                     level_start: int, leaders: int):
    """Grid (point blocks, levels level_start...). Refs: x (B, 3), [valid (B,)], [mask (L,)], the level constants,
    g (B, L*F), d_table in (R, F) (aliased to the output) -> d_table accumulated with atomics (pre-reduced over
    the block's ``leaders`` leader cells first when ``leaders`` > 0)."""
    x_ref, valid_ref, mask_ref, level_refs, rest = split_level_refs(refs, use_valid, use_mask)
    g_ref, _dtable_in, dtable_ref = rest
    F = spec.n_features_per_level
    fw, n_chunks = feature_chunks(F)
    xs = [load(x_ref, (slice(None), d)) for d in range(3)]
    l = pl.program_id(1) + level_start
    level = loaded_level(level_refs, l)
    mask_l = load(mask_ref, l) if use_mask else None
    on = level_on(valid_ref, mask_l, B)
    w, terms = level_geometry(xs, level)
    g = []
    for c in range(n_chunks):
        g_c = load(g_ref, (slice(None), pl.ds(l * F + c * fw, fw)))
        g.append(g_c * mask_l if use_mask else g_c)

    def contribution(k, c):
        bits = CORNERS[k]
        return ((w[0][bits[0]] * w[1][bits[1]]) * w[2][bits[2]])[:, None] * g[c]

    pre_reduced_scatter(dtable_ref, terms, level, contribution, on, B, fw, n_chunks, interpret, leaders=leaders)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _encode_core(table, x, mask, valid, static: _Static):
    return _forward(table, x, mask, valid, static)


def _forward(table, x, mask, valid, static: _Static):
    spec, B = static.spec, static.block
    N, L, F = x.shape[0], spec.n_levels, spec.n_features_per_level
    in_specs, args = level_inputs(x, valid, mask, spec, B)
    kernel = functools.partial(_forward_kernel, spec=spec, B=B, use_mask=mask is not None,
                               use_valid=valid is not None)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((N, L * F), x),
        grid=(N // B, L),
        in_specs=in_specs + [full_hbm_spec()],
        out_specs=pl.BlockSpec((B, L * F), lambda i, l: (i, 0)),  # each level's program writes its columns
        compiler_params=compiler_params(static.num_warps, 1),
        interpret=static.interpret,
        name="hashgrid_levels_encode_fwd",
    )(*args, table)


def _encode_core_fwd(table, x, mask, valid, static):
    return _forward(table, x, mask, valid, static), (x, mask, valid)


def _encode_core_bwd(static: _Static, res, g):
    x, mask, valid = res
    spec, B = static.spec, static.block
    N, L, F = x.shape[0], spec.n_levels, spec.n_features_per_level
    dtable = cast_varying(jnp.zeros((spec.total_params, F), jnp.float32), varying_axes(x))
    g = g.astype(jnp.float32)
    # Scales grow with the level: the pre-reduced (coarse) levels are a prefix, one call for each part.
    n_coarse = sum(1 for s in spec.scales if s <= static.pre_reduce_max_scale) if B >= 2 * N_LEADERS else 0
    for start, stop, leaders in ((0, n_coarse, N_LEADERS), (n_coarse, L, 0)):
        if stop <= start:
            continue
        in_specs, args = level_inputs(x, valid, mask, spec, B)
        in_specs += [pl.BlockSpec((B, L * F), lambda i, l: (i, 0)), full_hbm_spec()]
        args += [g, dtable]
        kernel = functools.partial(_backward_kernel, spec=spec, B=B, use_mask=mask is not None,
                                   use_valid=valid is not None, interpret=static.interpret, level_start=start,
                                   leaders=leaders)
        dtable = pl.pallas_call(
            kernel,
            out_shape=out_struct((spec.total_params, F), x),
            grid=(N // B, stop - start),
            in_specs=in_specs,
            out_specs=full_hbm_spec(),
            input_output_aliases={len(args) - 1: 0},
            compiler_params=compiler_params(static.num_warps, 1),
            interpret=static.interpret,
            name="hashgrid_levels_encode_bwd",
        )(*args)
    return dtable, jnp.zeros_like(x), None if mask is None else jnp.zeros_like(mask), None


_encode_core.defvjp(_encode_core_fwd, _encode_core_bwd)


def encode_levels_pallas(table: jax.Array, x: jax.Array, spec: HashGridSpec, level_mask: jax.Array | None = None,
                         valid: jax.Array | None = None, *, interpret: bool | None = None, block_points: int = 128,
                         num_warps: int = 4, pre_reduce_max_scale: float = 0.0) -> jax.Array:
    """Hash-grid features (N, L*F) of points x (N, 3) in [0, 1]^3, one level per program; see the module
    docstring. ``valid`` (N,) bool: invalid points get zero features and touch no table memory;
    ``level_mask`` (L,): switched-off levels likewise. ``block_points`` a power of two >= 16 (N is padded up),
    ``interpret`` None: interpret mode unless the default backend is GPU. Differentiable w.r.t. ``table``."""
    interpret = resolve_interpret(interpret)
    table, x2, mask, keep, block, n = padded_point_inputs(table, x, spec, level_mask, valid, block_points)
    static = _Static(spec, block, num_warps, bool(interpret), float(pre_reduce_max_scale))
    return _encode_core(table, x2, mask, keep, static)[:n]
