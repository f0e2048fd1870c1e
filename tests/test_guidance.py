"""Tests of guidance/sds.py, guidance/prompts.py and guidance/zero123.py against hand values and numpy (float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.cameras import make_camera
from dreamcraft_jax.guidance import prompts, sds, zero123
from dreamcraft_jax.models import schedules
from dreamcraft_jax.models.schedules import NoiseSchedule


def _alphabar_np():
    return np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)


def _draws(key, shape, min_step, max_step):
    """The documented random draws of sds_loss: (t, noise)."""
    k_t, k_noise = jax.random.split(key)
    t = jax.random.randint(k_t, (shape[0],), min_step, max_step + 1, dtype=jnp.int32)
    return np.asarray(t), np.asarray(jax.random.normal(k_noise, shape), np.float64)


# ---------------------------------------------------------------------------------------------- timesteps, w(t)


def test_timestep_range_annealing_hand_values():
    lo, hi = (0, 0.7, 0.2, 200), (0, 0.85, 0.5, 200)
    expected = {0: (700, 850), 100: (450, 675), 200: (200, 500), 1000: (200, 500)}
    for step, (e_lo, e_hi) in expected.items():
        got = sds.timestep_range(step, lo, hi, 1000)
        assert (int(got[0]), int(got[1])) == (e_lo, e_hi), step
    # traced step, and constant percents whose float32 product is just below the integer (0.02 * 1000)
    got = jax.jit(lambda s: sds.timestep_range(s, lo, hi))(jnp.int32(100))
    assert (int(got[0]), int(got[1])) == (450, 675)
    assert tuple(int(v) for v in sds.timestep_range(0, 0.02, 0.98)) == (20, 980)


def test_sds_weight_hand_values():
    s = schedules.default_schedule()
    ab = _alphabar_np()
    t = np.array([20, 500, 980])
    np.testing.assert_allclose(np.asarray(sds.sds_weight(s, t, "sds")), 1 - ab[t], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sds.sds_weight(s, t, "uniform")), np.ones(3))
    np.testing.assert_allclose(np.asarray(sds.sds_weight(s, t, "fantasia3d")), np.sqrt(ab[t]) * (1 - ab[t]),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        sds.sds_weight(s, t, "nope")


# ---------------------------------------------------------------------------------------------- SDS loss


class TinyUNet:
    """A linear 'UNet': out_c = x W_c + b t / 1000, out_u = x W_u (channels last), numpy twin included."""

    def __init__(self, channels=4, seed=0):
        rng = np.random.default_rng(seed)
        self.w_c = rng.normal(size=(channels, channels)) * 0.3
        self.w_u = rng.normal(size=(channels, channels)) * 0.3
        self.b = rng.normal(size=(channels,))

    def __call__(self, x, t):
        tt = t.astype(jnp.float32).reshape(-1, 1, 1, 1) / 1000.0
        return (x @ jnp.asarray(self.w_c, jnp.float32) + jnp.asarray(self.b, jnp.float32) * tt,
                x @ jnp.asarray(self.w_u, jnp.float32))

    def numpy(self, x, t):
        tt = t.reshape(-1, 1, 1, 1) / 1000.0
        return x @ self.w_c + self.b * tt, x @ self.w_u


@pytest.mark.parametrize("weighting,prediction_type", [("sds", "epsilon"), ("uniform", "epsilon"),
                                                       ("fantasia3d", "epsilon"), ("sds", "v_prediction")])
def test_sds_gradient_matches_numpy(weighting, prediction_type):
    s = NoiseSchedule.from_config(dict(schedules.SD_SCHEDULER_CONFIG, prediction_type=prediction_type))
    unet = TinyUNet()
    latents = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 4))
    key, step, scale = jax.random.PRNGKey(5), 100, 7.5
    kw = dict(eps_fn=unet, schedule=s, guidance_scale=scale, weighting=weighting,
              min_step_percent=(0, 0.7, 0.2, 200), max_step_percent=(0, 0.85, 0.5, 200))

    # expected, independently in float64 numpy
    t, noise = _draws(key, latents.shape, 450, 675)
    ab = _alphabar_np()[t][:, None, None, None]
    z = np.asarray(latents, np.float64)
    x_t = np.sqrt(ab) * z + np.sqrt(1 - ab) * noise
    out_c, out_u = unet.numpy(x_t, t)
    out = out_u + scale * (out_c - out_u)
    eps_hat = out if prediction_type == "epsilon" else np.sqrt(ab) * out + np.sqrt(1 - ab) * x_t
    w = {"sds": 1 - ab, "uniform": np.ones_like(ab), "fantasia3d": np.sqrt(ab) * (1 - ab)}[weighting]
    grad = w * (eps_hat - noise)

    (loss, stats), g = jax.value_and_grad(lambda z: sds.sds_loss(z, key, step, **kw), has_aux=True)(latents)
    np.testing.assert_array_equal(np.asarray(stats["t"]), t)
    assert (int(stats["min_step"]), int(stats["max_step"])) == (450, 675)
    np.testing.assert_allclose(np.asarray(g), grad / 3, rtol=1e-4, atol=1e-6)
    assert float(loss) == pytest.approx(0.5 * np.sum(grad ** 2) / 3, rel=1e-4)
    assert float(stats["grad_mean_abs"]) == pytest.approx(np.mean(np.abs(grad)), rel=1e-4)
    assert float(stats["grad_norm"]) == pytest.approx(np.linalg.norm(grad), rel=1e-4)


def test_sds_grad_clip_and_nan_to_num():
    s = schedules.default_schedule()
    latents = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 4))
    key = jax.random.PRNGKey(2)
    t, noise = _draws(key, latents.shape, 20, 980)

    def eps_fn(x, tt):  # a big prediction (so clipping bites) with one NaN
        return jnp.full_like(x, 3.0).at[0, 0, 0, 0].set(jnp.nan)

    w = (1 - _alphabar_np()[t])[:, None, None, None]
    raw = w * (3.0 - noise)
    raw[0, 0, 0, 0] = 0.0  # nan_to_num
    for clip, step, c in [(0.5, 0, 0.5), ((0, 0.1, 1.1, 100), 50, 0.6)]:
        g = jax.grad(lambda z: sds.sds_loss(z, key, step, eps_fn=eps_fn, schedule=s, guidance_scale=None,
                                            grad_clip=clip)[0])(latents)
        np.testing.assert_allclose(np.asarray(g), np.clip(raw, -c, c) / 2, rtol=1e-5, atol=1e-7)
        assert np.abs(np.asarray(g)).max() <= c / 2 + 1e-7


def test_sds_surrogate_value_and_gradient():
    z = jnp.asarray([[1000.0, -2.0], [0.5, 3.0]])
    grad = jnp.asarray([[1e-4, 2e-3], [-5e-4, 0.0]])
    value, g = jax.value_and_grad(sds.sds_surrogate)(z, grad)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(grad) / 2)  # exact, even next to |z| = 1000
    assert float(value) == pytest.approx(0.5 * float(jnp.sum(grad ** 2)) / 2, rel=1e-6)


def test_sd_sds_from_images_resizes_scales_and_backprops():
    s = schedules.default_schedule()
    images = jax.random.uniform(jax.random.PRNGKey(3), (2, 12, 12, 3))
    seen = {}
    proj = jax.random.normal(jax.random.PRNGKey(4), (3, 4)) * 0.5

    def encode_fn(x):  # an 'encoder': 4x4 average pool and a channel map (differentiable)
        seen["x"] = x
        pooled = x.reshape(2, 4, 4, 4, 4, 3).mean(axis=(2, 4))
        return pooled @ proj

    unet = TinyUNet()
    key = jax.random.PRNGKey(9)
    run = lambda im: sds.sd_sds_from_images(im, key, 0, encode_fn=encode_fn, eps_fn=unet, schedule=s,  # noqa
                                            guidance_scale=7.5, resolution=16)[0]
    run(images)  # eager: records the encoder input
    x = np.asarray(seen["x"])
    g_images = jax.grad(run)(images)
    assert x.shape == (2, 16, 16, 3) and x.min() >= -1.0 and x.max() <= 1.0
    # bilinear upsampling without antialias, half-pixel centres: the corner pixel is copied
    np.testing.assert_allclose(x[:, 0, 0], 2 * np.asarray(images[:, 0, 0]) - 1, rtol=1e-6)
    # chain rule through resize and encoder: d loss / d images = J^T (grad / B)
    latents, vjp = jax.vjp(lambda im: encode_fn(sds.images_to_model_input(im, 16)), images)
    _, stats = sds.sds_loss(latents, key, 0, eps_fn=unet, schedule=s, guidance_scale=7.5)
    t, noise = _draws(key, latents.shape, 20, 980)
    ab = _alphabar_np()[t][:, None, None, None]
    x_t = np.sqrt(ab) * np.asarray(latents, np.float64) + np.sqrt(1 - ab) * noise
    c, u = unet.numpy(x_t, t)
    grad = (1 - ab) * (u + 7.5 * (c - u) - noise)
    (expected,) = vjp(jnp.asarray(grad / 2, jnp.float32))
    np.testing.assert_allclose(np.asarray(g_images), np.asarray(expected), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- prompts


def test_direction_index_hand_cases():
    cases = [  # (elevation, azimuth) -> direction
        (0, 0, "front"), (0, 90, "side"), (0, 180, "back"), (0, -170, "back"), (0, -90, "side"),
        (0, 44.9, "front"), (0, 45, "side"), (0, -135, "side"), (0, -136, "back"), (0, 360, "front"),
        (80, 0, "overhead"), (80, 180, "overhead"), (60, 0, "front"), (30, 120, "side"),
    ]
    elev = jnp.asarray([c[0] for c in cases], jnp.float32)
    azim = jnp.asarray([c[1] for c in cases], jnp.float32)
    got = np.asarray(prompts.direction_index(elev, azim))
    assert got.dtype == np.int32
    assert [prompts.DIRECTIONS[i] for i in got] == [c[2] for c in cases]


def test_view_prompts():
    assert prompts.view_prompts("a cat") == ("a cat, side view", "a cat, front view", "a cat, back view",
                                             "a cat, overhead view")


def test_perp_neg_weights_hand_cases():
    e = math.exp(-0.5)
    elev = jnp.asarray([0.0, 0.0, 0.0, 0.0, 80.0])
    azim = jnp.asarray([0.0, 90.0, 180.0, -45.0, 30.0])
    w = prompts.perp_neg_weights(elev, azim)
    np.testing.assert_allclose(np.asarray(w.pos_coeffs), [
        [0, 1, 0, 0],        # front
        [1, 0, 0, 0],        # side (r = 1 in the side-back branch)
        [0, 0, 1, 0],        # back
        [0.5, 0.5, 0, 0],    # halfway front-side
        [0, 0, 0, 1],        # overhead
    ], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(w.neg_index), [[1, 0], [0, 1], [0, 1], [1, 0], [-1, -1]])
    f = lambda a, b, c, r: a * math.exp(-b * r) + c  # noqa: E731
    np.testing.assert_allclose(np.asarray(w.neg_weights), [
        [-(4 * e - 2.426), -(4 - 2.426)],
        [-(e - 0.606), -(e + 0.967)],
        [-(1 - 0.606), -(1 + 0.967)],
        [-f(4, 0.5, -2.426, 0.5), -f(4, 0.5, -2.426, 0.5)],
        [0.0, 0.0],
    ], rtol=1e-5, atol=1e-6)


def test_perp_neg_embeddings():
    text_vd = jnp.arange(4 * 2 * 3, dtype=jnp.float32).reshape(4, 2, 3)
    uncond = jnp.full((2, 3), -1.0)
    w = prompts.perp_neg_weights(jnp.asarray([0.0, 80.0]), jnp.asarray([-45.0, 0.0]))
    pos, neg = prompts.perp_neg_embeddings(text_vd, uncond, w)
    np.testing.assert_allclose(np.asarray(pos[0]), 0.5 * np.asarray(text_vd[0] + text_vd[1]))
    np.testing.assert_allclose(np.asarray(pos[1]), np.asarray(text_vd[3]))
    np.testing.assert_array_equal(np.asarray(neg[0]), np.asarray(text_vd[jnp.asarray([1, 0])]))
    np.testing.assert_array_equal(np.asarray(neg[1]), -np.ones((2, 2, 3)))


def test_perp_neg_combine_closed_forms():
    rng = np.random.default_rng(0)
    eps_u, d_pos = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(2, 3, 3, 4))
    s, w = 7.5, np.array([[-1.5, -0.3], [-0.2, -2.0]])
    # parallel negatives: their perpendicular parts vanish -> plain CFG
    parallel = np.stack([2.0 * d_pos, -0.5 * d_pos], axis=1)
    got = prompts.perp_neg_combine(eps_u, eps_u + d_pos, eps_u[:, None] + parallel, w, s)
    np.testing.assert_allclose(np.asarray(got), eps_u + s * d_pos, rtol=1e-4, atol=1e-5)
    # negatives orthogonal to d_pos (per sample) pass through unchanged
    raw = rng.normal(size=(2, 2, 3, 3, 4))
    dots = np.einsum("bkhwc,bhwc->bk", raw, d_pos) / np.einsum("bhwc,bhwc->b", d_pos, d_pos)[:, None]
    ortho = raw - dots[:, :, None, None, None] * d_pos[:, None]
    got = prompts.perp_neg_combine(eps_u, eps_u + d_pos, eps_u[:, None] + ortho, w, s)
    expected = eps_u + s * (d_pos + np.einsum("bk,bkhwc->bhwc", w, ortho))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- Zero123


def test_zero123_T_hand_cases():
    elev = np.array([0.0, 0.0, 30.0, -10.0])
    azim = np.array([0.0, 90.0, 0.0, -90.0])
    dist = np.array([3.8, 3.8, 3.8, 4.3])
    T = np.asarray(zero123.zero123_T(elev, azim, dist, 0.0, 0.0, 3.8))
    np.testing.assert_allclose(T, [
        [0, 0, 1, 0],                    # same view
        [0, 1, 0, 0],                    # 90 deg to the left
        [-math.pi / 6, 0, 1, 0],         # 30 deg above: polar shrinks
        [math.pi / 18, -1, 0, 0.5],      # 10 deg below, 90 deg right, 0.5 farther
    ], atol=1e-6)
    # relative to a reference at elevation 20, azimuth 30
    T = np.asarray(zero123.zero123_T(50.0, 120.0, 3.8, 20.0, 30.0, 3.8))
    np.testing.assert_allclose(T, [-math.pi / 6, 1, 0, 0], atol=1e-6)


def test_stable_zero123_T_fourth_entry_is_input_polar():
    T = np.asarray(zero123.stable_zero123_T(np.array([30.0, 0.0]), np.array([0.0, 180.0]), None, 15.0, 0.0))
    np.testing.assert_allclose(T, [[-math.pi / 12, 0, 1, math.radians(75)],
                                   [math.pi / 12, 0, -1, math.radians(75)]], atol=1e-6)
    T0 = np.asarray(zero123.camera_T("stable_zero123", 0.0, 0.0, 3.8))
    np.testing.assert_allclose(T0, [0, 0, 1, math.pi / 2], atol=1e-6)


def test_zero123_conditioning_and_uncond_zeros():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(1, 768)).astype(np.float32)
    w = (rng.normal(size=(772, 768)) * 0.05).astype(np.float32)
    T = np.asarray(zero123.stable_zero123_T(np.array([10.0, 20.0, 30.0]), np.array([0.0, 90.0, -90.0])))
    cond, uncond = zero123.zero123_conditioning(jnp.asarray(emb), jnp.asarray(T), lambda x: x @ jnp.asarray(w))
    expected = np.concatenate([np.repeat(emb, 3, 0), T], axis=-1) @ w
    assert cond.shape == (3, 1, 768)
    np.testing.assert_allclose(np.asarray(cond[:, 0]), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(uncond), np.zeros((3, 1, 768)))


def test_zero123_sds_uncond_half_gets_zeros_and_cfg():
    batch, res = 2, 32
    rng = np.random.default_rng(2)
    ref_latent = jnp.asarray(rng.normal(size=(1, 4, 4, 4)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(1, 768)), jnp.float32)
    w_cc = jnp.asarray(rng.normal(size=(772, 768)) * 0.05, jnp.float32)
    proj = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    camera = make_camera(jnp.asarray([20.0, -5.0]), jnp.asarray([90.0, 180.0]), 3.8, 20.0)
    calls = []

    def unet_fn(x_in, t, context):  # records its inputs and echoes a known function of them
        calls.append((x_in, t, context))
        return 0.3 * x_in[..., :4] + 0.5 * x_in[..., 4:] + jnp.mean(context, axis=(1, 2))[:, None, None, None]

    def encode_fn(x):  # 8x8 average pool + channel map
        return x.reshape(batch, 4, 8, 4, 8, 3).mean(axis=(2, 4)) @ proj

    images = jax.random.uniform(jax.random.PRNGKey(0), (batch, 20, 20, 3))
    key, step = jax.random.PRNGKey(1), 0
    loss, stats = zero123.zero123_sds_loss(
        images, camera, key, step, unet_fn=unet_fn, encode_fn=encode_fn, image_embedding=emb,
        ref_latent=ref_latent, cc_projection_fn=lambda x: x @ w_cc, resolution=res, guidance_scale=5.0)
    (x_in, t, context), = calls
    x_in, t, context = np.asarray(x_in), np.asarray(t), np.asarray(context)
    assert x_in.shape == (2 * batch, 4, 4, 8) and context.shape == (2 * batch, 1, 768)
    np.testing.assert_array_equal(x_in[:batch, ..., 4:], 0.0)          # uncond: zero concat latent
    np.testing.assert_array_equal(context[:batch], 0.0)                # uncond: zero context token
    np.testing.assert_array_equal(x_in[batch:, ..., 4:], np.broadcast_to(np.asarray(ref_latent), (batch, 4, 4, 4)))
    np.testing.assert_array_equal(x_in[:batch, ..., :4], x_in[batch:, ..., :4])
    np.testing.assert_array_equal(t[:batch], t[batch:])
    T = np.asarray(zero123.stable_zero123_T(np.array([20.0, -5.0]), np.array([90.0, 180.0])))
    expected_ctx = np.concatenate([np.repeat(np.asarray(emb), batch, 0), T], -1) @ np.asarray(w_cc)
    np.testing.assert_allclose(context[batch:, 0], expected_ctx, rtol=1e-4, atol=1e-4)

    # CFG 5 on the echoed outputs, then the SDS gradient (loss value = 0.5 sum grad^2 / B)
    eps = 0.3 * x_in[..., :4] + 0.5 * x_in[..., 4:] + context.mean(axis=(1, 2))[:, None, None, None]
    eps_hat = eps[:batch] + 5.0 * (eps[batch:] - eps[:batch])
    latents = np.asarray(encode_fn(sds.images_to_model_input(images, res)), np.float64)
    t_np, noise = _draws(key, latents.shape, 20, 980)
    np.testing.assert_array_equal(t_np, t[:batch])
    ab = _alphabar_np()[t_np][:, None, None, None]
    np.testing.assert_allclose(x_in[:batch, ..., :4], np.sqrt(ab) * latents + np.sqrt(1 - ab) * noise,
                               rtol=1e-5, atol=1e-5)
    grad = (1 - ab) * (eps_hat - noise)
    assert float(loss) == pytest.approx(0.5 * np.sum(grad ** 2) / batch, rel=1e-4)
