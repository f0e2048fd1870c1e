"""Stage 1 as the official code does it (issue [8]): depth convention, reference masks and rays, the field MLPs'
initialisation, and what stage 1b inherits from 1a. Each expected number is computed here, independently."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import make_stage, tiny_config
from dreamcraft_jax import cameras, losses, parallel
from dreamcraft_jax.config import stage_config
from dreamcraft_jax.data.reference import ReferenceImage, load_reference
from dreamcraft_jax.fields.mlp import MLP, init_mlp
from dreamcraft_jax.render import volume
from dreamcraft_jax.stages import volume_stage

# ---------------------------------------------------------------------------------------------- depth convention


def _plane_depths(size: int):
    """Ray distance t, view-space z-depth and disparity 1/z of the reference camera's rays hitting the slanted plane
    n . p = 0 with n = (sin 40deg, 0, cos 40deg) (tilted about the y axis through the origin): (size, size) each."""
    cam = cameras.make_camera(0.0, 0.0, 3.8, 20.0)
    o, d = (np.asarray(x, np.float64) for x in cameras.get_rays(cam, size, size))
    n = np.array([math.sin(math.radians(40)), 0.0, math.cos(math.radians(40))])
    t = -(o @ n) / (d @ n)
    forward = -np.asarray(cam.c2w, np.float64)[:3, 2]  # OpenGL: the camera looks along its -z
    z = t * (d @ forward)
    return t, z, 1.0 / z


def _save_depth(path, values: np.ndarray, inside: np.ndarray) -> str:
    """16-bit PNG of ``values`` min-max normalised to [1, 65535] inside, 0 outside."""
    v = values[inside]
    out = np.zeros(values.shape, np.uint16)
    out[inside] = np.round(1 + (v - v.min()) / (v.max() - v.min()) * 65534).astype(np.uint16)
    Image.fromarray(out).save(path)
    return str(path)


@pytest.mark.parametrize("convention", ["depth", "disparity"])
def test_depth_file_of_a_slanted_plane_scores_0_in_its_convention_and_2_in_the_other(tmp_path, convention):
    size = 48
    t, z, disparity = _plane_depths(size)
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (0.4 * size) ** 2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[inside] = (200, 120, 40, 255)
    image = tmp_path / "plane_rgba.png"
    Image.fromarray(rgba).save(image)
    files = {"depth": _save_depth(tmp_path / "z.png", z, inside),  # larger = farther (official, Omnidata)
             "disparity": _save_depth(tmp_path / "disp.png", disparity, inside)}  # larger = nearer (MiDaS-like)
    other = "disparity" if convention == "depth" else "depth"

    def score(file):
        ref = load_reference(image, size, size, depth_path=file, depth_convention=convention)
        target = volume_stage.targets_from_reference(ref)
        return float(losses.depth_pearson(jnp.asarray(t, jnp.float32), target.depth, target.mask))

    # Ray distance vs z (cos of at most 10 deg off-axis) and the reversed 1/z over z in [3.3, 4.3] are nearly
    # affine: the fits are off by about 1e-3 only.
    assert score(files[convention]) == pytest.approx(0.0, abs=0.01)
    assert score(files[other]) == pytest.approx(2.0, abs=0.01)


# ---------------------------------------------------------------------------------------------- reference targets


def test_targets_binarise_the_mask_at_half_unless_soft():
    mask = np.array([[0.0, 0.3, 0.5], [0.51, 0.9, 1.0]], np.float32)
    ref = ReferenceImage(rgb=np.full((2, 3, 3), 0.5, np.float32), mask=mask, depth=None, source="x")
    hard = np.asarray(volume_stage.targets_from_reference(ref).mask)
    np.testing.assert_array_equal(hard, [[0, 0, 0], [1, 1, 1]])
    soft = np.asarray(volume_stage.targets_from_reference(ref, soft_mask=True).mask)
    np.testing.assert_array_equal(soft, mask)
    # the rgb loss composites the target with the binary mask: a 0.3-alpha pixel is pure background
    rgb = jnp.ones((2, 3, 3))  # white render = white background everywhere
    target = volume_stage.targets_from_reference(ref)
    want = np.mean((np.where(hard[..., None] > 0, 0.5, 1.0) - 1.0) ** 2)
    assert float(losses.rgb_mse(rgb, target.rgb, target.mask, (1.0, 1.0, 1.0))) == pytest.approx(want, rel=1e-6)


def test_reference_rays_are_the_same_at_every_step(monkeypatch):
    """The official jitter is one fixed offset per resolution, not fresh per-ray noise each step: the reference
    view's rays are identical under two different step keys, and they differ from the un-jittered rays."""
    cfg = tiny_config()
    stage = make_stage(cfg, parallel.make_mesh(1, 1))
    (hw, targets), = stage.targets.items()
    offset = np.asarray(targets.ray_offset)
    assert offset.shape == (2, 3) and 0 < np.abs(offset).max() < 10 * cfg.camera.ray_jitter
    seen = []
    real = cameras.get_rays

    def recording(*args, **kwargs):  # under jit: the rays come back through a host callback
        out = real(*args, **kwargs)
        jax.debug.callback(lambda d: seen.append(np.asarray(d)), out[1])
        return out

    monkeypatch.setattr(cameras, "get_rays", recording)
    camera = cameras.reference_camera(cfg.camera)
    state = stage.init_state()
    terms = jax.jit(lambda key: stage.view_terms(state.params, state.extras["grid"], camera, key, 0, targets, True,
                                                 *hw)[0])
    for seed in (1, 2):
        jax.block_until_ready(terms(jax.random.PRNGKey(seed)))
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0], seen[1])
    plain = np.asarray(real(camera, *hw)[1])
    assert np.abs(seen[0] - plain).max() > 1e-5
    # the reference PSNR is measured with the rays the losses fit
    np.testing.assert_array_equal(np.asarray(stage.eval_cameras()["reference"].ray_offset), offset)
    # the same seed gives the same offset (a resumed run keeps its camera)
    again = make_stage(cfg, parallel.make_mesh(1, 1))
    np.testing.assert_array_equal(np.asarray(again.targets[hw].ray_offset), offset)


