"""Loading and preprocessing of the reference image (the single input view).

Conventions of the returned :class:`ReferenceImage` (H, W = the requested size):

* ``rgb``   (H, W, 3) float32 in [0, 1], *straight* (not premultiplied) colour. Where the
  mask is 0 the colour is whatever the image has there (it is not composited onto any
  background); areas of the canvas outside the source image are 0.
* ``mask``  (H, W) float32 in [0, 1]: the alpha matte, anti-aliased values kept. The stages
  binarise it at 0.5 as the official code does (``data.soft_mask`` keeps the matte).
* ``depth`` (H, W) float32 or None, in the official DreamCraft3D convention: *larger =
  farther* (z-depth-like, what Omnidata's depth model gives and ``preprocess_image.py``
  writes), min-max normalised to [0, 1] over ``mask > 0.5`` (0 = nearest point), 0 outside.
  A disparity-like map (larger = nearer, as MiDaS outputs it) is converted to this
  convention here, once, when loaded with ``depth_convention="disparity"``: the normalised
  values are flipped (1 - d). The depth_rel loss uses the result as is.

Foreground comes from one of two sources (``background=``):

* ``"alpha"``: the image's alpha channel (an RGBA / LA / transparent-palette cut-out).
* ``"flat"``: simple removal of a flat background for images without alpha: the background
  colour is the per-channel median of a 2-pixel frame along the image border, and the
  foreground is every pixel whose Euclidean RGB distance (in [0, 1] units) to it exceeds
  ``flat_threshold``. No connected-component cleanup and no softening: the mask is binary.

Framing. The official pipeline frames the object once, in preprocessing
(``preprocess_image.py --recenter``, ``python -m dreamcraft_jax.preprocess`` here), and training
loads that file as is: by default (``recenter=False``) the whole image is resized to (H, W).
With ``recenter=True`` it is re-framed at load time with the official formula: the bounding
box of ``alpha > 0`` (rows ``y_min .. y_max``, the crop ``[y_min, y_max)`` as the official
code takes it, same for columns), ``desired = int(min(H, W) * (1 - border_ratio))``,
``scale = desired / max(y_max - y_min, x_max - x_min)``, the crop resized to
``(int(h * scale), int(w * scale))`` and placed at ``((H - h2) // 2, (W - w2) // 2)``;
the default border_ratio 0.1 makes the longer side 90 % of the frame. Colour and alpha are
resampled premultiplied (so the transparent surroundings cannot bleed into the edges) and then
un-premultiplied; depth is resampled bilinearly, weighted by the binary mask so that the
values outside the object do not leak in either.

Every problem with the input (missing or unreadable file, no alpha, empty mask, bad sizes
or arguments) raises :class:`ReferenceImageError` with a one-line message saying what was
wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import numbers
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ReferenceImage",
    "ReferenceImageError",
    "depth_beside",
    "depth_from_config",
    "example_depth_path",
    "example_image_path",
    "load_reference",
]

MIN_SIZE = 8  # smallest accepted output height / width
BACKGROUNDS = ("alpha", "flat")
DEPTH_CONVENTIONS = ("depth", "disparity")  # larger = farther (official) / larger = nearer
DEFAULT_BORDER_RATIO = 0.1  # preprocess_image.py's default: the object's longer side is 90 % of the frame

_FLAT_FRAME_PX = 2  # width of the border frame that estimates a flat background colour
# A flat background may have a few border pixels off its colour (the object touching the
# edge, noise); more than this fraction means the border is not one flat colour.
_FLAT_MAX_OFF_FRACTION = 0.2
# Below this resampled alpha the un-premultiplied colour is numerically meaningless, so the
# straight-resampled colour is used instead (half an 8-bit alpha step).
_ALPHA_EPS = 0.5 / 255
_RGB_RESAMPLE = Image.Resampling.BICUBIC  # interpolating, with less ringing than LANCZOS
_DEPTH_RESAMPLE = Image.Resampling.BILINEAR
_FILTER_RADIUS = 2  # BICUBIC support in output pixels (BILINEAR needs 1)

_INTEGER_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16/32-bit grayscale
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ReferenceImageError(ValueError):
    """The reference image (or its depth map, or a loading argument) is unusable."""


@dataclasses.dataclass(frozen=True)
class ReferenceImage:
    """A preprocessed reference view; see the module docstring for the conventions.

    Attributes:
      rgb:    (H, W, 3) float32 in [0, 1], straight colour.
      mask:   (H, W) float32 in [0, 1], alpha matte; binary foreground is ``mask > 0.5``.
      depth:  (H, W) float32, larger = farther, [0, 1] inside the mask and 0 outside; None
              when no depth map was given.
      source: path of the image it was loaded from.
    """

    rgb: np.ndarray
    mask: np.ndarray
    depth: np.ndarray | None
    source: str


def example_image_path() -> str:
    """Path of the bundled example reference image (256 x 256 RGBA PNG of a toy mushroom)."""
    return str(importlib.resources.files("dreamcraft_jax") / "assets" / "example_rgba.png")


def example_depth_path() -> str:
    """Path of the bundled example's depth map (256 x 256 16-bit PNG, larger = farther)."""
    return str(importlib.resources.files("dreamcraft_jax") / "assets" / "example_depth.png")


