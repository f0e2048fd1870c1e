"""Finite-difference neighbour encodings as one Pallas kernel (interpret mode) against the jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.fields.hashgrid import HashGridSpec
from dreamcraft_jax.kernels import fd_hashgrid as fk

# Level 0 dense (1728 rows: not a power of two), level 1 hashed; grid scales 11 and 47 (two levels only: the
# interpret-mode program unrolls 6 neighbours x 8 corners per level and compiles slowly).
MIXED = HashGridSpec(n_levels=2, n_features_per_level=2, log2_hashmap_size=11, base_resolution=12,
                     per_level_scale=4.0)
# F = 3 (not a power of two): feature chunks of one.
F3 = HashGridSpec(n_levels=2, n_features_per_level=3, log2_hashmap_size=10, base_resolution=5,
                  per_level_scale=3.0)
RADIUS = 2.0


def _samples(n, seed=0):
    """Rays of consecutive samples (as the renderer packs them), some near the box faces (clipped neighbours)."""
    k1, k3 = jax.random.split(jax.random.key(seed), 2)
    rays = n // 10
    starts = jax.random.uniform(k1, (rays, 1, 3), minval=-1.9, maxval=1.0)
    steps = jnp.arange(10, dtype=jnp.float32)[None, :, None] * jnp.array([0.09, 0.05, -0.03])
    x = (starts + steps).reshape(-1, 3)
    x = x.at[:4].set(jnp.array([[1.999, 0.0, 0.0], [-1.9995, 0.3, 0.1], [0.0, 2.0, -2.0], [0.5, 0.5, 1.998]]))
    valid = (jnp.arange(x.shape[0]) % 9) != 4
    return x, valid, k3


@pytest.mark.parametrize("spec,eps,max_scale,neighbours", [
    pytest.param(MIXED, 0.01, 128.0, fk.CENTRAL, id="official_eps"),
    pytest.param(F3, 0.6, 0.0, fk.CENTRAL, id="F3_wide_eps_no_prereduce", marks=pytest.mark.slow),
    pytest.param(MIXED, 0.01, 20.0, fk.CENTRAL, id="coarse_prereduced_fine_plain", marks=pytest.mark.slow),
    pytest.param(MIXED, 0.01, 128.0, fk.FORWARD, id="forward_official_eps"),
    pytest.param(MIXED, 0.01, 20.0, (fk.CENTER,) + fk.FORWARD, id="center_forward")])
def test_fd_encode_values_and_table_grad_match_reference(spec, eps, max_scale, neighbours):
    x, valid, key = _samples(100)
    n = x.shape[0]
    table = jax.random.normal(key, (spec.total_params, spec.n_features_per_level), jnp.float32)
    mask = jnp.array([0.5, 1.0]) if max_scale else jnp.array([1.0, 0.0])  # fractional / switched-off level
    gs = tuple(jax.random.normal(k, (n, spec.output_dim), jnp.float32)
               for k in jax.random.split(key, len(neighbours)))

    def run(fn):
        def f(t):
            out, back = jax.vjp(lambda t: fn(t, x, spec, RADIUS, eps, mask, valid, neighbours=neighbours), t)
            return out, back(gs)[0]
        return jax.jit(f)(table)

    out_k, dt_k = run(lambda *a, **k: fk.fd_encode_pallas(*a, **k, interpret=True, block_points=64,
                                                          pre_reduce_max_scale=max_scale))
    out_r, dt_r = run(fk.fd_encode_xla)
    assert len(out_k) == len(neighbours)
    for a, b in zip(out_k, out_r):
        # 1e-5: the two programs round x * resolution (up to 4096 cells) differently by an ulp, which moves a
        # trilinear weight by ~1e-6; a wrong corner, weight or offset is off by 1e-2 or more.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(a)[~np.asarray(valid)] == 0.0)
    scale = float(jnp.max(jnp.abs(dt_r)))
    np.testing.assert_allclose(np.asarray(dt_k), np.asarray(dt_r), rtol=1e-5, atol=1e-6 * scale)


def test_blocks_without_valid_samples_write_zeros_and_add_nothing():
    """The packed samples' valid prefix (here 40 of 200, blocks of 64: the last two blocks have no valid sample)
    and a switched-off level: those programs skip their work, and still give zero features and no gradient."""
    x, _, key = _samples(200, seed=3)
    valid = jnp.arange(x.shape[0]) < 40
    spec, n = MIXED, x.shape[0]
    table = jax.random.normal(key, (spec.total_params, 2), jnp.float32)
    mask = jnp.array([1.0, 0.0])
    neighbours = (fk.CENTER,) + fk.FORWARD
    gs = tuple(jax.random.normal(k, (n, spec.output_dim)) for k in jax.random.split(key, len(neighbours)))

    def run(fn, **kw):
        def f(t):
            out, back = jax.vjp(lambda t: fn(t, x, spec, RADIUS, 0.01, mask, valid, neighbours=neighbours, **kw), t)
            return out, back(gs)[0]
        return jax.jit(f)(table)

    out_k, dt_k = run(fk.fd_encode_pallas, interpret=True, block_points=64)
    out_r, dt_r = run(fk.fd_encode_xla)
    for a, b in zip(out_k, out_r):
        assert np.all(np.asarray(a)[40:] == 0.0) and np.all(np.asarray(a)[:, 2:] == 0.0)  # level 1 is off
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dt_k), np.asarray(dt_r), rtol=1e-5,
                               atol=1e-6 * float(jnp.max(jnp.abs(dt_r))))
    assert float(jnp.max(jnp.abs(dt_k[spec.offsets[1]:]))) == 0.0  # nothing added to the switched-off level


@pytest.mark.parametrize("spec", [pytest.param(MIXED, id="F2"), pytest.param(F3, id="F3", marks=pytest.mark.slow)])
def test_columns_layout_is_the_transposed_encoding_with_the_same_gradient(spec):
    """``columns=True``: each encoding (L*F, N) equals the row layout transposed (including the zeros of blocks
    without a valid sample), and the table gradient of transposed cotangents is the row layout's."""
    x, _, key = _samples(130, seed=5)
    valid = jnp.arange(x.shape[0]) < 50  # blocks of 64: the last two have no valid sample
    n = x.shape[0]
    table = jax.random.normal(key, (spec.total_params, spec.n_features_per_level), jnp.float32)
    mask = jnp.array([1.0, 0.5])
    neighbours = (fk.CENTER,) + fk.FORWARD
    gs = tuple(jax.random.normal(k, (n, spec.output_dim)) for k in jax.random.split(key, len(neighbours)))

    def run(columns):
        def f(t):
            out, back = jax.vjp(lambda t: fk.fd_encode_pallas(t, x, spec, RADIUS, 0.01, mask, valid,
                                                              neighbours=neighbours, interpret=True,
                                                              block_points=64, columns=columns), t)
            return out, back(tuple(g.T for g in gs) if columns else gs)[0]
        return jax.jit(f)(table)

    (rows, dt_rows), (cols, dt_cols) = run(False), run(True)
    for a, b in zip(rows, cols):
        assert b.shape == (spec.output_dim, n)
        # Same arithmetic; the CPU compiles the two interpret-mode programs apart (an ulp of FMA contraction).
        np.testing.assert_allclose(np.asarray(b), np.asarray(a).T, rtol=1e-6, atol=1e-6)
        assert np.all(np.asarray(b)[:, 64:] == 0.0)  # the blocks without a valid sample
    assert float(jnp.max(jnp.abs(rows[0]))) > 0
    np.testing.assert_allclose(np.asarray(dt_cols), np.asarray(dt_rows), rtol=1e-6,
                               atol=1e-7 * float(jnp.max(jnp.abs(dt_rows))))


