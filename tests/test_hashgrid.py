"""Tests of dreamcraft_jax.fields.hashgrid against independently computed numbers.

The reference below is a deliberately naive per-point / per-level / per-corner loop in plain Python
(float64, Python ints with explicit 32-bit wrapping), sharing no code with the vectorised encoder.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dreamcraft_jax.fields import hashgrid
from dreamcraft_jax.fields.hashgrid import HashGridSpec

OFFICIAL = HashGridSpec(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16,
                        per_level_scale=1.447269237440378)
# Levels 0 (res 3, 27 cells padded to 32 rows) and 1 dense, levels 2..5 hashed (1024 rows each).
SMALL = HashGridSpec(n_levels=6, n_features_per_level=2, log2_hashmap_size=10, base_resolution=3,
                     per_level_scale=2.0)
# Non-integer growth, F = 3: levels 0 and 1 (729 cells padded to 736 rows) dense, 2..4 hashed.
ODD = HashGridSpec(n_levels=5, n_features_per_level=3, log2_hashmap_size=10, base_resolution=5,
                   per_level_scale=1.7)


# ----------------------------------------------------------------------------------------------
# Naive reference
# ----------------------------------------------------------------------------------------------

def _naive_levels(spec):
    """[(scale, res, size, dense, offset)] per level from the written-out tcnn formulas."""
    levels, offset = [], 0
    for l in range(spec.n_levels):
        scale = 2.0 ** (l * math.log2(spec.per_level_scale)) * spec.base_resolution - 1.0
        res = math.ceil(scale) + 1
        size = min((res**3 + 7) // 8 * 8, 2**spec.log2_hashmap_size)
        levels.append((scale, res, size, res**3 <= size, offset))
        offset += size
    return levels


def _naive_corners(x, spec):
    """Per point, per level: list of 8 (row, weight) pairs. x: (N, 3) float64."""
    out = []
    for p in np.asarray(x, np.float64):
        per_level = []
        for scale, res, size, dense, offset in _naive_levels(spec):
            pos = [scale * float(v) + 0.5 for v in p]
            cell = [max(math.floor(v), 0) for v in pos]
            frac = [v - math.floor(v) for v in pos]
            corners = []
            for b in itertools.product((0, 1), repeat=3):
                c = [cell[d] + b[d] for d in range(3)]
                w = 1.0
                for d in range(3):
                    w *= frac[d] if b[d] else 1.0 - frac[d]
                if dense:
                    idx = (c[0] + c[1] * res + c[2] * res * res) & 0xFFFFFFFF
                else:
                    idx = ((c[0] * 1) ^ (c[1] * 2654435761) ^ (c[2] * 805459861)) & 0xFFFFFFFF
                corners.append((offset + idx % size, w))
            per_level.append(corners)
        out.append(per_level)
    return out


def _naive_encode(table, x, spec):
    table = np.asarray(table, np.float64)
    F = spec.n_features_per_level
    out = np.zeros((len(x), spec.n_levels * F))
    for i, per_level in enumerate(_naive_corners(x, spec)):
        for l, corners in enumerate(per_level):
            for row, w in corners:
                out[i, l * F:(l + 1) * F] += w * table[row]
    return out


def _naive_table_grad(x, cot, spec):
    """d sum(encode * cot) / d table as an explicit scatter-add of weight * cotangent."""
    F = spec.n_features_per_level
    grad = np.zeros((spec.total_params, F))
    for i, per_level in enumerate(_naive_corners(x, spec)):
        for l, corners in enumerate(per_level):
            for row, w in corners:
                grad[row] += w * cot[i, l * F:(l + 1) * F]
    return grad


def _points(seed, n=50):
    """n random points in [0,1]^3 plus points exactly on the faces / corners of the unit cube."""
    rng = np.random.default_rng(seed)
    special = np.array([[0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 1], [0.5, 0, 1], [1, 0.25, 0]], np.float64)
    return np.concatenate([rng.uniform(0, 1, (n, 3)), special])


def _random_table(seed, spec):
    """U(-1, 1) table: large enough that any wrong row or weight shows."""
    return np.random.default_rng(seed).uniform(-1, 1, (spec.total_params, spec.n_features_per_level))


# ----------------------------------------------------------------------------------------------
# 1. Spec numbers
# ----------------------------------------------------------------------------------------------

def test_official_spec_numbers():
    # per_level_scale = 2^(8/15) (16 -> 4096 over 15 steps), so scale_l + 1 = 16 * 2^(8l/15) and
    # res_l = ceil(scale_l) + 1 = ceil(16 * 2^(8l/15)): the smallest n with n^15 >= 2^(60 + 8l).
    assert abs(OFFICIAL.per_level_scale - 2 ** (8 / 15)) < 1e-14
    expected_res = []
    for l in range(16):
        n = 1
        while n**15 < 2 ** (60 + 8 * l):
            n += 1
        expected_res.append(n)
    assert expected_res[0] == 16 and expected_res[5] == 102 and expected_res[15] == 4096
    np.testing.assert_array_equal(OFFICIAL.resolutions, expected_res)

    # Levels 0..4 (res 16, 24, 34, 49, 71) fit densely: 71^3 = 357911 -> 357912 <= 2^19; 102^3 does not.
    expected_sizes = [4096, 13824, 39304, 117656, 357912] + [2**19] * 11
    np.testing.assert_array_equal(OFFICIAL.level_sizes, expected_sizes)
    np.testing.assert_array_equal(OFFICIAL.dense, [True] * 5 + [False] * 11)
    np.testing.assert_array_equal(OFFICIAL.offsets, np.cumsum([0] + expected_sizes[:-1]))
    assert OFFICIAL.total_params == 4096 + 13824 + 39304 + 117656 + 357912 + 11 * 524288 == 6299960
    assert OFFICIAL.output_dim == 32
    np.testing.assert_allclose(OFFICIAL.scales[[0, 15]], [15.0, 4095.0], rtol=1e-12)


def test_small_spec_numbers():
    # scale_l = 3 * 2^l - 1 = 2, 5, 11, 23, 47, 95 -> res 3, 6, 12, 24, 48, 96.
    np.testing.assert_array_equal(SMALL.resolutions, [3, 6, 12, 24, 48, 96])
    # 27 -> 32 (dense with padding), 216 (dense), 1728.. > 1024 (hashed).
    np.testing.assert_array_equal(SMALL.level_sizes, [32, 216, 1024, 1024, 1024, 1024])
    np.testing.assert_array_equal(SMALL.dense, [True, True, False, False, False, False])
    np.testing.assert_array_equal(SMALL.offsets, [0, 32, 248, 1272, 2296, 3320])
    assert SMALL.total_params == 4344 and SMALL.output_dim == 12
    # 5 * 1.7^l - 1 = 4, 7.5, 13.45, 23.565, 40.7605 -> res 5, 9, 15, 25, 42;
    # 125 -> 128, 729 -> 736 (dense), 3375 > 1024 (hashed), ...
    np.testing.assert_array_equal(ODD.resolutions, [5, 9, 15, 25, 42])
    np.testing.assert_array_equal(ODD.level_sizes, [128, 736, 1024, 1024, 1024])
    np.testing.assert_array_equal(ODD.dense, [True, True, False, False, False])
    assert ODD.total_params == 3936 and ODD.output_dim == 15


def test_spec_from_config_and_hashable():
    cfg = {"otype": "ProgressiveBandHashGrid", "n_levels": 6, "n_features_per_level": 2, "log2_hashmap_size": 10,
           "base_resolution": 3, "per_level_scale": 2.0, "start_level": 8}
    assert HashGridSpec.from_config(cfg) == SMALL
    assert HashGridSpec.from_config(ml_collections.ConfigDict(cfg)) == SMALL
    assert hash(HashGridSpec.from_config(cfg)) == hash(SMALL)
    with pytest.raises(KeyError):
        HashGridSpec.from_config({"n_levels": 4})
    with pytest.raises(ValueError):
        SMALL.resolutions[0] = 1  # derived arrays are read-only


# ----------------------------------------------------------------------------------------------
# 2. Values
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [SMALL, ODD], ids=["small", "odd"])
def test_encode_matches_naive_float64(spec):
    x = _points(0)
    table = _random_table(1, spec)
    expected = _naive_encode(table, x, spec)
    with jax.enable_x64(True):
        got = jax.jit(hashgrid.encode, static_argnames="spec")(jnp.asarray(table), jnp.asarray(x), spec=spec)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-12)


def test_encode_matches_naive_float32():
    x = _points(2)
    table = _random_table(3, SMALL)
    expected = _naive_encode(table.astype(np.float32), x.astype(np.float32), SMALL)
    got = hashgrid.encode(jnp.asarray(table, jnp.float32), jnp.asarray(x, jnp.float32), SMALL)
    assert got.dtype == jnp.float32 and got.shape == (len(x), 12)
    # float32 positions at scale ~95 carry ~4e-6 absolute error in frac, times table differences <= 2 per
    # dimension: a few 1e-5 at worst.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=5e-5)


def test_encode_batch_shape_and_bfloat16_table():
    x = jnp.asarray(_points(4)[:48].reshape(4, 12, 3), jnp.float32)
    table = jnp.asarray(_random_table(5, SMALL), jnp.float32)
    flat = hashgrid.encode(table, x.reshape(-1, 3), SMALL)
    np.testing.assert_array_equal(np.asarray(hashgrid.encode(table, x, SMALL)), np.asarray(flat).reshape(4, 12, 12))
    out_bf16 = hashgrid.encode(table.astype(jnp.bfloat16), x, SMALL)
    assert out_bf16.dtype == jnp.float32  # positions and blending stay float32


def test_encode_official_spec_smoke():
    table = hashgrid.init_hashgrid(jax.random.key(0), OFFICIAL)
    x = jax.random.uniform(jax.random.key(1), (256, 3))
    out = jax.jit(hashgrid.encode, static_argnames="spec")(table, x, spec=OFFICIAL)
    assert out.shape == (256, 32) and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.max(jnp.abs(out))) <= 1e-4 * (1 + 1e-6)  # convex blend of values in [-1e-4, 1e-4]


# ----------------------------------------------------------------------------------------------
# 3. Gradients
# ----------------------------------------------------------------------------------------------

def test_table_grad_is_naive_scatter_add():
    x = _points(6)
    table = _random_table(7, SMALL)
    cot = np.random.default_rng(8).normal(size=(len(x), SMALL.output_dim))
    expected = _naive_table_grad(x, cot, SMALL)
    assert np.count_nonzero(np.any(expected != 0, axis=1)) > 100  # many rows touched, some several times
    with jax.enable_x64(True):
        grad = jax.jit(jax.grad(lambda t: jnp.sum(hashgrid.encode(t, jnp.asarray(x), SMALL) * cot)))(
            jnp.asarray(table))
        np.testing.assert_allclose(np.asarray(grad), expected, rtol=0, atol=1e-12)
    grad32 = jax.grad(lambda t: jnp.sum(hashgrid.encode(t, jnp.asarray(x, jnp.float32), SMALL) * cot))(
        jnp.asarray(table, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad32), expected, rtol=0, atol=1e-4)


def test_x_grad_matches_finite_differences():
    spec, h = SMALL, 1e-6
    rng = np.random.default_rng(9)
    x = rng.uniform(0.02, 0.98, (400, 3))
    # Keep points whose every level / dimension is at least 1e-3 (>> h * scale ~ 1e-4) from a cell face:
    # within a cell the encoding is multilinear, hence exactly linear along each axis.
    frac = np.stack([(s * x + 0.5) % 1.0 for s in spec.scales], axis=1)  # (N, L, 3)
    x = x[np.all((frac > 1e-3) & (frac < 1 - 1e-3), axis=(1, 2))][:40]
    assert len(x) == 40
    table = _random_table(10, spec)
    cot = rng.normal(size=(len(x), spec.output_dim))
    with jax.enable_x64(True):
        t = jnp.asarray(table)

        def per_point(xx):  # (N,) independent per point
            return jnp.sum(hashgrid.encode(t, xx, spec) * cot, axis=-1)

        grad = np.asarray(jax.grad(lambda xx: jnp.sum(per_point(xx)))(jnp.asarray(x)))
        fd = np.zeros_like(x)
        for d in range(3):
            e = np.zeros(3)
            e[d] = h
            fd[:, d] = (np.asarray(per_point(jnp.asarray(x + e))) - np.asarray(per_point(jnp.asarray(x - e)))) / (2 * h)
    assert np.max(np.abs(grad)) > 10  # fine levels: slopes of order scale * |table|
    np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 4. Level mask
# ----------------------------------------------------------------------------------------------

def test_level_mask_zeroes_features_and_table_grads():
    spec = SMALL
    x = jnp.asarray(_points(11), jnp.float32)
    table = jnp.asarray(_random_table(12, spec), jnp.float32)
    mask_np = np.array([1, 0, 1, 1, 0, 0], np.float32)
    full = np.asarray(hashgrid.encode(table, x, spec)).reshape(len(x), 6, 2)
    masked = np.asarray(hashgrid.encode(table, x, spec, jnp.asarray(mask_np))).reshape(len(x), 6, 2)
    np.testing.assert_array_equal(masked, full * mask_np[:, None])
    assert np.all(masked[:, mask_np == 0] == 0) and np.any(masked[:, mask_np == 1] != 0)

    grad = np.asarray(jax.grad(lambda t: jnp.sum(hashgrid.encode(t, x, spec, jnp.asarray(mask_np)) ** 2))(table))
    for l, (off, size) in enumerate(zip(spec.offsets, spec.level_sizes)):
        rows = grad[off:off + size]
        if mask_np[l]:
            assert np.any(rows != 0), l
        else:
            assert np.all(rows == 0), l


def test_progressive_level_mask_official_schedule():
    # DreamCraft3D threestudio/models/networks.py, ProgressiveBandHashGrid.update_step:
    # n_active = min(start_level + max(step - start_step, 0) // update_steps, n_levels).
    expected_active = {0: 8, 1999: 8, 2000: 8, 2499: 8, 2500: 9, 2999: 9, 3000: 10, 5499: 14, 6000: 16,
                       10**6: 16}
    for step, n in expected_active.items():
        mask = hashgrid.progressive_level_mask(step, OFFICIAL, 8, 2000, 500)
        assert mask.shape == (16,) and mask.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(mask), [1.0] * n + [0.0] * (16 - n), err_msg=str(step))


def test_progressive_level_mask_traced_step_no_recompile():
    traces = []

    @jax.jit
    def f(step):
        traces.append(None)  # runs only while tracing
        return hashgrid.progressive_level_mask(step, OFFICIAL, 8, 2000, 500)

    for step, n in [(0, 8), (2500, 9), (4000, 12), (10**6, 16)]:
        np.testing.assert_array_equal(np.asarray(f(jnp.int32(step))), [1.0] * n + [0.0] * (16 - n))
    assert len(traces) == 1


# ----------------------------------------------------------------------------------------------
# 5. Init
# ----------------------------------------------------------------------------------------------

def test_init_hashgrid():
    table = hashgrid.init_hashgrid(jax.random.key(0), OFFICIAL)
    assert table.shape == (6299960, 2) and table.dtype == jnp.float32
    t = np.asarray(table)
    assert np.all(np.abs(t) <= 1e-4)
    # U(-1e-4, 1e-4): mean 0, std 1e-4 / sqrt(3) ~ 5.77e-5.
    assert abs(t.mean()) < 1e-6 and abs(t.std() - 1e-4 / math.sqrt(3)) < 1e-6
    small = hashgrid.init_hashgrid(jax.random.key(1), SMALL, dtype=jnp.bfloat16)
    assert small.shape == (4344, 2) and small.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(small.astype(jnp.float32)))) <= 1e-4 * (1 + 2**-7)


def test_skip_masked_levels_same_features_and_table_gradient():
    """Skipping switched-off levels changes neither the features nor the table gradient (the mask gradient of
    the skipped levels becomes 0, documented)."""
    spec = HashGridSpec(n_levels=5, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
                        per_level_scale=1.8)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(4), 3)
    table = jax.random.normal(k1, (spec.total_params, 2))
    x = jax.random.uniform(k2, (200, 3))
    g = jax.random.normal(k3, (200, spec.output_dim))
    mask = jnp.array([1.0, 1.0, 0.5, 0.0, 0.0])

    def vjp(**kw):
        out, back = jax.vjp(lambda t, m: hashgrid.encode(t, x, spec, m, **kw), table, mask)
        return out, back(g)

    out, (dt, dm) = jax.jit(lambda: vjp())()
    out_s, (dt_s, dm_s) = jax.jit(lambda: vjp(skip_masked_levels=True))()
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dt_s), np.asarray(dt), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dm_s[:3]), np.asarray(dm[:3]), rtol=1e-5)
    assert np.all(np.asarray(dm_s[3:]) == 0) and np.all(np.asarray(dm[3:]) != 0)
