"""Fused hash-grid + density-MLP Pallas kernel (interpret mode on CPU) against the pure-jnp reference.

The reference composes :func:`dreamcraft_jax.fields.hashgrid.encode` with two float32 matmuls; both sides are
jitted (see tests/test_kernels_hashgrid.py on eager vs fused rounding of ``scale * x + 0.5``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.fields import nerf
from dreamcraft_jax.fields.hashgrid import HashGridSpec
from dreamcraft_jax.kernels import density as dk

# Levels 0 (32 rows) and 1 (216 rows, dense size not a power of two) dense, levels 2..5 hashed.
MIXED = HashGridSpec(n_levels=6, n_features_per_level=2, log2_hashmap_size=10, base_resolution=3,
                     per_level_scale=2.0)
F3 = HashGridSpec(n_levels=3, n_features_per_level=3, log2_hashmap_size=10, base_resolution=5,
                  per_level_scale=1.7)


def _inputs(spec, n, hidden=16, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    table = jax.random.normal(k[0], (spec.total_params, spec.n_features_per_level), jnp.float32)
    x = jax.random.uniform(k[1], (n, 3), jnp.float32)
    w_hidden = jax.random.normal(k[2], (spec.output_dim, hidden), jnp.float32) / np.sqrt(spec.output_dim)
    w_out = jax.random.normal(k[3], (hidden, 1), jnp.float32) / np.sqrt(hidden)
    valid = jax.random.uniform(k[4], (n,)) > 0.3
    return table, x, w_hidden, w_out, valid


def _both(spec, table, x, mask, valid, w_hidden, w_out, block=64):
    ker = jax.jit(lambda *a: dk.density_mlp_pallas(a[0], a[1], spec, a[2], a[3], a[4], a[5],
                                                   block_points=block, interpret=True))
    ref = jax.jit(lambda *a: dk.density_mlp_xla(a[0], a[1], spec, a[2], a[3], a[4], a[5]))
    return np.asarray(ker(table, x, mask, valid, w_hidden, w_out)), np.asarray(ref(table, x, mask, valid,
                                                                                   w_hidden, w_out))


@pytest.mark.parametrize("spec,n", [(MIXED, 300), (F3, 77)])
def test_fused_density_matches_reference(spec, n):
    table, x, w_hidden, w_out, valid = _inputs(spec, n)
    # Level mask with a switched-off level and a fractional one; some invalid points; n not a block multiple.
    mask = jnp.asarray([1.0] * (spec.n_levels - 2) + [0.5, 0.0], jnp.float32)
    got, want = _both(spec, table, x, mask, valid, w_hidden, w_out)
    assert got.shape == (n,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[~np.asarray(valid)] == 0.0)  # invalid points: zero features, bias-free MLP -> 0
    # Independent check of a few points: features from the reference encoder, MLP by numpy in float64.
    from dreamcraft_jax.fields.hashgrid import encode
    enc = np.asarray(jax.jit(lambda t, p, m: encode(t, p, spec, m))(table, x[:5], mask), np.float64)
    by_hand = np.maximum(enc @ np.asarray(w_hidden, np.float64), 0.0) @ np.asarray(w_out, np.float64)
    np.testing.assert_allclose(got[:5][np.asarray(valid[:5])], by_hand[:, 0][np.asarray(valid[:5])],
                               rtol=1e-5, atol=1e-5)


def test_fused_density_blocks_past_the_valid_prefix_are_zero():
    """Packed candidates: a valid prefix (50 of 300, blocks of 64): blocks without a valid point skip their work
    and still write 0, as the reference gives for invalid points."""
    table, x, w_hidden, w_out, _ = _inputs(MIXED, 300, seed=2)
    valid = jnp.arange(300) < 50
    got, want = _both(MIXED, table, x, None, valid, w_hidden, w_out)
    assert np.all(got[50:] == 0.0) and np.any(got[:50] != 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fused_density_no_mask_no_valid_and_tiny_batch():
    table, x, w_hidden, w_out, _ = _inputs(MIXED, 5, hidden=32, seed=1)
    got, want = _both(MIXED, table, x, None, None, w_hidden, w_out)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fused_density_rejects_bad_shapes():
    table, x, w_hidden, w_out, _ = _inputs(MIXED, 8)
    with pytest.raises(ValueError, match="w_hidden"):
        dk.density_mlp_pallas(table, x, MIXED, None, None, w_hidden[:3], w_out, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        dk.density_mlp_pallas(table, x, MIXED, None, None, w_hidden[:, :12], w_out[:12], interpret=True)


def test_field_density_no_grad_uses_kernel_and_matches():
    """nerf.density_no_grad through the fused kernel (interpret) equals stop_gradient(nerf.density)."""
    grid = HashGridSpec(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=16,
                        per_level_scale=2.0)
    spec_x = nerf.NerfFieldSpec(grid=grid, mlp_width=16)
    spec_p = nerf.NerfFieldSpec(grid=grid, mlp_width=16, backend="pallas")
    params = nerf.init_field(jax.random.PRNGKey(0), spec_x)
    params["encoding"] = params["encoding"] + 0.3 * jax.random.normal(jax.random.PRNGKey(1),
                                                                      params["encoding"].shape)
    x = jax.random.uniform(jax.random.PRNGKey(2), (200, 3), minval=-1.0, maxval=1.0)
    valid = jnp.arange(200) < 150
    mask = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    want = jax.jit(lambda p, x: nerf.density(p, x, spec_x, mask, valid))(params, x)
    got = jax.jit(lambda p, x: nerf.density_no_grad(p, x, spec_p, mask, valid, interpret=True))(params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # No gradient flows through it (pruning-pass semantics).
    g = jax.grad(lambda p: jnp.sum(nerf.density_no_grad(p, x, spec_p, mask, valid, interpret=True)))(params)
    assert all(float(jnp.max(jnp.abs(leaf))) == 0.0 for leaf in jax.tree.leaves(g))
