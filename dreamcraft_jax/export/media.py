"""Turn renderer outputs into images and videos.

The renderer produces, per view, float maps that this module converts to viewable media:

* ``rgb``      (H, W, 3) in [0, 1]
* ``normal``   (H, W, 3) already mapped to [0, 1] and multiplied by opacity (background 0)
* ``depth``    (H, W) expected ray distance, meaningful only where opacity > 0
* ``opacity``  (H, W) in [0, 1]

Inputs may be numpy or JAX arrays; everything is converted with ``np.asarray`` and processed
on the host in numpy, so nothing here triggers device computation or compilation.

Public API: :func:`to_uint8`, :func:`colorize_depth`, :func:`panel`, :func:`save_image`,
:func:`write_video`, :func:`image_grid`, and the colormap table :data:`DEPTH_LUT`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "DEPTH_LUT",
    "to_uint8",
    "colorize_depth",
    "panel",
    "save_image",
    "write_video",
    "image_grid",
]

logger = logging.getLogger(__name__)

# Magma, sampled at t = 0.0, 0.1, ..., 0.9 (matplotlib's published 11-stop hex samples). The
# brightest stop (#fcfdbf, t = 1.0) is left out on purpose: depth is composited over white, and
# the nearest surfaces would otherwise be almost indistinguishable from the background.
_DEPTH_HEX = (
    "#000004", "#140e36", "#3b0f70", "#641a80", "#8c2981",
    "#b73779", "#de4968", "#f7705c", "#fe9f6d", "#fecf92",
)
DEPTH_LUT: np.ndarray = np.array(
    [[int(h[i:i + 2], 16) / 255.0 for i in (1, 3, 5)] for h in _DEPTH_HEX], dtype=np.float32
)
"""(K, 3) float32 control points of the depth colormap, far (dark, row 0) to near (bright, row -1)."""
DEPTH_LUT.flags.writeable = False

_GIF_SUFFIX = ".gif"
_LABEL_MARGIN = 2  # px between the panel corner and the label box, and around the text


def to_uint8(image) -> np.ndarray:
    """Convert a float image in [0, 1] to uint8.

    Args:
      image: (H, W) or (H, W, C) array. Floats are clipped to [0, 1], scaled by 255 and rounded
        half up; NaN maps to 0. Booleans map to {0, 255}. A uint8 array is returned unchanged, so
        the function is idempotent.

    Returns:
      uint8 array of the same shape.

    Raises:
      ValueError: for integer dtypes other than uint8 (their value range is ambiguous).
    """
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"to_uint8 expects a float image in [0, 1] or uint8, got dtype {arr.dtype}")
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    # floor(x + 0.5) rounds half up; np.rint would round 127.5 down to the even 127.
    return np.floor(np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _squeeze_map(x, name: str) -> np.ndarray:
    """(H, W) or (H, W, 1) -> (H, W) float32."""
    arr = np.asarray(x)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W) or (H, W, 1), got {arr.shape}")
    return arr.astype(np.float32)


def _apply_lut(t: np.ndarray, lut: np.ndarray = DEPTH_LUT) -> np.ndarray:
    """Piecewise-linear colormap: (...) values in [0, 1] -> (..., 3) colours from ``lut`` rows."""
    x = np.clip(t, 0.0, 1.0) * (len(lut) - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), len(lut) - 2)
    frac = (x - lo)[..., None]
    return lut[lo] * (1.0 - frac) + lut[lo + 1] * frac


def colorize_depth(depth, opacity, *, near=None, far=None) -> np.ndarray:
    """Colour-code a depth map, nearest surfaces brightest, composited over white.

    Depth is normalised over the foreground (pixels with opacity > 0.5) using its min/max, or
    the given ``near``/``far`` (either may be given alone). The normalised value is mapped through
    :data:`DEPTH_LUT` (``near`` -> ``DEPTH_LUT[-1]``, ``far`` -> ``DEPTH_LUT[0]``, clamped outside)
    and blended over white with ``opacity``, so pixels with opacity 0 are exactly white.

    Args:
      depth: (H, W) or (H, W, 1) ray distance; values where opacity is low are ignored.
      opacity: (H, W) or (H, W, 1) in [0, 1].
      near: depth drawn with the brightest colour; defaults to the foreground minimum.
      far: depth drawn with the darkest colour; defaults to the foreground maximum.

    Returns:
      (H, W, 3) float32 in [0, 1].
    """
    d = _squeeze_map(depth, "depth")
    a = np.clip(np.nan_to_num(_squeeze_map(opacity, "opacity"), nan=0.0), 0.0, 1.0)
    if d.shape != a.shape:
        raise ValueError(f"depth {d.shape} and opacity {a.shape} must have the same (H, W)")
    # Background depth is undefined (may be 0, inf or NaN), so it never enters the range.
    fg = (a > 0.5) & np.isfinite(d)
    if near is None:
        near = float(d[fg].min()) if fg.any() else 0.0
    if far is None:
        far = float(d[fg].max()) if fg.any() else 1.0
    span = float(far) - float(near)
    d = np.nan_to_num(d, nan=float(far), posinf=float(far), neginf=float(near))
    if abs(span) < 1e-12:
        t = np.ones_like(d)  # flat foreground: draw it all as "near"
    else:
        t = 1.0 - (d - float(near)) / span
    color = _apply_lut(t)
    return (color * a[..., None] + (1.0 - a[..., None])).astype(np.float32)


def _as_rgb_uint8(image, name: str) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3), float in [0, 1] or uint8 -> uint8 (H, W, 3)."""
    arr = to_uint8(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (H, W), (H, W, 1) or (H, W, 3), got {arr.shape}")
    return arr


@functools.lru_cache(maxsize=1)
def _label_font():
    """PIL's default font, or None when it cannot be loaded (labels are then skipped)."""
    try:
        return ImageFont.load_default()
    except (OSError, ImportError, ValueError) as err:
        logger.debug("no default font for panel labels (%s); drawing panels unlabelled", err)
        return None


def _draw_label(image: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` in white on a black box in the top-left corner of a uint8 (H, W, 3) image."""
    font = _label_font()
    if font is None:
        return image
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    m = _LABEL_MARGIN
    left, top, right, bottom = draw.textbbox((2 * m, 2 * m), text, font=font)
    draw.rectangle((left - m, top - m, right + m - 1, bottom + m - 1), fill=(0, 0, 0))
    draw.text((2 * m, 2 * m), text, fill=(255, 255, 255), font=font)
    return np.asarray(pil)


def panel(
    views: Mapping[str, np.ndarray],
    order: Sequence[str] = ("rgb", "normal", "depth", "opacity"),
    label: bool = True,
) -> np.ndarray:
    """Lay out a view's renderer outputs side by side.

    ``depth`` is colourised with :func:`colorize_depth` (using ``views['opacity']``, or full
    opacity when absent); ``opacity`` and any other single-channel map are shown in grey; RGB maps
    (``rgb``, ``normal``, or any other (H, W, 3) entry) are shown as they are.

    Args:
      views: name -> map; 'rgb'/'normal' (H, W, 3) in [0, 1], 'depth' raw (H, W) or (H, W, 1),
        'opacity' (H, W) or (H, W, 1) in [0, 1].
      order: names of the panels, left to right; each must be a key of ``views``.
      label: write each panel's name small in its top-left corner (skipped silently when PIL's
        default font is unavailable).

    Returns:
      uint8 (H, W * len(order), 3).
    """
    if not order:
        raise ValueError("panel needs at least one name in `order`")
    missing = [name for name in order if name not in views]
    if missing:
        raise ValueError(f"panel: views has no {missing}; available: {sorted(views)}")
    tiles = []
    for name in order:
        if name == "depth":
            depth = _squeeze_map(views["depth"], "depth")
            opacity = views["opacity"] if "opacity" in views else np.ones_like(depth)
            tile = _as_rgb_uint8(colorize_depth(depth, opacity), name)
        else:
            tile = _as_rgb_uint8(views[name], name)
        if tiles and tile.shape != tiles[0].shape:
            raise ValueError(
                f"panel: '{name}' is {tile.shape[:2]} but '{order[0]}' is {tiles[0].shape[:2]}"
            )
        tiles.append(_draw_label(tile, name) if label else tile)
    return np.concatenate(tiles, axis=1)


def save_image(path, image) -> str:
    """Write an image as PNG with pillow, creating parent folders.

    Args:
      path: destination file; the content is PNG whatever the suffix.
      image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), float in [0, 1] or uint8.

    Returns:
      ``path`` as a string.
    """
    arr = to_uint8(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(f"save_image expects (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
    return str(path)


def _check_frames(frames: Iterable) -> list[np.ndarray]:
    """Validate video frames: non-empty, all uint8 (H, W, 3) (floats converted) of one size."""
    out = [_as_rgb_uint8(f, f"frame {i}") for i, f in enumerate(frames)]
    if not out:
        raise ValueError("write_video: no frames to write")
    shape = out[0].shape
    for i, f in enumerate(out):
        if f.shape != shape:
            raise ValueError(
                f"write_video: all frames must have the same size; frame 0 is {shape}, frame {i} is {f.shape}"
            )
    return out


def _pad_even(frame: np.ndarray) -> np.ndarray:
    """Pad H and W up to even sizes by repeating the last row/column (yuv420p needs even sizes)."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    # Edge repetition instead of black keeps the padded border invisible.
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _ffmpeg_exe() -> str:
    """Path of the ffmpeg binary imageio-ffmpeg uses; raises if imageio-ffmpeg or ffmpeg is missing."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _write_mp4(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """Encode ``frames`` as H.264/yuv420p with imageio's ffmpeg plugin."""
    import imageio.v2 as iio

    _ffmpeg_exe()  # fail fast, before creating the file, when no encoder exists
    # macro_block_size=1: frames are already even, so imageio must not rescale them to 16-multiples.
    # quality=7 is libx264 CRF 15 in imageio-ffmpeg: near-lossless for renders, still small files.
    writer = iio.get_writer(
        path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
        quality=7, macro_block_size=1, ffmpeg_log_level="error",
    )
    try:
        for frame in frames:
            writer.append_data(_pad_even(frame))
    finally:
        writer.close()


def _write_gif(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """Write an animated, looping GIF with pillow.

    Frame times are stored in whole milliseconds, and pillow merges identical consecutive frames
    into one longer frame, so a reader may see fewer frames than were written (same playback).
    """
    images = [Image.fromarray(f) for f in frames]
    duration = max(1, round(1000 / fps))
    images[0].save(
        path, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0
    )


def write_video(path, frames, fps: int = 30, *, prefer: str = "mp4") -> str:
    """Write frames as an H.264 mp4, falling back to a GIF when no mp4 encoder works.

    Odd heights/widths are padded to even by repeating the last row/column, as yuv420p requires.
    If imageio-ffmpeg is missing or encoding fails, a warning is logged and a GIF with the same
    stem (``.gif``) is written next to ``path`` instead.

    Args:
      path: destination mp4; parent folders are created.
      frames: non-empty sequence of (H, W, 3) uint8 frames of one size (float frames in [0, 1]
        are converted with :func:`to_uint8`).
      fps: frames per second, > 0.
      prefer: "mp4" (default) or "gif" to skip the mp4 encoder and write the GIF directly.

    Returns:
      The path actually written, as a string.

    Raises:
      ValueError: no frames, frames of different sizes or bad shapes, fps <= 0, unknown ``prefer``.
    """
    if prefer not in ("mp4", "gif"):
        raise ValueError(f"write_video: prefer must be 'mp4' or 'gif', got {prefer!r}")
    if not (isinstance(fps, (int, np.integer)) and fps > 0):
        raise ValueError(f"write_video: fps must be a positive integer, got {fps!r}")
    fps = int(fps)
    checked = _check_frames(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if prefer == "mp4":
        try:
            _write_mp4(path, checked, fps)
            return str(path)
        # Any encoder failure (no binary, no libx264, broken pipe, imageio errors) is handled the
        # same way: the video is a diagnostic artefact, so a GIF is better than losing it.
        except Exception as err:  # noqa: BLE001
            logger.warning("mp4 encoding to %s failed (%s: %s); writing a GIF instead",
                           path, type(err).__name__, err)
            if path.exists():
                os.remove(path)
    gif_path = path.with_suffix(_GIF_SUFFIX)
    _write_gif(gif_path, checked, fps)
    return str(gif_path)


def image_grid(images, ncols: int) -> np.ndarray:
    """Tile same-sized images row-major into a grid with 2 px white gaps.

    Args:
      images: non-empty sequence of (H, W, 3) uint8 images (float in [0, 1] and (H, W) grey
        images are converted).
      ncols: columns; capped at ``len(images)`` so a short list makes no empty columns. Unfilled
        cells of the last row stay white.

    Returns:
      uint8 (rows * H + 2 * (rows - 1), ncols * W + 2 * (ncols - 1), 3), rows = ceil(n / ncols).
    """
    tiles = [_as_rgb_uint8(im, f"image {i}") for i, im in enumerate(images)]
    if not tiles:
        raise ValueError("image_grid: no images")
    if not (isinstance(ncols, (int, np.integer)) and ncols >= 1):
        raise ValueError(f"image_grid: ncols must be a positive integer, got {ncols!r}")
    h, w = tiles[0].shape[:2]
    for i, t in enumerate(tiles):
        if t.shape[:2] != (h, w):
            raise ValueError(f"image_grid: image 0 is {(h, w)}, image {i} is {t.shape[:2]}")
    gap = 2
    ncols = min(int(ncols), len(tiles))
    nrows = math.ceil(len(tiles) / ncols)
    grid = np.full((nrows * h + gap * (nrows - 1), ncols * w + gap * (ncols - 1), 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        y, x = r * (h + gap), c * (w + gap)
        grid[y:y + h, x:x + w] = t
    return grid
