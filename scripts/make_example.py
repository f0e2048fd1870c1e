"""Render the bundled example reference image (the source of ``dreamcraft_jax/assets``).

The project ships one example object so that it runs end to end without any download:
a toy mushroom (red cap with white spots, cream stem, on a small green mound), made of
analytic primitives and ray-cast here in plain numpy. The output is deterministic (no
randomness), so re-running this script reproduces the committed files bit for bit.

Outputs (both 256 x 256):

* ``example_rgba.png``  8-bit RGBA, straight (not premultiplied) colour; alpha is the
  pixel coverage from 4 x 4 supersampling, so edges are anti-aliased; background alpha 0.
* ``example_depth.png`` 16-bit grayscale depth in the official DreamCraft3D convention
  (what Omnidata's model gives and ``preprocess_image.py`` writes): view-space z-depth,
  larger value = farther from the camera. Pixels with coverage >= 0.5 are normalised to
  [1, 65535] (min-max), everything else is 0.

Camera: at (0, 0, 3.8) looking at the origin along -z (y up), perspective. The image window is
framed as the official preprocessing (``preprocess_image.py --recenter``, border ratio 0.1)
frames an object: the longer side of the object's bounding box is 90 % of the image, centred.
The window is found by a first, coarse pass over a fovy-20-degree view.

Usage::

    python scripts/make_example.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 256  # output resolution (square)
SUPERSAMPLE = 4  # 4 x 4 rays per pixel
FOVY_DEG = 20.0  # of the first pass that finds the object's extent
CAM_DIST = 3.8
BORDER_RATIO = 0.1  # the official preprocessing default: the object fills 90 % of the frame

# Scene (world units, y up). Cap: upper half of an ellipsoid closed by a flat underside.
CAP_CENTER_Y = 0.0
CAP_RADII = np.array([0.40, 0.28, 0.40])
STEM_RADIUS = 0.12
STEM_Y = (-0.36, CAP_CENTER_Y)  # starts inside the mound, ends at the cap underside
MOUND_CENTER = np.array([0.0, -0.36, 0.0])
MOUND_RADII = np.array([0.27, 0.07, 0.27])

RED = (0.86, 0.12, 0.10)
SPOT_WHITE = (0.97, 0.95, 0.90)
GILLS = (0.88, 0.76, 0.60)
STEM_CREAM = (0.95, 0.90, 0.74)
GRASS = (0.28, 0.66, 0.22)

# White spots on the cap: (direction in the cap's unit-sphere frame, angular radius in rad).
SPOTS = (
    ((0.00, 1.00, 0.00), 0.30),
    ((0.00, 0.55, 0.84), 0.27),
    ((0.66, 0.42, 0.62), 0.22),
    ((-0.66, 0.42, 0.62), 0.22),
    ((0.93, 0.25, 0.10), 0.18),
    ((-0.93, 0.25, 0.10), 0.18),
    ((0.40, 0.86, 0.30), 0.14),
    ((-0.42, 0.80, -0.40), 0.20),
    ((0.55, 0.50, -0.65), 0.22),
    ((0.00, 0.35, -0.94), 0.22),
)

LIGHT_DIR = np.array([-0.5, 0.8, 0.6]) / np.linalg.norm([-0.5, 0.8, 0.6])  # towards the light
AMBIENT = 0.35
DIFFUSE = 0.65


def _camera_rays(size: int, ss: int, window=None) -> tuple[np.ndarray, np.ndarray]:
    """Ray origin (3,) and unit directions (size*ss, size*ss, 3) of the front camera. ``window``
    (x0, x1, y0, y1): the image plane's extent at z = -1 (x right, y up); default the fovy square."""
    n = size * ss
    coords = (np.arange(n) + 0.5) / n  # sub-pixel centres in (0, 1)
    if window is None:
        tan_half = math.tan(math.radians(FOVY_DEG) / 2)
        window = (-tan_half, tan_half, -tan_half, tan_half)
    x0, x1, y0, y1 = window
    x = x0 + coords * (x1 - x0)
    y = y1 - coords * (y1 - y0)  # image rows go down, world y goes up
    xx, yy = np.meshgrid(x, y)
    dirs = np.stack([xx, yy, -np.ones_like(xx)], axis=-1)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    return np.array([0.0, 0.0, CAM_DIST]), dirs