def load_reference(
    path: str | Path,
    height: int,
    width: int,
    *,
    recenter: bool = False,
    border_ratio: float = DEFAULT_BORDER_RATIO,
    depth_path: str | Path | None = None,
    background: str = "alpha",
    flat_threshold: float = 0.1,
    depth_convention: str = "depth",
) -> ReferenceImage:
    """Loads a reference image (PNG / JPG, any mode pillow opens) and preprocesses it.

    Args:
      path: the image file.
      height, width: output size H, W (each >= 8).
      recenter: re-frame the object with the official formula (see the module docstring);
        if False (default: the file is already framed, as preprocessing writes it) the whole
        image is resized to (H, W), aspect not kept.
      border_ratio: with ``recenter``, the empty part of the frame along the object's longer
        side, as a fraction of min(H, W) (the official ``--border_ratio``); in [0, 1).
      depth_path: optional depth map of the same size as the image: an 8- or 16-bit
        grayscale image or a 2-D ``.npy`` float array, in ``depth_convention``.
      background: ``"alpha"`` (mask from the alpha channel) or ``"flat"`` (mask from a flat
        background colour; the alpha channel, if any, is ignored).
      flat_threshold: with ``background="flat"``, the RGB distance in [0, 1] units from the
        background colour above which a pixel is foreground.
      depth_convention: ``"depth"`` if larger values are farther (the official convention,
        Omnidata / ``preprocess_image.py``), ``"disparity"`` if larger values are nearer
        (MiDaS-like); a disparity map is flipped (1 - d inside the mask) to the official
        convention.

    Returns:
      A :class:`ReferenceImage` with rgb (H, W, 3), mask (H, W) and depth (H, W) or None.

    Raises:
      ReferenceImageError: on any unusable input, with a message saying what to do.
    """
    _check_arguments(height, width, border_ratio, background, flat_threshold, depth_convention)
    height, width = int(height), int(width)
    rgb, alpha = _read_image(path, background, flat_threshold)  # (h, w, 3), (h, w)
    src_fg = alpha > 0.5
    if not src_fg.any():  # (checked on > 0.5: an object of nearly transparent pixels only is no object either)
        if background == "alpha":
            raise ReferenceImageError(
                f"reference image {path} is fully transparent (no pixel with alpha > 0.5); "
                "the object must be opaque in the alpha channel"
            )
        raise ReferenceImageError(
            f"reference image {path} has no foreground: no pixel differs from the border "
            f"colour by more than flat_threshold={flat_threshold}; lower the threshold or "
            "use an RGBA cut-out"
        )
    depth = None if depth_path is None else _read_depth(depth_path, src_fg)

    src_hw = alpha.shape
    if recenter:
        place = _recenter_placement(alpha > 0, height, width, border_ratio, path)
        outside = "constant"  # beyond the source image there is nothing: transparent
    else:
        place = _Placement(box=(0.0, 0.0, float(src_hw[1]), float(src_hw[0])),
                           region=(0, 0, width, height))
        outside = "edge"  # only the filter's reach beyond the image edge: repeat the edge

    def resize(plane, resample=_RGB_RESAMPLE, pad=outside):
        return _resize_plane(plane, place, (height, width), resample, pad)

    out_rgb, out_mask = _resample_rgba(rgb, alpha, resize)

    fg = out_mask > 0.5
    if not fg.any():
        hint = "a larger size" if recenter else "recenter=True or a larger size"
        raise ReferenceImageError(
            f"the object in {path} is too thin or small to survive resizing to "
            f"{height}x{width} (no pixel with mask > 0.5 left); use {hint}"
        )
    out_depth = None
    if depth is not None:
        out_depth = _resample_depth(depth, src_fg, fg, resize, flip=depth_convention == "disparity")

    return ReferenceImage(
        rgb=np.ascontiguousarray(out_rgb, np.float32),
        mask=np.ascontiguousarray(out_mask, np.float32),
        depth=out_depth,
        source=str(path),
    )


