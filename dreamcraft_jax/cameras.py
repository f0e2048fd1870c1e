"""Cameras: spherical placement, look-at, random view sampling, rays.

Conventions (the same as threestudio / DreamCraft3D, so that Zero123 camera deltas mean the same thing):

* World axes: right-handed, **+z up**. The object sits at the origin inside the box [-r, r]^3.
* A camera at elevation ``e``, azimuth ``a`` (degrees) and distance ``d`` sits at
  ``d * (cos e cos a, cos e sin a, sin e)`` and looks at the origin. **Azimuth 0 is the front**: the reference
  camera is on the +x axis looking towards -x; azimuth grows counter-clockwise seen from above (+z).
* Camera-to-world matrices ``c2w`` (4x4) use the OpenGL camera frame: columns are camera +x (right), +y (up)
  and +z (backwards: the camera looks along -z), then the position.
* Pixel (row ``j``, column ``i``) of an ``H x W`` image has its centre at ``(i + 0.5, j + 0.5)``; row 0 is the
  top of the image. Its camera-space direction is ``((i + 0.5 - W/2) / f, -(j + 0.5 - H/2) / f, -1)`` with
  focal length ``f = H / (2 tan(fovy / 2))`` (square pixels), then rotated by ``c2w`` and normalised.

Random views follow the official ranges: elevation in [-10, 45] deg (per view, half the time uniform in angle,
half uniform on the sphere, i.e. uniform in sin(elevation)), azimuth in [-180, 180], fixed distance and fovy.
Over the first ``progressive_until`` steps the ranges widen linearly from the reference view to the full ranges.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Camera:
    """A batch of pinhole cameras (any leading batch shape ``...``).

    c2w: (..., 4, 4) camera-to-world (OpenGL frame, see module doc).
    fovy: (...) vertical field of view in radians.
    elevation, azimuth: (...) degrees (kept for view-dependent prompts and Zero123 camera deltas).
    distance: (...) distance to the origin.
    ray_offset: (..., 2, 3) the fixed offset of its rays' origins (row 0) and unnormalised world directions
      (row 1), :func:`get_rays`; zeros except for the reference view, which the official code jitters once.
    """

    c2w: jax.Array
    fovy: jax.Array
    elevation: jax.Array
    azimuth: jax.Array
    distance: jax.Array
    ray_offset: jax.Array

    @property
    def position(self) -> jax.Array:
        """(..., 3) camera centre in world space."""
        return self.c2w[..., :3, 3]


def spherical_to_position(elevation_deg, azimuth_deg, distance) -> jax.Array:
    """(...) elevation/azimuth in degrees and distance -> (..., 3) position; see the module doc."""
    e = jnp.deg2rad(jnp.asarray(elevation_deg, jnp.float32))
    a = jnp.deg2rad(jnp.asarray(azimuth_deg, jnp.float32))
    d = jnp.asarray(distance, jnp.float32)
    return jnp.stack([d * jnp.cos(e) * jnp.cos(a), d * jnp.cos(e) * jnp.sin(a), d * jnp.sin(e)], axis=-1)


def look_at(eye: jax.Array, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> jax.Array:
    """(..., 3) eye positions -> (..., 4, 4) c2w looking at ``target`` with world ``up`` (OpenGL frame).

    forward = normalize(target - eye); right = normalize(forward x up); cam_up = right x forward;
    c2w[:3, :3] = [right, cam_up, -forward].
    """
    eye = jnp.asarray(eye, jnp.float32)
    target = jnp.broadcast_to(jnp.asarray(target, jnp.float32), eye.shape)
    up = jnp.broadcast_to(jnp.asarray(up, jnp.float32), eye.shape)
    forward = _normalize(target - eye)
    right = jnp.cross(forward, up)
    # Looking straight up or down makes forward x up vanish: fall back to world +x as "up" there.
    degenerate = jnp.linalg.norm(right, axis=-1, keepdims=True) < 1e-6
    alt_up = jnp.broadcast_to(jnp.asarray([1.0, 0.0, 0.0], jnp.float32), eye.shape)
    right = _normalize(jnp.where(degenerate, jnp.cross(forward, alt_up), right))
    cam_up = jnp.cross(right, forward)
    rot = jnp.stack([right, cam_up, -forward], axis=-1)  # columns
    top = jnp.concatenate([rot, eye[..., None]], axis=-1)  # (..., 3, 4)
    bottom = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.0, 1.0], jnp.float32), eye.shape[:-1] + (1, 4))
    return jnp.concatenate([top, bottom], axis=-2)


def make_camera(elevation_deg, azimuth_deg, distance, fovy_deg) -> Camera:
    """Cameras on the sphere looking at the origin; all arguments broadcast to one batch shape."""
    elevation, azimuth, distance, fovy_deg = jnp.broadcast_arrays(
        *(jnp.asarray(v, jnp.float32) for v in (elevation_deg, azimuth_deg, distance, fovy_deg))
    )
    c2w = look_at(spherical_to_position(elevation, azimuth, distance))
    return Camera(c2w=c2w, fovy=jnp.deg2rad(fovy_deg), elevation=elevation, azimuth=azimuth, distance=distance,
                  ray_offset=jnp.zeros(elevation.shape + (2, 3), jnp.float32))


def reference_camera(cfg) -> Camera:
    """The reference view from ``cfg`` (a ConfigDict with elevation_deg, azimuth_deg, distance, fovy_deg)."""
    return make_camera(cfg.elevation_deg, cfg.azimuth_deg, cfg.distance, cfg.fovy_deg)


def orbit_cameras(n_views: int, elevation_deg: float, distance: float, fovy_deg: float,
                  start_azimuth_deg: float = 0.0) -> Camera:
    """``n_views`` cameras on a 360 degree orbit (turntable), starting at ``start_azimuth_deg``."""
    azimuth = start_azimuth_deg + jnp.arange(n_views, dtype=jnp.float32) * (360.0 / n_views)
    azimuth = (azimuth + 180.0) % 360.0 - 180.0
    return make_camera(elevation_deg, azimuth, distance, fovy_deg)


def progressive_ranges(step, cfg) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Ranges of the random views at ``step`` (traced ok), widened linearly over ``cfg.progressive_until`` steps.

    cfg: ConfigDict with elevation_range, azimuth_range, distance_range, fovy_range (each (lo, hi)),
    progressive_until, and reference values elevation_deg, azimuth_deg, distance, fovy_deg to start from.
    Returns {name: (lo, hi)} with r = min(1, step / progressive_until), lo = (1-r) * ref + r * lo_full.
    """
    until = float(cfg.progressive_until)
    if until > 0:
        r = jnp.clip(jnp.asarray(step, jnp.float32) / until, 0.0, 1.0)
    else:
        r = jnp.float32(1.0)
    ranges = {}
    for name, ref in (("elevation", cfg.elevation_deg), ("azimuth", cfg.azimuth_deg),
                      ("distance", cfg.distance), ("fovy", cfg.fovy_deg)):
        lo, hi = getattr(cfg, f"{name}_range")
        ranges[name] = ((1.0 - r) * ref + r * lo, (1.0 - r) * ref + r * hi)
    return ranges