def test_fd_encode_shares_corners_on_coarse_levels():
    """The case the kernel is for: with eps much smaller than the cells, most neighbours share the own cell,
    and the independent per-point encoder still agrees (so sharing is not just never taken)."""
    x, valid, key = _samples(100, seed=1)
    spec = MIXED
    units = jnp.clip((x + RADIUS) / (2 * RADIUS), 0, 1)
    cells = np.floor(np.asarray(units) * spec.scales[0] + 0.5)
    shifted = np.floor(np.clip((np.asarray(x) + 0.01 + RADIUS) / (2 * RADIUS), 0, 1) * spec.scales[0] + 0.5)
    assert np.mean(np.all(cells == shifted, axis=1)) > 0.9
    table = jax.random.normal(key, (spec.total_params, 2), jnp.float32)
    got = jax.jit(lambda t: fk.fd_encode_pallas(t, x, spec, RADIUS, 0.01, None, None, interpret=True))(table)
    want = jax.jit(lambda t: fk.fd_encode_xla(t, x, spec, RADIUS, 0.01))(table)
    # Positions may round differently by one ulp where XLA fuses (p + r) / 2r differently in the two programs
    # (the reference jitted alone): up to ~1e-5 on the finest level, as in tests/test_kernels_hashgrid.py.
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=5e-5)


