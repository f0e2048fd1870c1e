"""kernels.mlp: the fields' one-hidden-layer MLPs (scalar density / SDF, 3-output albedo) as Pallas kernels (CPU
interpret mode) against the pure-jnp reference, values and all three gradients; the fields use them only where asked
and where they apply."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.kernels import mlp as mk
from dreamcraft_jax.kernels.spec import KernelSpec


def _inputs(n, d=32, h=64, seed=0, k_out=1):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    enc = jax.random.normal(k[0], (n, d), jnp.float32)
    w_hidden = jax.random.normal(k[1], (d, h), jnp.float32) / np.sqrt(d)
    w_out = jax.random.normal(k[2], (h, k_out), jnp.float32) / np.sqrt(h)
    g = jax.random.normal(k[3], (n,) if k_out == 1 else (n, k_out), jnp.float32)
    return enc, w_hidden, w_out, g


@pytest.mark.parametrize("n, block, k_out", [(300, 128, 1), (64, 16, 1), (1, 128, 1), (300, 128, 3)])
def test_values_and_gradients_match_the_reference(n, block, k_out):
    """Forward and the gradients w.r.t. enc, w_hidden and w_out of sum(g * y) equal the reference's (full float32
    on CPU), with N not a multiple of the block (zero padding rows add nothing to the weight gradients); scalar
    nets through ``mlp1_pallas`` (N,), the 3-output albedo net through ``mlp_pallas`` (N, 3)."""
    enc, w_hidden, w_out, g = _inputs(n, k_out=k_out)
    pallas, xla = (mk.mlp1_pallas, mk.mlp1_xla) if k_out == 1 else (mk.mlp_pallas, mk.mlp_xla)
    kernel = lambda e, a, b: pallas(e, a, b, interpret=True, block_rows=block)  # noqa: E731
    out = kernel(enc, w_hidden, w_out)
    assert out.shape == g.shape
    np.testing.assert_allclose(out, xla(enc, w_hidden, w_out), rtol=1e-5, atol=1e-5)
    grads_k = jax.grad(lambda *a: jnp.sum(g * kernel(*a)), argnums=(0, 1, 2))(enc, w_hidden, w_out)
    grads_r = jax.grad(lambda *a: jnp.sum(g * xla(*a)), argnums=(0, 1, 2))(enc, w_hidden, w_out)
    for name, a, b in zip(("enc", "w_hidden", "w_out"), grads_k, grads_r):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("k_out", [1, 3])
def test_valid_rows_match_the_reference_and_empty_blocks_write_zeros(k_out):
    """``valid``: rows where it is False give 0 and take no gradient, as in the reference. The mask has a valid
    prefix, whole blocks without a valid row (the kernel skips those and writes zeros), and a mixed block; the
    invalid rows carry nonzero features, so a skipped block that left its output unwritten or ran the net would
    differ from the reference."""
    n, block = 300, 32
    enc, w_hidden, w_out, g = _inputs(n, k_out=k_out, seed=5)
    valid = (jnp.arange(n) < 70) | (jnp.arange(n) % 97 == 0)  # blocks 0-1 valid, 2 mixed, 3+ mostly empty
    pallas, xla = (mk.mlp1_pallas, mk.mlp1_xla) if k_out == 1 else (mk.mlp_pallas, mk.mlp_xla)
    kernel = lambda e, a, b: pallas(e, a, b, valid=valid, interpret=True, block_rows=block)  # noqa: E731
    ref = lambda e, a, b: xla(e, a, b, valid)  # noqa: E731
    out = kernel(enc, w_hidden, w_out)
    np.testing.assert_allclose(out, ref(enc, w_hidden, w_out), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[~np.asarray(valid)] == 0.0)
    assert np.any(np.asarray(xla(enc, w_hidden, w_out))[~np.asarray(valid)] != 0.0)  # the mask matters here
    grads_k = jax.grad(lambda *a: jnp.sum(g * kernel(*a)), argnums=(0, 1, 2))(enc, w_hidden, w_out)
    grads_r = jax.grad(lambda *a: jnp.sum(g * ref(*a)), argnums=(0, 1, 2))(enc, w_hidden, w_out)
    for name, a, b in zip(("enc", "w_hidden", "w_out"), grads_k, grads_r):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.all(np.asarray(grads_k[0])[~np.asarray(valid)] == 0.0)
    with pytest.raises(ValueError, match="need valid"):
        pallas(enc, w_hidden, w_out, valid=valid[:10], interpret=True)


@pytest.mark.parametrize("k_out", [1, 3])
def test_columns_layout_takes_the_transposed_features_and_gives_their_gradient_so(k_out):
    """``columns=True``: enc given as (D, N) (the finite-difference kernel's column layout) gives the reference's
    values, weight gradients and the enc gradient transposed, with valid / mixed / empty blocks."""
    n, block = 300, 32
    enc, w_hidden, w_out, g = _inputs(n, k_out=k_out, seed=6)
    valid = (jnp.arange(n) < 70) | (jnp.arange(n) % 97 == 0)
    pallas, xla = (mk.mlp1_pallas, mk.mlp1_xla) if k_out == 1 else (mk.mlp_pallas, mk.mlp_xla)
    kernel = lambda e_t, a, b: pallas(e_t, a, b, valid=valid, interpret=True, block_rows=block,  # noqa: E731
                                      columns=True)
    ref = lambda e, a, b: xla(e, a, b, valid)  # noqa: E731
    np.testing.assert_allclose(kernel(enc.T, w_hidden, w_out), ref(enc, w_hidden, w_out), rtol=1e-5, atol=1e-5)
    grads_k = jax.grad(lambda *a: jnp.sum(g * kernel(*a)), argnums=(0, 1, 2))(enc.T, w_hidden, w_out)
    grads_r = jax.grad(lambda *a: jnp.sum(g * ref(*a)), argnums=(0, 1, 2))(enc, w_hidden, w_out)
    assert grads_k[0].shape == enc.T.shape
    for name, a, b in zip(("enc", "w_hidden", "w_out"), (grads_k[0].T, *grads_k[1:]), grads_r):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match=r"need enc\^T \(D, N\)"):
        pallas(enc, w_hidden, w_out, interpret=True, columns=True)


def test_relu_gate_by_hand():
    """A hand-computed case: hidden units below zero pass neither value nor gradient."""
    enc = jnp.asarray(np.eye(16, dtype=np.float32)[:2])  # rows e0, e1
    w_hidden = np.zeros((16, 16), np.float32)
    w_hidden[0, 0], w_hidden[1, 0], w_hidden[0, 1] = 2.0, -3.0, 1.0  # e0 -> h = (2, 1), e1 -> h = (-3, 0)
    w_out = np.zeros((16, 1), np.float32)
    w_out[0, 0], w_out[1, 0] = 0.5, 4.0
    y = mk.mlp1_pallas(enc, jnp.asarray(w_hidden), jnp.asarray(w_out), interpret=True)
    np.testing.assert_allclose(y, [2 * 0.5 + 1 * 4.0, 0.0])
    d_enc = jax.grad(lambda e: jnp.sum(mk.mlp1_pallas(e, jnp.asarray(w_hidden), jnp.asarray(w_out),
                                                      interpret=True)))(enc)
    # Row e0: dy/dh = w_out on both active units; d_enc = w_hidden @ that = (2*0.5 + 1*4, -3*0.5, 0...).
    np.testing.assert_allclose(d_enc[0, :2], [5.0, -1.5])
    np.testing.assert_allclose(d_enc[1], 0.0)  # every hidden unit of e1 is off


def test_bad_shapes_are_one_clear_error():
    enc, w_hidden, w_out, _ = _inputs(8)
    with pytest.raises(ValueError, match="need enc"):
        mk.mlp1_pallas(enc, w_hidden, w_out[:32], interpret=True)  # H of w_out != H of w_hidden
    with pytest.raises(ValueError, match="powers of two"):
        mk.mlp1_pallas(enc[:, :24], w_hidden[:24], w_out, interpret=True)
    with pytest.raises(ValueError, match="scalar net"):
        mk.mlp1_pallas(enc, w_hidden, jnp.zeros((64, 3)), interpret=True)
    with pytest.raises(ValueError, match="K <= "):
        mk.mlp_pallas(enc, w_hidden, jnp.zeros((64, mk.MAX_OUTPUTS + 1)), interpret=True)
    assert mk.supported(32, 64) and not mk.supported(8, 64) and not mk.supported(32, 48)
    assert mk.supported(32, 64, 3) and not mk.supported(32, 64, 0)


def test_fields_use_the_kernel_only_where_asked(monkeypatch):
    """kernels.fused_mlp routes the density MLP (and its finite-difference normals) and the albedo MLP through the
    kernel on the Pallas backend, with the values and parameter gradients of the XLA path; off, or with the XLA
    backend, the kernel is not called."""
    from dreamcraft_jax.config import base_config
    from dreamcraft_jax.fields import nerf

    cfg = base_config()
    cfg.field.hashgrid.n_levels = 8  # L*F = 16: the smallest width the kernel takes
    cfg.field.hashgrid.log2_hashmap_size = 12
    calls = []
    original = mk.mlp_pallas
    monkeypatch.setattr(mk, "mlp_pallas", lambda *a, **k: calls.append(a[2].shape[1]) or original(*a, **k))
    x = jax.random.uniform(jax.random.PRNGKey(1), (50, 3), minval=-0.6, maxval=0.6)
    results = {}
    for backend, fused in (("xla", True), ("pallas", False), ("pallas", True)):
        spec = nerf.NerfFieldSpec.from_config(cfg.field, KernelSpec(backend=backend, fused_mlp=fused))
        params = nerf.init_field(jax.random.PRNGKey(0), spec)
        n_before = len(calls)

        def loss(p):
            sigma, albedo = nerf.density_and_albedo(p, x, spec)
            return jnp.sum(sigma) + jnp.sum(jnp.sin(3.0 * albedo)) + jnp.sum(nerf.normals(p, x, spec) ** 3)

        value, grads = jax.value_and_grad(loss)(params)
        results[(backend, fused)] = (value, grads)
        assert (len(calls) > n_before) == (backend == "pallas" and fused)
        if backend == "pallas" and fused:
            assert set(calls[n_before:]) == {1, 3}  # the density net and the albedo net
    ref_value, ref_grads = results[("pallas", False)]
    value, grads = results[("pallas", True)]
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_neus_sdf_uses_the_kernel_with_the_same_gradients():
    """The NeuS SDF net (and its finite-difference gradient) through the kernel equals the XLA path; so does the
    main pass (``alpha_radiance``) with the finite-difference kernel's column layout read by the MLP kernel."""
    from dreamcraft_jax.config import base_config
    from dreamcraft_jax.fields import neus

    cfg = base_config()
    cfg.field.hashgrid.n_levels = 8
    cfg.field.hashgrid.log2_hashmap_size = 12
    x = jax.random.uniform(jax.random.PRNGKey(2), (40, 3), minval=-0.6, maxval=0.6)
    out = []
    for fused in (False, True):
        spec = neus.NeusFieldSpec.from_config(cfg, KernelSpec(backend="pallas", fused_mlp=fused))
        params = neus.init_field(jax.random.PRNGKey(0), spec)
        loss = lambda p: jnp.sum(neus.sdf(p, x, spec) ** 2) + jnp.sum(neus.sdf_gradient(p, x, spec) ** 2)  # noqa: E731
        out.append(jax.value_and_grad(loss)(params))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[0][1])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    dirs = jnp.tile(jnp.array([[0.0, 0.6, -0.8]]), (x.shape[0], 1))
    out = []
    for fused in (False, True):
        kernels = KernelSpec(backend="pallas", hashgrid_backward="reduced", fused_finite_difference=True,
                             fused_mlp=fused, fd_columns=fused)
        spec = neus.NeusFieldSpec.from_config(cfg, kernels)
        params = neus.init_field(jax.random.PRNGKey(0), spec)

        def loss(p, spec=spec):
            sigma, albedo, normal, grad = neus.alpha_radiance(p, x, dirs, jnp.full((x.shape[0],), 0.05), 100, spec)
            return jnp.sum(jnp.log1p(sigma)) + jnp.sum(albedo * normal) + jnp.sum(grad ** 2)

        out.append(jax.jit(jax.value_and_grad(loss))(params))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[0][1])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * float(np.max(np.abs(b))) + 1e-6)


