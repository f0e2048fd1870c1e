"""Tests of dreamcraft_jax.data.reference: every expected number is computed here from the
synthetic image the test draws, not taken from the loader."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dreamcraft_jax.data.reference import (
    ReferenceImage,
    ReferenceImageError,
    example_depth_path,
    example_image_path,
    load_reference,
)

COLOR = (204, 77, 26)  # drawn object colour, 8-bit
BACKDROP = (0, 255, 0)  # stored colour of the transparent pixels: would show up if it bled in


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1), ends exclusive, of mask > 0.5."""
    rows = np.flatnonzero((mask > 0.5).any(axis=1))
    cols = np.flatnonzero((mask > 0.5).any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _rect_rgba(h, w, r0, r1, c0, c1) -> np.ndarray:
    """(h, w, 4) uint8: an opaque COLOR rectangle rows [r0, r1) cols [c0, c1), the rest
    transparent with BACKDROP colour."""
    img = np.zeros((h, w, 4), np.uint8)
    img[..., :3] = BACKDROP
    img[r0:r1, c0:c1, :3] = COLOR
    img[r0:r1, c0:c1, 3] = 255
    return img


def _save(tmp_path, name, array, mode=None) -> str:
    path = tmp_path / name
    img = Image.fromarray(array)
    (img.convert(mode) if mode else img).save(path)
    return str(path)


@pytest.mark.parametrize("size", [64, 128])
def test_bundled_example_loads(size):
    ref = load_reference(example_image_path(), size, size, depth_path=example_depth_path())
    assert isinstance(ref, ReferenceImage)
    assert ref.rgb.shape == (size, size, 3) and ref.rgb.dtype == np.float32
    assert ref.mask.shape == (size, size) and ref.mask.dtype == np.float32
    assert ref.depth.shape == (size, size) and ref.depth.dtype == np.float32
    assert 0.0 <= ref.rgb.min() and ref.rgb.max() <= 1.0
    assert 0.0 <= ref.mask.min() and ref.mask.max() <= 1.0
    fg = ref.mask > 0.5
    # The example is framed as preprocessing frames it: the longer bbox side is 90 % of the frame, centred.
    r0, r1, c0, c1 = _bbox(ref.mask)
    assert abs(max(r1 - r0, c1 - c0) - 0.9 * size) <= 2
    assert abs((r0 + r1) / 2 - size / 2) <= 1 and abs((c0 + c1) / 2 - size / 2) <= 1
    # Depth, larger = farther: [0, 1] inside, 0 outside; the nearest point (0) is on the cap (upper half),
    # the farthest (1) on the mound (lower half).
    assert ref.depth[fg].min() == pytest.approx(0.0) and ref.depth[fg].max() == pytest.approx(1.0)
    assert np.all(ref.depth[~fg] == 0)
    nearest = np.where(fg, ref.depth, np.inf)
    assert np.unravel_index(np.argmin(nearest), ref.depth.shape)[0] < size / 2
    # A red mushroom cap: the upper part of the object is mostly red.
    cap = ref.rgb[r0:(r0 + r1) // 2][fg[r0:(r0 + r1) // 2]]
    assert np.mean((cap[:, 0] > 0.4) & (cap[:, 1] < 0.3)) > 0.4
    assert ref.source == example_image_path()


def _official_region(alpha: np.ndarray, h: int, w: int, border: float) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) where preprocess_image.py --recenter puts the crop, from its formula (the crop
    is [min, max) of the rows / columns with alpha > 0, so its last row / column is left out)."""
    rows, cols = np.nonzero(alpha > 0)
    hh, ww = rows.max() - rows.min(), cols.max() - cols.min()
    desired = int(min(h, w) * (1 - border))
    scale = desired / max(hh, ww)
    h2, w2 = int(hh * scale), int(ww * scale)
    return (h - h2) // 2, (h - h2) // 2 + h2, (w - w2) // 2, (w - w2) // 2 + w2


@pytest.mark.parametrize("out_hw,border", [((128, 128), 0.1), ((96, 128), 0.2), ((128, 80), 0.25)])
def test_recenter_geometry(tmp_path, out_hw, border):
    # 40 x 100 rectangle, far off-centre in a 200 x 160 image.
    img = _rect_rgba(200, 160, 30, 70, 20, 120)
    path = _save(tmp_path, "rect.png", img)
    h, w = out_hw
    ref = load_reference(path, h, w, recenter=True, border_ratio=border)
    assert ref.rgb.shape == (h, w, 3) and ref.mask.shape == (h, w)
    r0, r1, c0, c1 = _bbox(ref.mask)
    want = _official_region(img[..., 3], h, w, border)
    assert max(abs(a - b) for a, b in zip((r0, r1, c0, c1), want)) <= 1, ((r0, r1, c0, c1), want)
    # The longer side (the width, 100 px) is (1 - border) of the frame's shorter side.
    assert abs((c1 - c0) - (1 - border) * min(h, w)) <= 2


def test_framed_image_loads_unchanged(tmp_path):
    """An RGBA whose object already fills 90 % (as preprocessing writes it) is loaded as is by default, and
    re-framing it changes it by about one pixel at most."""
    img = _rect_rgba(100, 100, 30, 70, 5, 95)  # 90 x 40, centred: a 90 % framing
    path = _save(tmp_path, "framed.png", img)
    ref = load_reference(path, 100, 100)
    np.testing.assert_allclose(ref.mask, img[..., 3] / 255.0, atol=1e-6)
    np.testing.assert_allclose(ref.rgb, img[..., :3] / 255.0, atol=1e-6)
    again = load_reference(path, 100, 100, recenter=True)
    r0, r1, c0, c1 = _bbox(again.mask)
    assert abs((c1 - c0) - 90) <= 1 and abs((r1 - r0) - 40) <= 1
    assert abs((c0 + c1) / 2 - 50) <= 1 and abs((r0 + r1) / 2 - 50) <= 1


def test_small_object_is_reframed_to_90_percent_when_asked(tmp_path):
    img = _rect_rgba(200, 200, 20, 80, 110, 170)  # 60 x 60 = 30 % of the frame, off-centre
    path = _save(tmp_path, "small.png", img)
    plain = load_reference(path, 100, 100)  # recenter=False: the framing is kept
    r0, r1, c0, c1 = _bbox(plain.mask)
    assert abs((r1 - r0) - 30) <= 1 and abs((c0 + c1) / 2 - 70) <= 1
    ref = load_reference(path, 100, 100, recenter=True)
    r0, r1, c0, c1 = _bbox(ref.mask)
    assert abs((r1 - r0) - 90) <= 1 and abs((c1 - c0) - 90) <= 1
    assert abs((c0 + c1) / 2 - 50) <= 1 and abs((r0 + r1) / 2 - 50) <= 1


def test_recenter_keeps_colour(tmp_path):
    img = _rect_rgba(200, 160, 28, 72, 18, 122)
    img[30:70, 20:120, 3] = 0  # hollow out: the outer 2-pixel ring stays, at partial coverage
    img[28:72, 18:122, 3] = np.maximum(img[28:72, 18:122, 3], 0) // 3  # ring alpha 85
    img[30:70, 20:120, 3] = 255
    path = _save(tmp_path, "rect.png", img)
    ref = load_reference(path, 128, 128, recenter=True, border_ratio=0.2)  # downscale: soft edge pixels
    want = np.array(COLOR) / 255.0
    interior = ref.mask > 0.999
    assert interior.sum() > 1000
    np.testing.assert_allclose(ref.rgb[interior], np.broadcast_to(want, ref.rgb[interior].shape), atol=1e-4)
    # Premultiplied resampling: anti-aliased edge pixels keep the colour, with no green
    # from the transparent surroundings and no darkening.
    edge = (ref.mask > 0.05) & (ref.mask < 0.95)
    assert edge.sum() > 50
    np.testing.assert_allclose(ref.rgb[edge], np.broadcast_to(want, ref.rgb[edge].shape), atol=2e-3)
    # The canvas outside the source image's footprint is empty.
    assert ref.mask[0, 0] == 0 and np.all(ref.rgb[0, 0] == 0)


def test_no_recenter_resizes_whole_image(tmp_path):
    path = _save(tmp_path, "rect.png", _rect_rgba(200, 160, 30, 70, 20, 120))
    ref = load_reference(path, 100, 80, recenter=False)  # exactly half size
    r0, r1, c0, c1 = _bbox(ref.mask)
    assert (r0, r1, c0, c1) == (15, 35, 10, 60)
    # Outside the mask the stored colour is kept, not replaced.
    np.testing.assert_allclose(ref.rgb[90, 70], np.array(BACKDROP) / 255.0, atol=1e-4)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_modes(tmp_path, mode):
    img = _rect_rgba(64, 64, 10, 30, 20, 50)
    if mode == "P":  # palette with a transparent index
        pal = Image.fromarray(img).convert("RGB").quantize(colors=4)
        idx = np.asarray(pal)
        transparent = int(idx[0, 0])
        pal.info["transparency"] = transparent
        path = str(tmp_path / "p.png")
        pal.save(path, transparency=transparent)
    else:
        path = _save(tmp_path, f"{mode}.png", img, mode)
    ref = load_reference(path, 64, 64, recenter=False)
    np.testing.assert_array_equal(ref.mask > 0.5, img[..., 3] > 127)


def test_rgb_without_alpha_raises(tmp_path):
    path = _save(tmp_path, "rgb.png", _rect_rgba(64, 64, 10, 30, 20, 50)[..., :3])
    with pytest.raises(ReferenceImageError, match="alpha") as info:
        load_reference(path, 64, 64)
    assert "background=flat" in str(info.value)
    opaque = _rect_rgba(64, 64, 10, 30, 20, 50)
    opaque[..., 3] = 255
    with pytest.raises(ReferenceImageError, match="alpha"):
        load_reference(_save(tmp_path, "opaque.png", opaque), 64, 64)


def _flat_scene(h=120, w=100, noise=0.01):
    """(h, w, 3) uint8 on a light-grey background with seeded noise, and the drawn (h, w)
    foreground: a disc plus a bar touching it."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    fg = ((yy - 50) ** 2 + (xx - 45) ** 2 <= 22 ** 2) | ((yy >= 60) & (yy < 95) & (xx >= 40) & (xx < 52))
    img = np.empty((h, w, 3))
    img[:] = (0.92, 0.92, 0.90)
    img[fg] = (0.2, 0.35, 0.8)
    img[(yy >= 60) & (yy < 95) & (xx >= 40) & (xx < 52)] = (0.7, 0.5, 0.3)
    img += rng.normal(0, noise, img.shape)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), fg


