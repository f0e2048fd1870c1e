"""Tests for dreamcraft_jax.export.media: uint8 conversion, depth colouring, panels, video I/O."""

import logging

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image, ImageFont

from dreamcraft_jax.export import media
from dreamcraft_jax.export.media import (
    DEPTH_LUT,
    colorize_depth,
    image_grid,
    panel,
    save_image,
    to_uint8,
    write_video,
)

# Distinct flat colours, far apart so that codec error cannot make one look like another.
_COLOURS = np.array(
    [[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20], [20, 230, 230], [230, 20, 230],
     [128, 128, 128], [250, 250, 250], [10, 10, 10], [200, 120, 40], [40, 120, 200], [120, 40, 200]],
    dtype=np.uint8,
)


def _flat_frames(h, w):
    return [np.full((h, w, 3), c, np.uint8) for c in _COLOURS]


def _views(h=8, w=10, seed=0):
    rng = np.random.default_rng(seed)
    opacity = np.zeros((h, w), np.float32)
    opacity[2:6, 3:8] = 1.0
    return {
        "rgb": rng.uniform(size=(h, w, 3)).astype(np.float32),
        "normal": rng.uniform(size=(h, w, 3)).astype(np.float32) * opacity[..., None],
        "depth": rng.uniform(1.0, 3.0, size=(h, w)).astype(np.float32),
        "opacity": opacity,
    }


# ---------------------------------------------------------------------------------------- to_uint8

def test_to_uint8_rounds_half_up_and_clips():
    x = np.array([-0.5, 0.0, 10.49 / 255, 10.5 / 255, 10.51 / 255, 127.5 / 255, 1.0, 3.0, np.nan])
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 10, 11, 11, 128, 255, 255, 0])
    assert to_uint8(x).dtype == np.uint8


def test_to_uint8_keeps_shape_uint8_and_bool():
    img = np.linspace(0, 1, 2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    assert to_uint8(img).shape == (2, 3, 3)
    u = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert to_uint8(u) is u
    np.testing.assert_array_equal(to_uint8(np.array([True, False])), [255, 0])
    with pytest.raises(ValueError, match="dtype"):
        to_uint8(np.arange(4, dtype=np.int32))


# ----------------------------------------------------------------------------------- colorize_depth

def test_colorize_depth_near_colour_far_colour_and_white_background():
    depth = np.array([[2.0, 4.0, 3.0], [0.5, 9.0, np.nan]], np.float32)
    opacity = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    out = colorize_depth(depth, opacity)
    assert out.shape == (2, 3, 3) and out.dtype == np.float32
    # Background depths (0.5, 9.0, NaN) must not enter the normalisation: 2.0 is the nearest.
    np.testing.assert_allclose(out[0, 0], DEPTH_LUT[-1], atol=1e-6)
    np.testing.assert_allclose(out[0, 1], DEPTH_LUT[0], atol=1e-6)
    np.testing.assert_allclose(out[1], np.ones((3, 3)), atol=1e-6)
    # 3.0 sits halfway between near and far: halfway along the LUT's piecewise-linear curve.
    k = len(DEPTH_LUT) - 1
    pos = 0.5 * k
    i = int(np.floor(pos))
    expected = DEPTH_LUT[i] + (pos - i) * (DEPTH_LUT[min(i + 1, k)] - DEPTH_LUT[i])
    np.testing.assert_allclose(out[0, 2], expected, atol=1e-6)


def test_colorize_depth_partial_opacity_blends_over_white():
    depth = np.array([[1.0, 2.0]], np.float32)
    opacity = np.array([[1.0, 0.25]], np.float32)
    # (H, W, 1) inputs accepted; explicit range because the 0.25 pixel is not foreground.
    out = colorize_depth(depth[..., None], opacity[..., None], near=1.0, far=2.0)
    np.testing.assert_allclose(out[0, 0], DEPTH_LUT[-1], atol=1e-6)
    np.testing.assert_allclose(out[0, 1], 0.25 * DEPTH_LUT[0] + 0.75, atol=1e-6)


def test_colorize_depth_brightness_monotone_in_depth_and_explicit_range():
    depth = np.linspace(1.0, 5.0, 64, dtype=np.float32)[None, :]
    opacity = np.ones_like(depth)
    out = colorize_depth(depth, opacity)
    luma = out[0] @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luma) < 0), "farther must be darker"
    # Explicit near/far: values outside clamp to the LUT ends.
    out = colorize_depth(np.array([[0.0, 1.0, 2.0, 9.0]]), np.ones((1, 4)), near=1.0, far=2.0)
    np.testing.assert_allclose(out[0, 0], DEPTH_LUT[-1], atol=1e-6)
    np.testing.assert_allclose(out[0, 1], DEPTH_LUT[-1], atol=1e-6)
    np.testing.assert_allclose(out[0, 2], DEPTH_LUT[0], atol=1e-6)
    np.testing.assert_allclose(out[0, 3], DEPTH_LUT[0], atol=1e-6)