def sample_cameras(key, n_views: int, step, cfg) -> Camera:
    """``n_views`` random cameras at training ``step`` (see :func:`progressive_ranges` for ``cfg``)."""
    ranges = progressive_ranges(step, cfg)
    k_mode, k_elev, k_azim, k_dist, k_fovy = jax.random.split(key, 5)
    e_lo, e_hi = ranges["elevation"]
    u = jax.random.uniform(k_elev, (n_views,))
    elev_uniform_angle = e_lo + u * (e_hi - e_lo)
    s_lo, s_hi = jnp.sin(jnp.deg2rad(e_lo)), jnp.sin(jnp.deg2rad(e_hi))
    elev_uniform_sphere = jnp.rad2deg(jnp.arcsin(s_lo + u * (s_hi - s_lo)))
    use_sphere = jax.random.bernoulli(k_mode, 0.5, (n_views,))
    elevation = jnp.where(use_sphere, elev_uniform_sphere, elev_uniform_angle)

    def uniform(k, lo_hi):
        lo, hi = lo_hi
        return lo + jax.random.uniform(k, (n_views,)) * (hi - lo)

    azimuth = uniform(k_azim, ranges["azimuth"])
    distance = uniform(k_dist, ranges["distance"])
    fovy = uniform(k_fovy, ranges["fovy"])
    return make_camera(elevation, azimuth, distance, fovy)


