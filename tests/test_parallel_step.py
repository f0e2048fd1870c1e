"""The sharded step on 8 simulated devices equals the 1-device step on the same 8 views."""

import jax
import numpy as np
import pytest

from conftest import make_stage, tiny_config
from dreamcraft_jax import parallel
from dreamcraft_jax.data.reference import example_depth_path, example_image_path, load_reference
from dreamcraft_jax.stages.volume_stage import BOTH, targets_from_reference

N_DEV = 8


def _setup(n_devices, per_device, cfg_overrides=()):
    cfg = tiny_config(**{"train.ref_views_per_device": per_device, "train.random_views_per_device": per_device,
                         "data.depth": "auto", **dict(cfg_overrides)})
    mesh = parallel.make_mesh(n_devices, 1, devices=jax.devices()[:n_devices])
    stage = make_stage(cfg, mesh)
    ref = load_reference(example_image_path(), 16, 16, depth_path=example_depth_path())
    targets = parallel.replicate(targets_from_reference(ref), mesh)
    return stage, stage.init_state(), targets


def _relative_error(a, b):
    a, b = jax.device_get(a), jax.device_get(b)
    num = sum(float(np.sum((np.asarray(x, np.float64) - y) ** 2))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))
    return (num / den) ** 0.5


# The per-sample normal terms are ill-conditioned at float32: 3D normal smoothness is an L1 of differences of
# nearly equal normals (sign flips under 1e-7 perturbations) and normals normalise small finite-difference
# gradients. Different XLA fusion on 1 vs 8 devices perturbs them at the 1e-7 level, which those terms amplify
# to ~1e-3 relative in the gradient. They are checked separately with a tolerance that reflects that.
# Sample pruning (alpha < 0.01 or transmittance < 1e-4 dropped) is a threshold: after one step the params differ
# by float32 rounding (<= 3e-9), which can move a sample across it, and the second step's gradient then differs by
# that sample (2.0e-5 relative in the params after two steps with jax 0.12.1, 1.9e-8 with 0.11.2: same programs,
# other rounding). `python scripts/device_parity.py [--x64] [--no_pruning]` prints it per leaf: with float64
# params 3e-17 with pruning (the two programs compute the same sums in another order); with float32 the first
# step's gradients 8.6e-7 with pruning (same params on both sides), the params after two steps without pruning
# 3.1e-8 (0.12.1) / 2.8e-8 (0.11.2). The bounds below are ~6x / ~30x those; the two steps run without pruning.
WELL_CONDITIONED = {"loss.lambda_3d_normal_smooth": 0.0, "loss.lambda_orient": 0.0}
NO_PRUNING = {"render.alpha_threshold": 0.0, "render.early_stop_eps": 0.0}


@pytest.mark.skipif(len(jax.devices()) < N_DEV, reason="needs 8 (simulated) devices")
def test_eight_devices_equal_one_device_grads_and_step():
    # rgb, mask, depth (reference views); 2D normal smoothness, sparsity, opacity entropy (random views).
    stage8, state8, targets8 = _setup(N_DEV, 1, WELL_CONDITIONED)
    stage1, state1, targets1 = _setup(1, N_DEV, WELL_CONDITIONED)
    assert state8.params["encoding"].sharding.mesh.devices.size == N_DEV

    grads8, metrics8 = stage8.grads_fn((BOTH, (16, 16)))(state8, targets8)
    grads1, metrics1 = stage1.grads_fn((BOTH, (16, 16)))(state1, targets1)
    assert float(metrics1["loss"]) > 0
    for name in ("ref/rgb", "ref/mask", "ref/depth_rel", "random/normal_smooth", "random/sparsity",
                 "random/opaque"):
        assert name in metrics1
    np.testing.assert_allclose(float(metrics8["loss"]), float(metrics1["loss"]), rtol=1e-5)
    assert _relative_error(grads8, grads1) <= 5e-6
    for g8, g1 in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1)):
        assert _relative_error(g8, g1) <= 5e-6 or float(np.max(np.abs(jax.device_get(g1)))) < 1e-12


@pytest.mark.slow  # two more compiled steps per side (~40 s on CI's 2 cores); the gradients above run in CI
@pytest.mark.skipif(len(jax.devices()) < N_DEV, reason="needs 8 (simulated) devices")
def test_eight_devices_equal_one_device_after_two_full_steps():
    """Two full steps (Adam + occupancy grid update) on 8 devices and on 1 stay equal."""
    stage8, state8, targets8 = _setup(N_DEV, 1, {**WELL_CONDITIONED, **NO_PRUNING})
    stage1, state1, targets1 = _setup(1, N_DEV, {**WELL_CONDITIONED, **NO_PRUNING})
    step8, step1 = stage8.step_fn((BOTH, (16, 16))), stage1.step_fn((BOTH, (16, 16)))
    for _ in range(2):
        state8, _ = step8(state8, targets8)
        state1, _ = step1(state1, targets1)
    assert int(state8.step) == int(state1.step) == 2
    assert _relative_error(state8.params, state1.params) <= 1e-6
    np.testing.assert_array_equal(np.asarray(state8.extras["grid"].binary), np.asarray(state1.extras["grid"].binary))


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < N_DEV, reason="needs 8 (simulated) devices")
@pytest.mark.optimized
def test_eight_devices_match_one_device_with_normal_terms():
    stage8, state8, targets8 = _setup(N_DEV, 1)
    stage1, state1, targets1 = _setup(1, N_DEV)
    grads8, metrics8 = stage8.grads_fn((BOTH, (16, 16)))(state8, targets8)
    grads1, metrics1 = stage1.grads_fn((BOTH, (16, 16)))(state1, targets1)
    assert "random/orient" in metrics1 and "random/3d_normal_smooth" in metrics1
    np.testing.assert_allclose(float(metrics8["loss"]), float(metrics1["loss"]), rtol=1e-5)
    # A missing or doubled pmean would be off by 8x; a wrong view split by O(1).
    assert _relative_error(grads8, grads1) <= 2e-2