def test_fd_encode_argument_checks():
    table = jnp.zeros((MIXED.total_params, 2), jnp.float32)
    with pytest.raises(ValueError, match="eps"):
        fk.fd_encode_pallas(table, jnp.zeros((4, 3)), MIXED, RADIUS, 0.0, interpret=True)
    with pytest.raises(ValueError, match="x must be"):
        fk.fd_encode_pallas(table, jnp.zeros((4, 2)), MIXED, RADIUS, 0.01, interpret=True)
    with pytest.raises(ValueError, match="neighbours"):
        fk.fd_encode_pallas(table, jnp.zeros((4, 3)), MIXED, RADIUS, 0.01, neighbours=((3, 1),), interpret=True)


def _field_case(seed=0, normal_type="finite_difference"):
    from dreamcraft_jax.fields import nerf

    grid = HashGridSpec(n_levels=2, n_features_per_level=2, log2_hashmap_size=11, base_resolution=4,
                        per_level_scale=3.0)
    spec_x = nerf.NerfFieldSpec(grid=grid, mlp_width=16, finite_difference_eps=0.02, normal_type=normal_type)
    spec_k = nerf.NerfFieldSpec(grid=grid, mlp_width=16, finite_difference_eps=0.02, backend="pallas",
                                fused_finite_difference=True, normal_type=normal_type)
    params = nerf.init_field(jax.random.PRNGKey(seed), spec_x)
    params["encoding"] = 0.5 * jax.random.normal(jax.random.PRNGKey(seed + 1), params["encoding"].shape)
    x, valid, _ = _samples(40, seed)
    x = 0.6 * x
    return nerf, spec_x, spec_k, params, x, valid


@pytest.mark.parametrize("normal_type", ["finite_difference", "finite_difference_laplacian"])
def test_nerf_normals_through_the_kernel_match_xla_values_and_grads(normal_type):
    nerf, spec_x, spec_k, params, x, valid = _field_case(normal_type=normal_type)
    mask = jnp.array([1.0, 0.5])
    assert nerf.uses_fd_kernel(spec_k, spec_k.normal_type) and not nerf.uses_fd_kernel(spec_x, spec_x.normal_type)
    w = jax.random.normal(jax.random.PRNGKey(7), (x.shape[0], 3))

    def loss(p, spec):
        # As the renderer calls it: the sample's own density passed in (forward differences reuse it).
        center = nerf.density(p, x, spec, mask, valid)
        return jnp.sum(w * nerf.normals(p, x, spec, mask, valid, center=center))

    _assert_same_loss_and_grads(loss, params, spec_x, spec_k)


@pytest.mark.parametrize("columns", [False, True], ids=["rows", "columns"])
def test_nerf_main_pass_and_perturbed_normals_through_the_kernel_match_xla(columns):
    """The renderer's main pass with normals (x's own encoding from the finite-difference kernel, led by CENTER)
    and the perturbed points' normals (no centre given: the kernel encodes the centre too) against the XLA field:
    sigma, albedo, normals and all parameter gradients; also with the kernel's transposed layout
    (``kernels.fd_columns``)."""
    import dataclasses

    nerf, spec_x, spec_k, params, x, valid = _field_case(seed=4)
    spec_k = dataclasses.replace(spec_k, fd_columns=columns)
    mask = jnp.array([1.0, 0.5])
    w = jax.random.normal(jax.random.PRNGKey(8), (x.shape[0], 7))

    def loss(p, spec):
        sigma, albedo, normal = nerf.density_albedo_and_normals(p, x, spec, mask, valid)
        perturbed = nerf.normals(p, x + 0.01, spec, mask, valid)
        out = jnp.concatenate([jnp.log1p(sigma)[:, None], albedo, normal * perturbed], axis=1)
        return jnp.sum(w * out)

    _assert_same_loss_and_grads(loss, params, spec_x, spec_k)


def _assert_same_loss_and_grads(loss, params, spec_ref, spec_kernel):
    """loss(params, spec) and its params gradient agree between the XLA and the kernel field specs (FD normals
    divide rounding differences of the encodings by 2 eps: a looser bound than the encodings')."""
    (l_x, g_x), (l_k, g_k) = (jax.jit(jax.value_and_grad(lambda p, s=s: loss(p, s)))(params)
                              for s in (spec_ref, spec_kernel))
    np.testing.assert_allclose(float(l_k), float(l_x), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                                   atol=2e-4 * float(np.max(np.abs(np.asarray(b)))))