# ----------------------------------------------------------------------------- checks / IO


def _check_arguments(height, width, border_ratio, background, flat_threshold, depth_convention) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ReferenceImageError(f"{name} must be an integer, got {value!r}")
        if value < MIN_SIZE:
            raise ReferenceImageError(f"{name} must be at least {MIN_SIZE} pixels, got {value}")
    if isinstance(border_ratio, bool) or not isinstance(border_ratio, numbers.Real) or not 0.0 <= border_ratio < 1.0:
        raise ReferenceImageError(
            f"border_ratio must be in [0, 1) (the empty part of the frame along the object's "
            f"longer side; 0.1 frames it at 90 %), got {border_ratio!r}"
        )
    if depth_convention not in DEPTH_CONVENTIONS:
        raise ReferenceImageError(
            f"depth_convention must be one of {DEPTH_CONVENTIONS} (\"depth\": larger = farther, "
            f"the official maps; \"disparity\": larger = nearer), got {depth_convention!r}"
        )
    if background not in BACKGROUNDS:
        raise ReferenceImageError(
            f"background must be one of {BACKGROUNDS}, got {background!r}"
        )
    if not isinstance(flat_threshold, numbers.Real) or not flat_threshold > 0:
        raise ReferenceImageError(f"flat_threshold must be > 0, got {flat_threshold!r}")


def _open(path: str | Path, what: str) -> Image.Image:
    """Opens and fully decodes an image file, turning every failure into a clear error."""
    p = Path(path)
    if not p.is_file():
        raise ReferenceImageError(f"{what} not found: {p} (check the path)")
    try:
        with Image.open(p) as im:
            im.load()
            # Photos store their orientation in EXIF; apply it so the object is upright.
            out = ImageOps.exif_transpose(im)
            out.load()
            return out
    except Exception as exc:  # pillow raises many types; the user only needs the reason
        raise ReferenceImageError(
            f"could not read {what} {p}: {type(exc).__name__}: {exc} (expected a PNG or JPG)"
        ) from None


