"""kernels.channel_sums: the GroupNorm per-channel sums with the rows split over programs (CPU interpret mode)
against the pure-jnp references and against sums in float64; the launch plan; the models route GroupNorms to
the kernels only where their KernelSpec asks, with its launch plan, and their values and gradients do not change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.kernels import channel_sums as cs
from dreamcraft_jax.kernels.spec import KernelConfigError, KernelSpec
from dreamcraft_jax.models import layers

SHAPES = [
    (2, 8, 8, 96),     # 96 channels: one 128-lane block, 32 lanes masked; 2 row stretches
    (3, 5, 7, 40),     # 35 rows (last chunk partly masked), 40 channels in a 64-lane block
    (2, 16, 16, 320),  # the UNet's 320 channels: five 64-lane blocks; 8 stretches of 32 rows
    (1, 4, 4, 1280),   # few rows, many channels: 256-lane blocks, one chunk of 16 rows
]


def test_a_configured_run_takes_the_kernels_on_every_prior_level_and_the_default_spec_on_none():
    """The config's spec covers the largest GroupNorm of the priors (the VAE encoder's 512 px level, 512 x 512
    positions per batch element); ``KernelSpec()``, what the models get when built without one, none."""
    from dreamcraft_jax.config import base_config

    assert KernelSpec.from_config(base_config().kernels).groupnorm_sums_max_rows >= 512 * 512
    assert KernelSpec().groupnorm_sums_max_rows == 0


def _moments_f64(x):
    xs = np.asarray(x, np.float64).reshape(x.shape[0], -1, x.shape[-1])
    d = xs - xs[:, :1, :]
    return xs[:, 0, :], d.sum(1), (d * d).sum(1)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fold", [False, True], ids=["acc-tiles", "fold"])
def test_forward_sums_match_float64_and_the_reference(shape, fold):
    x = jax.random.normal(jax.random.PRNGKey(0), shape) * 2.0 + 3.0
    got = cs.shifted_channel_sums(x, interpret=True, target_programs=64, fold=fold)
    ref = cs.shifted_channel_sums_reference(x)
    for g, r, w in zip(got, ref, _moments_f64(x)):
        assert g.shape == (shape[0], shape[-1]) and g.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("silu, fold", [(True, False), (False, False), (True, True)])
def test_backward_sums_match_float64(shape, silu, fold):
    b, c = shape[0], shape[-1]
    k = jax.random.split(jax.random.PRNGKey(1), 6)
    x = jax.random.normal(k[0], shape)
    dy = jax.random.normal(k[1], shape)
    mean_c = jax.random.normal(k[2], (b, 1, 1, c))
    rstd_c = jnp.abs(jax.random.normal(k[3], (b, 1, 1, c))) + 0.5
    scale, bias = jax.random.normal(k[4], (c,)), jax.random.normal(k[5], (c,))
    got = cs.backward_channel_sums(x, dy, mean_c, rstd_c, scale, bias, silu, interpret=True, target_programs=64,
                                   fold=fold)
    # float64 by hand: z = xhat * scale + bias, dz = dy * silu'(z)
    f = lambda v: np.asarray(v, np.float64)  # noqa: E731
    xhat = (f(x) - f(mean_c)) * f(rstd_c)
    z = xhat * f(scale) + f(bias)
    sig = 1.0 / (1.0 + np.exp(-z))
    dz = f(dy) * (sig * (1.0 + z * (1.0 - sig)) if silu else 1.0)
    want = (dz.sum((1, 2)), (dz * xhat).sum((1, 2)))
    for g, w, r in zip(got, want, cs.backward_channel_sums_reference(x, dy, mean_c, rstd_c, scale, bias, silu)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


def test_bf16_input_sums_in_float32():
    x = (jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 64)) + 5.0).astype(jnp.bfloat16)
    got = cs.shifted_channel_sums(x, interpret=True, target_programs=16)
    for g, w in zip(got, _moments_f64(np.asarray(x.astype(jnp.float32)))):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-3)


def test_plan_splits_rows_until_enough_programs():
    # UNet 64 px at 4 views with CFG: 8 x 4096 rows x 320 channels -> 64-lane blocks, 32 stretches of 128 rows
    p = cs.plan(8, 4096, 320)
    assert (p.block_channels, p.channel_blocks, p.splits, p.rows_per_split) == (64, 5, 32, 128)
    assert p.batch * p.splits * p.channel_blocks >= cs.TARGET_PROGRAMS
    # VAE 512 px level: 4 x 262144 rows x 128 channels -> 256 stretches of 1024 rows
    p = cs.plan(4, 512 * 512, 128)
    assert (p.block_channels, p.splits, p.rows_per_split) == (128, 256, 1024)
    # 8 warps from MID_ROWS rows on, 16-row chunks below WIDE_ROWS (the 256 px level); explicit values win
    assert (p.num_warps, p.chunk) == (8, 32)
    p = cs.plan(4, 256 * 256, 256)
    assert (p.num_warps, p.chunk) == (8, 16)
    p = cs.plan(4, 128 * 128, 512)
    assert (p.num_warps, p.chunk) == (4, cs.CHUNK)
    p = cs.plan(4, 512 * 512, 128, num_warps=4, chunk=64)
    assert (p.num_warps, p.chunk) == (4, 64)
    # 8 x 8 latents: never fewer rows per stretch than a chunk
    p = cs.plan(8, 64, 1280, chunk=32)
    assert p.block_channels == 256 and p.splits == 2 and p.rows_per_split >= p.chunk
    p = cs.plan(2, 100, 72)  # no power-of-two lane block divides 72: 128 lanes, 56 masked
    assert p.block_channels == 128 and p.channel_blocks == 1
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        cs.plan(2, 100, 72, chunk=48)


def test_a_specs_launch_plan_reaches_the_kernel_calls(monkeypatch):
    """A KernelSpec's ``groupnorm_sums_plan`` is the plan of the models' sums calls (benches compare plans so);
    a spec without one gets the per-shape default plan; the values are the float64 sums either way."""
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 16, 64)) * 3.0 + 2.0
    plans = []
    original = cs.plan

    def recording(*a, **k):
        plans.append(original(*a, **k))
        return plans[-1]

    monkeypatch.setattr(cs, "plan", recording)
    monkeypatch.setattr(layers, "_on_gpu", lambda: True)  # the kernels run in interpret mode on this CPU
    tuned = KernelSpec(groupnorm_sums_max_rows=1 << 20, groupnorm_sums_plan={"chunk": 16, "fold": True,
                                                                              "num_warps": 8})
    assert tuned.groupnorm_sums_plan == (("chunk", 16), ("fold", True), ("num_warps", 8))  # hashable, sorted
    got_tuned = layers._shifted_channel_sums(x, tuned)
    got_default = layers._shifted_channel_sums(x, tuned.replace(groupnorm_sums_plan=()))
    assert [(p.chunk, p.fold, p.num_warps) for p in plans] == [(16, True, 8), (cs.CHUNK, False, 4)]
    for got in (got_tuned, got_default):
        for g, w in zip(got, _moments_f64(x)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="unknown plan keywords"):
        cs.shifted_channel_sums(x, interpret=True, chunks=16)
    with pytest.raises(KernelConfigError, match="kernels.groupnorm_sums_plan"):
        KernelSpec(groupnorm_sums_plan={"chunks": 16})


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="spatial axis"):
        cs.shifted_channel_sums(jnp.zeros((4, 8)), interpret=True)
    with pytest.raises(ValueError, match="must have the shape of x"):
        z = jnp.zeros((1, 1, 1, 4))
        cs.backward_channel_sums(jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 4, 2, 4)), z, z, z[0, 0, 0], z[0, 0, 0],
                                 True, interpret=True)


def _vae_encode_loss(kernels: KernelSpec):
    """The loss of conftest's ``tiny_vae_encode_case`` with a VAE built with ``kernels``."""
    from dreamcraft_jax.guidance.random_priors import TINY_VAE
    from dreamcraft_jax.models.vae import AutoencoderKL

    vae = AutoencoderKL.from_config(TINY_VAE, kernels=kernels)
    return lambda p, im: jnp.sum(jnp.sin(vae.apply({"params": p}, im, method=AutoencoderKL.encode)[0]))


