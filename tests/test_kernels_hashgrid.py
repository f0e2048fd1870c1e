"""Pallas hash-grid kernel (interpret mode on CPU) against the pure-jnp reference encoder.

The reference is compared under ``jax.jit``: eager op-by-op evaluation of the reference rounds
``scale * x + 0.5`` differently from a fused one (up to ~1e-5 absolute on the finest levels), while the
interpret-mode kernel body is compiled by XLA like the jitted reference.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from dreamcraft_jax.fields.hashgrid import HashGridSpec, progressive_level_mask
from dreamcraft_jax.kernels import common
from dreamcraft_jax.kernels import hashgrid as hk

# tests/conftest.py's tiny grid: level 0 dense (16^3 = 4096 rows = 2^12), levels 1..3 hashed.
TINY = HashGridSpec(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=16,
                    per_level_scale=2.0)
# Levels 0 (32 rows) and 1 (216 rows: dense size not a power of two) dense, levels 2..5 hashed.
MIXED = HashGridSpec(n_levels=6, n_features_per_level=2, log2_hashmap_size=10, base_resolution=3,
                     per_level_scale=2.0)
F1 = HashGridSpec(n_levels=3, n_features_per_level=1, log2_hashmap_size=9, base_resolution=4,
                  per_level_scale=2.0)
F4 = HashGridSpec(n_levels=3, n_features_per_level=4, log2_hashmap_size=9, base_resolution=4,
                  per_level_scale=2.0)
# F = 3 is not a power of two: the kernel goes feature by feature; dense level 1 has 736 rows.
F3 = HashGridSpec(n_levels=3, n_features_per_level=3, log2_hashmap_size=10, base_resolution=5,
                  per_level_scale=1.7)

BLOCK = 128
N = 1000  # not a multiple of BLOCK: exercises the padding


def _inputs(spec, n=N, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    # O(1) table values so that absolute tolerances mean something (the real init is 1e-4).
    table = jax.random.normal(k1, (spec.total_params, spec.n_features_per_level), jnp.float32)
    x = jax.random.uniform(k2, (n, 3), jnp.float32)
    g = jax.random.normal(k3, (n, spec.output_dim), jnp.float32)
    return table, x, g


def _boundary_points():
    """All 27 combinations of {0, 0.5, 1}: 0.5 lies exactly on a cell boundary of every level of TINY and
    of levels >= 1 of MIXED (scale * 0.5 + 0.5 is an exact integer there), 1 reaches the last corner."""
    v = np.array([0.0, 0.5, 1.0], np.float32)
    return jnp.asarray(np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3))


def _vjps(spec, table, x, mask, g, **kw):
    """(value, cotangents) of the kernel and of the jitted reference, both through jax.vjp."""
    def run(fn):
        def f(t, x, m):
            out, vjp = jax.vjp(lambda t, x, m: fn(t, x, spec, m), t, x, m)
            return out, vjp(g)
        return jax.jit(f)(table, x, mask)

    ker = run(lambda t, x, s, m: hk.encode_pallas(t, x, s, m, block_points=BLOCK, **kw))
    ref = run(hk.encode_xla)
    return ker, ref


def _close(a, b, rtol=1e-6, atol=1e-6):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * max(1.0, float(np.abs(b).max())))


def _check_grads(ker, ref, *, mask_grad=True):
    (out_k, (dt_k, dx_k, dm_k)), (out_r, (dt_r, dx_r, dm_r)) = ker, ref
    _close(out_k, out_r)
    _close(dt_k, dt_r)
    # d_x sums up to 24 L products scaled by the grid scale: float32 summation order matters more.
    _close(dx_k, dx_r, rtol=1e-5, atol=1e-6)
    if mask_grad:
        _close(dm_k, dm_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", [TINY, MIXED, F1, F4, F3], ids=["tiny", "mixed", "F1", "F4", "F3"])
def test_forward_and_vjp_match_reference(spec):
    table, x, g = _inputs(spec)
    x = jnp.concatenate([x, _boundary_points()])
    g = jnp.concatenate([g, jnp.ones((27, spec.output_dim), jnp.float32)])
    mask = jnp.ones((spec.n_levels,), jnp.float32).at[1].set(0.5)
    ker, ref = _vjps(spec, table, x, mask, g)
    _check_grads(ker, ref)


def test_forward_eager_without_mask_and_batch_shape():
    table, x, _ = _inputs(MIXED, n=600)
    x = x.reshape(3, 200, 3)
    out = hk.encode_pallas(table, x, MIXED, block_points=BLOCK)
    assert out.shape == (3, 200, MIXED.output_dim) and out.dtype == jnp.float32
    ref = jax.jit(hk.encode_xla, static_argnums=2)(table, x, MIXED)
    _close(out, ref)


def test_boundary_points_exact_cells():
    """Points at 0, 1 and on cell boundaries (all rounding-free): values and all gradients."""
    table, _, _ = _inputs(MIXED)
    x = _boundary_points()
    g = jax.random.normal(jax.random.key(3), (x.shape[0], MIXED.output_dim))
    ker, ref = _vjps(MIXED, table, x, None, g)
    (out_k, (dt_k, dx_k, dm_k)), (out_r, (dt_r, dx_r, _)) = ker, ref
    assert dm_k is None
    _close(out_k, out_r)
    _close(dt_k, dt_r)
    _close(dx_k, dx_r, rtol=1e-5)


def test_masked_levels_get_exactly_zero_table_gradient():
    spec = MIXED
    table, x, g = _inputs(spec, n=500)
    mask = progressive_level_mask(0, spec, start_level=3, start_step=0, update_steps=1)  # levels 3..5 off
    ker, ref = _vjps(spec, table, x, mask, g)
    _check_grads(ker, ref)
    out_k, (dt_k, _, dm_k) = ker
    out_k, dt_k = np.asarray(out_k), np.asarray(dt_k)
    F = spec.n_features_per_level
    for l in range(spec.n_levels):
        rows = slice(int(spec.offsets[l]), int(spec.offsets[l] + spec.level_sizes[l]))
        if l < 3:
            assert np.any(dt_k[rows] != 0)
        else:
            assert np.all(dt_k[rows] == 0), l
            assert np.all(out_k[:, l * F:(l + 1) * F] == 0), l
    # The mask gradient of switched-off levels is still the true one (non-zero).
    assert np.all(np.asarray(dm_k)[3:] != 0)


def test_grad_table_only():
    spec = TINY
    table, x, g = _inputs(spec, n=300)
    mask = jnp.array([1.0, 1.0, 0.0, 1.0])
    ker, ref = _vjps(spec, table, x, mask, g, grad_table_only=True)
    (out_k, (dt_k, dx_k, dm_k)), (out_r, (dt_r, _, _)) = ker, ref
    _close(out_k, out_r)
    _close(dt_k, dt_r)
    assert np.all(np.asarray(dx_k) == 0) and dx_k.shape == x.shape
    assert np.all(np.asarray(dm_k) == 0) and dm_k.shape == mask.shape


def test_small_input_and_jit_grad_of_loss():
    """N smaller than a block (block shrinks to a power of two) and jax.grad of a scalar loss under jit."""
    spec = TINY
    table, x, _ = _inputs(spec, n=37)

    def loss(fn, t, x):
        return jnp.sum(jnp.sin(fn(t, x, spec)))

    gk = jax.jit(jax.grad(lambda t, x: loss(hk.encode_pallas, t, x), argnums=(0, 1)))(table, x)
    gr = jax.jit(jax.grad(lambda t, x: loss(hk.encode_xla, t, x), argnums=(0, 1)))(table, x)
    _close(gk[0], gr[0])
    _close(gk[1], gr[1], rtol=1e-5)


def _sharded_vjp(spec, check_vma):
    """jit(shard_map) over 8 CPU devices: points and cotangents sharded, table and mask replicated;
    returns (features, d_table, d_mask) with the replicated gradients summed over the shards: by the
    transpose of the replicated -> varying cast under check_vma (as for jnp code), by hand without."""
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def local(t, m, x, g):
        out, vjp = jax.vjp(lambda t, m: hk.encode_pallas(t, x, spec, m, block_points=64), t, m)
        dt, dm = vjp(g)
        if not check_vma:
            dt, dm = jax.lax.psum((dt, dm), "d")
        return out, dt, dm

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("d"), P("d")),
                                 out_specs=(P("d"), P(), P()), check_vma=check_vma))


def test_shard_map_forward_and_grads():
    """Sharded forward equals the unsharded kernel; psum of per-shard table / mask gradients equals the
    unsharded gradients (check_vma=False: Pallas interpret mode cannot lower under check_vma, see below)."""
    spec = TINY
    table, x, g = _inputs(spec, n=8 * 64)
    mask = jnp.array([1.0, 0.5, 1.0, 0.0])
    out_s, dt_s, dm_s = _sharded_vjp(spec, check_vma=False)(table, mask, x, g)
    out_u, vjp = jax.vjp(lambda t, m: hk.encode_pallas(t, x, spec, m, block_points=64), table, mask)
    dt_u, dm_u = vjp(g)
    _close(out_s, out_u)
    _close(dt_s, dt_u)
    _close(dm_s, dm_u, rtol=1e-5)


def test_shard_map_check_vma_types():
    """Under shard_map(check_vma=True) the kernel calls type-check: outputs vary with the points and the
    replicated table / mask get replicated (psum-ed) gradients, else out_specs P() would be rejected.
    Only traced: jax 0.12's Pallas interpret mode fails to lower any blocked pallas_call under
    check_vma ("dynamic_slice requires varying manual axes to match"); the Triton lowering does not
    re-trace the kernel with manual axis types."""
    spec = TINY
    table, x, g = _inputs(spec, n=8 * 64)
    mask = jnp.array([1.0, 0.5, 1.0, 0.0])
    traced = _sharded_vjp(spec, check_vma=True).trace(table, mask, x, g)
    out, dt, dm = traced.out_info
    assert out.shape == (8 * 64, spec.output_dim)
    assert dt.shape == table.shape and dm.shape == mask.shape
    assert "psum" in str(traced.jaxpr)


def test_triton_atomic_path_indexing_in_interpret_mode():
    """The Triton branch of ``common.scatter_add`` (``plgpu.atomic_add`` with (rows, cols) index arrays) and
    ``common.gather``, run in interpret mode on duplicate-free rows (the only case interpret mode discharges
    exactly), address the same elements as the jnp reference."""
    R, F, B = 64, 4, 16
    rows_np = np.random.default_rng(0).permutation(R)[:B].astype(np.int32)
    table = jnp.arange(R * F, dtype=jnp.float32).reshape(R, F)
    vals = jnp.arange(B * F, dtype=jnp.float32).reshape(B, F) + 0.5

    def kernel(rows_ref, vals_ref, table_ref, zeros_ref, gathered_ref, acc_ref):
        idx = common.index_arrays(rows_ref[...], 0, F, B)
        gathered_ref[...] = common.gather(table_ref, idx)
        common.scatter_add(acc_ref, idx, vals_ref[...], interpret=False)
        common.scatter_add(acc_ref, idx, vals_ref[...], interpret=False)

    gathered, acc = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((B, F), jnp.float32), jax.ShapeDtypeStruct((R, F), jnp.float32)),
        grid=(1,),
        in_specs=[pl.BlockSpec((B,), lambda i: (0,)), pl.BlockSpec((B, F), lambda i: (0, 0)),
                  pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=(pl.BlockSpec((B, F), lambda i: (0, 0)), pl.BlockSpec(memory_space=pl.ANY)),
        input_output_aliases={3: 1},
        interpret=True,
    )(jnp.asarray(rows_np), vals, table, jnp.zeros((R, F), jnp.float32))
    np.testing.assert_array_equal(gathered, table[rows_np])
    np.testing.assert_array_equal(acc, jnp.zeros((R, F)).at[rows_np].add(2 * vals))


def test_argument_checks():
    table, x, _ = _inputs(TINY, n=8)
    with pytest.raises(ValueError, match="power of two"):
        hk.encode_pallas(table, x, TINY, block_points=96)
    with pytest.raises(TypeError, match="float32"):
        hk.encode_pallas(table.astype(jnp.bfloat16), x, TINY)
    with pytest.raises(ValueError, match="table shape"):
        hk.encode_pallas(table[:-1], x, TINY)
    with pytest.raises(ValueError, match="level_mask"):
        hk.encode_pallas(table, x, TINY, jnp.ones(3))


def _naive_vjp_f64(spec, table, x, mask, g):
    """(features, d_table, d_x, d_mask) of ``sum(encode(table, x, spec, mask) * g)`` in NumPy float64, written
    out from the tcnn formulas (fields/hashgrid.py docstring) and sharing no code with the encoder: the table
    gradient is the explicit scatter-add of mask * trilinear weight * cotangent, d_x differentiates the weights
    by hand (d frac / d x = scale), d_mask is the unmasked features dotted with the cotangent."""
    table, x, g = (np.asarray(a, np.float64) for a in (table, x, g))
    mask = np.asarray(mask, np.float64)
    n, F = len(x), spec.n_features_per_level
    out, dt, dx, dm = np.zeros((n, spec.output_dim)), np.zeros_like(table), np.zeros_like(x), np.zeros(len(mask))
    offset = 0
    for l in range(spec.n_levels):
        scale = 2.0 ** (l * math.log2(spec.per_level_scale)) * spec.base_resolution - 1.0
        res = math.ceil(scale) + 1
        size = min((res**3 + 7) // 8 * 8, 2**spec.log2_hashmap_size)
        pos = scale * x + 0.5
        cell = np.floor(pos).astype(np.int64)
        frac = pos - cell
        gl = g[:, l * F:(l + 1) * F]
        feat, dfeat = np.zeros((n, F)), np.zeros((n, 3, F))  # unmasked features and d feat / d frac
        for b in itertools.product((0, 1), repeat=3):
            c = cell + np.array(b)
            if res**3 <= size:
                idx = c[:, 0] + c[:, 1] * res + c[:, 2] * res * res
            else:
                idx = (c[:, 0] ^ (c[:, 1] * 2654435761) ^ (c[:, 2] * 805459861)) & 0xFFFFFFFF
            rows = offset + idx % size
            wd = np.where(np.array(b, bool), frac, 1.0 - frac)  # (n, 3) per-dimension weights
            feat += np.prod(wd, axis=1)[:, None] * table[rows]
            for d in range(3):
                dw = (1.0 if b[d] else -1.0) * np.prod(np.delete(wd, d, axis=1), axis=1)
                dfeat[:, d] += dw[:, None] * table[rows]
            np.add.at(dt, rows, mask[l] * np.prod(wd, axis=1)[:, None] * gl)
        out[:, l * F:(l + 1) * F] = mask[l] * feat
        dx += mask[l] * scale * np.einsum("ndf,nf->nd", dfeat, gl)
        dm[l] = np.sum(feat * gl)
        offset += size
    return out, dt, dx, dm


@pytest.mark.parametrize("grad_table_only", [True, False])
def test_xla_backward_option_matches_naive_float64(grad_table_only):
    """With xla_backward the kernel's backward is jax.vjp of the jnp reference, so it is checked against the
    naive float64 vjp above instead. Points on a 2^-16 lattice: scale * x + 0.5 (scales <= 127) is exact in
    float32, so the kernel sees the same cells and fractions as float64 and the float32 error is only that of
    the products and sums (~1e-7 relative)."""
    spec = TINY
    table, x, g = _inputs(spec, n=300)
    x = jnp.round(x * 2**16) / 2**16
    mask = jnp.array([1.0, 1.0, 0.0, 1.0])

    def f(t, p, m):
        out, vjp = jax.vjp(lambda t, p, m: hk.encode_pallas(t, p, spec, m, block_points=BLOCK,
                                                             grad_table_only=grad_table_only, xla_backward=True),
                           t, p, m)
        return out, vjp(g)

    out_k, (dt_k, dx_k, dm_k) = jax.jit(f)(table, x, mask)
    out_n, dt_n, dx_n, dm_n = _naive_vjp_f64(spec, table, x, mask, g)
    assert np.all(dt_n[spec.offsets[2]:spec.offsets[3]] == 0) and np.count_nonzero(dt_n) > 1000
    _close(out_k, out_n, rtol=1e-5)
    _close(dt_k, dt_n, rtol=1e-5)
    if grad_table_only:
        assert np.all(np.asarray(dx_k) == 0) and np.all(np.asarray(dm_k) == 0)
    else:
        _close(dx_k, dx_n, rtol=1e-5)
        _close(dm_k, dm_n, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"grad_table_only": True}, {"xla_backward": True}],
                         ids=["atomic", "table_only", "xla_backward"])
def test_valid_mask_equals_encoding_only_the_valid_points(kw):
    """Invalid points: zero features and no share in any gradient, i.e. the vjp equals the reference's vjp on
    the valid subset alone (an independent computation: no mask involved on that side)."""
    spec = MIXED
    table, x, g = _inputs(spec, n=700)
    # A packed buffer's shape: a valid prefix, then unused slots that all sit on one point.
    valid = jnp.arange(700) < 430
    x = jnp.where(valid[:, None], x, 0.25)
    mask = jnp.ones((spec.n_levels,), jnp.float32).at[2].set(0.5)

    def ker(t, p, m):
        return hk.encode_pallas(t, p, spec, m, block_points=BLOCK, valid=valid, **kw)

    def vjp(fn, p, gp):  # jitted on both sides (module docstring: eager rounding differs)
        out, back = jax.vjp(fn, table, p, mask)
        return out, back(gp)

    out_k, (dt_k, dx_k, dm_k) = jax.jit(lambda p, gp: vjp(ker, p, gp))(x, g)
    out_r, (dt_r, dx_r, dm_r) = jax.jit(lambda p, gp: vjp(lambda t, q, m: hk.encode_xla(t, q, spec, m), p, gp))(
        x[:430], g[:430])
    _close(out_k[:430], out_r)
    assert np.all(np.asarray(out_k[430:]) == 0)
    _close(dt_k, dt_r)
    if not kw.get("grad_table_only"):
        _close(dx_k[:430], dx_r, rtol=1e-5)
        assert np.all(np.asarray(dx_k[430:]) == 0)
        _close(dm_k, dm_r, rtol=1e-5)


def test_reference_valid_mask_and_shape_check():
    spec = TINY
    table, x, g = _inputs(spec, n=50)
    valid = jnp.arange(50) % 3 != 0
    out, vjp = jax.vjp(lambda t: hk.encode_xla(t, x, spec, None, valid), table)
    ref, vjp_ref = jax.vjp(lambda t: hk.encode_xla(t, x[valid], spec), table)
    _close(out[valid], ref, rtol=1e-5, atol=1e-5)  # eager: fusion-dependent rounding (module docstring)
    assert np.all(np.asarray(out[~valid]) == 0)
    _close(vjp(g)[0], vjp_ref(g[valid])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="valid must have the batch shape"):
        hk.encode_xla(table, x, spec, None, valid[:10])


def test_pre_reduced_backward_on_clustered_points():
    """The block pre-reduction (leader cells) gives the reference's table gradient: points in ray order
    crowding into few cells (what it is for), invalid slots, a switched-off and a fractional level; levels 0-1
    (scales 2, 5) pre-reduced, the finer ones scattered point by point."""
    max_scale = 8.0
    spec = MIXED
    n = 600
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    table = jax.random.normal(k1, (spec.total_params, spec.n_features_per_level), jnp.float32)
    # 40 rays of 15 samples marching from a random start: consecutive points share coarse cells.
    starts = jax.random.uniform(k2, (40, 1, 3), minval=0.2, maxval=0.6)
    steps = jnp.arange(15, dtype=jnp.float32)[None, :, None] * jnp.array([0.011, 0.004, 0.002])
    x = (starts + steps).reshape(n, 3)
    g = jax.random.normal(k3, (n, spec.output_dim), jnp.float32)
    valid = (jnp.arange(n) % 7) != 3
    mask = jnp.ones((spec.n_levels,), jnp.float32).at[1].set(0.0).at[3].set(0.5)

    def ker(t):
        return hk.encode_pallas(t, x, spec, mask, block_points=BLOCK, valid=valid, grad_table_only=True,
                                pre_reduce_max_scale=max_scale)

    dt_k = jax.jit(lambda t: jax.vjp(ker, t)[1](g)[0])(table)
    # Reference: the jnp encoder's vjp on the valid points alone (no mask argument involved).
    keep = np.asarray(valid)
    dt_r = jax.jit(lambda t: jax.vjp(lambda t: hk.encode_xla(t, x[keep], spec, mask), t)[1](g[keep])[0])(table)
    _close(dt_k, dt_r, rtol=1e-5)
    # The leaders really catch most lanes on the coarsest level (else the test exercises nothing new).
    cells = np.floor(np.asarray(x) * spec.scales[0] + 0.5).astype(int)
    blocks = cells.reshape(-1, BLOCK, 3) if n % BLOCK == 0 else cells[: n // BLOCK * BLOCK].reshape(-1, BLOCK, 3)
    shared = np.mean([np.mean(np.all(b == b[0], axis=1)) for b in blocks])
    assert shared > 0.5