@pytest.mark.parametrize("fd_columns", [False, True], ids=["rows", "columns"])
def test_gpu_default_field_path_matches_xla(monkeypatch, fd_columns):
    """The GPU defaults together: finite-difference kernel with the sample's own encoding (CENTER), fused density
    and albedo MLPs, on the renderer's main pass with normals over packed samples (a valid prefix, then blocks
    with none, which the kernels skip): sigma, albedo, normals and every parameter gradient equal the XLA
    field's, and every MLP kernel call gets the samples' mask; with ``kernels.fd_columns`` every MLP kernel call
    reads the finite-difference kernel's column layout as it is."""
    from dreamcraft_jax.config import base_config
    from dreamcraft_jax.fields import nerf

    cfg = base_config()
    cfg.field.hashgrid.n_levels = 8  # L*F = 16: the smallest width the MLP kernel takes
    cfg.field.hashgrid.log2_hashmap_size = 10
    n = 300  # MLP blocks of 128: one mixed, two without a valid sample
    x = jax.random.uniform(jax.random.PRNGKey(3), (n, 3), minval=-0.6, maxval=0.6)
    valid = jnp.arange(n) < 100
    w = jax.random.normal(jax.random.PRNGKey(4), (n, 7))
    masks, layouts = [], []
    original = mk.mlp_pallas

    def spy(*a, **k):
        masks.append(k.get("valid"))
        layouts.append(k.get("columns", False))
        return original(*a, **k)

    monkeypatch.setattr(mk, "mlp_pallas", spy)
    out = []
    for backend, fused in (("xla", False), ("pallas", True)):
        kernels = KernelSpec(backend=backend, hashgrid_backward="reduced", fused_finite_difference=fused,
                             fused_mlp=fused, fd_columns=fused and fd_columns)
        spec = nerf.NerfFieldSpec.from_config(cfg.field, kernels)
        params = nerf.init_field(jax.random.PRNGKey(0), spec)
        params["encoding"] = 0.5 * jax.random.normal(jax.random.PRNGKey(5), params["encoding"].shape)

        def loss(p, spec=spec):
            sigma, albedo, normal = nerf.density_albedo_and_normals(p, x, spec, valid=valid)
            return jnp.sum(w * jnp.concatenate([jnp.log1p(sigma)[:, None], albedo, normal], axis=1))

        out.append(jax.jit(jax.value_and_grad(loss))(params))
    assert len(masks) == 5 and all(m is valid for m in masks)  # density at x and 3 neighbours, albedo
    assert layouts == [fd_columns] * 5
    (l_x, g_x), (l_k, g_k) = out
    np.testing.assert_allclose(float(l_k), float(l_x), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(np.max(np.abs(b))))