def test_depth_lut_is_perceptually_ordered():
    luma = DEPTH_LUT @ np.array([0.2126, 0.7152, 0.0722])
    assert 8 <= len(DEPTH_LUT) <= 16
    assert np.all(np.diff(luma) > 0)
    assert DEPTH_LUT.min() >= 0.0 and DEPTH_LUT.max() <= 1.0


def test_colorize_depth_shape_mismatch():
    with pytest.raises(ValueError, match="same"):
        colorize_depth(np.ones((4, 4)), np.ones((4, 5)))


# -------------------------------------------------------------------------------------------- panel

def test_panel_shape_and_regions():
    v = _views(8, 10)
    out = panel(v, label=False)
    assert out.shape == (8, 40, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 0:10], to_uint8(v["rgb"]))
    np.testing.assert_array_equal(out[:, 10:20], to_uint8(v["normal"]))
    np.testing.assert_array_equal(out[:, 20:30], to_uint8(colorize_depth(v["depth"], v["opacity"])))
    np.testing.assert_array_equal(out[:, 30:40], np.repeat(to_uint8(v["opacity"])[..., None], 3, -1))


def test_panel_custom_order_and_opacity_channel_axis():
    v = _views(6, 7)
    v["opacity"] = v["opacity"][..., None]
    out = panel(v, order=("opacity", "rgb"), label=False)
    assert out.shape == (6, 14, 3)
    np.testing.assert_array_equal(out[:, 7:], to_uint8(v["rgb"]))


def test_panel_label_stays_in_top_left_corner():
    v = _views(64, 96)
    plain = panel(v, label=False)
    labelled = panel(v, label=True)
    assert labelled.shape == plain.shape
    assert not np.array_equal(labelled, plain)
    # Labels are small and in each panel's top-left corner; the bottom half is untouched.
    np.testing.assert_array_equal(labelled[32:], plain[32:])


def test_panel_without_font_skips_labels(monkeypatch):
    def no_font(*args, **kwargs):
        raise OSError("font not found")

    monkeypatch.setattr(ImageFont, "load_default", no_font)
    media._label_font.cache_clear()
    try:
        v = _views(8, 10)
        np.testing.assert_array_equal(panel(v, label=True), panel(v, label=False))
    finally:
        media._label_font.cache_clear()


def test_panel_bad_inputs():
    v = _views(8, 10)
    with pytest.raises(ValueError, match="no"):
        panel({"rgb": v["rgb"]}, label=False)
    v["normal"] = v["normal"][:, :9]
    with pytest.raises(ValueError, match="normal"):
        panel(v, label=False)


# --------------------------------------------------------------------------------------- save_image