# ---------------------------------------------------------------------------------------------- fields


def test_field_mlp_init_is_pytorch_linear_default():
    """nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (variance bound^2 / 3), and no biases."""
    module = MLP(width=64, n_hidden_layers=1, out_dim=16)
    params = init_mlp(jax.random.PRNGKey(0), module, 32)
    assert set(params) == {"layers_0", "layers_1"} and all(set(p) == {"kernel"} for p in params.values())
    for name, fan_in in (("layers_0", 32), ("layers_1", 64)):
        w = np.asarray(params[name]["kernel"])
        bound = 1.0 / math.sqrt(fan_in)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.97 * bound
        assert np.var(w) == pytest.approx(bound**2 / 3, rel=0.1)  # 1024-2048 draws: ~4 % standard error


# ---------------------------------------------------------------------------------------------- stage 1b


def test_coarse_neus_views_span_the_full_range_from_step_0():
    cfg = stage_config(tiny_config(), "coarse_neus")
    assert cfg.camera.progressive_until == 0
    cams = cameras.sample_cameras(jax.random.PRNGKey(0), 256, 0, cfg.camera)
    azimuth = np.asarray(cams.azimuth)
    assert azimuth.min() < -150 and azimuth.max() > 150  # 1a at step 0 would give only the reference azimuth
    nerf_cams = cameras.sample_cameras(jax.random.PRNGKey(0), 256, 0, tiny_config().camera)
    assert np.ptp(np.asarray(nerf_cams.azimuth)) < 1e-3


def test_coarse_neus_inherits_and_keeps_updating_the_nerf_occupancy_grid():
    cfg = tiny_config()
    mesh = parallel.make_mesh(1, 1)
    nerf = make_stage(cfg, mesh, "coarse_nerf")
    previous = nerf.init_state()
    n = previous.extras["grid"].occs.shape[0]
    occs = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.0, n), jnp.float32)
    binary = jnp.asarray(np.arange(n) % 3 == 0)
    previous = previous.replace(extras={"grid": volume.OccupancyGrid(occs=occs, binary=binary)})
    neus = make_stage(cfg, mesh, "coarse_neus")
    state = neus.init_state(previous=nerf.handoff(previous))
    np.testing.assert_array_equal(np.asarray(state.extras["grid"].occs), np.asarray(occs))
    np.testing.assert_array_equal(np.asarray(state.extras["grid"].binary), np.asarray(binary))
    # A warm-up update evaluates every cell: occs = max(0.95 * inherited, alpha) >= 0.95 * inherited, while a
    # fresh grid gets the SDF's alpha alone (the sphere-biased SDF has many cells of alpha ~0).
    updated = neus.update_grid(state)
    assert np.all(np.asarray(updated.occs) >= 0.95 * np.asarray(occs) - 1e-7)
    fresh = neus.update_grid(neus.init_state())
    assert np.asarray(fresh.occs).min() < 0.1
    # No previous stage: a fresh, fully occupied grid.
    alone = neus.init_state()
    assert np.all(np.asarray(alone.extras["grid"].occs) == 0) and np.all(np.asarray(alone.extras["grid"].binary))
