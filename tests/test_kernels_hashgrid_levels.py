"""kernels.hashgrid_levels (one level per program; CPU interpret mode) against the pure-jnp reference encoder:
features and table gradient, with dense and hashed levels, F not a power of two, switched-off levels, invalid
points and the coarse levels' block pre-reduction; and the Triton program it lowers to is a fraction of the
unrolled encoder's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.fields import hashgrid as ref
from dreamcraft_jax.fields.hashgrid import HashGridSpec
from dreamcraft_jax.kernels import hashgrid_levels as hl

MIXED = HashGridSpec(n_levels=6, n_features_per_level=2, log2_hashmap_size=10, base_resolution=3,
                     per_level_scale=2.0)  # levels 0-1 dense (1: 216 rows), 2-5 hashed
F3 = HashGridSpec(n_levels=3, n_features_per_level=3, log2_hashmap_size=10, base_resolution=5,
                  per_level_scale=1.7)  # F = 3: feature by feature


def _case(spec, n, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    table = jax.random.normal(k[0], (spec.total_params, spec.n_features_per_level), jnp.float32)
    # Points in ray order (runs of nearby points share cells, as the renderer's packed samples do).
    start = jax.random.uniform(k[1], (n // 8 + 1, 1, 3))
    x = jnp.clip(start + 0.01 * jnp.arange(8.0)[None, :, None] * jax.random.normal(k[2], (n // 8 + 1, 1, 3)),
                 0.0, 1.0).reshape(-1, 3)[:n]
    g = jax.random.normal(k[3], (n, spec.output_dim), jnp.float32)
    return table, x, g


@pytest.mark.parametrize("spec, pre_reduce", [(MIXED, 0.0), (MIXED, 8.0), (F3, 0.0)])
def test_features_and_table_gradient_match_the_reference(spec, pre_reduce):
    n = 300  # not a multiple of the block
    table, x, g = _case(spec, n)
    mask = jnp.asarray([1.0] * (spec.n_levels - 1) + [0.0])  # the last level switched off
    valid = jnp.arange(n) % 7 != 3

    def run(fn):
        out, vjp = jax.vjp(lambda t: fn(t), table)
        return out, vjp(g)[0]

    kernel = jax.jit(lambda: run(lambda t: hl.encode_levels_pallas(
        t, x, spec, mask, valid, interpret=True, block_points=64, pre_reduce_max_scale=pre_reduce)))
    reference = jax.jit(lambda: run(lambda t: ref.encode(t, x, spec, mask, valid, skip_masked_levels=True)))
    (out_k, dt_k), (out_r, dt_r) = kernel(), reference()
    # Same rows and weight order; the level's scale is a loaded value here, a constant in the reference, so
    # XLA may contract scale * x + 0.5 differently (ulps of the cell fraction).
    np.testing.assert_allclose(out_k, out_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dt_k, dt_r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(dt_r))))
    assert not np.any(np.asarray(out_k)[~np.asarray(valid)])  # invalid points: zero features
    off = slice(spec.offsets[-1], spec.offsets[-1] + spec.level_sizes[-1])
    assert not np.any(np.asarray(dt_k)[off])  # the switched-off level gets no gradient


def test_bad_input_is_one_clear_error():
    table, x, _ = _case(MIXED, 16)
    with pytest.raises(ValueError, match="table must be float32"):
        hl.encode_levels_pallas(table.astype(jnp.bfloat16), x, MIXED, interpret=True)
    with pytest.raises(ValueError, match="x must be"):
        hl.encode_levels_pallas(table, x[:, :2], MIXED, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        hl.encode_levels_pallas(table, x, MIXED, interpret=True, block_points=96)



def test_fields_with_the_per_level_encoder_match_the_unrolled_one(monkeypatch):
    """``kernels.encoder_per_level``: the NeRF field's density, value and parameter gradients, as with the unrolled
    encoder (both Pallas, the `reduced` backward, interpret mode)."""
    from dreamcraft_jax.config import base_config
    from dreamcraft_jax.fields import nerf
    from dreamcraft_jax.kernels.spec import KernelSpec

    cfg = base_config()
    cfg.field.hashgrid.n_levels = 4
    cfg.field.hashgrid.log2_hashmap_size = 12
    x = jax.random.uniform(jax.random.PRNGKey(3), (32, 3), minval=-0.6, maxval=0.6)
    calls, original = [], hl.encode_levels_pallas
    monkeypatch.setattr(hl, "encode_levels_pallas", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = []
    for per_level in (False, True):
        kernels = KernelSpec(backend="pallas", hashgrid_backward="reduced", fused_finite_difference=True,
                             encoder_per_level=per_level)
        spec = nerf.NerfFieldSpec.from_config(cfg.field, kernels)
        params = nerf.init_field(jax.random.PRNGKey(0), spec)
        loss = lambda p: jnp.sum(nerf.density(p, x, spec) ** 2)  # noqa: E731 (normals: the FD kernel, not this one)
        n_before = len(calls)
        out.append(jax.value_and_grad(loss)(params))
        assert (len(calls) > n_before) == per_level
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[0][1])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6 + 1e-4 * float(np.max(np.abs(b))))
