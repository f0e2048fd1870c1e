"""The fields' one-hidden-layer MLPs, forward and backward each as one Pallas kernel, beside the reference.

Every density (NeRF) or SDF (NeuS) value a step needs goes through ``relu(enc @ W0) @ W1`` with enc (N, D) the
hash-grid features (D = L*F = 32), W0 (D, H) (H = 64) and W1 (H, 1): the samples themselves and, for the
finite-difference normals, their 3 neighbours and again at the perturbed point. Through XLA each evaluation is a
GEMM that writes the (N, H) hidden activations to HBM, a ReLU mask and a matrix-vector product reading them back,
and in the backward pass a data-gradient GEMM, a weight-gradient GEMM and the masks again: at 384 px ~28 GEMMs
of ~0.33 ms, memory-bound (``benchmarks/archive/profile/profile_nerf384_step_h200.json``). Here one program per block
of ``B`` rows keeps the hidden layer in registers:

    forward:   h = enc @ W0 (B, H);  y = sum_j relu(h)[:, j] W1[j]                          writes y (B,)
    backward:  h recomputed;  dh = (g W1^T) * [h > 0];  d_enc = dh @ W0^T                  writes d_enc (B, D)
               dW0 += enc^T @ dh,  dW1 += relu(h)^T g       per-block partials, summed after the kernel

so HBM sees enc and y (forward), enc, g and d_enc (backward), and (N / B) small partial weight gradients.

The albedo (feature) net, K = 3 outputs, runs the same way, its output columns unrolled. With ``valid`` (the
samples' mask) a block of rows with no valid sample skips its loads and matmuls and writes zeros: about half of
the packed sample slots, as the per-ray budgets are twice the use.

Contract: ``mlp_pallas(enc, w_hidden, w_out) -> (N, K)`` equals :func:`mlp_xla` (the reference), differentiable
w.r.t. all three; ``mlp1_pallas`` is its scalar form (N,). ``columns=True`` takes enc transposed, (D, N) (the
finite-difference kernel's column layout, ``kernels.fd_columns``), in (D, B) blocks, and returns its cotangent so.
The matmuls take TF32 on the GPU by default (XLA's default for the reference there), or three-pass TF32 / float32
FMAs (``precision``); full float32 in interpret mode. D and H must be powers of two >= 16 (Triton's ``dot``); the
fields fall back to the reference otherwise (:func:`supported`). Triton specifics come from
:mod:`kernels.common`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from dreamcraft_jax.kernels.common import (
    block_and_padding,
    cast_varying,
    compiler_params,
    load,
    out_struct,
    resolve_interpret,
    store,
    when_else,
)
from dreamcraft_jax.parallel import varying_axes

__all__ = ["mlp_pallas", "mlp_xla", "mlp1_pallas", "mlp1_xla", "supported", "MAX_OUTPUTS", "PRECISIONS"]

# Output columns are unrolled (one reduction over H each): the nets here have 1 (density, SDF) or 3 (albedo).
MAX_OUTPUTS = 8
# Matmul input precision on the GPU: "tf32" (XLA's float32 default there, one tensor-core pass), "tf32x3" (three
# passes, about float32 accuracy), "ieee" (float32 FMAs). Interpret mode (CPU) is float32 whatever the choice.
PRECISIONS = ("tf32", "tf32x3", "ieee")


def _dot_precision(precision: str, interpret: bool):
    """The ``precision`` argument of the kernels' dots (None: the backend's default, TF32 in Triton)."""
    if interpret or precision == "tf32":
        return None
    if precision == "tf32x3":
        return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return jax.lax.Precision.HIGHEST  # Triton lowering: input_precision IEEE for float32 operands


def mlp_xla(enc: jax.Array, w_hidden: jax.Array, w_out: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Pure-jnp reference: relu(enc @ w_hidden) @ w_out, enc (N, D), w_hidden (D, H), w_out (H, K) -> (N, K);
    0 (and no gradient) on rows where ``valid`` (N,) is False."""
    out = jnp.dot(jax.nn.relu(jnp.dot(enc, w_hidden)), w_out)
    return out if valid is None else jnp.where(valid[:, None], out, 0.0)