def test_flat_background_recovers_mask(tmp_path):
    img, fg = _flat_scene()
    path = _save(tmp_path, "flat.png", img)
    ref = load_reference(path, 120, 100, recenter=False, background="flat")
    got = ref.mask > 0.5
    iou = (got & fg).sum() / (got | fg).sum()
    assert iou > 0.98
    # The background keeps its own colour (no compositing).
    np.testing.assert_allclose(ref.rgb[5, 5], img[5, 5] / 255.0, atol=1e-4)
    # JPG input works the same way; its 4:2:0 chroma subsampling smears colour edges by
    # about a pixel, which a slightly higher threshold absorbs.
    jpg = str(tmp_path / "flat.jpg")
    Image.fromarray(img).save(jpg, quality=95)
    got = load_reference(jpg, 120, 100, recenter=False, background="flat", flat_threshold=0.15)
    got = got.mask > 0.5
    assert (got & fg).sum() / (got | fg).sum() > 0.98


def test_flat_background_rejects_non_flat_border(tmp_path):
    ramp = np.linspace(0, 255, 80).astype(np.uint8)
    img = np.broadcast_to(ramp[None, :, None], (64, 80, 3)).copy()
    with pytest.raises(ReferenceImageError, match="not flat"):
        load_reference(_save(tmp_path, "ramp.png", img), 64, 64, background="flat")