def framed_window(probe: int = 1024) -> tuple[float, float, float, float]:
    """The image-plane window (x0, x1, y0, y1) that frames the object as ``--recenter`` does: a square whose
    side is the object's longer extent / (1 - BORDER_RATIO), centred on the object's bounding box."""
    _, d = _camera_rays(probe, 1)
    hit = _trace(np.array([0.0, 0.0, CAM_DIST]), d)[1]
    x, y = d[..., 0] / -d[..., 2], d[..., 1] / -d[..., 2]  # back to the z = -1 plane
    half_px = math.tan(math.radians(FOVY_DEG) / 2) / probe  # half a probe pixel: the extent to the pixel edges
    xs, ys = x[hit], y[hit]
    bx0, bx1, by0, by1 = xs.min() - half_px, xs.max() + half_px, ys.min() - half_px, ys.max() + half_px
    side = max(bx1 - bx0, by1 - by0) / (1.0 - BORDER_RATIO)
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    return cx - side / 2, cx + side / 2, cy - side / 2, cy + side / 2


def _ellipsoid_roots(o, d, center, radii):
    """Both ray parameters (t_near, t_far) of a ray-ellipsoid intersection; inf on a miss."""
    oo = (o - center) / radii
    dd = d / radii
    a = np.sum(dd * dd, axis=-1)
    b = 2 * np.sum(oo * dd, axis=-1)
    c = np.sum(oo * oo) - 1
    disc = b * b - 4 * a * c
    hit = disc >= 0
    sq = np.sqrt(np.where(hit, disc, 0.0))
    t0 = np.where(hit, (-b - sq) / (2 * a), np.inf)
    t1 = np.where(hit, (-b + sq) / (2 * a), np.inf)
    return t0, t1


def _positive(t):
    return np.where(t > 1e-6, t, np.inf)


def _trace(o: np.ndarray, d: np.ndarray):
    """Nearest hit of each ray: (t (...,), hit (...,) bool, which primitive (...,) in 0..3)."""
    cap_c = np.array([0.0, CAP_CENTER_Y, 0.0])

    # Cap dome: nearest root above the cap's equator (the far root covers rays that enter
    # from below, although the underside disc occludes those anyway).
    t0, t1 = _ellipsoid_roots(o, d, cap_c, CAP_RADII)
    above0 = o[1] + t0 * d[..., 1] >= CAP_CENTER_Y
    above1 = o[1] + t1 * d[..., 1] >= CAP_CENTER_Y
    t_cap = _positive(np.where(above0, t0, np.where(above1, t1, np.inf)))

    # Cap underside: disc in the plane y = CAP_CENTER_Y. A ray parallel to it gives inf or nan,
    # which fails the disc test below: no hit.
    t_plane = (CAP_CENTER_Y - o[1]) / d[..., 1]
    px, pz = o[0] + t_plane * d[..., 0], o[2] + t_plane * d[..., 2]
    t_gills = _positive(np.where(px**2 + pz**2 <= CAP_RADII[0] ** 2, t_plane, np.inf))

    # Stem: outer wall of a vertical cylinder (its ends are hidden inside cap and mound).
    a = d[..., 0] ** 2 + d[..., 2] ** 2
    b = 2 * (o[0] * d[..., 0] + o[2] * d[..., 2])
    c = o[0] ** 2 + o[2] ** 2 - STEM_RADIUS**2
    disc = b * b - 4 * a * c
    t_s = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a), np.inf)
    ys = o[1] + t_s * d[..., 1]
    t_stem = _positive(np.where((ys >= STEM_Y[0]) & (ys <= STEM_Y[1]), t_s, np.inf))

    t_mound = _positive(_ellipsoid_roots(o, d, MOUND_CENTER, MOUND_RADII)[0])

    ts = np.stack([t_cap, t_gills, t_stem, t_mound])  # (4, n, n)
    which = np.argmin(ts, axis=0)
    t = np.min(ts, axis=0)
    hit = np.isfinite(t)
    t = np.where(hit, t, 0.0)
    return t, hit, which