def _read_image(path, background: str, flat_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns straight rgb (h, w, 3) and alpha / mask (h, w), float32 in [0, 1]."""
    im = _open(path, "reference image")
    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if im.mode in _INTEGER_GRAY_MODES or im.mode == "F":
        # High-bit-depth grayscale: pillow cannot convert it to RGBA without clipping.
        scale = 1.0 if im.mode == "F" else 65535.0
        gray = np.clip(np.asarray(im, np.float32) / scale, 0.0, 1.0)
        rgb = np.repeat(gray[..., None], 3, axis=-1)
        alpha = np.ones(gray.shape, np.float32)
    else:
        rgba = np.asarray(im.convert("RGBA"), np.float32) / 255.0
        rgb, alpha = rgba[..., :3], rgba[..., 3]

    if background == "flat":
        return rgb, _flat_background_mask(rgb, flat_threshold, path)
    if not has_alpha or alpha.min() >= 1.0:
        raise ReferenceImageError(
            f"reference image {path} has no alpha channel (or it is fully opaque), so the "
            "object cannot be separated from the background; save an RGBA cut-out with a "
            "transparent background, or pass --config.data.background=flat for an image "
            "on a flat background"
        )
    return rgb, alpha


def _flat_background_mask(rgb: np.ndarray, threshold: float, path) -> np.ndarray:
    """Binary foreground (h, w) float32 of an image (h, w, 3) on a flat background."""
    h, w = rgb.shape[:2]
    b = _FLAT_FRAME_PX
    if min(h, w) <= 2 * b:
        raise ReferenceImageError(f"reference image {path} is too small ({w}x{h}) for background=flat")
    frame = np.ones((h, w), bool)
    frame[b:-b, b:-b] = False
    border = rgb[frame]  # (n, 3)
    bg = np.median(border, axis=0)
    off = np.mean(np.linalg.norm(border - bg, axis=-1) > threshold)
    if off > _FLAT_MAX_OFF_FRACTION:
        raise ReferenceImageError(
            f"reference image {path}: the background is not flat ({off:.0%} of the border "
            f"pixels differ from its median colour by more than flat_threshold={threshold}); "
            "background=flat needs a uniform background not touched by the object, so save "
            "an RGBA cut-out instead (background=alpha)"
        )
    return (np.linalg.norm(rgb - bg, axis=-1) > threshold).astype(np.float32)


def _read_depth(path, src_fg: np.ndarray) -> np.ndarray:
    """Reads a depth map as float64 (h, w), checked against the image's foreground (h, w)."""
    p = Path(path)
    if p.suffix.lower() == ".npy":
        if not p.is_file():
            raise ReferenceImageError(f"depth map not found: {p} (check the path)")
        try:
            depth = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise ReferenceImageError(
                f"could not read depth map {p}: {type(exc).__name__}: {exc}"
            ) from None
        if depth.ndim == 3 and depth.shape[-1] == 1:
            depth = depth[..., 0]
        if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number) or np.iscomplexobj(depth):
            raise ReferenceImageError(
                f"depth map {p} must be a 2-D real array, got shape {depth.shape} dtype {depth.dtype}"
            )
        depth = depth.astype(np.float64)
    else:
        im = _open(p, "depth map")
        if im.mode in ("RGB", "RGBA"):
            arr = np.asarray(im)
            # A grayscale map saved as RGB is fine; a colour-mapped visualisation is not.
            if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
                raise ReferenceImageError(
                    f"depth map {p} is a colour image; save the raw depth as a grayscale "
                    "8/16-bit PNG or a .npy array, not a colour-mapped visualisation"
                )
            depth = arr[..., 0].astype(np.float64)
        elif im.mode in ("L", "LA", "F") or im.mode in _INTEGER_GRAY_MODES:
            depth = np.asarray(im.getchannel(0) if im.mode == "LA" else im).astype(np.float64)
        else:
            raise ReferenceImageError(
                f"depth map {p} has unsupported mode {im.mode}; save it as a grayscale "
                "8/16-bit PNG or a .npy array"
            )

    if depth.shape != src_fg.shape:
        raise ReferenceImageError(
            f"depth map {p} is {depth.shape[1]}x{depth.shape[0]} but the reference image is "
            f"{src_fg.shape[1]}x{src_fg.shape[0]}; it must be estimated on the same image"
        )
    inside = depth[src_fg]
    if not np.all(np.isfinite(inside)):
        raise ReferenceImageError(f"depth map {p} has NaN or infinite values inside the object")
    if inside.max() <= inside.min():
        raise ReferenceImageError(
            f"depth map {p} is constant inside the object, so it carries no depth; "
            "check the file or leave depth_path unset"
        )
    # Outside the object the values are never used (zero weight); drop NaN / inf there.
    return np.where(src_fg, depth, 0.0)