def mlp1_xla(enc: jax.Array, w_hidden: jax.Array, w_out: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """:func:`mlp_xla` of a scalar net: w_out (H, 1) -> (N,)."""
    return mlp_xla(enc, w_hidden, w_out, valid)[:, 0]


def supported(in_dim: int, hidden: int, out_dim: int = 1) -> bool:
    """Whether the kernel takes these widths (Triton ``dot`` wants power-of-two sizes of at least 16; the output
    columns are unrolled, up to :data:`MAX_OUTPUTS`)."""
    return all(n >= 16 and not n & (n - 1) for n in (in_dim, hidden)) and 1 <= out_dim <= MAX_OUTPUTS


def _block_valid(valid_ref, B: int):
    """(rows on (B,) bool, whether any is on) of this block; all on without a ``valid`` input. A block past the
    valid prefix of the packed samples (about half of them: the per-ray budgets are twice the use) then skips its
    loads and matmuls (:func:`when_else`)."""
    if valid_ref is None:
        return jnp.ones((B,), bool), None
    on = load(valid_ref, slice(None)) != 0
    return on, jnp.max(on.astype(jnp.int32)) > 0


def _pre_activation(enc_ref, w_hidden, precision, columns: bool):
    """(enc block (B, D), or (D, B) with ``columns``; enc @ w_hidden (B, H))."""
    enc = load(enc_ref, (slice(None), slice(None)))
    if columns:  # contract the features, dim 0 of the (D, B) block: no transposed copy
        return enc, jax.lax.dot_general(enc, w_hidden, (((0,), (0,)), ((), ())), precision=precision)
    return enc, jnp.dot(enc, w_hidden, precision=precision)


def _forward_kernel(*refs, n_out: int, precision, use_valid: bool, columns: bool):
    """Refs: enc (B, D) block (``columns``: (D, B)), [valid (B,) int32], w_hidden (D, H), w_out^T (K, H) -> y^T
    (K, B) block; rows not on give 0."""
    enc_ref, *refs = refs
    valid_ref = refs.pop(0) if use_valid else None
    w_hidden_ref, w_out_ref, out_ref = refs
    B = enc_ref.shape[1 if columns else 0]
    on, any_on = _block_valid(valid_ref, B)

    def work():
        hidden = jnp.maximum(_pre_activation(enc_ref, load(w_hidden_ref, (slice(None), slice(None))), precision,
                                             columns)[1], 0.0)
        for k in range(n_out):
            w_k = load(w_out_ref, (pl.ds(k, 1), slice(None)))  # (1, H)
            store(out_ref, (k, slice(None)), jnp.where(on, jnp.sum(hidden * w_k, axis=1), 0.0))

    def zeros():
        for k in range(n_out):
            store(out_ref, (k, slice(None)), jnp.zeros((B,), jnp.float32))

    when_else(any_on, work, zeros)


def _backward_kernel(*refs, n_out: int, precision, use_valid: bool, columns: bool):
    """Refs: enc (B, D) (``columns``: (D, B)), [valid (B,) int32], g^T (K, B) blocks, w_hidden (D, H), w_out^T
    (K, H) -> d_enc (B, D) block (``columns``: (D, B)), and this block's partial weight gradients d_hidden
    (1, D, H), d_out^T (1, K, H); rows not on take no cotangent."""
    enc_ref, *refs = refs
    valid_ref = refs.pop(0) if use_valid else None
    g_ref, w_hidden_ref, w_out_ref, d_enc_ref, d_hidden_ref, d_out_ref = refs
    D, H = w_hidden_ref.shape
    B = enc_ref.shape[1 if columns else 0]
    on, any_on = _block_valid(valid_ref, B)

    def work():
        w_hidden = load(w_hidden_ref, (slice(None), slice(None)))
        enc, pre = _pre_activation(enc_ref, w_hidden, precision, columns)  # pre (B, H)
        hidden = jnp.maximum(pre, 0.0)
        gs = [jnp.where(on, load(g_ref, (k, slice(None))), 0.0)[:, None] for k in range(n_out)]  # K x (B, 1)
        d_hidden_act = gs[0] * load(w_out_ref, (pl.ds(0, 1), slice(None)))
        for k in range(1, n_out):
            d_hidden_act = d_hidden_act + gs[k] * load(w_out_ref, (pl.ds(k, 1), slice(None)))
        d_pre = jnp.where(pre > 0.0, d_hidden_act, 0.0)  # (B, H)
        # d_enc = d_pre @ w_hidden^T; d_hidden = enc^T @ d_pre (contracting the rows: no transposed copies).
        # Columns: d_enc^T = w_hidden @ d_pre^T, d_hidden = enc^T-block @ d_pre.
        if columns:
            d_enc = jax.lax.dot_general(w_hidden, d_pre, (((1,), (1,)), ((), ())), precision=precision)  # (D, B)
            d_hidden = jnp.dot(enc, d_pre, precision=precision)
        else:
            d_enc = jax.lax.dot_general(d_pre, w_hidden, (((1,), (1,)), ((), ())), precision=precision)
            d_hidden = jax.lax.dot_general(enc, d_pre, (((0,), (0,)), ((), ())), precision=precision)  # (D, H)
        store(d_enc_ref, (slice(None), slice(None)), d_enc)
        store(d_hidden_ref, (0, slice(None), slice(None)), d_hidden)
        for k in range(n_out):
            store(d_out_ref, (0, k, slice(None)), jnp.sum(hidden * gs[k], axis=0))

    def zeros():
        store(d_enc_ref, (slice(None), slice(None)), jnp.zeros((D, B) if columns else (B, D), jnp.float32))
        store(d_hidden_ref, (0, slice(None), slice(None)), jnp.zeros((D, H), jnp.float32))
        for k in range(n_out):
            store(d_out_ref, (0, k, slice(None)), jnp.zeros((H,), jnp.float32))

    when_else(any_on, work, zeros)


def _enc_spec(B: int, D: int, columns: bool):
    """BlockSpec of enc (N, D) in (B, D) blocks, or of enc^T (D, N) in (D, B) blocks."""
    return pl.BlockSpec((D, B), lambda i: (0, i)) if columns else pl.BlockSpec((B, D), lambda i: (i, 0))


def _row_specs(B: int, D: int, valid, columns: bool):
    """BlockSpecs and operands of the per-row inputs: enc blocks and, when given, valid (B,) blocks."""
    specs = [_enc_spec(B, D, columns)]
    return (specs + [pl.BlockSpec((B,), lambda i: (i,))], [valid]) if valid is not None else (specs, [])


@functools.partial(jax.jit, static_argnames=("block_rows", "num_warps", "interpret", "precision", "columns"))
def _forward(enc, valid, w_hidden, w_out_t, *, block_rows: int, num_warps: int, interpret: bool, precision: str,
             columns: bool):
    (D, H), K = w_hidden.shape, w_out_t.shape[0]
    N = enc.shape[1 if columns else 0]
    B = block_rows
    row_specs, valid_args = _row_specs(B, D, valid, columns)
    return pl.pallas_call(
        functools.partial(_forward_kernel, n_out=K, precision=_dot_precision(precision, interpret),
                          use_valid=valid is not None, columns=columns),
        out_shape=out_struct((K, N), enc),
        grid=(N // B,),
        in_specs=row_specs + [pl.BlockSpec((D, H), lambda i: (0, 0)), pl.BlockSpec((K, H), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((K, B), lambda i: (0, i)),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="mlp1_fwd",
    )(enc, *valid_args, w_hidden, w_out_t)


@functools.partial(jax.jit, static_argnames=("block_rows", "num_warps", "interpret", "precision", "columns"))
def _backward(enc, valid, g_t, w_hidden, w_out_t, *, block_rows: int, num_warps: int, interpret: bool,
              precision: str, columns: bool):
    (D, H), K = w_hidden.shape, w_out_t.shape[0]
    N = enc.shape[1 if columns else 0]
    B = block_rows
    n_blocks = N // B
    row_specs, valid_args = _row_specs(B, D, valid, columns)
    d_enc, d_hidden, d_out = pl.pallas_call(
        functools.partial(_backward_kernel, n_out=K, precision=_dot_precision(precision, interpret),
                          use_valid=valid is not None, columns=columns),
        out_shape=(out_struct(enc.shape, enc), out_struct((n_blocks, D, H), enc),
                   out_struct((n_blocks, K, H), enc)),
        grid=(n_blocks,),
        in_specs=row_specs + [pl.BlockSpec((K, B), lambda i: (0, i)), pl.BlockSpec((D, H), lambda i: (0, 0)),
                              pl.BlockSpec((K, H), lambda i: (0, 0))],
        out_specs=(_enc_spec(B, D, columns), pl.BlockSpec((1, D, H), lambda i: (i, 0, 0)),
                   pl.BlockSpec((1, K, H), lambda i: (i, 0, 0))),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="mlp1_bwd",
    )(enc, *valid_args, g_t, w_hidden, w_out_t)
    return d_enc, jnp.sum(d_hidden, axis=0), jnp.sum(d_out, axis=0)  # (N, D), (D, H), (K, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _mlp(enc, valid, w_hidden, w_out_t, static):
    return _forward(enc, valid, w_hidden, w_out_t, **static._asdict())


def _mlp_fwd(enc, valid, w_hidden, w_out_t, static):
    return _mlp(enc, valid, w_hidden, w_out_t, static), (enc, valid, w_hidden, w_out_t)


def _mlp_bwd(static, residuals, g_t):
    enc, valid, w_hidden, w_out_t = residuals
    d_enc, d_hidden, d_out = _backward(enc, valid, g_t, w_hidden, w_out_t, **static._asdict())
    d_valid = None if valid is None else np.zeros(valid.shape, jax.dtypes.float0)  # an integer input
    return d_enc, d_valid, d_hidden, d_out


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


class _Static(NamedTuple):
    """Static kernel settings (custom_vjp's hashable nondiff argument)."""

    block_rows: int
    num_warps: int
    interpret: bool
    precision: str
    columns: bool


def mlp_pallas(enc: jax.Array, w_hidden: jax.Array, w_out: jax.Array, *, valid: jax.Array | None = None,
               interpret: bool | None = None, block_rows: int = 128, num_warps: int = 4,
               precision: str = "tf32", columns: bool = False) -> jax.Array:
    """relu(enc @ w_hidden) @ w_out with the hidden layer in registers; (N, K) float32, differentiable.

    Same arguments as :func:`mlp_xla` (K <= :data:`MAX_OUTPUTS`); ``valid`` (N,) bool or None: rows where it is
    False give 0 and take no gradient, and blocks with no valid row skip their work (pass it for samples whose
    features are zero, where the net gives 0 anyway); ``block_rows`` a power of two (N is padded with zero rows,
    which add nothing to the weight gradients), ``interpret`` None: interpret mode unless the default backend is
    GPU, ``precision`` one of :data:`PRECISIONS` (the matmuls' input precision on the GPU). ``columns``: enc is
    given transposed, (D, N) (the finite-difference kernel's column layout), and its cotangent comes back so.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    rows = enc.T if columns and enc.ndim == 2 else enc  # (N, D) view, for the checks only
    if enc.ndim != 2 or w_hidden.ndim != 2 or w_out.ndim != 2 or rows.shape[1] != w_hidden.shape[0] \
            or w_out.shape[0] != w_hidden.shape[1]:
        layout = "enc^T (D, N)" if columns else "enc (N, D)"
        raise ValueError(f"need {layout}, w_hidden (D, H), w_out (H, K); got {enc.shape}, {w_hidden.shape}, "
                         f"{w_out.shape}")
    if valid is not None and valid.shape != rows.shape[:1]:
        raise ValueError(f"need valid (N,) for enc of N = {rows.shape[0]} rows; got {valid.shape}")
    if not supported(*w_hidden.shape, w_out.shape[1]):
        raise ValueError(f"D and H must be powers of two >= 16 (Triton dot) and K <= {MAX_OUTPUTS}, got "
                         f"{w_hidden.shape} and K = {w_out.shape[1]}; use mlp_xla")
    interpret = resolve_interpret(interpret)
    n = rows.shape[0]
    block, n_pad = block_and_padding(n, block_rows)
    padding = ((0, 0), (0, n_pad - n)) if columns else ((0, n_pad - n), (0, 0))
    # Outputs (and their cotangents) travel as (K, N): each output's rows are contiguous for the kernel.
    operands = [jnp.pad(enc.astype(jnp.float32), padding), w_hidden.astype(jnp.float32),
                w_out.astype(jnp.float32).T]
    if valid is not None:  # padding rows: not valid
        operands.append(jnp.pad(jnp.asarray(valid, bool).astype(jnp.int32), (0, n_pad - n)))
    axes = frozenset().union(*(varying_axes(v) for v in operands))
    enc2, w_hidden2, w_out_t, *valid2 = (cast_varying(v, axes) for v in operands)
    static = _Static(block, num_warps, bool(interpret), precision, bool(columns))
    return _mlp(enc2, valid2[0] if valid2 else None, w_hidden2, w_out_t, static)[:, :n].T


def mlp1_pallas(enc: jax.Array, w_hidden: jax.Array, w_out: jax.Array, *, valid: jax.Array | None = None,
                interpret: bool | None = None, block_rows: int = 128, num_warps: int = 4,
                precision: str = "tf32", columns: bool = False) -> jax.Array:
    """:func:`mlp_pallas` of a scalar net: w_out (H, 1) -> (N,)."""
    if w_out.ndim != 2 or w_out.shape[1] != 1:
        raise ValueError(f"need w_out (H, 1) for a scalar net, got {w_out.shape}; use mlp_pallas")
    return mlp_pallas(enc, w_hidden, w_out, valid=valid, interpret=interpret, block_rows=block_rows,
                      num_warps=num_warps, precision=precision, columns=columns)[:, 0]
