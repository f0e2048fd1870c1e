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

The Triton-specific pieces (gather / scatter / atomics, compiler params) and the per-level geometry (weights,
index terms, corner rows) come from :mod:`dreamcraft_jax.kernels.common`, shared with the other hash-grid kernels,
so that a port to another Pallas GPU backend only replaces those helpers.

Interpret mode (CPU, tests): Pallas discharges ``atomic_add`` with an index array as
``ref.at[idx].set(ref[idx] + val)``, which drops all but one update when ``idx`` has duplicates (common:
neighbouring points share corners). :func:`~dreamcraft_jax.kernels.common.scatter_add` therefore uses a functional
``.at[].add`` on the whole buffer in interpret mode and the hardware atomics only when lowering to Triton.

Inside ``jax.shard_map``: with ``check_vma=True`` the operands are cast to their common varying mesh axes
and the ``pallas_call`` outputs declared varying (so a replicated table's gradient is psum-ed by the
transpose of that cast, as for jnp code); jax 0.12's Pallas *interpret* mode cannot lower a blocked
``pallas_call`` under ``check_vma=True`` at all, so CPU runs inside shard_map need ``check_vma=False``
(then the per-shard table gradient must be psum-ed by the caller).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from dreamcraft_jax.fields import hashgrid as _ref
from dreamcraft_jax.fields.hashgrid import HashGridSpec
from dreamcraft_jax.kernels.common import (
    CORNERS,
    N_LEADERS,
    block_and_padding,
    cast_varying,
    compiler_params,
    corner_row,
    feature_chunks,
    full_hbm_spec,
    gather,
    index_arrays,
    level_geometry,
    level_lanes,
    load,
    out_struct,
    point_inputs,
    pre_reduced_scatter,
    resolve_interpret,
    scatter_add,
    static_level,
    store,
    valid_lanes,
)
from dreamcraft_jax.parallel import varying_axes

__all__ = ["encode_pallas", "encode_xla"]


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


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

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
    fw, n_chunks = feature_chunks(F)
    lanes = valid_lanes(valid_ref, B, fw)
    xs = [load(x_ref, (slice(None), d)) for d in range(3)]
    for l in range(spec.n_levels):
        level = static_level(spec, l)
        w, terms = level_geometry(xs, level)
        mask_l = load(mask_ref, l) if use_mask else None
        lanes_l = level_lanes(lanes, mask_l, B, fw)
        acc = [jnp.zeros((B, fw), jnp.float32) for _ in range(n_chunks)]
        for bits in CORNERS:
            row = corner_row(terms, bits, level)
            weight = (w[0][bits[0]] * w[1][bits[1]]) * w[2][bits[2]]  # reference order: (w0 * w1) * w2
            for c in range(n_chunks):
                rows, cols = index_arrays(row, c, fw, B)
                acc[c] = acc[c] + weight[:, None] * gather(table_ref, (rows, cols), lanes_l)
        for c in range(n_chunks):
            val = acc[c] * mask_l if use_mask else acc[c]
            store(out_ref, (slice(None), pl.ds(l * F + c * fw, fw)), val)