def test_fully_transparent_raises(tmp_path):
    img = np.zeros((32, 32, 4), np.uint8)
    img[..., :3] = 200
    img[8:16, 8:16, 3] = 100  # faint, below the 0.5 foreground threshold
    with pytest.raises(ReferenceImageError, match="transparent"):
        load_reference(_save(tmp_path, "empty.png", img), 32, 32)


def test_missing_and_unreadable_files_raise(tmp_path):
    with pytest.raises(ReferenceImageError, match="not found") as info:
        load_reference(tmp_path / "nope.png", 64, 64)
    assert not isinstance(info.value, FileNotFoundError)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ReferenceImageError, match="could not read"):
        load_reference(bad, 64, 64)


@pytest.mark.parametrize(
    "kwargs",
    [dict(height=4, width=64), dict(height=64, width=7),
     dict(border_ratio=-0.1), dict(border_ratio=1.0), dict(background="white"), dict(depth_convention="z")],
)
def test_bad_arguments_raise(tmp_path, kwargs):
    path = _save(tmp_path, "rect.png", _rect_rgba(64, 64, 10, 30, 20, 50))
    args = dict(height=64, width=64) | kwargs
    h, w = args.pop("height"), args.pop("width")
    with pytest.raises(ReferenceImageError):
        load_reference(path, h, w, **args)