@pytest.mark.parametrize("normal_type,columns", [
    pytest.param("finite_difference", False, id="forward"),
    pytest.param("finite_difference_laplacian", False, id="central", marks=pytest.mark.slow),
    pytest.param("finite_difference", True, id="columns")])
def test_neus_sdf_gradient_through_the_kernel_matches_xla(normal_type, columns):
    import dataclasses

    from dreamcraft_jax.fields import neus

    nerf, spec_x, spec_k, params, x, valid = _field_case(seed=2)
    spec_k = dataclasses.replace(spec_k, fd_columns=columns)
    nspec_x = neus.NeusFieldSpec(base=spec_x, finite_difference_eps=0.02, normal_type=normal_type)
    nspec_k = dataclasses.replace(nspec_x, base=spec_k)
    nparams = neus.init_field(jax.random.PRNGKey(3), nspec_x, params)

    dirs = jnp.tile(jnp.array([[0.6, 0.0, -0.8]]), (x.shape[0], 1))
    dts = jnp.full((x.shape[0],), 0.05)

    def loss(p, s):
        # sdf_gradient without a centre, and the main pass (own encoding from the finite-difference kernel).
        sigma, albedo, normal, grad = neus.alpha_radiance(p, x, dirs, dts, 100, s, None, valid)
        return (jnp.sum(jnp.square(neus.sdf_gradient(p, x + 0.01, s, None, valid))) + jnp.sum(jnp.log1p(sigma))
                + jnp.sum(albedo * normal) + jnp.sum(jnp.square(grad)))

    _assert_same_loss_and_grads(loss, nparams, nspec_x, nspec_k)


@pytest.mark.parametrize("normal_type", ["finite_difference", "finite_difference_laplacian"])
def test_finite_differences_of_a_quadratic_field_in_closed_form(normal_type):
    """f(x) = a.x + b x0^2: forward differences give a + b (2 x0 + eps) e0 (the official ``finite_difference``),
    central ones a + 2 b x0 e0 (``finite_difference_laplacian``); a passed centre value is the same as
    none; neighbours past the box are clamped to it (as the official geometry clamps)."""
    from dreamcraft_jax.fields import nerf

    a, b, eps = jnp.array([0.3, -1.2, 2.0]), 0.7, 0.05
    x = jnp.array([[0.1, 0.2, -0.3], [-0.5, 0.0, 0.4], [1.0, 0.5, 0.5]])

    def f(p, v=None):
        return p @ a + b * p[:, 0] ** 2

    grad = nerf.finite_difference_gradient(f, x, eps, 2.0, normal_type=normal_type)
    x0 = np.asarray(x[:, 0])
    d0 = 2 * b * x0 + (b * eps if normal_type == "finite_difference" else 0.0)
    want = np.stack([0.3 + d0, np.full(3, -1.2), np.full(3, 2.0)], axis=1)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-4)
    if normal_type == "finite_difference":
        with_center = nerf.finite_difference_gradient(f, x, eps, 2.0, normal_type=normal_type, center=f(x))
        np.testing.assert_array_equal(np.asarray(with_center), np.asarray(grad))
    # At the box face x0 = radius the +x neighbour is clamped back onto the face: no difference along x0.
    edge = nerf.finite_difference_gradient(f, jnp.array([[2.0, 0.0, 0.0]]), eps, 2.0, normal_type="finite_difference")
    assert float(edge[0, 0]) == 0.0


def test_fd_columns_config_reaches_both_field_specs():
    """kernels.fd_columns (on by default) is the NeRF and the NeuS field specs' fd_columns, through the run's
    KernelSpec."""
    from conftest import tiny_config
    from dreamcraft_jax.fields import nerf, neus
    from dreamcraft_jax.kernels.spec import KernelSpec

    assert tiny_config().kernels.fd_columns
    for value in (True, False):
        cfg = tiny_config(**{"kernels.fd_columns": value})
        kernels = KernelSpec.from_config(cfg.kernels)
        assert nerf.NerfFieldSpec.from_config(cfg.field, kernels).fd_columns is value
        assert neus.NeusFieldSpec.from_config(cfg, kernels).base.fd_columns is value