# ------------------------------------------------------------------------------ resampling


@dataclasses.dataclass(frozen=True)
class _Placement:
    """Maps the source rectangle ``box`` (x0, y0, x1, y1; float source pixel coordinates,
    pixel i spans [i, i + 1]) onto the integer canvas rectangle ``region`` (X0, Y0, X1, Y1);
    the canvas outside ``region`` stays 0."""

    box: tuple[float, float, float, float]
    region: tuple[int, int, int, int]


def _recenter_placement(fg: np.ndarray, height: int, width: int, border_ratio: float, path) -> _Placement:
    """The official re-framing (``preprocess_image.py --recenter``) of the bbox of ``fg`` (h, w).

    Crop [y_min, y_max) x [x_min, x_max) with y_max / x_max the last foreground row / column (the
    official crop leaves that last one out), longer side scaled to int(min(H, W) * (1 - border_ratio)),
    truncated to whole pixels, placed at ((H - h2) // 2, (W - w2) // 2); generalised from the official
    square canvas to H x W by framing in the shorter side.
    """
    rows = np.flatnonzero(fg.any(axis=1))
    cols = np.flatnonzero(fg.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    h, w = y1 - y0, x1 - x0
    desired = int(min(height, width) * (1.0 - border_ratio))
    if max(h, w) == 0 or desired == 0:
        raise ReferenceImageError(
            f"cannot re-frame {path}: its object is {w + 1}x{h + 1} pixels, too small to scale to "
            f"{desired} pixels; use a larger image or recenter=False"
        )
    scale = desired / max(h, w)
    h2, w2 = int(h * scale), int(w * scale)
    Y0, X0 = (height - h2) // 2, (width - w2) // 2
    return _Placement(box=(float(x0), float(y0), float(x1), float(y1)), region=(X0, Y0, X0 + w2, Y0 + h2))


def _crop_padded(plane: np.ndarray, y0: int, y1: int, x0: int, x1: int, pad: str) -> np.ndarray:
    """plane[y0:y1, x0:x1] (h, w) where the window may exceed the plane; filled by np.pad mode."""
    h, w = plane.shape
    inner = plane[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)]
    widths = ((max(0, -y0), max(0, y1 - h)), (max(0, -x0), max(0, x1 - w)))
    return np.pad(inner, widths, mode=pad)


def _resize_plane(plane: np.ndarray, place: _Placement, out_hw: tuple[int, int],
                  resample: Image.Resampling, pad: str) -> np.ndarray:
    """Resamples one float plane (h, w) into an (H, W) float32 canvas, 0 outside the region."""
    bx0, by0, bx1, by1 = place.box
    X0, Y0, X1, Y1 = place.region
    canvas = np.zeros(out_hw, np.float32)
    if X1 <= X0 or Y1 <= Y0:
        return canvas
    # Pillow reads the filter's support beyond the box; crop a window with that much room
    # (support widens by the downscale factor) so the box always lies inside the image.
    reach = max(1.0, (bx1 - bx0) / (X1 - X0), (by1 - by0) / (Y1 - Y0))
    margin = math.ceil(_FILTER_RADIUS * reach) + 1
    ox, oy = math.floor(bx0) - margin, math.floor(by0) - margin
    window = _crop_padded(plane.astype(np.float32), oy, math.ceil(by1) + margin,
                          ox, math.ceil(bx1) + margin, pad)
    out = Image.fromarray(window).resize(  # 2-D float32 -> pillow mode "F"
        (X1 - X0, Y1 - Y0), resample, box=(bx0 - ox, by0 - oy, bx1 - ox, by1 - oy)
    )
    canvas[Y0:Y1, X0:X1] = np.asarray(out)
    return canvas


