"""Fused hash-grid encoding + density MLP (forward only) as a Pallas kernel, beside its pure-jnp reference.

The renderer's pruning pass evaluates the density at every occupied candidate (~40 per ray at 384 px, ~6 M
points per view) without a gradient, only to drop the samples whose alpha or transmittance is negligible. Unfused,
that is the hash-grid kernel writing (N, L*F) features to HBM, a GEMM reading them and writing the (N, H) hidden
activations, and a second GEMM reading those. Here one program per block of ``B`` points keeps all of it in
registers:

    enc   = hash-grid features of x (exactly :func:`kernels.hashgrid.encode_pallas`'s forward, same gathers)
    h     = relu(sum_{l, f} enc[:, l*F + f] (outer) W0[l*F + f, :])          (B, H), float32 FMAs
    raw   = sum_j h[:, j] * W1[j, 0]                                         (B,)

and writes ``raw`` (N,) only: 4 bytes per point instead of 4 (L*F + H) twice. The density bias and activation
(elementwise on ``raw``) stay with the field (:func:`dreamcraft_jax.fields.nerf.density_no_grad`).

Contract: ``density_mlp_pallas(table, x, spec, level_mask, valid, w_hidden, w_out) -> raw (N,)`` equals
:func:`density_mlp_xla` (the reference) up to float32 summation order: both take full float32 products (the
reference's matmuls ask for ``Precision.HIGHEST``; XLA's GPU default would be TF32 and flip samples at the alpha
threshold). No VJP: the result is meant for ``stop_gradient`` uses (pruning, occupancy-grid updates). One
hidden layer (the official field); :func:`dreamcraft_jax.fields.nerf.density_no_grad` falls back to the unfused
path otherwise.

Triton specifics and the level geometry come from :mod:`kernels.common` (gather, load, store, compiler params), so
a port to another Pallas GPU backend replaces them there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dreamcraft_jax.fields import hashgrid as _ref
from dreamcraft_jax.fields.hashgrid import HashGridSpec
from dreamcraft_jax.kernels.common import (
    CORNERS,
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
    resolve_interpret,
    static_level,
    store,
    valid_lanes,
    when_else,
)
from dreamcraft_jax.parallel import varying_axes

__all__ = ["density_mlp_pallas", "density_mlp_xla"]


def density_mlp_xla(table: jax.Array, x: jax.Array, spec: HashGridSpec, level_mask: jax.Array | None,
                    valid: jax.Array | None, w_hidden: jax.Array, w_out: jax.Array) -> jax.Array:
    """Pure-jnp reference: relu(encode(x) @ w_hidden) @ w_out, (N, 3) -> (N,).

    Args:
        table: (spec.total_params, F) hash table; x: (N, 3) points in [0, 1]^3; level_mask: optional (L,);
        valid: optional (N,) bool (invalid points: zero features, so raw = 0 with bias-free layers);
        w_hidden: (L*F, H); w_out: (H, 1).
    """
    enc = _ref.encode(table, x, spec, level_mask, valid, skip_masked_levels=True)
    hi = jax.lax.Precision.HIGHEST  # float32 products, like the kernel (XLA's GPU default may be TF32)
    return jnp.dot(jax.nn.relu(jnp.dot(enc, w_hidden, precision=hi)), w_out, precision=hi)[:, 0]


def _density_kernel(*refs, spec: HashGridSpec, B: int, H: int, use_mask: bool, use_valid: bool):
    """Refs: x (B, 3) block, [valid (B,) int32 block], [mask (L,)], w_hidden (L*F, H), w_out (1, H), table (R, F)
    in HBM -> raw (B,) block."""
    refs = list(refs)
    x_ref = refs.pop(0)
    valid_ref = refs.pop(0) if use_valid else None
    mask_ref = refs.pop(0) if use_mask else None
    w_hidden_ref, w_out_ref, table_ref, out_ref = refs
    F = spec.n_features_per_level
    fw, n_chunks = feature_chunks(F)
    lanes = valid_lanes(valid_ref, B, fw)

    def encode_and_mlp():
        xs = [load(x_ref, (slice(None), d)) for d in range(3)]
        # One-hot column selectors: Triton has no column slicing of a register tensor, a masked row sum does it.
        columns = [(jnp.arange(fw, dtype=jnp.int32) == j).astype(jnp.float32)[None, :] for j in range(fw)]
        hidden = jnp.zeros((B, H), jnp.float32)
        for l in range(spec.n_levels):
            level = static_level(spec, l)
            w, terms = level_geometry(xs, level)
            mask_l = load(mask_ref, l) if use_mask else None
            lanes_l = level_lanes(lanes, mask_l, B, fw)
            for c in range(n_chunks):
                acc = jnp.zeros((B, fw), jnp.float32)
                for bits in CORNERS:
                    row = corner_row(terms, bits, level)
                    weight = (w[0][bits[0]] * w[1][bits[1]]) * w[2][bits[2]]
                    rows, cols = index_arrays(row, c, fw, B)
                    acc = acc + weight[:, None] * gather(table_ref, (rows, cols), lanes_l)
                if use_mask:
                    acc = acc * mask_l
                for j in range(fw):
                    feature = l * F + c * fw + j
                    col = acc if fw == 1 else jnp.sum(acc * columns[j], axis=1, keepdims=True)  # (B, 1)
                    hidden = hidden + col * load(w_hidden_ref, (pl.ds(feature, 1), slice(None)))  # (B,1)*(1,H)
        hidden = jnp.maximum(hidden, 0.0)
        store(out_ref, slice(None), jnp.sum(hidden * load(w_out_ref, (slice(None), slice(None))), axis=1))

    # A block past the valid prefix of the packed candidates (their budget is well above what a view uses) reads
    # no table rows anyway: skip its geometry and MLP too; its raw values are 0, as the bias-free MLP of zero
    # features gives.
    any_valid = None if lanes is None else jnp.max(load(valid_ref, slice(None))) != 0
    when_else(any_valid, encode_and_mlp, lambda: store(out_ref, slice(None), jnp.zeros((B,), jnp.float32)))


@functools.partial(jax.jit, static_argnames=("spec", "block_points", "num_warps", "interpret"))
def _density_call(table, x, mask, valid, w_hidden, w_out, *, spec: HashGridSpec, block_points: int,
                  num_warps: int, interpret: bool):
    N = x.shape[0]
    B = block_points
    L, F = spec.n_levels, spec.n_features_per_level
    H = w_hidden.shape[1]
    use_mask = mask is not None
    in_specs, args = point_inputs(x, valid, B)
    if use_mask:
        in_specs.append(pl.BlockSpec((L,), lambda i: (0,)))
        args.append(mask)
    in_specs += [pl.BlockSpec((L * F, H), lambda i: (0, 0)), pl.BlockSpec((1, H), lambda i: (0, 0)),
                 full_hbm_spec()]
    args += [w_hidden, w_out.reshape(1, H), table]
    kernel = functools.partial(_density_kernel, spec=spec, B=B, H=H, use_mask=use_mask,
                               use_valid=valid is not None)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((N,), x),
        grid=(N // B,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((B,), lambda i: (i,)),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="hashgrid_density_mlp_fwd",
    )(*args)


def density_mlp_pallas(table: jax.Array, x: jax.Array, spec: HashGridSpec, level_mask: jax.Array | None = None,
                       valid: jax.Array | None = None, w_hidden: jax.Array | None = None,
                       w_out: jax.Array | None = None, *, interpret: bool | None = None, block_points: int = 128,
                       num_warps: int = 4) -> jax.Array:
    """relu(encode(x) @ w_hidden) @ w_out for (N, 3) points in one kernel; (N,) float32, no gradient.

    Same arguments as :func:`density_mlp_xla`; ``block_points`` a power of two (N is padded up to a multiple),
    ``interpret`` None: interpret mode unless the default backend is GPU. Invalid points (``valid`` False) and
    switched-off levels (``level_mask`` 0) read no table memory. Inputs are cut off from autodiff
    (``stop_gradient``): there is no backward kernel.
    """
    L, F = spec.n_levels, spec.n_features_per_level
    if table.shape != (spec.total_params, F) or table.dtype != jnp.float32:
        raise ValueError(f"table must be float32 {(spec.total_params, F)}, got {table.dtype} {table.shape}")
    if x.ndim != 2 or x.shape[-1] != 3:
        raise ValueError(f"x must be (N, 3), got {x.shape}")
    if w_hidden is None or w_out is None or w_hidden.ndim != 2 or w_hidden.shape[0] != L * F \
            or w_out.shape != (w_hidden.shape[1], 1):
        raise ValueError(f"need w_hidden ({L * F}, H) and w_out (H, 1), got "
                         f"{None if w_hidden is None else w_hidden.shape} and {None if w_out is None else w_out.shape}")
    H = w_hidden.shape[1]
    if H & (H - 1):
        raise ValueError(f"the hidden width must be a power of two (Triton tensor sizes), got {H}")
    interpret = resolve_interpret(interpret)
    sg = jax.lax.stop_gradient
    n = x.shape[0]
    block, n_pad = block_and_padding(n, block_points)
    x2 = jnp.pad(sg(x).astype(jnp.float32), ((0, n_pad - n), (0, 0)))
    # Padding points are invalid: no gathers, and their raw values are cut off below.
    keep = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    keep = jnp.pad(keep.astype(jnp.int32), (0, n_pad - n))
    mask = None if level_mask is None else sg(jnp.asarray(level_mask, jnp.float32))
    operands = [sg(table), x2, keep, sg(w_hidden).astype(jnp.float32), sg(w_out).astype(jnp.float32)]
    if mask is not None:
        operands.append(mask)
    axes = frozenset().union(*(varying_axes(v) for v in operands))
    table, x2, keep, w_hidden, w_out, *rest = (cast_varying(v, axes) for v in operands)
    mask = rest[0] if rest else None
    raw = _density_call(table, x2, mask, keep, w_hidden, w_out, spec=spec, block_points=block,
                        num_warps=num_warps, interpret=bool(interpret))
    return raw[:n]