def _depth_ramp(h, w, r0, r1, c0, c1):
    """(h, w) depth: an integer ramp 1000, 1100, ... over the rectangle's columns (exact in
    16 bits), junk (60000) outside."""
    depth = np.full((h, w), 60000.0)
    depth[r0:r1, c0:c1] = 1000 + 100 * np.arange(c1 - c0)[None, :]
    return depth


@pytest.mark.parametrize("fmt", ["png16", "png8", "npy"])
def test_depth_normalisation(tmp_path, fmt):
    r0, r1, c0, c1 = 10, 30, 20, 50
    img_path = _save(tmp_path, "rect.png", _rect_rgba(64, 64, r0, r1, c0, c1))
    depth = _depth_ramp(64, 64, r0, r1, c0, c1)
    if fmt == "npy":
        depth_path = str(tmp_path / "d.npy")
        np.save(depth_path, depth.astype(np.float32))
    elif fmt == "png16":
        depth_path = _save(tmp_path, "d16.png", depth.astype(np.uint16))
    else:
        # 10, 15, 20, ... inside (exact in 8 bits); the junk clips to 255.
        depth_path = _save(tmp_path, "d8.png", np.clip((depth - 1000) / 20 + 10, 0, 255).astype(np.uint8))
    ref = load_reference(img_path, 64, 64, recenter=False, depth_path=depth_path)
    fg = ref.mask > 0.5
    want = np.zeros((64, 64))
    want[r0:r1, c0:c1] = np.linspace(0, 1, c1 - c0)[None, :]  # min-max over the mask
    np.testing.assert_allclose(ref.depth, want, atol=1e-6)
    assert ref.depth[fg].min() == 0.0 and ref.depth[fg].max() == pytest.approx(1.0)
    # The same map read as disparity (larger = nearer) comes out flipped to larger = farther, still 0 outside.
    flipped = load_reference(img_path, 64, 64, recenter=False, depth_path=depth_path,
                             depth_convention="disparity")
    drawn = np.zeros((64, 64), bool)
    drawn[r0:r1, c0:c1] = True
    np.testing.assert_allclose(flipped.depth, np.where(drawn, 1 - want, 0), atol=1e-6)


def test_depth_recentered(tmp_path):
    r0, r1, c0, c1 = 30, 70, 20, 120
    img_path = _save(tmp_path, "rect.png", _rect_rgba(200, 160, r0, r1, c0, c1))
    depth_path = _save(tmp_path, "d.png", _depth_ramp(200, 160, r0, r1, c0, c1).astype(np.uint16))
    ref = load_reference(img_path, 96, 96, recenter=True, depth_path=depth_path)
    fg = ref.mask > 0.5
    assert ref.depth[fg].min() == pytest.approx(0.0) and ref.depth[fg].max() == pytest.approx(1.0)
    assert np.all(ref.depth[~fg] == 0)
    # The ramp survives: along the middle row, depth rises monotonically across the object,
    # with no dip at the edges from the junk values outside.
    row = ref.depth[48][fg[48]]
    assert np.all(np.diff(row) >= -1e-6)


def test_depth_size_mismatch_raises(tmp_path):
    img_path = _save(tmp_path, "rect.png", _rect_rgba(64, 64, 10, 30, 20, 50))
    depth_path = _save(tmp_path, "d.png", np.zeros((32, 64), np.uint16))
    with pytest.raises(ReferenceImageError, match="32"):
        load_reference(img_path, 64, 64, depth_path=depth_path)
    with pytest.raises(ReferenceImageError, match="not found"):
        load_reference(img_path, 64, 64, depth_path=tmp_path / "none.npy")