def _resample_rgba(rgb: np.ndarray, alpha: np.ndarray, resize) -> tuple[np.ndarray, np.ndarray]:
    """Straight rgb (h, w, 3) and alpha (h, w) -> (H, W, 3), (H, W) float32 through ``resize`` (one plane).

    Premultiplied resampling: colour is weighted by coverage, so transparent pixels (of any stored colour)
    contribute nothing to the edges; un-premultiplied after, with the straight-resampled colour where the
    resampled alpha is too small to divide by.
    """
    alpha_raw = resize(alpha)
    premult = np.stack([resize(rgb[..., c] * alpha) for c in range(3)], axis=-1)
    straight = np.stack([resize(rgb[..., c], pad="edge") for c in range(3)], axis=-1)
    covered = alpha_raw > _ALPHA_EPS
    ratio = premult / np.where(covered, alpha_raw, 1.0)[..., None]
    out_rgb = np.clip(np.where(covered[..., None], ratio, straight), 0.0, 1.0).astype(np.float32)
    return out_rgb, np.clip(alpha_raw, 0.0, 1.0).astype(np.float32)


def _resample_depth(depth: np.ndarray, src_fg: np.ndarray, fg: np.ndarray, resize, flip: bool) -> np.ndarray:
    """Depth (h, w) -> (H, W) float32 normalised to [0, 1] over ``fg`` (H, W), 0 outside, larger = farther.

    Resampled as a mask-weighted average (sum of depth * weight / sum of weight), so that the object's
    edge takes no values from outside the object. ``flip``: the file is disparity-like (larger = nearer);
    a relative map has an unknown shift, so 1 / d is not available and reversing the order (1 - d) is
    the convention-preserving conversion. This is the only place the convention is converted.
    """
    weight = src_fg.astype(np.float32)
    num = resize(depth * weight, _DEPTH_RESAMPLE, "constant")
    den = resize(weight, _DEPTH_RESAMPLE, "constant")
    valid = fg & (den > 1e-3)
    # Mask pixels with no depth support (a sliver of resampled alpha) count as the farthest.
    out = np.where(fg, 1.0, 0.0).astype(np.float32)
    if not valid.any():  # cannot happen for a non-empty source mask; kept as a safe fallback
        return out
    values = num[valid] / den[valid]
    lo, hi = values.min(), values.max()
    values = (values - lo) / (hi - lo) if hi > lo else np.ones_like(values)
    out[valid] = 1.0 - values if flip else values
    return out


def depth_beside(image: str | Path) -> Path | None:
    """The depth map that preprocessing writes beside an image: ``<name>_depth.png`` for ``<name>_rgba.png``
    (or ``<name>.png``), or None when there is none."""
    image = Path(image)
    stem = image.stem[: -len("_rgba")] if image.stem.endswith("_rgba") else image.stem
    candidate = image.with_name(f"{stem}_depth.png")
    return candidate if candidate.is_file() else None


def depth_from_config(cfg) -> str | None:
    """The depth map a config names: ``data.depth`` = "auto" (the file beside the image, if any), "" (none) or a
    path."""
    if cfg.data.depth == "auto":
        found = depth_beside(cfg.image or example_image_path())
        return None if found is None else str(found)
    return cfg.data.depth or None


def reference_from_config(cfg, height: int, width: int) -> ReferenceImage:
    """The reference image (and depth map) a config names (``image``, ``data.*``), at one resolution."""
    return load_reference(cfg.image or example_image_path(), height, width, recenter=cfg.data.recenter,
                          border_ratio=cfg.data.border_ratio, depth_path=depth_from_config(cfg),
                          background=cfg.data.background, depth_convention=cfg.data.depth_convention)


# ---------------------------------------------------------------- framing for preprocessing (public)

__all__ += ["frame_cutout"]