def test_precision_choices_are_the_configs_and_change_only_the_gpu_dots():
    """kernels.fused_mlp_precision: the choices KernelSpec (and so the config) accepts are the kernel's; in
    interpret mode (float32 on CPU) every choice gives the reference values; lowered for the GPU, each choice
    reaches the Triton kernels (the IR is MLIR bytecode, so the check is that the three lower to three different
    kernels, forward and backward)."""
    import re

    from dreamcraft_jax.kernels.spec import FUSED_MLP_PRECISIONS

    assert FUSED_MLP_PRECISIONS == mk.PRECISIONS
    enc, w_hidden, w_out, _ = _inputs(40, k_out=3)
    want = mk.mlp_xla(enc, w_hidden, w_out)
    for precision in mk.PRECISIONS:
        got = mk.mlp_pallas(enc, w_hidden, w_out, interpret=True, precision=precision)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="precision must be one of"):
        mk.mlp_pallas(enc, w_hidden, w_out, interpret=True, precision="bf16")

    from conftest import lowered_for_gpu

    kernels = {}
    for precision in mk.PRECISIONS:
        fn = lambda e, a, b, p=precision: jax.value_and_grad(  # noqa: E731
            lambda *args: jnp.sum(mk.mlp_pallas(*args, interpret=False, precision=p)), argnums=(0, 1, 2))(e, a, b)
        text = lowered_for_gpu(fn, enc, w_hidden, w_out)
        kernels[precision] = tuple(re.findall(r'ir = "(.*?)", name', text))
        assert len(kernels[precision]) == 2  # forward, backward
    for i in range(2):
        assert len({k[i] for k in kernels.values()}) == 3