def test_views_must_divide_evenly_over_devices():
    """Each device gets views_per_device views: the global batch is devices x per-device by construction."""
    stage, state, targets = _setup(2, 3)
    ref, rand = stage.view_batches(state, BOTH)
    assert ref[0].c2w.shape == (6, 4, 4) and rand[0].c2w.shape == (6, 4, 4)


@pytest.mark.skipif(len(jax.devices()) < N_DEV, reason="needs 8 (simulated) devices")
def test_eval_render_split_over_eight_devices_equals_one_device_and_is_replicated():
    """The evaluation render splits its ray chunks over the devices and hands back the whole image on every
    device (so every process of a multi-host run can read it, as the runner's validation and video need)."""
    from dreamcraft_jax import cameras as cam

    stage8, state, _ = _setup(N_DEV, 1)
    stage1, _, _ = _setup(1, 1)
    camera = cam.reference_camera(stage8.cfg.camera)
    # 20 x 24 = 480 rays in 16-ray chunks: 30 chunks, padded to 32 so each of the 8 devices takes 4.
    out8 = stage8.eval_render(20, 24, chunk_rays=16)(state, camera)
    state1 = parallel.replicate(jax.device_get(state), stage1.mesh)
    out1 = stage1.eval_render(20, 24, chunk_rays=16)(state1, camera)
    for name in ("rgb", "normal", "depth", "opacity"):
        assert out8[name].sharding.is_fully_replicated, name
        assert out8[name].shape[:2] == (20, 24)
        np.testing.assert_allclose(np.asarray(out8[name]), np.asarray(out1[name]), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(len(jax.devices()) < N_DEV, reason="needs 8 (simulated) devices")
def test_vjp_residuals_cross_programs_with_their_device_varying_type():
    """The three-program step's mechanism (``train.separate_guidance``, stages/coarse_nerf.py; end to end in the
    slow tests/test_stage1_programs.py): a vjp taken inside one shard_map, its residuals carried out with
    :func:`parallel.stacked_spec` and its backward run inside a second shard_map gives the one-program gradient.
    One residual, a per-level mask sin(c) that enters a rematerialised encoding (as the fields' level mask
    does), is device-invariant: made varying on the way, it fails (jax >= 0.12 refuses to cast it again in the
    recomputation inside the backward, which multiplies it with varying features)."""
    import jax.numpy as jnp

    mesh = parallel.make_mesh(4, 2)
    w = jnp.linspace(-1.0, 1.0, 6)
    c = jnp.linspace(0.3, 0.9, 6)  # replicated input
    x = jax.random.normal(jax.random.PRNGKey(0), (N_DEV, 6))  # one view per device
    box = {}

    def loss_of(w, c, x):
        encode = jax.checkpoint(lambda w, mask: jnp.tanh((x * w).reshape(-1, 2, 3) * mask[:, None]))
        return jnp.sum(encode(w, jnp.sin(c[:2])))

    def forward(w, c, x):
        _, back = jax.vjp(lambda w: loss_of(w, c, x), parallel.as_varying(w))
        leaves, box["tree"] = jax.tree.flatten(back)
        box["specs"] = [parallel.stacked_spec(r) for r in leaves]
        return [r[None] for r in leaves]

    def backward(residuals):
        back = jax.tree.unflatten(box["tree"], [r[0] for r in residuals])
        (g,) = back(parallel.as_varying(jnp.ones(()), parallel.VIEW_AXES))
        return jax.lax.pmean(g, parallel.VIEW_AXES)

    in_specs = (parallel.REPLICATED, parallel.REPLICATED, parallel.VIEWS)
    jax.eval_shape(lambda: parallel.shard_map(lambda *a: forward(*a)[:0], mesh, in_specs, [])(w, c, x))
    assert parallel.REPLICATED in box["specs"] and parallel.VIEWS in box["specs"]  # both kinds occur
    residuals = jax.jit(parallel.shard_map(forward, mesh, in_specs, box["specs"]))(w, c, x)
    grad = jax.jit(parallel.shard_map(backward, mesh, (box["specs"],), parallel.REPLICATED))(residuals)
    expected = jax.grad(lambda w: sum(loss_of(w, c, x[i:i + 1]) for i in range(N_DEV)) / N_DEV)(w)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-5, atol=1e-6)