def render(size: int = SIZE, ss: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast the example, framed by :func:`framed_window`.

    Returns:
      rgba:  (size, size, 4) uint8, straight colour, alpha = coverage.
      depth: (size, size) uint16, z-depth (larger = farther) normalised to [1, 65535] where
             coverage >= 0.5, 0 elsewhere.
    """
    o, d = _camera_rays(size, ss, framed_window())
    cap_c = np.array([0.0, CAP_CENTER_Y, 0.0])
    t, hit, which = _trace(o, d)
    p = o + t[..., None] * d

    # Per-primitive normals and albedo; the argmin picks one per ray.
    n_cap = (p - cap_c) / CAP_RADII**2
    n_gills = np.broadcast_to(np.array([0.0, -1.0, 0.0]), p.shape)
    n_stem = np.stack([p[..., 0], np.zeros_like(t), p[..., 2]], axis=-1)
    n_mound = (p - MOUND_CENTER) / MOUND_RADII**2
    normals = np.choose(which[..., None], [n_cap, n_gills, n_stem, n_mound])
    normals = normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)

    u = (p - cap_c) / CAP_RADII  # cap point in its unit-sphere frame
    u = u / np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
    spot = np.zeros(t.shape, bool)
    for direction, radius in SPOTS:
        dirn = np.asarray(direction) / np.linalg.norm(direction)
        spot |= u @ dirn >= math.cos(radius)
    cap_albedo = np.where(spot[..., None], SPOT_WHITE, RED)
    albedo = np.choose(
        which[..., None],
        [cap_albedo, np.broadcast_to(GILLS, p.shape), np.broadcast_to(STEM_CREAM, p.shape),
         np.broadcast_to(GRASS, p.shape)],
    )
    shade = AMBIENT + DIFFUSE * np.maximum(normals @ LIGHT_DIR, 0.0)
    color = np.clip(albedo * shade[..., None], 0.0, 1.0) * hit[..., None]

    # Camera looks along -z, so the view-space depth of a hit is its distance along -z.
    zdepth = np.where(hit, t * -d[..., 2], 0.0)

    def pool(x):  # (size*ss, size*ss, ...) -> per-pixel sums over the ss x ss samples
        return x.reshape(size, ss, size, ss, *x.shape[2:]).sum(axis=(1, 3))

    count = pool(hit.astype(np.float64))
    coverage = count / ss**2
    safe = np.maximum(count, 1.0)
    rgb = pool(color) / safe[..., None]  # straight colour: mean over the covered samples
    z = pool(zdepth) / safe

    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = np.round(rgb * 255).astype(np.uint8)
    rgba[..., 3] = np.round(coverage * 255).astype(np.uint8)

    inside = coverage >= 0.5
    lo, hi = z[inside].min(), z[inside].max()
    depth = np.zeros((size, size), np.uint16)
    depth[inside] = np.round(1 + (z[inside] - lo) / (hi - lo) * 65534).astype(np.uint16)
    return rgba, depth


def main() -> None:
    default_dir = Path(__file__).resolve().parent.parent / "dreamcraft_jax" / "assets"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=default_dir)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    rgba, depth = render()
    rgba_path = args.out_dir / "example_rgba.png"
    depth_path = args.out_dir / "example_depth.png"
    Image.fromarray(rgba).save(rgba_path, optimize=True)  # (H, W, 4) uint8 -> RGBA
    Image.fromarray(depth).save(depth_path, optimize=True)  # (H, W) uint16 -> 16-bit gray
    for path in (rgba_path, depth_path):
        print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
