"""Tests of dreamcraft_jax.cameras against hand-derived numbers (conventions: the module docstring).

Hand derivation used below for the reference camera (elevation 0, azimuth 0, distance d):
eye = (d, 0, 0), forward = (-1, 0, 0), world up = (0, 0, 1);
right = forward x up = (-1, 0, 0) x (0, 0, 1) = (0*1 - 0*0, 0*0 - (-1)*1, (-1)*0 - 0*0) = (0, 1, 0);
cam_up = right x forward = (0, 1, 0) x (-1, 0, 0) = (1*0 - 0*0, 0*(-1) - 0*0, 0*0 - 1*(-1)) = (0, 0, 1);
back = -forward = (1, 0, 0).  A camera-space direction (x, y, -1) maps to world x*right + y*up - back
= (-1, x, y).  For azimuth 90 (eye (0, d, 0)): forward = (0, -1, 0), right = (0,-1,0) x (0,0,1) = (-1, 0, 0),
cam_up = (0, 0, 1), back = (0, 1, 0), so (x, y, -1) maps to (-x, -1, y).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dreamcraft_jax import cameras


def _cfg(progressive_until=200):
    c = ml_collections.ConfigDict()
    c.elevation_deg = 0.0
    c.azimuth_deg = 0.0
    c.distance = 3.8
    c.fovy_deg = 20.0
    c.elevation_range = (-10.0, 45.0)
    c.azimuth_range = (-180.0, 180.0)
    c.distance_range = (3.8, 3.8)
    c.fovy_range = (20.0, 20.0)
    c.progressive_until = progressive_until
    return c


# ----------------------------------------------------------------------------------------------
# spherical_to_position
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("elev, azim, dist, expected", [
    (0.0, 0.0, 2.5, (2.5, 0.0, 0.0)),
    (0.0, 90.0, 2.5, (0.0, 2.5, 0.0)),
    (0.0, 180.0, 1.0, (-1.0, 0.0, 0.0)),
    (0.0, -90.0, 1.0, (0.0, -1.0, 0.0)),
    (90.0, 0.0, 3.0, (0.0, 0.0, 3.0)),
    (90.0, 137.0, 3.0, (0.0, 0.0, 3.0)),
    (-90.0, 20.0, 3.0, (0.0, 0.0, -3.0)),
    # 2 (cos30 cos45, cos30 sin45, sin30) = (sqrt(3/2), sqrt(3/2), 1)
    (30.0, 45.0, 2.0, (math.sqrt(1.5), math.sqrt(1.5), 1.0)),
])
def test_spherical_to_position_hand_cases(elev, azim, dist, expected):
    got = np.asarray(cameras.spherical_to_position(elev, azim, dist))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_spherical_to_position_batched():
    elev = np.array([[0.0, 0.0], [30.0, -30.0]])
    azim = np.array([[90.0, 180.0], [45.0, -45.0]])
    got = np.asarray(cameras.spherical_to_position(elev, azim, 2.0))
    assert got.shape == (2, 2, 3)
    r = math.sqrt(1.5)
    np.testing.assert_allclose(got, [[[0.0, 2.0, 0.0], [-2.0, 0.0, 0.0]],
                                     [[r, r, 1.0], [r, -r, -1.0]]], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# look_at / make_camera
# ----------------------------------------------------------------------------------------------

def _check_frame(c2w, eye):
    c2w = np.asarray(c2w, np.float64)
    eye = np.asarray(eye, np.float64)
    rot = c2w[..., :3, :3]
    eye_b = np.broadcast_to(eye, rot.shape[:-2] + (3,))
    rtr = np.einsum("...ji,...jk->...ik", rot, rot)
    np.testing.assert_allclose(rtr, np.broadcast_to(np.eye(3), rtr.shape), atol=2e-6)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=2e-6)
    np.testing.assert_allclose(c2w[..., :3, 3], eye_b, atol=1e-6)
    np.testing.assert_allclose(c2w[..., 3, :], np.broadcast_to([0, 0, 0, 1.0], c2w.shape[:-2] + (4,)), atol=0)
    # The camera looks along its -z axis: -third column = unit vector from the eye to the origin.
    to_origin = -eye_b / np.linalg.norm(eye_b, axis=-1, keepdims=True)
    np.testing.assert_allclose(-rot[..., :, 2], to_origin, atol=2e-6)
    return rot


def test_make_camera_frames_orthonormal_and_look_at_origin():
    rng = np.random.default_rng(0)
    elev = rng.uniform(-85.0, 85.0, size=64)
    azim = rng.uniform(-180.0, 180.0, size=64)
    dist = rng.uniform(1.0, 5.0, size=64)
    cam = cameras.make_camera(elev, azim, dist, 40.0)
    e, a = np.deg2rad(elev), np.deg2rad(azim)
    eye = dist[:, None] * np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1)
    rot = _check_frame(cam.c2w, eye)
    # camera up has a positive world-z component for elevations in (-90, 90): it is cos(e) here
    np.testing.assert_allclose(rot[:, 2, 1], np.cos(e), atol=2e-6)
    assert np.all(rot[:, 2, 1] > 0)
    # camera right is horizontal (no z component) and equals (-sin a, cos a, 0)
    np.testing.assert_allclose(rot[:, :, 0], np.stack([-np.sin(a), np.cos(a), 0 * a], -1), atol=2e-6)
    np.testing.assert_allclose(np.asarray(cam.position), eye, atol=2e-6)
    np.testing.assert_allclose(np.asarray(cam.fovy), np.deg2rad(40.0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cam.elevation), elev, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cam.azimuth), azim, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cam.distance), dist, rtol=1e-6)


def test_reference_camera_frame_literal():
    cam = cameras.make_camera(0.0, 0.0, 3.8, 20.0)
    expected = np.array([[0.0, 0.0, 1.0, 3.8],
                         [1.0, 0.0, 0.0, 0.0],
                         [0.0, 1.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(np.asarray(cam.c2w), expected, atol=1e-6)
    # looks along -x
    np.testing.assert_allclose(-np.asarray(cam.c2w)[:3, 2], [-1.0, 0.0, 0.0], atol=1e-6)
    ref = cameras.reference_camera(_cfg())
    np.testing.assert_allclose(np.asarray(ref.c2w), expected, atol=1e-6)


def test_look_at_degenerate_poles_still_valid():
    for eye in ([0.0, 0.0, 2.0], [0.0, 0.0, -3.0]):
        c2w = cameras.look_at(jnp.asarray(eye))
        assert np.all(np.isfinite(np.asarray(c2w)))
        _check_frame(c2w, eye)


def test_look_at_other_target():
    eye = np.array([1.0, 2.0, 0.5])
    target = np.array([0.5, -1.0, 0.25])
    rot = np.asarray(cameras.look_at(jnp.asarray(eye), target=tuple(target)))[:3, :3]
    d = (target - eye) / np.linalg.norm(target - eye)
    np.testing.assert_allclose(-rot[:, 2], d, atol=2e-6)
    np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=2e-6)


# ----------------------------------------------------------------------------------------------
# get_rays
# ----------------------------------------------------------------------------------------------

def unit_coordinates(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def test_get_rays_square_reference_literals():
    # H = W = 4, fovy 90: f = 4 / (2 tan 45) = 2.  Pixel (j, i): x = (i + .5 - 2) / 2, y = -(j + .5 - 2) / 2.
    cam = cameras.make_camera(0.0, 0.0, 3.8, 90.0)
    o, d = cameras.get_rays(cam, 4, 4)
    o, d = np.asarray(o), np.asarray(d)
    assert o.shape == d.shape == (4, 4, 3)
    # (row 0, col 0): x = -0.75, y = 0.75 -> world (-1, -0.75, 0.75)
    np.testing.assert_allclose(d[0, 0], unit_coordinates([-1.0, -0.75, 0.75]), atol=1e-6)
    # (row 1, col 2): x = 0.25, y = 0.25 -> world (-1, 0.25, 0.25)
    np.testing.assert_allclose(d[1, 2], unit_coordinates([-1.0, 0.25, 0.25]), atol=1e-6)
    # (row 2, col 1): x = -0.25, y = -0.25
    np.testing.assert_allclose(d[2, 1], unit_coordinates([-1.0, -0.25, -0.25]), atol=1e-6)
    # (row 3, col 3): x = 0.75, y = -0.75
    np.testing.assert_allclose(d[3, 3], unit_coordinates([-1.0, 0.75, -0.75]), atol=1e-6)
    # (row 0, col 3): x = 0.75, y = 0.75
    np.testing.assert_allclose(d[0, 3], unit_coordinates([-1.0, 0.75, 0.75]), atol=1e-6)
    np.testing.assert_allclose(o, np.broadcast_to([3.8, 0.0, 0.0], o.shape), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-6)
    # top row points up (world +z), bottom row down; column 0 is the camera's left (right = world +y)
    assert np.all(d[0, :, 2] > 0) and np.all(d[-1, :, 2] < 0)
    assert np.all(d[:, 0, 1] < 0) and np.all(d[:, -1, 1] > 0)


def test_get_rays_non_square_literals():
    # H = 3, W = 5, fovy 90: f = 3 / 2.  x = (i + .5 - 2.5) / 1.5, y = -(j + .5 - 1.5) / 1.5.
    cam = cameras.make_camera(0.0, 0.0, 2.0, 90.0)
    o, d = cameras.get_rays(cam, 3, 5)
    o, d = np.asarray(o), np.asarray(d)
    assert d.shape == (3, 5, 3)
    np.testing.assert_allclose(d[0, 0], np.array([-3.0, -4.0, 2.0]) / math.sqrt(29.0), atol=1e-6)
    np.testing.assert_allclose(d[1, 2], [-1.0, 0.0, 0.0], atol=1e-6)  # exact centre pixel
    np.testing.assert_allclose(d[2, 4], np.array([-3.0, 4.0, -2.0]) / math.sqrt(29.0), atol=1e-6)
    np.testing.assert_allclose(d[1, 3], np.array([-3.0, 2.0, 0.0]) / math.sqrt(13.0), atol=1e-6)
    np.testing.assert_allclose(d[0, 2], np.array([-3.0, 0.0, 2.0]) / math.sqrt(13.0), atol=1e-6)
    np.testing.assert_allclose(o, np.broadcast_to([2.0, 0.0, 0.0], o.shape), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-6)


def test_get_rays_azimuth_90_literals():
    # eye (0, 2, 0): (x, y, -1) -> (-x, -1, y).  H = 3, W = 5, fovy 90 as above.
    cam = cameras.make_camera(0.0, 90.0, 2.0, 90.0)
    o, d = cameras.get_rays(cam, 3, 5)
    o, d = np.asarray(o), np.asarray(d)
    np.testing.assert_allclose(d[0, 0], np.array([4.0, -3.0, 2.0]) / math.sqrt(29.0), atol=1e-6)
    np.testing.assert_allclose(d[1, 2], [0.0, -1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(o, np.broadcast_to([0.0, 2.0, 0.0], o.shape), atol=1e-6)


def test_get_rays_fovy_sets_focal():
    # fovy 60 on H = 2, W = 2: f = 1 / tan 30 = sqrt(3); pixel (0, 0): x = -0.5/sqrt3, y = 0.5/sqrt3.
    cam = cameras.make_camera(0.0, 0.0, 3.0, 60.0)
    _, d = cameras.get_rays(cam, 2, 2)
    s = 0.5 / math.sqrt(3.0)
    np.testing.assert_allclose(np.asarray(d)[0, 0], unit_coordinates([-1.0, -s, s]), atol=1e-6)


def test_get_rays_offset_is_one_fixed_camera_shift():
    """The official jitter: one 3-vector on every origin, one on every unnormalised direction (z = -1 frame)."""
    cam = cameras.make_camera(20.0, 30.0, 3.8, 40.0)
    h, w = 6, 5
    offset = np.array([[0.01, -0.02, 0.03], [0.004, 0.002, -0.003]], np.float32)
    o, d = (np.asarray(x, np.float64) for x in cameras.get_rays(cam.replace(ray_offset=jnp.asarray(offset)), h, w))
    c2w = np.asarray(cam.c2w, np.float64)
    np.testing.assert_allclose(o, np.broadcast_to(c2w[:3, 3] + offset[0], (h, w, 3)), atol=1e-6)
    # Independent pixel directions: focal from fovy, pixel centres, camera frame x right / y up / z = -1.
    f = 0.5 * h / math.tan(math.radians(20.0))
    ii, jj = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    cam_dirs = np.stack([(ii - w / 2) / f, -(jj - h / 2) / f, -np.ones_like(ii)], -1)
    want = cam_dirs @ c2w[:3, :3].T + offset[1]
    np.testing.assert_allclose(d, want / np.linalg.norm(want, axis=-1, keepdims=True), atol=1e-6)
    _, d0 = cameras.get_rays(cam, h, w)
    assert np.abs(d - np.asarray(d0)).max() > 1e-4  # the offset does move the rays


def test_ray_offset_is_deterministic_gaussian():
    a = np.asarray(cameras.ray_offset(jax.random.PRNGKey(3), 2e-3))
    assert a.shape == (2, 3)
    np.testing.assert_array_equal(a, np.asarray(cameras.ray_offset(jax.random.PRNGKey(3), 2e-3)))
    np.testing.assert_allclose(np.asarray(cameras.ray_offset(jax.random.PRNGKey(3), 4e-3)), 2 * a, rtol=1e-6)
    many = np.asarray(jax.vmap(lambda k: cameras.ray_offset(k, 2e-3))(jax.random.split(jax.random.PRNGKey(0), 4000)))
    assert abs(many.std() / 2e-3 - 1.0) < 0.03 and abs(many.mean()) < 1e-4  # 24000 draws: std error ~0.5 %


# ----------------------------------------------------------------------------------------------
# sample_cameras / progressive ranges
# ----------------------------------------------------------------------------------------------

def test_sample_cameras_step0_is_reference():
    cfg = _cfg()
    cam = cameras.sample_cameras(jax.random.PRNGKey(0), 16, 0, cfg)
    ref = cameras.make_camera(0.0, 0.0, 3.8, 20.0)
    np.testing.assert_allclose(np.asarray(cam.elevation), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cam.azimuth), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cam.distance), 3.8, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cam.fovy), math.radians(20.0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cam.c2w), np.broadcast_to(np.asarray(ref.c2w), (16, 4, 4)), atol=1e-6)


def _sample(n, step, seed=1, cfg=None):
    cam = jax.jit(lambda k, s: cameras.sample_cameras(k, n, s, cfg or _cfg()))(jax.random.PRNGKey(seed), step)
    return np.asarray(cam.elevation, np.float64), np.asarray(cam.azimuth, np.float64), cam


@pytest.mark.parametrize("step", [200, 1000])
def test_sample_cameras_full_ranges(step):
    elev, azim, cam = _sample(4000, step)
    assert elev.min() >= -10.0 - 1e-4 and elev.max() <= 45.0 + 1e-4
    assert azim.min() >= -180.0 - 1e-4 and azim.max() <= 180.0 + 1e-4
    # and they fill the ranges (4000 draws: extremes within ~1% of the span)
    assert elev.min() < -9.0 and elev.max() > 44.0
    assert azim.min() < -175.0 and azim.max() > 175.0
    # the cameras sit where their angles say and look at the origin
    e, a = np.deg2rad(elev), np.deg2rad(azim)
    eye = 3.8 * np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1)
    np.testing.assert_allclose(np.asarray(cam.position), eye, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cam.distance), 3.8, rtol=1e-6)


def test_sample_cameras_half_widened():
    elev, azim, _ = _sample(4000, 100)
    # r = 0.5: elevation [0.5 * -10, 0.5 * 45] = [-5, 22.5]; azimuth [-90, 90]
    assert elev.min() >= -5.0 - 1e-4 and elev.max() <= 22.5 + 1e-4
    assert elev.min() < -4.5 and elev.max() > 22.0
    assert azim.min() >= -90.0 - 1e-4 and azim.max() <= 90.0 + 1e-4
    assert azim.min() < -88.0 and azim.max() > 88.0
    lo, hi = cameras.progressive_ranges(100, _cfg())["elevation"]
    np.testing.assert_allclose([float(lo), float(hi)], [-5.0, 22.5], rtol=1e-6)
    lo, hi = cameras.progressive_ranges(50, _cfg())["azimuth"]
    np.testing.assert_allclose([float(lo), float(hi)], [-45.0, 45.0], rtol=1e-6)


def test_progressive_until_zero_is_full_range():
    elev, _, _ = _sample(2000, 0, cfg=_cfg(progressive_until=0))
    assert elev.min() < -9.0 and elev.max() > 44.0


def test_sample_cameras_elevation_distribution():
    """Mixture 50/50 of uniform-in-angle and uniform-in-sin on [a, b] = [-10, 45] deg.

    Closed forms: uniform angle: E sin e = (cos a - cos b) / (b - a), E sin^2 e = 1/2 - (sin 2b - sin 2a) / (4 (b - a));
    uniform sin: E s = (sin a + sin b) / 2, E s^2 = (sa^2 + sa sb + sb^2) / 3.
    CDF of the mixture: F(x) = 0.5 (x - a) / (b - a) + 0.5 (sin x - sin a) / (sin b - sin a).
    """
    n = 40000
    elev, _, _ = _sample(n, 500, seed=7)
    a, b = math.radians(-10.0), math.radians(45.0)
    sa, sb = math.sin(a), math.sin(b)
    m_angle = (math.cos(a) - math.cos(b)) / (b - a)
    m_sin = (sa + sb) / 2
    q_angle = 0.5 - (math.sin(2 * b) - math.sin(2 * a)) / (4 * (b - a))
    q_sin = (sa * sa + sa * sb + sb * sb) / 3
    mean = 0.5 * (m_angle + m_sin)
    var = 0.5 * (q_angle + q_sin) - mean**2
    sigma = math.sqrt(var / n)
    s = np.sin(np.deg2rad(elev))
    assert abs(s.mean() - mean) < 3 * sigma, (s.mean(), mean, sigma)
    # the test separates the mixture from either pure law by many sigmas
    assert abs(m_angle - mean) > 6 * sigma and abs(m_sin - mean) > 6 * sigma
    # CDF at a few points, 4 sigma each
    for x_deg in (0.0, 10.0, 20.0, 35.0):
        x = math.radians(x_deg)
        f = 0.5 * (x - a) / (b - a) + 0.5 * (math.sin(x) - sa) / (sb - sa)
        emp = np.mean(elev <= x_deg)
        assert abs(emp - f) < 4 * math.sqrt(f * (1 - f) / n), (x_deg, emp, f)


# ----------------------------------------------------------------------------------------------
# orbit_cameras
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, start", [(7, 0.0), (4, 30.0), (12, -170.0)])
def test_orbit_cameras(n, start):
    elev, dist = 15.0, 2.5
    cam = cameras.orbit_cameras(n, elev, dist, 30.0, start_azimuth_deg=start)
    azim = np.asarray(cam.azimuth, np.float64)
    assert azim.shape == (n,)
    assert np.all(azim >= -180.0) and np.all(azim < 180.0 + 1e-4)
    expected = start + np.arange(n) * 360.0 / n
    # same angles modulo 360
    diff = (azim - expected + 180.0) % 360.0 - 180.0
    np.testing.assert_allclose(diff, 0.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(cam.elevation), elev, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cam.distance), dist, atol=1e-6)
    e, a = math.radians(elev), np.deg2rad(expected)
    eye = dist * np.stack([math.cos(e) * np.cos(a), math.cos(e) * np.sin(a), np.full(n, math.sin(e))], -1)
    np.testing.assert_allclose(np.asarray(cam.position), eye, atol=1e-5)
    # consecutive views are 360/n apart seen from above (from the cameras' own positions, not the expected eyes;
    # float32 positions: angles to ~1e-6)
    xy = np.asarray(cam.position, np.float64)[:, :2]
    ang = np.arctan2(xy[:, 1], xy[:, 0])
    step = (np.diff(np.concatenate([ang, ang[:1]])) % (2 * np.pi))
    np.testing.assert_allclose(step, 2 * np.pi / n, atol=1e-5)
    _check_frame(cam.c2w, eye)