def test_models_route_groupnorm_sums_only_where_their_spec_asks(monkeypatch):
    """With a spec that asks and a GPU backend, a VAE encoder's GroupNorms up to the spec's row limit take the
    kernels (here in interpret mode), and the encoding and its gradients equal those of conftest's XLA VAE (built
    without a spec); with ``groupnorm_sums_max_rows=0``, or on this CPU backend, none do."""
    from conftest import tiny_vae_encode_case

    _, params, x, want = tiny_vae_encode_case()
    calls = []
    fwd, bwd = cs.shifted_channel_sums, cs.backward_channel_sums

    def recording_fwd(x, **k):
        calls.append(("fwd", x.shape))
        return fwd(x, **{**k, "interpret": True})

    def recording_bwd(x, *a, **k):
        calls.append(("bwd", x.shape))
        return bwd(x, *a, **{**k, "interpret": True})

    monkeypatch.setattr(cs, "shifted_channel_sums", recording_fwd)
    monkeypatch.setattr(cs, "backward_channel_sums", recording_bwd)
    loss = _vae_encode_loss(KernelSpec(groupnorm_sums_max_rows=16 * 16))
    jax.value_and_grad(loss, argnums=(0, 1))(params, x)
    assert not calls  # the real backend here is the CPU
    monkeypatch.setattr(layers, "_on_gpu", lambda: True)
    jax.value_and_grad(_vae_encode_loss(KernelSpec(groupnorm_sums_max_rows=0)), argnums=(0, 1))(params, x)
    assert not calls
    got = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
    kinds = {k for k, _ in calls}
    assert kinds == {"fwd", "bwd"}
    assert all(int(np.prod(s[1:-1])) <= 16 * 16 for _, s in calls)  # 32 px level stays on XLA
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())))
