"""Stage 1 end to end: NeuS field and renderer, priors in the sharded step, the pipeline's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_stage, tiny_config
from dreamcraft_jax import parallel
from dreamcraft_jax.config import ConfigError, stage_config, validate
from dreamcraft_jax.data.reference import example_image_path, load_reference
from dreamcraft_jax.fields import neus
from dreamcraft_jax.guidance import priors as priors_mod
from dreamcraft_jax.render import volume
from dreamcraft_jax.stages.volume_stage import RANDOM, targets_from_reference

N_DEV = 8


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_neus_alpha_telescopes_to_the_sdf_cdf():
    """Head-on (cos = -1) with full annealing, prod(1 - alpha) over consecutive intervals equals
    sigmoid(s sdf_end) / sigmoid(s sdf_start): the NeuS transmittance in closed form (up to the 1e-5 guards)."""
    s, dt = 2.0, 0.05  # few intervals: each adds ~1e-5 / sigmoid of error through the guards
    t = np.arange(0.0, 2.0, dt)
    sdf_mid = 1.0 - (t + 0.5 * dt)  # a plane at distance 1 along the ray, crossed head-on
    alpha = np.asarray(neus.neus_alpha(jnp.asarray(sdf_mid), -1.0, dt, s, 1.0))
    transmittance = np.prod(1.0 - alpha)
    expected = _sigmoid(s * (1.0 - t[-1] - dt)) / _sigmoid(s * 1.0)
    np.testing.assert_allclose(transmittance, expected, rtol=2e-3)
    # Moving away from the surface (cos > 0) nothing is absorbed once annealed.
    away = np.asarray(neus.neus_alpha(jnp.asarray(sdf_mid), 1.0, dt, s, 1.0))
    assert np.all(away < 1e-4)


def test_neus_sphere_init_renders_the_sphere():
    """Fresh NeuS field (SDF MLP zeroed): the sphere of radius 0.5; a central ray's opacity and depth follow the
    telescoped NeuS transmittance, a ray passing beside the sphere stays transparent."""
    cfg = tiny_config(**{"render.alpha_threshold": 0.0, "render.early_stop_eps": 0.0,
                         "render.num_samples_per_ray": 512, "render.candidate_samples_per_ray": 600.0,
                         "render.samples_per_ray": 600.0, "render.stratified": False, "neus.variance_init": 0.3})
    spec = neus.NeusFieldSpec.from_config(cfg)
    params = neus.init_field(jax.random.PRNGKey(0), spec)
    params["sdf_net"] = jax.tree.map(jnp.zeros_like, params["sdf_net"])
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    stage = make_stage(cfg, mesh, "coarse_neus")
    rspec = stage.render
    fns = stage.field_fns(params, None, step=10**6)  # cosine fully annealed
    o = jnp.asarray([[3.0, 0.0, 0.0], [3.0, 0.8, 0.0]])
    d = jnp.asarray([[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    out = volume.render_rays(o, d, volume.init_occupancy_grid(rspec), None, fns, rspec)
    s = float(np.exp(10 * 0.3))
    # Central ray: the box starts at t = 1 (sdf 1.5), the sphere surface is at t = 2.5; it is fully opaque.
    assert float(out["opacity"][0]) > 0.999
    np.testing.assert_allclose(float(out["depth"][0]), 2.5, atol=0.1)
    # Beside the sphere (closest distance 0.8, sdf >= 0.3 everywhere): nearly transparent (the 1e-5 guards of
    # the alpha formula leak ~1e-5 per interval).
    assert float(out["opacity"][1]) < 0.01
    s = float(np.exp(10 * 0.3))
    # Opacity of the central ray up to the sphere's centre: 1 - T with the telescoped T (head-on rays, cos = -1).
    assert float(out["opacity"][0]) >= 1.0 - _sigmoid(s * -0.5) / _sigmoid(s * 1.5) - 1e-3


def test_finite_difference_normals_skip_invalid_slots():
    """The sphere SDF (SDF MLP zeroed, grid features tiny): forward-difference normals (the official
    ``finite_difference``) are g / |g| with g_i = (|x + eps e_i| - |x|) / eps (closed form); with a ``valid``
    mask the unused slots get zero normals and the table gradient of a loss on the normals is the one of the
    valid points alone."""
    cfg = tiny_config()
    spec = neus.NeusFieldSpec.from_config(cfg)
    params = neus.init_field(jax.random.PRNGKey(0), spec)
    params["sdf_net"] = jax.tree.map(jnp.zeros_like, params["sdf_net"])
    x = jax.random.uniform(jax.random.PRNGKey(1), (64, 3), minval=-0.8, maxval=0.8)
    valid = jnp.arange(64) < 40
    n = neus.normals(params, x, spec, None, valid)
    xs, eps = np.asarray(x, np.float64), spec.finite_difference_eps
    g = (np.linalg.norm(xs[:, None, :] + eps * np.eye(3)[None], axis=-1) - np.linalg.norm(xs, axis=-1)[:, None]) / eps
    expected = g / np.linalg.norm(g, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(n[:40]), expected[:40], atol=1e-3)
    assert np.all(np.asarray(n[40:]) == 0)
    params["sdf_net"] = neus.init_field(jax.random.PRNGKey(2), spec)["sdf_net"]  # non-trivial table gradient

    def loss(p, pts, v):
        return jnp.sum(jnp.sin(3.0 * neus.normals(p, pts, spec, None, v)))

    g_masked = jax.grad(loss)(params, x, valid)["encoding"]
    g_subset = jax.grad(loss)(params, x[:40], None)["encoding"]
    assert float(jnp.max(jnp.abs(g_subset))) > 0
    np.testing.assert_allclose(np.asarray(g_masked), np.asarray(g_subset), rtol=1e-5, atol=1e-9)


def test_neus_starts_from_the_coarse_nerf_table_and_features():
    cfg = tiny_config()
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    nerf_state = make_stage(cfg, mesh).init_state(seed=3)
    neus_stage = make_stage(stage_config(cfg, "coarse_neus"), mesh, "coarse_neus")
    state = neus_stage.init_state(previous=nerf_state)
    np.testing.assert_array_equal(np.asarray(state.params["encoding"]), np.asarray(nerf_state.params["encoding"]))
    for a, b in zip(jax.tree.leaves(state.params["feature_net"]), jax.tree.leaves(nerf_state.params["feature_net"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(state.params["variance"]) == pytest.approx(0.3)
    assert "density_net" not in state.params and "sdf_net" in state.params
    # The new state owns its buffers: the stage's steps donate their state, which must not delete stage 1a's.
    new_buffers = {leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state.params)}
    assert not new_buffers & {leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(nerf_state.params)}


def test_stage_config_applies_the_neus_overrides():
    cfg = tiny_config()
    n = stage_config(cfg, "coarse_neus")
    assert n.loss.lambda_orient == 10.0 and n.optimizer.eps == 1e-15 and n.guidance.sd.min_step_percent == 0.2
    assert n.loss.lambda_rgb == cfg.loss.lambda_rgb and n.stage == "coarse_neus"
    cfg.overrides.coarse_neus.loss.lambda_orient = "ten"
    cfg.stage = "all"
    with pytest.raises(ConfigError, match="in stage coarse_neus.*lambda_orient"):
        validate(cfg)


def test_missing_prior_weights_name_the_download_and_the_key(tmp_path):
    cfg = tiny_config(**{"loss.lambda_sd": 0.1, "guidance.sd.pretrained": str(tmp_path / "nowhere")})
    with pytest.raises(priors_mod.PriorUnavailableError) as e:
        priors_mod.load_priors(cfg, None)
    message = str(e.value)
    assert "guidance.sd.pretrained" in message and "stabilityai/stable-diffusion-2-1-base" in message
    cfg = tiny_config(**{"loss.lambda_3d_sd": 0.1})
    with pytest.raises(priors_mod.PriorUnavailableError, match="guidance.zero123.pretrained is empty"):
        priors_mod.load_priors(cfg, np.ones((32, 32, 3), np.float32))


def test_prior_losses_do_not_depend_on_the_batch_a_view_is_in(demo_priors):
    """One key per view: a batch's loss is the mean of its views' losses (so any device split gives the same)."""
    from dreamcraft_jax import cameras as cam

    cfg, (priors, params) = demo_priors
    assert priors.random_weights and set(priors.priors) == {"sd", "3d_sd"}
    images = jax.random.uniform(jax.random.PRNGKey(0), (3, 24, 24, 3))
    camera = cam.make_camera(jnp.asarray([10.0, 20.0, 70.0]), jnp.asarray([0.0, 100.0, -150.0]), 3.8, 20.0)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    losses = jax.jit(lambda p, im, c, k: priors.losses(p, im, c, k, 50)[0])
    batch = losses(params, images, camera, keys)
    singles = [losses(params, images[i:i + 1], jax.tree.map(lambda a: a[i:i + 1], camera), keys[i:i + 1])
               for i in range(3)]
    for name in ("sd", "3d_sd"):
        singles_name = [s[name] for s in singles]
        np.testing.assert_allclose(float(batch[name]), np.mean([float(v) for v in singles_name]), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < N_DEV, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("layout", [(4, 2)])  # data x fsdp: views over 8 devices, priors FSDP-split
def test_guided_step_on_8_devices_equals_1_device(demo_priors, layout):
    """A random-view step with both priors: 8 devices (data x fsdp, priors FSDP-split when fsdp = 2) give the
    1-device gradient on the same 8 views."""
    cfg0, (priors, params) = demo_priors
    overrides = {"train.random_views_per_device": 1, "loss.lambda_sd": 0.1, "loss.lambda_3d_sd": 0.1,
                 "guidance.sd.resolution": 32, "guidance.zero123.resolution": 32,
                 "loss.lambda_3d_normal_smooth": 0.0, "loss.lambda_orient": 0.0, "parallel.fsdp_min_size": 256}
    results = []
    for data, fsdp, per_device in ((*layout, 1), (1, 1, N_DEV)):
        cfg = tiny_config(**{**overrides, "train.random_views_per_device": per_device})
        mesh = parallel.make_mesh(data, fsdp, devices=jax.devices()[:data * fsdp])
        stage = make_stage(cfg, mesh, "coarse_nerf", priors, params)
        placed = stage.prior_params
        if fsdp > 1:
            specs = jax.tree.leaves(stage.prior_specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
            assert any(parallel.FSDP in tuple(s) for s in specs)
        ref = load_reference(example_image_path(), 16, 16)
        targets = parallel.replicate(targets_from_reference(ref), mesh)
        grads, metrics = stage.grads_fn((RANDOM, (16, 16)))(stage.init_state(), targets, placed)
        assert float(metrics["random/sd"]) > 0 and float(metrics["random/3d_sd"]) > 0
        results.append((jax.device_get(grads), float(metrics["loss"])))
    (g8, l8), (g1, l1) = results
    np.testing.assert_allclose(l8, l1, rtol=1e-4)
    num = sum(float(np.sum((np.asarray(a, np.float64) - b) ** 2))
              for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)))
    den = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in jax.tree.leaves(g1))
    assert (num / den) ** 0.5 <= 1e-4