def frame_cutout(
    rgb: np.ndarray,
    alpha: np.ndarray,
    height: int,
    width: int,
    border_ratio: float = DEFAULT_BORDER_RATIO,
    *,
    depth: np.ndarray | None = None,
    normal: np.ndarray | None = None,
    path: str | Path = "image",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Re-frames a cut-out and its per-pixel maps once, as ``preprocess_image.py --recenter`` does.

    The placement is the loader's (:func:`_recenter_placement`: bbox of ``alpha > 0``, longer side
    ``int(min(H, W) * (1 - border_ratio))``, centred), and colour / alpha are resampled as
    ``load_reference(recenter=True)`` resamples them (premultiplied bicubic, then un-premultiplied), so a file
    written from this output and loaded with ``recenter=False`` matches loading the original with
    ``recenter=True``.

    Args:
      rgb: (h, w, 3) float in [0, 1], straight colour.
      alpha: (h, w) float in [0, 1]; the object is ``alpha > 0`` (the official mask).
      height, width: canvas size H, W (each >= 8).
      border_ratio: the empty part of the frame along the object's longer side, in [0, 1).
      depth: optional (h, w), larger = farther; only its values where ``alpha > 0`` are used.
      normal: optional (h, w, C); only its values where ``alpha > 0`` are used.
      path: names the image in error messages.

    Returns:
      (rgb (H, W, 3), alpha (H, W), depth (H, W) or None, normal (H, W, C) or None), float32. The new mask is
      ``alpha > 0.5 / 255`` (nonzero once written at 8 bits). Depth is resampled mask-weighted (as the loader:
      sum(d * m) / sum(m), bilinear) and min-max normalised to [0, 1] over the new mask, so 0 = nearest and
      1 = farthest exactly; normal is the same mask-weighted average, not re-normalised. Both are 0 outside.

    Raises:
      ReferenceImageError: empty alpha, bad sizes or border_ratio, mismatched shapes.
    """
    _check_arguments(height, width, border_ratio, BACKGROUNDS[0], 1.0, DEPTH_CONVENTIONS[0])
    height, width = int(height), int(width)
    rgb = np.asarray(rgb, np.float32)
    alpha = np.asarray(alpha, np.float32)
    shapes = [("rgb", rgb, 3), ("alpha", alpha, 2), ("depth", depth, 2), ("normal", normal, 3)]
    for name, plane, ndim in shapes:
        if plane is not None and (np.ndim(plane) != ndim or np.shape(plane)[:2] != alpha.shape):
            raise ReferenceImageError(
                f"{name} of {path} has shape {np.shape(plane)}, expected {ndim}-D with (h, w) = {alpha.shape}"
            )
    src_fg = alpha > 0
    if not src_fg.any():
        raise ReferenceImageError(f"cannot frame {path}: its alpha is 0 everywhere (no object)")
    place = _recenter_placement(src_fg, height, width, border_ratio, path)

    def resize(plane, resample=_RGB_RESAMPLE, pad="constant"):
        return _resize_plane(plane, place, (height, width), resample, pad)

    out_rgb, out_alpha = _resample_rgba(rgb, alpha, resize)
    covered = out_alpha > _ALPHA_EPS

    out_depth = None
    if depth is not None:
        clean = np.where(src_fg, np.asarray(depth, np.float64), 0.0)  # NaN / inf outside must not reach the sums
        out_depth = _resample_depth(clean, src_fg, covered, resize, flip=False)
    out_normal = None
    if normal is not None:
        weight = src_fg.astype(np.float32)
        den = resize(weight, _DEPTH_RESAMPLE, "constant")
        valid = covered & (den > 1e-3)
        safe = np.where(valid, den, 1.0)
        channels = [resize(np.where(src_fg, normal[..., c], 0.0) * weight, _DEPTH_RESAMPLE, "constant")
                    for c in range(normal.shape[-1])]
        out_normal = np.stack([np.where(valid, ch / safe, 0.0) for ch in channels], axis=-1).astype(np.float32)
    return out_rgb, out_alpha, out_depth, out_normal