def test_save_image_float_and_uint8(tmp_path):
    img = np.random.default_rng(1).uniform(size=(5, 7, 3)).astype(np.float32)
    p = save_image(tmp_path / "a" / "b" / "img.png", img)
    assert p == str(tmp_path / "a" / "b" / "img.png")
    np.testing.assert_array_equal(np.asarray(Image.open(p)), to_uint8(img))
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(np.asarray(Image.open(save_image(tmp_path / "g.png", grey))), grey)
    with pytest.raises(ValueError):
        save_image(tmp_path / "bad.png", np.zeros((4, 4, 2), np.float32))


# -------------------------------------------------------------------------------------- write_video

def _check_read_back(path, n, h, w, tol):
    frames = iio.imread(path, index=None)
    assert frames.shape[0] == n
    assert frames.shape[1:3] == (h, w)
    means = frames[..., :3].reshape(n, -1, 3).mean(axis=1)
    np.testing.assert_allclose(means, _COLOURS.astype(np.float64), atol=tol)


@pytest.mark.parametrize("h,w", [(34, 50), (33, 51)])
def test_write_video_mp4_round_trip(tmp_path, h, w):
    out = write_video(tmp_path / "vid" / "clip.mp4", _flat_frames(h, w), fps=12)
    assert out == str(tmp_path / "vid" / "clip.mp4")
    # Odd sizes are padded up to even by the writer.
    _check_read_back(out, len(_COLOURS), h + h % 2, w + w % 2, tol=6.0)


def test_write_video_gif_when_preferred(tmp_path):
    out = write_video(tmp_path / "clip.mp4", _flat_frames(33, 51), fps=10, prefer="gif")
    assert out == str(tmp_path / "clip.gif")
    assert not (tmp_path / "clip.mp4").exists()
    _check_read_back(out, len(_COLOURS), 33, 51, tol=3.0)


def test_write_video_falls_back_to_gif_when_encoder_missing(tmp_path, monkeypatch, caplog):
    def missing():
        raise RuntimeError("no ffmpeg")

    monkeypatch.setattr(media, "_ffmpeg_exe", missing)
    with caplog.at_level(logging.WARNING, logger=media.__name__):
        out = write_video(tmp_path / "clip.mp4", _flat_frames(34, 50))
    assert out == str(tmp_path / "clip.gif")
    assert any("GIF" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "clip.mp4").exists()
    _check_read_back(out, len(_COLOURS), 34, 50, tol=3.0)


def test_write_video_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "a.mp4", [])
    frames = [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)]
    with pytest.raises(ValueError, match="same size"):
        write_video(tmp_path / "b.mp4", frames)
    with pytest.raises(ValueError, match="shape"):
        write_video(tmp_path / "c.mp4", [np.zeros((8, 8, 4), np.uint8)])
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "d.mp4", [np.zeros((8, 8, 3), np.uint8)], fps=0)
    with pytest.raises(ValueError, match="prefer"):
        write_video(tmp_path / "e.mp4", [np.zeros((8, 8, 3), np.uint8)], prefer="avi")
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------- image_grid

def test_image_grid_layout_and_gaps():
    imgs = [np.full((4, 5, 3), 10 * (i + 1), np.uint8) for i in range(5)]
    g = image_grid(imgs, ncols=3)
    assert g.shape == (2 * 4 + 2, 3 * 5 + 2 * 2, 3) and g.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = r * 6, c * 7
        assert np.all(g[y:y + 4, x:x + 5] == 10 * (i + 1))
    assert np.all(g[4:6] == 255)          # horizontal gap
    assert np.all(g[:, 5:7] == 255)       # vertical gap
    assert np.all(g[6:, 14:] == 255)      # empty last cell
    assert image_grid(imgs[:2], ncols=4).shape == (4, 12, 3)


def test_image_grid_bad_inputs():
    with pytest.raises(ValueError, match="no images"):
        image_grid([], 2)
    with pytest.raises(ValueError, match="ncols"):
        image_grid([np.zeros((2, 2, 3), np.uint8)], 0)
    with pytest.raises(ValueError, match="image 1"):
        image_grid([np.zeros((2, 2, 3), np.uint8), np.zeros((3, 2, 3), np.uint8)], 2)