# Leader cells of the block pre-reduction of the coarse levels (those of lanes 0, B/4, B/2, 3B/4).
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
    fw, n_chunks = feature_chunks(F)
    lanes = valid_lanes(valid_ref, B, fw)
    xs = [load(x_ref, (slice(None), d)) for d in range(3)]
    dx = [jnp.zeros((B,), jnp.float32) for _ in range(3)]
    for l in range(spec.n_levels):
        level = static_level(spec, l)
        w, terms = level_geometry(xs, level)
        g = [load(g_ref, (slice(None), pl.ds(l * F + c * fw, fw))) for c in range(n_chunks)]
        if use_mask:
            mask_l = load(mask_ref, l)
            gm = [gc * mask_l for gc in g]
        else:
            mask_l, gm = None, g
        # Atomics skip switched-off levels (they would add exact zeros); the gathers keep them when the
        # level-mask gradient (the unmasked features) is wanted.
        scatter_lanes = level_lanes(lanes, mask_l, B, fw)
        if not need_x and spec.scales[l] <= pre_reduce_max_scale and B >= 2 * N_LEADERS:
            # From the valid block itself: Triton cannot slice a column out of the (B, fw) lanes.
            lanes_1d = jnp.ones((B,), bool) if valid_ref is None else load(valid_ref, slice(None)) != 0
            if mask_l is not None:
                lanes_1d = lanes_1d & (mask_l != 0)
            weights = [(w[0][b[0]] * w[1][b[1]]) * w[2][b[2]] for b in CORNERS]
            pre_reduced_scatter(dtable_ref, terms, level, lambda k, c: weights[k][:, None] * gm[c], lanes_1d,
                                B, fw, n_chunks, interpret)
            continue
        if mask_grad:
            feat = [jnp.zeros((B, fw), jnp.float32) for _ in range(n_chunks)]
        dfrac = [jnp.zeros((B,), jnp.float32) for _ in range(3)]
        for bits in CORNERS:
            row = corner_row(terms, bits, level)
            wd = [w[d][bits[d]] for d in range(3)]
            weight = (wd[0] * wd[1]) * wd[2]
            dot = jnp.zeros((B,), jnp.float32)  # <mask_l * g_l, table[row_b]>: cotangent of w_b
            for c in range(n_chunks):
                rows, cols = index_arrays(row, c, fw, B)
                scatter_add(dtable_ref, (rows, cols), weight[:, None] * gm[c], interpret=interpret,
                            mask=scatter_lanes)
                if need_x:  # the gathers serve d_x and d_mask only; d_table alone is a pure scatter
                    t = gather(table_ref, (rows, cols), lanes)
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
            store(dmask_ref, l, total)
    if need_x:
        for d in range(3):
            store(dx_ref, (slice(None), d), dx[d])


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers and custom_vjp
# ------------------------------------------------------------------------------------------------

def _forward(table, x, mask, valid, spec: HashGridSpec, cfg: _Config):
    """(N, 3) x, N a multiple of the block -> (N, L*F) float32 features."""
    N = x.shape[0]
    B = cfg.block_points
    L, F = spec.n_levels, spec.n_features_per_level
    use_mask = mask is not None
    in_specs, args = point_inputs(x, valid, B)
    if use_mask:
        in_specs.append(pl.BlockSpec((L,), lambda i: (0,)))
        args.append(mask)
    in_specs.append(full_hbm_spec())
    args.append(table)
    kernel = functools.partial(_forward_kernel, spec=spec, B=B, use_mask=use_mask, use_valid=valid is not None)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((N, L * F), x),
        grid=(N // B,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((B, L * F), lambda i: (i, 0)),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
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
    in_specs, args = point_inputs(x, valid, B)
    if use_mask:
        in_specs.append(pl.BlockSpec((L,), lambda i: (0,)))
        args.append(mask)
    in_specs += [full_hbm_spec(), pl.BlockSpec((B, L * F), lambda i: (i, 0)), full_hbm_spec()]
    # The d_table output aliases a zero input: Triton outputs start uninitialised and programs cannot
    # synchronise to zero it in-kernel; in interpret mode the alias likewise gives the initial value.
    zeros_index = len(args) + 2
    args += [table, g, cast_varying(jnp.zeros((R, F), jnp.float32), varying_axes(x))]
    out_shape, out_specs = [], []
    if need_x:
        out_shape.append(out_struct((N, 3), x))
        out_specs.append(pl.BlockSpec((B, 3), lambda i: (i, 0)))
    if use_mask and need_x:
        out_shape.append(out_struct((n_blocks, L), x))
        out_specs.append(pl.BlockSpec((None, L), lambda i: (i, 0)))
    out_shape.append(out_struct((R, F), x))
    out_specs.append(full_hbm_spec())
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
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
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
            scattered with a per-block pre-reduction (``common.pre_reduced_scatter``): lanes that share a leader
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
    interpret = resolve_interpret(interpret)

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
