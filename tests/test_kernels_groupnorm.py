"""kernels.groupnorm: GroupNorm (+ SiLU) of small activations as one Pallas kernel per pass (CPU interpret mode)
against the two-pass reference and against the models' XLA GroupNorm; values and the gradients w.r.t. x, scale and
bias; the models route only suited GroupNorms to it, only where their KernelSpec asks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.kernels import groupnorm as gk
from dreamcraft_jax.kernels.spec import KernelSpec
from dreamcraft_jax.models import layers


def _inputs(shape, dtype, seed=0, offset=3.0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = (jax.random.normal(k[0], shape) * jax.random.uniform(k[1], shape[-1:], minval=0.2, maxval=2.0)
         + offset).astype(dtype)
    scale = jax.random.normal(k[2], shape[-1:])
    bias = jax.random.normal(k[3], shape[-1:])
    cot = jax.random.normal(jax.random.PRNGKey(seed + 1), shape).astype(dtype)
    return x, scale, bias, cot


@pytest.mark.parametrize("shape, groups, silu, dtype", [
    ((2, 8, 8, 64), 32, True, jnp.float32),      # 2 channels per group
    ((3, 5, 7, 40), 4, False, jnp.float32),      # 10 channels per group: 16 lanes, 6 masked; 35 rows, chunk 16
    ((2, 6, 6, 320), 32, True, jnp.float32),     # the UNet's 320 channels
    ((2, 16, 16, 96), 32, True, jnp.bfloat16),   # bf16 in and out, float32 inside
])
def test_values_and_gradients_match_the_reference(shape, groups, silu, dtype):
    x, scale, bias, cot = _inputs(shape, dtype)
    kernel = lambda *a: gk.group_norm_act_pallas(*a, groups, 1e-5, silu, interpret=True, chunk=16)  # noqa: E731
    ref = lambda *a: gk.group_norm_act_reference(*a, groups, 1e-5, silu)  # noqa: E731
    got, want = kernel(x, scale, bias), ref(x, scale, bias)
    assert got.dtype == dtype and got.shape == shape
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    grads = [jax.grad(lambda *a, f=f: jnp.sum((f(*a) * cot).astype(jnp.float32)), argnums=(0, 1, 2))(
        x, scale, bias) for f in (kernel, ref)]
    for name, g, w in zip(("x", "scale", "bias"), *grads):
        w = np.asarray(w, np.float32)
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=(1e-4 if dtype == jnp.float32 else 3e-2)
                                   * max(1.0, float(np.abs(w).max())), rtol=1e-3, err_msg=name)


def test_equals_the_models_xla_groupnorm_and_is_accurate_off_centre():
    """Against the models' custom-VJP GroupNorm (one-pass shifted statistics in XLA), on channels whose mean
    dwarfs their spread (the case the shift is for)."""
    x, scale, bias, cot = _inputs((2, 9, 9, 64), jnp.float32, seed=3, offset=300.0)
    kernel = lambda *a: gk.group_norm_act_pallas(*a, 32, 1e-6, True, interpret=True, chunk=32)  # noqa: E731
    xla = lambda *a: layers._group_norm_act(*a, 32, 1e-6, True, KernelSpec())  # noqa: E731
    np.testing.assert_allclose(kernel(x, scale, bias), xla(x, scale, bias), atol=1e-4, rtol=1e-4)
    g_k = jax.grad(lambda *a: jnp.sum(kernel(*a) * cot), argnums=(0, 1, 2))(x, scale, bias)
    g_x = jax.grad(lambda *a: jnp.sum(xla(*a) * cot), argnums=(0, 1, 2))(x, scale, bias)
    for name, a, b in zip(("x", "scale", "bias"), g_k, g_x):
        np.testing.assert_allclose(a, b, atol=1e-3 * max(1.0, float(np.abs(b).max())), rtol=1e-3, err_msg=name)


def test_bad_input_is_one_clear_error():
    x, scale, bias, _ = _inputs((2, 4, 4, 64), jnp.float32)
    with pytest.raises(ValueError, match="do not split into 5 groups"):
        gk.group_norm_act_pallas(x, scale, bias, 5, 1e-5, True, interpret=True)
    with pytest.raises(ValueError, match="scale / bias"):
        gk.group_norm_act_pallas(x, scale[:3], bias, 32, 1e-5, True, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        gk.group_norm_act_pallas(x, scale, bias, 32, 1e-5, True, interpret=True, chunk=48)
    assert gk.suited((8, 64, 64, 320), 32) and gk.suited((4, 128, 128, 512), 32)
    assert not gk.suited((4, 256, 256, 256), 32) and not gk.suited((4, 64, 64, 100), 32)


def test_models_route_suited_groupnorms_only_where_their_spec_asks(monkeypatch):
    """With ``fused_groupnorm`` in the modules' spec and a GPU backend, a VAE encoder's GroupNorms at <= 128 x 128
    positions take the kernel (here in interpret mode) and the encoding and its gradients equal those of conftest's
    XLA VAE (built without a spec); with ``KernelSpec()`` none do; on this CPU backend, not even asked."""
    from conftest import tiny_vae_encode_case
    from dreamcraft_jax.guidance.random_priors import TINY_VAE
    from dreamcraft_jax.models.vae import AutoencoderKL

    _, params, x, want = tiny_vae_encode_case()
    shapes = []
    original = gk.group_norm_act_pallas

    def recording(x, *a, **k):
        shapes.append(x.shape)
        return original(x, *a, **{**k, "interpret": True})

    def loss_with(kernels):
        vae = AutoencoderKL.from_config(TINY_VAE, kernels=kernels)
        return lambda p, im: jnp.sum(jnp.sin(vae.apply({"params": p}, im, method=AutoencoderKL.encode)[0]))

    monkeypatch.setattr(gk, "group_norm_act_pallas", recording)
    fused = KernelSpec(fused_groupnorm=True)  # groupnorm_sums_max_rows 0: the split-row sums stay out of this A/B
    jax.value_and_grad(loss_with(fused), argnums=(0, 1))(params, x)
    assert not shapes  # the real backend here is the CPU
    monkeypatch.setattr(layers, "_on_gpu", lambda: True)
    jax.value_and_grad(loss_with(KernelSpec()), argnums=(0, 1))(params, x)
    assert not shapes
    got = jax.value_and_grad(loss_with(fused), argnums=(0, 1))(params, x)
    assert shapes and all(gk.suited(s, TINY_VAE["norm_num_groups"]) for s in shapes)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(b).max())))

