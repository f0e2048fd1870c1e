"""Tests of dreamcraft_jax.losses against hand-computed values and numpy re-implementations (float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax import losses


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# rgb / mask
# ----------------------------------------------------------------------------------------------

def test_rgb_mse_hand_case():
    # gt red, mask 0.25, background blue -> target (0.25, 0, 0.75); rendered black:
    # mean(0.0625, 0, 0.5625) = 0.625 / 3
    rgb = jnp.zeros((1, 1, 3))
    gt = jnp.asarray([[[1.0, 0.0, 0.0]]])
    mask = jnp.asarray([[0.25]])
    got = float(losses.rgb_mse(rgb, gt, mask, (0.0, 0.0, 1.0)))
    assert got == pytest.approx(0.625 / 3, rel=1e-6)
    # mask 1: the background is irrelevant; mask 0: only the background matters
    assert float(losses.rgb_mse(rgb, gt, jnp.ones((1, 1)), (0.3, 0.3, 0.3))) == pytest.approx(1 / 3, rel=1e-6)
    assert float(losses.rgb_mse(rgb, gt, jnp.zeros((1, 1)), (0.0, 0.6, 0.0))) == pytest.approx(0.36 / 3, rel=1e-6)


def test_rgb_mse_vs_numpy():
    rng = _rng(1)
    h, w = 5, 7
    rgb, gt = rng.uniform(size=(h, w, 3)), rng.uniform(size=(h, w, 3))
    mask = rng.uniform(size=(h, w))
    bg = np.array([1.0, 1.0, 1.0])
    expected = np.mean((gt * mask[..., None] + bg * (1 - mask[..., None]) - rgb) ** 2)
    got = float(losses.rgb_mse(jnp.asarray(rgb, jnp.float32), jnp.asarray(gt, jnp.float32),
                               jnp.asarray(mask, jnp.float32), tuple(bg)))
    assert got == pytest.approx(expected, rel=1e-5)


def test_mask_mse_vs_numpy():
    rng = _rng(2)
    op, m = rng.uniform(size=(6, 4)), (rng.uniform(size=(6, 4)) > 0.5).astype(float)
    got = float(losses.mask_mse(jnp.asarray(op, jnp.float32), jnp.asarray(m, jnp.float32)))
    assert got == pytest.approx(np.mean((m - op) ** 2), rel=1e-5)
    assert float(losses.mask_mse(jnp.asarray([[0.2, 1.0]]), jnp.asarray([[1.0, 0.0]]))) == pytest.approx(
        (0.64 + 1.0) / 2, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# depth
# ----------------------------------------------------------------------------------------------

def _depth_case(seed=3, h=9, w=8):
    rng = _rng(seed)
    mask = rng.choice([0.0, 0.3, 0.5, 0.7, 1.0], size=(h, w))  # > 0.5 strictly: 0.7 and 1.0 count
    gt = rng.uniform(0.5, 2.0, size=(h, w))
    return rng, mask, gt


def test_depth_pearson_perfect_correlations():
    rng, mask, gt = _depth_case()
    noise_outside = np.where(mask > 0.5, 0.0, rng.uniform(-50, 50, size=mask.shape))  # ignored pixels
    # rendered depth an increasing affine function of the (larger = farther) reference: perfect fit -> 0
    depth = 1.0 + 0.4 * gt + noise_outside
    args = [jnp.asarray(x, jnp.float32) for x in (depth, gt, mask)]
    assert float(losses.depth_pearson(*args)) == pytest.approx(0.0, abs=1e-5)
    # decreasing: an inverted relief -> 2 (no sign flip inside the loss)
    depth_bad = 3.0 - 0.7 * gt + noise_outside
    args = [jnp.asarray(x, jnp.float32) for x in (depth_bad, gt, mask)]
    assert float(losses.depth_pearson(*args)) == pytest.approx(2.0, abs=1e-5)


def test_depth_pearson_vs_numpy_corrcoef():
    rng, mask, gt = _depth_case(seed=4)
    depth = rng.uniform(1.0, 3.0, size=gt.shape) - 0.5 * gt
    sel = mask > 0.5
    assert 5 < sel.sum() < sel.size
    args = [jnp.asarray(x, jnp.float32) for x in (depth, gt, mask)]
    expected = 1.0 - np.corrcoef(depth[sel], gt[sel])[0, 1]
    assert float(losses.depth_pearson(*args)) == pytest.approx(expected, abs=1e-5)
    assert 0.05 < expected < 1.95  # a non-degenerate case


def test_depth_pearson_gradient_finite_difference():
    rng, mask, gt = _depth_case(seed=5, h=4, w=5)
    depth = rng.uniform(1.0, 3.0, size=gt.shape)
    sel = mask > 0.5

    def ref(dflat):
        return 1.0 - np.corrcoef(dflat.reshape(gt.shape)[sel], gt[sel])[0, 1]

    g = np.asarray(jax.grad(lambda d: losses.depth_pearson(d, jnp.asarray(gt, jnp.float32),
                                                           jnp.asarray(mask, jnp.float32)))(
        jnp.asarray(depth, jnp.float32))).ravel()
    eps = 1e-6
    fd = np.array([(ref(depth.ravel() + eps * e) - ref(depth.ravel() - eps * e)) / (2 * eps)
                   for e in np.eye(depth.size)])
    np.testing.assert_allclose(g, fd, atol=2e-4)
    assert np.all(g[~sel.ravel()] == 0)


# ----------------------------------------------------------------------------------------------
# normals
# ----------------------------------------------------------------------------------------------

def test_normal_smooth_2d_vs_numpy():
    rng = _rng(6)
    n = rng.uniform(size=(5, 6, 3))
    dy = [(n[j + 1, i] - n[j, i]) ** 2 for j in range(4) for i in range(6)]
    dx = [(n[j, i + 1] - n[j, i]) ** 2 for j in range(5) for i in range(5)]
    expected = np.mean(dy) + np.mean(dx)
    assert float(losses.normal_smooth_2d(jnp.asarray(n, jnp.float32))) == pytest.approx(expected, rel=1e-5)
    # hand case: a horizontal ramp 0, 1, 2 in one channel of a 2 x 3 image: dx^2 = 1 on 4 of 12 entries
    ramp = np.zeros((2, 3, 3))
    ramp[..., 0] = np.arange(3)
    assert float(losses.normal_smooth_2d(jnp.asarray(ramp))) == pytest.approx(4 / 12, rel=1e-6)


def test_normal_smooth_3d_vs_numpy():
    rng = _rng(7)
    m = 11
    a, b = rng.normal(size=(m, 3)), rng.normal(size=(m, 3))
    valid = rng.uniform(size=m) < 0.6
    expected = np.abs(a - b)[valid].mean()
    got = float(losses.normal_smooth_3d(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                        jnp.asarray(valid)))
    assert got == pytest.approx(expected, rel=1e-5)
    assert float(losses.normal_smooth_3d(jnp.asarray(a), jnp.asarray(b), jnp.zeros((m,), bool))) == 0.0


def _orientation_case(seed=8):
    rng = _rng(seed)
    m = 13
    w = rng.uniform(size=m)
    n = rng.normal(size=(m, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    d = rng.normal(size=(m, 3))
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    valid = np.arange(m) < 10
    opacity = np.array([0.0, 0.4, 0.0, 1.0, 0.2])  # 3 rays with opacity > 0
    return w, n, d, valid, opacity


def test_orientation_vs_numpy():
    w, n, d, valid, opacity = _orientation_case()
    expected = sum(w[k] * max(0.0, float(n[k] @ d[k])) ** 2 for k in range(len(w)) if valid[k]) / 3
    args = [jnp.asarray(x, jnp.float32) for x in (w, n, d)] + [jnp.asarray(valid), jnp.asarray(opacity, jnp.float32)]
    assert float(losses.orientation(*args)) == pytest.approx(expected, rel=1e-5)
    facing = np.sum(n * d, axis=-1) > 0
    assert np.any(facing & valid) and np.any(~facing & valid)  # both branches of the clamp exercised
    # no ray with opacity: divide by 1
    args0 = args[:4] + [jnp.zeros((5,))]
    assert float(losses.orientation(*args0)) == pytest.approx(expected * 3, rel=1e-5)


def test_orientation_stop_gradient_on_weights_and_normal_grad():
    w, n, d, valid, opacity = _orientation_case(seed=9)
    wj, nj, dj = (jnp.asarray(x, jnp.float32) for x in (w, n, d))
    vj, oj = jnp.asarray(valid), jnp.asarray(opacity, jnp.float32)
    gw = np.asarray(jax.grad(lambda x: losses.orientation(x, nj, dj, vj, oj))(wj))
    np.testing.assert_array_equal(gw, 0.0)
    # d/dn_k = valid_k * w_k * 2 max(0, n_k . d_k) d_k / #(opacity > 0)
    gn = np.asarray(jax.grad(lambda x: losses.orientation(wj, x, dj, vj, oj))(nj))
    dots = np.maximum(np.sum(n * d, axis=-1), 0.0)
    expected = (valid * w * 2 * dots)[:, None] * d / 3
    np.testing.assert_allclose(gn, expected, rtol=1e-5, atol=1e-7)
    assert np.any(np.abs(expected) > 1e-3)


# ----------------------------------------------------------------------------------------------
# sparsity / opaque / psnr
# ----------------------------------------------------------------------------------------------

def test_sparsity_vs_numpy():
    op = np.array([[0.0, 0.5], [1.0, 0.25]])
    # sqrt(0.01) = 0.1, sqrt(0.26), sqrt(1.01), sqrt(0.0725)
    expected = (0.1 + math.sqrt(0.26) + math.sqrt(1.01) + math.sqrt(0.0725)) / 4
    assert float(losses.sparsity(jnp.asarray(op, jnp.float32))) == pytest.approx(expected, rel=1e-6)


def test_opaque_entropy_vs_numpy_with_clipping():
    op = np.array([0.0, 1.0, -0.5, 1.5, 0.5, 0.1, 0.999, 1e-4])
    o = np.clip(op, 1e-3, 1 - 1e-3)
    expected = np.mean(-(o * np.log(o) + (1 - o) * np.log(1 - o)))
    assert float(losses.opaque_entropy(jnp.asarray(op, jnp.float32))) == pytest.approx(expected, rel=1e-5)
    # hand values: H(0.5) = ln 2; H(1e-3) = -(1e-3 ln 1e-3 + 0.999 ln 0.999) = 0.0079073...
    assert float(losses.opaque_entropy(jnp.asarray([0.5]))) == pytest.approx(math.log(2.0), rel=1e-6)
    h_clip = -(1e-3 * math.log(1e-3) + 0.999 * math.log(0.999))
    assert float(losses.opaque_entropy(jnp.asarray([0.0, 1.0]))) == pytest.approx(h_clip, rel=1e-4)
    assert h_clip == pytest.approx(0.0079073, rel=1e-4)
    # finite gradient at the clipped ends (zero there), entropy gradient in between
    g = np.asarray(jax.grad(lambda x: losses.opaque_entropy(x))(jnp.asarray([0.0, 1.0, 0.2])))
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g[:2], 0.0)
    assert g[2] == pytest.approx(math.log((1 - 0.2) / 0.2) / 3, rel=1e-5)


@pytest.mark.parametrize("mse, db", [(0.01, 20.0), (1e-4, 40.0), (0.25, 10 * math.log10(4.0))])
def test_psnr_known_mse(mse, db):
    target = jnp.full((4, 6, 3), 0.3)
    rgb = target + math.sqrt(mse)
    assert float(losses.psnr(rgb, target)) == pytest.approx(db, rel=1e-4)


def test_psnr_identical_is_clamped():
    x = jnp.full((2, 2, 3), 0.5)
    assert float(losses.psnr(x, x)) == pytest.approx(120.0)