def pixel_directions_camera(height: int, width: int, fovy) -> jax.Array:
    """(H, W, 3) unnormalised camera-space directions of pixel centres (OpenGL frame, z = -1)."""
    focal = 0.5 * height / jnp.tan(0.5 * jnp.asarray(fovy, jnp.float32))
    i = jnp.arange(width, dtype=jnp.float32) + 0.5
    j = jnp.arange(height, dtype=jnp.float32) + 0.5
    x = (i[None, :] - 0.5 * width) / focal
    y = -(j[:, None] - 0.5 * height) / focal
    x, y = jnp.broadcast_arrays(x, y)
    return jnp.stack([x, y, -jnp.ones_like(x)], axis=-1)


def get_rays(camera: Camera, height: int, width: int):
    """Rays of one camera (batch shape ()) -> (rays_o, rays_d), each (H, W, 3); rays_d unit length.

    ``camera.ray_offset`` (2, 3) is the official reference-ray jitter (``threestudio/utils/ops.py: get_rays``): row
    0 is added to every origin and row 1 to every world direction before it is normalised (directions have
    camera-space z = -1 there, so a 2e-3 offset turns the camera by about 2e-3 rad): one fixed sub-pixel camera
    offset, not per-ray noise. See :func:`ray_offset`.
    """
    dirs_cam = pixel_directions_camera(height, width, camera.fovy)
    rot = camera.c2w[:3, :3]
    dirs = dirs_cam @ rot.T + camera.ray_offset[1]
    origins = jnp.broadcast_to(camera.c2w[:3, 3] + camera.ray_offset[0], dirs.shape)
    return origins, _normalize(dirs)


def ray_offset(key: jax.Array, std: float) -> jax.Array:
    """(2, 3) float32: N(0, std^2) offsets of the reference rays' origins (row 0) and directions (row 1), drawn
    once when the rays are set (the official code draws them at setup and at each resolution change)."""
    return std * jax.random.normal(key, (2, 3), jnp.float32)


def light_directions(key, camera: Camera, n_views: int | None = None, *, distance_range=(0.8, 1.5),
                     angle_std_deg: float = 30.0) -> jax.Array:
    """Point-light positions near each camera (DreamFusion-style shading): (..., 3).

    The light sits at ``camera_dir * U(distance_range) * |camera|`` rotated by a random perturbation of about
    ``angle_std_deg`` degrees, so lambertian renders are lit roughly from the viewer's side.
    """
    k_dir, k_dist = jax.random.split(key)
    pos = camera.position
    cam_dir = _normalize(pos)
    noise = jnp.deg2rad(angle_std_deg) * jax.random.normal(k_dir, pos.shape)
    direction = _normalize(cam_dir + noise)
    scale = jax.random.uniform(k_dist, pos.shape[:-1] + (1,), minval=distance_range[0], maxval=distance_range[1])
    return direction * scale * jnp.linalg.norm(pos, axis=-1, keepdims=True)


def _normalize(v: jax.Array, eps: float = 1e-12) -> jax.Array:
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), eps)
