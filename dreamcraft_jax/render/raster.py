"""Differentiable triangle rasteriser (pure jnp reference path), in the roles of nvdiffrast's primitives.

Every function works on ONE view; callers ``jax.vmap`` over views. All shapes are static (budgets plus overflow
counts), so everything runs under ``jax.jit``, ``jax.vmap`` and inside ``shard_map``.

Conventions
-----------
* **Projection** (:func:`clip_positions`): OpenGL clip coordinates ``clip = P @ w2c @ [v, 1]`` with the
  official (threestudio) matrix, y flipped: ``P = [[1/(t a), 0, 0, 0], [0, -1/t, 0, 0],
  [0, 0, -(f+n)/(f-n), -2fn/(f-n)], [0, 0, -1, 0]]``, ``t = tan(fovy/2)``, ``a = W/H``. So ``w`` is the view
  depth (camera-space ``-z``) and NDC ``y`` points DOWN the image: pixel (row j, column i) has its centre at
  NDC ``(2 (i + 0.5)/W - 1, 2 (j + 0.5)/H - 1)``, the ray of :func:`dreamcraft_jax.cameras.get_rays`.
* **Pixel space**: ``X = (x + w) W/2``, ``Y = (y + w) H/2`` (homogeneous), so ``(X/w, Y/w)`` are pixel
  coordinates with pixel centres at ``(i + 0.5, j + 0.5)``.
* **Coverage** (homogeneous rasterisation, no geometric clipping): for a pixel centre ``p = (px, py)`` put
  ``a_i = X_i - px w_i``, ``b_i = Y_i - py w_i`` and the edge functions ``e_i = a_j b_k - a_k b_j``
  (``(i, j, k)`` cyclic; edge ``i`` is the one opposite vertex ``i``). The perspective-correct barycentrics are
  ``lambda = e / sum(e)``, the surface point's view depth ``w_p = (e . w) / sum(e)`` and its NDC depth
  ``z_p / w_p = (e . z) / (e . w)``. With ``s = sign(det[X; Y; w])`` (the triangle's orientation, either winding
  is drawn: no back-face culling), the pixel is covered iff every ``s e_i >= 0`` (not all 0) and
  ``-1 <= z_p / w_p <= 1``. This is exact clipping against the near and far planes per pixel: parts of a
  triangle behind the camera or outside [near, far] cover nothing, the rest is drawn correctly.
* **Fill rule** (for ``s e_i == 0``): a pixel centre on an edge belongs to the triangle that contains the centre
  moved by an infinitesimal ``(eps, eps^2)`` (right, and much less down); i.e. with ``A_i = de_i/dpx`` and
  ``B_i = de_i/dpy``, the edge includes its points iff ``s A_i > 0`` or (``A_i == 0`` and ``s B_i > 0``): the
  top-left rule in image coordinates (rows down). Two triangles sharing an edge get exactly negated edge
  functions (products of the same vertex values), so every centre on the edge is drawn exactly once. (A GPU
  compiler that contracts ``a b - c d`` into an FMA can break that exact antisymmetry within ~1 ulp of an edge;
  such a centre is then drawn twice, resolved by the z-buffer, or, extremely rarely, not at all.)
* **Z-buffer**: nearest NDC depth ``z/w``; equal depths: the lower face index wins.
* **Degenerate** triangles (``det = 0``: zero area on screen) and ``face_valid == False`` never cover a pixel.
* **Outputs** (:class:`Raster`): ``tri_id`` (-1 background), ``bary`` = (lambda_1, lambda_2) (vertex 0 gets
  ``1 - u - v``), ``depth`` = view depth ``w_p`` (camera-space distance along the optical axis; the distance
  along the pixel's ray is ``depth * |d|`` with ``d`` from :func:`dreamcraft_jax.cameras.pixel_directions_camera`);
  background 0.

Algorithm of :func:`rasterize` (static budgets)
-------------------------------------------------
1. Setup per face: pixel-space homogeneous vertices, orientation, fill-rule flags, and the pixel bounding box of
   the triangle clipped by the near plane ``z + w >= 0`` (if a clipped point has ``w <= 0``: the whole screen).
2. Binning: the bbox gives each face ``n_f`` overlapped tiles (``tile x tile`` pixels). An exclusive cumsum gives
   each face its first slot among ``pair_budget`` (tile, face) slots; slot -> face by a scatter + cummax (no
   data-dependent shapes). Pairs past the budget are dropped and counted (``overflow_pairs``); the dropped ones
   are those of the highest face indices. A stable sort by tile keeps each tile's faces in index order.
3. :func:`tile_zbuffer` (the kernel-shaped core): for every tile at once, a ``while_loop`` over its list, ``chunk``
   faces per step, each step testing every pixel of every tile (vectorised). Lists longer than
   ``max_per_tile`` are cut (``overflow_tiles`` counts the dropped pairs). The loop runs ``ceil(max list /
   chunk)`` steps (dynamic trip count, static shapes).
4. Resolve: barycentrics and depth of each pixel's winner.

:func:`interpolate` recomputes the barycentrics from ``clip`` differentiably (gradients reach the vertices, as
nvdiffrast's). :func:`antialias` is nvdiffrast's analytic silhouette antialiasing (see its docstring).
:func:`vertex_normals`: area-weighted vertex normals as the official ``Mesh._compute_vertex_normal``.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.cameras import Camera
from dreamcraft_jax.kernels import raster as raster_kernel

__all__ = ["Raster", "projection_matrix", "world_to_camera", "clip_positions", "pixel_homogeneous",
           "default_budgets", "triangle_setup", "bin_triangles", "tile_zbuffer", "rasterize", "barycentrics",
           "interpolate", "edge_topology", "antialias", "antialias_sparse", "default_antialias_budget",
           "vertex_normals", "safe_normalize", "SETUP_WIDTH"]

# Columns of a face's setup row (triangle_setup): X(3) Y(3) w(3) z(3) orientation s(1) fill-rule flags(3).
SETUP_WIDTH = 16
_X, _Y, _W, _Z, _S, _INCL = slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12), 12, slice(13, 16)

# nvdiffrast's tolerance on the silhouette crossing: up to 1/16 pixel past the neighbour's centre still counts.
_AA_EPS = 1.0 / 16.0
# The far vertex of the face across an edge must be this fraction of our own det off the eye-edge plane for the edge
# to be a silhouette (antialias); closer, the face across is flat or degenerate and the surface continues.
_AA_FLAT = 1e-3

# Pixel-bbox margin (pixels): bbox corners come from X/w, coverage from edge functions; a centre within float
# error of a vertex must not be left out of the bbox.
_BBOX_MARGIN = 1e-2


@flax.struct.dataclass
class Raster:
    """Rasteriser output of one view (under ``vmap``: a leading view axis on every field).

    tri_id: (H, W) int32 face index, -1 for background.
    bary: (H, W, 2) float32 perspective-correct barycentrics (u, v) of vertices 1 and 2 (vertex 0: 1 - u - v).
    depth: (H, W) float32 view depth (camera-space -z, = clip w) of the surface point; 0 on background.
    overflow_pairs: () int32 (tile, face) pairs over ``pair_budget`` (dropped).
    overflow_tiles: () int32 pairs over ``max_per_tile`` in their tile's list (dropped).
    """

    tri_id: jax.Array
    bary: jax.Array
    depth: jax.Array
    overflow_pairs: jax.Array
    overflow_tiles: jax.Array

    @property
    def overflow(self) -> jax.Array:
        """All dropped pairs; 0 means the result is exact."""
        return self.overflow_pairs + self.overflow_tiles


# ----------------------------------------------------------------------------------------------------------------
# Projection
# ----------------------------------------------------------------------------------------------------------------

def projection_matrix(fovy, aspect: float, near: float, far: float) -> jax.Array:
    """(4, 4) OpenGL perspective matrix with y flipped (threestudio ``get_projection_matrix``); fovy in radians,
    aspect = W / H."""
    t = jnp.tan(0.5 * jnp.asarray(fovy, jnp.float32))
    zero = jnp.zeros_like(t)
    rows = [
        [1.0 / (t * aspect), zero, zero, zero],
        [zero, -1.0 / t, zero, zero],
        [zero, zero, zero - (far + near) / (far - near), zero - 2.0 * far * near / (far - near)],
        [zero, zero, zero - 1.0, zero],
    ]
    return jnp.stack([jnp.stack(r) for r in rows])


def world_to_camera(c2w: jax.Array) -> jax.Array:
    """(4, 4) inverse of a rigid c2w: [R^T, -R^T t] (the official ``get_mvp_matrix``)."""
    rot_t = c2w[:3, :3].T
    trans = -jnp.sum(rot_t * c2w[:3, 3][None, :], axis=-1)  # elementwise: no reduced-precision matmul on GPUs
    top = jnp.concatenate([rot_t, trans[:, None]], axis=1)
    return jnp.concatenate([top, jnp.asarray([[0.0, 0.0, 0.0, 1.0]], c2w.dtype)], axis=0)


def clip_positions(vertices: jax.Array, camera: Camera, height: int, width: int, near: float = 0.1,
                   far: float = 1000.0) -> jax.Array:
    """(V, 3) world positions -> (V, 4) clip coordinates ``(P @ w2c @ [v, 1])`` of one camera (batch shape ()).

    near / far default to the official random-view values (0.1 / 1000; its reference view uses 0.01 / 100).
    """
    mvp = jnp.matmul(projection_matrix(camera.fovy, width / height, near, far), world_to_camera(camera.c2w),
                     precision=jax.lax.Precision.HIGHEST)
    homo = jnp.concatenate([vertices, jnp.ones_like(vertices[:, :1])], axis=-1)
    # Full float32: TF32 matmuls (a GPU default) would move vertices by ~1e-3 of the screen.
    return jnp.matmul(homo, mvp.T, precision=jax.lax.Precision.HIGHEST)


def pixel_homogeneous(clip: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(..., 4) clip -> (X, Y, w), each (...): ``X = (x + w) W/2``, ``Y = (y + w) H/2``; (X/w, Y/w) in pixels."""
    x, y, w = clip[..., 0], clip[..., 1], clip[..., 3]
    return (x + w) * (0.5 * width), (y + w) * (0.5 * height), w


def _edge_functions(a: jax.Array, b: jax.Array) -> jax.Array:
    """(..., 3) a, b -> (..., 3) e_i = a_j b_k - a_k b_j, (i, j, k) cyclic."""
    a1, a2 = jnp.roll(a, -1, axis=-1), jnp.roll(a, -2, axis=-1)
    b1, b2 = jnp.roll(b, -1, axis=-1), jnp.roll(b, -2, axis=-1)
    return a1 * b2 - a2 * b1


def _edge_functions3(a, b):
    """Tuples of 3 arrays -> tuple of 3 edge functions (the loop body's unrolled form of _edge_functions)."""
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


# ----------------------------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------------------------

def default_budgets(n_faces: int, height: int, width: int, tile: int = 16) -> tuple[int, int]:
    """(pair_budget, max_per_tile) for ``n_faces`` faces on an H x W image with ``tile``-pixel tiles.

    pair_budget = min(F * tiles, 4 F + 16 tiles): a mesh of small triangles overlaps ~1-2 tiles per face (back
    faces and hidden faces count too: binning knows no depth); the tile term covers a few screen-sized ones.
    max_per_tile = min(F, pair_budget, max(1024, 8 * pair_budget / tiles)): bounds the loop's trip count; the
    loop itself runs only as long as the longest actual list.
    """
    n_tiles = math.ceil(height / tile) * math.ceil(width / tile)
    pairs = max(1, min(n_faces * n_tiles, 4 * n_faces + 16 * n_tiles))
    per_tile = max(1, min(n_faces, pairs, max(1024, 8 * math.ceil(pairs / n_tiles))))
    return pairs, per_tile


def triangle_setup(clip: jax.Array, faces: jax.Array, face_valid: jax.Array, height: int, width: int):
    """Per-face constants of the coverage test and the faces' pixel bounding boxes.

    Returns (setup (F, SETUP_WIDTH) float32, bbox (F, 4) int32 = (i0, i1, j0, j1) inclusive pixel ranges of
    candidate centres, live (F,) bool: the face may cover a pixel).
    setup row: X_0..2, Y_0..2, w_0..2, z_0..2 (pixel-space homogeneous vertices), s = sign(det[X; Y; w]) (0 for
    dead faces), fill-rule flags incl_i = (s A_i > 0) | (A_i == 0 & s B_i > 0) as 0/1.
    """
    v = clip[faces]  # (F, 3, 4); out-of-range indices of invalid faces clamp (and the face is dead)
    X, Y, w = pixel_homogeneous(v, height, width)
    z = v[..., 2]

    # Orientation from the determinant in coordinates sheared to the vertex of largest w (exact invariance of
    # det under X -> X - c w), which keeps the values local: X - c w = w (x_pix - c).
    r = jnp.argmax(w, axis=-1)
    w_r = jnp.take_along_axis(w, r[:, None], axis=-1)
    safe_w_r = jnp.where(w_r > 0, w_r, 1.0)
    cx = jnp.take_along_axis(X, r[:, None], axis=-1) / safe_w_r
    cy = jnp.take_along_axis(Y, r[:, None], axis=-1) / safe_w_r
    det = jnp.sum(w * _edge_functions(X - cx * w, Y - cy * w), axis=-1)
    s = jnp.sign(det)

    # Fill-rule flags from the raw values: A_i, B_i of a shared edge are then exact negations in both faces.
    A = jnp.roll(w, -2, axis=-1) * jnp.roll(Y, -1, axis=-1) - jnp.roll(w, -1, axis=-1) * jnp.roll(Y, -2, axis=-1)
    B = jnp.roll(w, -1, axis=-1) * jnp.roll(X, -2, axis=-1) - jnp.roll(w, -2, axis=-1) * jnp.roll(X, -1, axis=-1)
    sA, sB = s[:, None] * A, s[:, None] * B
    incl = (sA > 0) | ((sA == 0) & (sB > 0))

    # Bounding box of the triangle clipped by the near plane d = z + w >= 0: kept vertices and edge crossings.
    d = z + w
    d_next = jnp.roll(d, -1, axis=-1)
    crosses = (d >= 0) != (d_next >= 0)
    t = d / jnp.where(crosses, d - d_next, 1.0)

    def lerp(q):
        return q + t * (jnp.roll(q, -1, axis=-1) - q)

    px_ = jnp.concatenate([X, lerp(X)], axis=-1)  # (F, 6)
    py_ = jnp.concatenate([Y, lerp(Y)], axis=-1)
    pw_ = jnp.concatenate([w, lerp(w)], axis=-1)
    keep = jnp.concatenate([d >= 0, crosses], axis=-1)
    unbounded = jnp.any(keep & (pw_ <= 0), axis=-1)  # not a standard perspective: take the whole screen
    ok_pt = keep & (pw_ > 0)
    sx = px_ / jnp.where(ok_pt, pw_, 1.0)
    sy = py_ / jnp.where(ok_pt, pw_, 1.0)
    big = jnp.float32(3e38)
    xmin = jnp.where(unbounded, -big, jnp.min(jnp.where(ok_pt, sx, big), axis=-1))
    xmax = jnp.where(unbounded, big, jnp.max(jnp.where(ok_pt, sx, -big), axis=-1))
    ymin = jnp.where(unbounded, -big, jnp.min(jnp.where(ok_pt, sy, big), axis=-1))
    ymax = jnp.where(unbounded, big, jnp.max(jnp.where(ok_pt, sy, -big), axis=-1))

    def first(lo, n):  # first centre k + 0.5 >= lo, clamped to the image
        return jnp.ceil(jnp.clip(lo - 0.5 - _BBOX_MARGIN, -1.0, n + 1.0)).astype(jnp.int32)

    def last(hi, n):
        return jnp.floor(jnp.clip(hi - 0.5 + _BBOX_MARGIN, -1.0, n + 1.0)).astype(jnp.int32)

    i0, i1 = jnp.maximum(first(xmin, width), 0), jnp.minimum(last(xmax, width), width - 1)
    j0, j1 = jnp.maximum(first(ymin, height), 0), jnp.minimum(last(ymax, height), height - 1)

    beyond_far = jnp.all(z > w, axis=-1)
    live = (face_valid & (s != 0) & jnp.any(keep, axis=-1) & ~beyond_far & (i0 <= i1) & (j0 <= j1))
    s = jnp.where(live, s, 0.0)
    incl = incl & live[:, None]
    setup = jnp.concatenate([X, Y, w, z, s[:, None], incl.astype(jnp.float32)], axis=-1)
    return setup.astype(jnp.float32), jnp.stack([i0, i1, j0, j1], axis=-1), live


def bin_triangles(bbox: jax.Array, live: jax.Array, height: int, width: int, tile: int, pair_budget: int):
    """Bin faces into tiles: (tile, face) pairs sorted by tile, face index ascending within a tile.

    bbox (F, 4) int32 (i0, i1, j0, j1), live (F,) bool. Returns (faces_sorted (P,) int32 (padding: 0),
    tile_start (T,) int32, tile_count (T,) int32, overflow_pairs () int32) with P = pair_budget and
    T = ceil(H/tile) * ceil(W/tile) tiles, tile index ty * tiles_x + tx.
    """
    n_faces = bbox.shape[0]
    tiles_x, tiles_y = -(-width // tile), -(-height // tile)
    n_tiles = tiles_x * tiles_y
    i0, i1, j0, j1 = (bbox[:, k] for k in range(4))
    tx0, tx1, ty0, ty1 = i0 // tile, i1 // tile, j0 // tile, j1 // tile
    span_x = tx1 - tx0 + 1
    n = jnp.where(live, span_x * (ty1 - ty0 + 1), 0)
    ends = jnp.cumsum(n)
    offsets = ends - n
    total = ends[-1]

    # slot -> face: write each face's index at its first slot, carry it forward (cummax).
    face_ids = jnp.arange(n_faces, dtype=jnp.int32)
    marks = jnp.full((pair_budget,), -1, jnp.int32)
    marks = marks.at[jnp.where(n > 0, offsets, pair_budget)].max(face_ids, mode="drop")
    owner = jax.lax.cummax(marks)
    slot = jnp.arange(pair_budget, dtype=jnp.int32)
    valid = (slot < total) & (owner >= 0)
    f = jnp.maximum(owner, 0)
    k = slot - offsets[f]
    sx = span_x[f]
    tile_id = (ty0[f] + k // sx) * tiles_x + tx0[f] + k % sx
    key = jnp.where(valid, tile_id, n_tiles)
    key_sorted, faces_sorted = jax.lax.sort((key, jnp.where(valid, f, 0)), num_keys=1, is_stable=True)
    counts = jnp.zeros((n_tiles + 1,), jnp.int32).at[key_sorted].add(1)[:n_tiles]
    starts = jnp.cumsum(counts) - counts
    overflow = jnp.maximum(total - pair_budget, 0).astype(jnp.int32)
    return faces_sorted, starts.astype(jnp.int32), counts, overflow


def _tile_pixels(tiles_y: int, tiles_x: int, tile: int):
    """(T, tile*tile) pixel-centre coordinates px, py of every tile (row-major within a tile)."""
    ly, lx = np.divmod(np.arange(tile * tile), tile)
    ty, tx = np.divmod(np.arange(tiles_y * tiles_x), tiles_x)
    px = (tx[:, None] * tile + lx[None, :] + 0.5).astype(np.float32)
    py = (ty[:, None] * tile + ly[None, :] + 0.5).astype(np.float32)
    return jnp.asarray(px), jnp.asarray(py)


def tile_zbuffer(setup_sorted: jax.Array, tile_start: jax.Array, tile_count: jax.Array, height: int, width: int,
                 tile: int, chunk: int = 8) -> tuple[jax.Array, jax.Array]:
    """Per-tile z-buffer over the tiles' face lists (the part a Pallas kernel takes over: one program per tile).

    setup_sorted: (P, SETUP_WIDTH) setup rows of the binned faces in list order; tile_start, tile_count: (T,) the
    tiles' lists (counts already capped). Returns (best (Hp, Wp) int32 position in ``setup_sorted`` of each
    pixel's nearest covering face or -1, zbest (Hp, Wp) its NDC depth or +inf), Hp, Wp padded to tiles.
    Ties (equal depth): the earlier list entry, i.e. the lower face index, wins.
    """
    tiles_x, tiles_y = -(-width // tile), -(-height // tile)
    n_tiles, tt = tiles_x * tiles_y, tile * tile
    px, py = _tile_pixels(tiles_y, tiles_x, tile)
    px, py = px[:, None, :], py[:, None, :]  # (T, 1, tt)
    n_slots = setup_sorted.shape[0]
    lanes = jnp.arange(chunk, dtype=jnp.int32)
    n_steps = -(-jnp.max(tile_count) // chunk)
    # Derived from the inputs so that, inside shard_map, the loop carry varies over the same mesh axes as the body.
    zero = jnp.max(tile_count) * 0

    def body(state):
        step, zbest, best = state
        pos = step * chunk + lanes  # (chunk,) list positions
        ok = pos[None, :] < tile_count[:, None]  # (T, chunk)
        idx = jnp.minimum(tile_start[:, None] + pos[None, :], n_slots - 1)
        row = setup_sorted[idx][..., None]  # (T, chunk, SETUP_WIDTH, 1)
        X, Y, W, Z = ([row[:, :, c] for c in range(o, o + 3)] for o in (0, 3, 6, 9))
        s = row[:, :, _S]
        a = [X[i] - px * W[i] for i in range(3)]  # (T, chunk, tt) each
        b = [Y[i] - py * W[i] for i in range(3)]
        e = _edge_functions3(a, b)
        inside = ok[..., None]
        for i in range(3):
            se = s * e[i]
            inside = inside & ((se > 0) | ((se == 0) & (row[:, :, 13 + i] > 0)))
        den = e[0] * W[0] + e[1] * W[1] + e[2] * W[2]
        zndc = (e[0] * Z[0] + e[1] * Z[1] + e[2] * Z[2]) / jnp.where(inside, den, 1.0)
        inside = inside & (zndc >= -1.0) & (zndc <= 1.0)
        zc = jnp.where(inside, zndc, jnp.inf)
        j = jnp.argmin(zc, axis=1)  # first minimum: the lowest face of the chunk
        zmin = jnp.min(zc, axis=1)
        cand = idx[jnp.arange(n_tiles)[:, None], j]
        better = zmin < zbest  # strict: earlier chunks (lower faces) keep ties
        return step + 1, jnp.where(better, zmin, zbest), jnp.where(better, cand, best)

    init = (zero, jnp.full((n_tiles, tt), jnp.inf, jnp.float32) + zero, jnp.full((n_tiles, tt), -1, jnp.int32) + zero)
    _, zbest, best = jax.lax.while_loop(lambda st: st[0] < n_steps, body, init)
    best = jnp.where(jnp.isfinite(zbest), best, -1)

    def untile(q):
        return q.reshape(tiles_y, tiles_x, tile, tile).transpose(0, 2, 1, 3).reshape(tiles_y * tile, tiles_x * tile)

    return untile(best), untile(zbest)


def _pixel_centres(height: int, width: int):
    py, px = np.meshgrid(np.arange(height, dtype=np.float32) + 0.5, np.arange(width, dtype=np.float32) + 0.5,
                         indexing="ij")
    return jnp.asarray(px), jnp.asarray(py)


def rasterize(clip: jax.Array, faces: jax.Array, face_valid: jax.Array, height: int, width: int, *, tile: int = 16,
              pair_budget: int | None = None, max_per_tile: int | None = None, chunk: int = 8,
              zbuffer: str = "xla") -> Raster:
    """Rasterise one view: clip (V, 4), faces (F, 3) int32, face_valid (F,) bool -> :class:`Raster` (H, W).

    See the module doc for coverage, fill rule, near/far clipping, tie-break and depth. Budgets (static):
    ``pair_budget`` (tile, face) pairs and ``max_per_tile`` faces per tile list, defaults
    :func:`default_budgets`; ``chunk`` faces tested per loop step. ``zbuffer``: "xla" (:func:`tile_zbuffer`) or
    "pallas" (:func:`dreamcraft_jax.kernels.raster.tile_zbuffer_pallas`, one program per tile; same outputs).
    No gradients (use :func:`interpolate`).
    """
    clip = jax.lax.stop_gradient(clip.astype(jnp.float32))
    faces = faces.astype(jnp.int32)
    n_faces = faces.shape[0]
    d_pairs, d_cap = default_budgets(n_faces, height, width, tile)
    pair_budget = d_pairs if pair_budget is None else int(pair_budget)
    max_per_tile = d_cap if max_per_tile is None else int(max_per_tile)

    setup, bbox, live = triangle_setup(clip, faces, face_valid, height, width)
    faces_sorted, start, count, overflow_pairs = bin_triangles(bbox, live, height, width, tile, pair_budget)
    capped = jnp.minimum(count, max_per_tile)
    overflow_tiles = jnp.sum(count - capped).astype(jnp.int32)
    if zbuffer == "pallas":
        best, _ = raster_kernel.tile_zbuffer_pallas(setup[faces_sorted], start, capped, height, width, tile)
    elif zbuffer == "xla":
        best, _ = tile_zbuffer(setup[faces_sorted], start, capped, height, width, tile, chunk)
    else:
        raise ValueError(f"zbuffer must be 'xla' or 'pallas', got {zbuffer!r}")
    best = best[:height, :width]
    fg = best >= 0
    tri_id = jnp.where(fg, faces_sorted[jnp.maximum(best, 0)], -1)

    # Resolve: barycentrics and depth of the winner at each centre (the same edge functions as the test).
    row = setup[jnp.maximum(tri_id, 0)]  # (H, W, SETUP_WIDTH)
    px, py = _pixel_centres(height, width)
    w = row[..., _W]
    e = _edge_functions(row[..., _X] - px[..., None] * w, row[..., _Y] - py[..., None] * w)
    total = jnp.where(fg, jnp.sum(e, axis=-1), 1.0)
    lam = e / total[..., None]
    bary = jnp.where(fg[..., None], lam[..., 1:], 0.0)
    depth = jnp.where(fg, jnp.sum(e * w, axis=-1) / total, 0.0)
    return Raster(tri_id=tri_id.astype(jnp.int32), bary=bary, depth=depth, overflow_pairs=overflow_pairs,
                  overflow_tiles=overflow_tiles)


# ----------------------------------------------------------------------------------------------------------------
# Interpolation
# ----------------------------------------------------------------------------------------------------------------

def barycentrics(tri_id: jax.Array, faces: jax.Array, clip: jax.Array) -> jax.Array:
    """(H, W) face ids, faces, clip (V, 4) -> (H, W, 3) perspective-correct barycentrics at the pixel centres,
    differentiable w.r.t. ``clip``: lambda = e / sum(e) (module doc); 0 (and no gradient) on background."""
    height, width = tri_id.shape
    fg = tri_id >= 0
    X, Y, w = pixel_homogeneous(clip[faces[jnp.maximum(tri_id, 0)]], height, width)  # (H, W, 3)
    px, py = _pixel_centres(height, width)
    e = _edge_functions(X - px[..., None] * w, Y - py[..., None] * w)
    total = jnp.where(fg, jnp.sum(e, axis=-1), 1.0)
    return jnp.where(fg[..., None], e / total[..., None], 0.0)


def interpolate(attr: jax.Array, raster: Raster, faces: jax.Array, clip: jax.Array) -> jax.Array:
    """attr (V, C) -> (H, W, C) = sum_i lambda_i attr[face_i]; differentiable w.r.t. attr and clip (the
    barycentrics are recomputed from clip, not read from ``raster``); background 0 with no gradient."""
    lam = barycentrics(raster.tri_id, faces, clip)
    vals = attr[faces[jnp.maximum(raster.tri_id, 0)]]  # (H, W, 3, C)
    return jnp.sum(lam[..., None] * vals, axis=-2)


# ----------------------------------------------------------------------------------------------------------------
# Antialiasing
# ----------------------------------------------------------------------------------------------------------------

def edge_topology(faces: jax.Array, face_valid: jax.Array | None = None) -> jax.Array:
    """(F, 3) faces -> (F, 3) int32: for edge k of face f (the edge opposite vertex k, between vertices k+1 and
    k+2), the vertex of the other face across that edge that is not on it; -1 when the edge has no other face,
    or more than one (non-manifold), or the face is invalid or repeats a vertex. One sort of the 3F half-edges
    by (min, max) vertex; winding need not be consistent. View-independent: compute once per mesh."""
    faces = faces.astype(jnp.int32)
    n_faces = faces.shape[0]
    ok = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    if face_valid is not None:
        ok = ok & face_valid
    a, b = jnp.roll(faces, -1, axis=1), jnp.roll(faces, -2, axis=1)
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.where(ok[:, None], jnp.minimum(a, b), big).reshape(-1)
    hi = jnp.where(ok[:, None], jnp.maximum(a, b), big).reshape(-1)
    half = jnp.arange(3 * n_faces, dtype=jnp.int32)
    lo_s, hi_s, h_s = jax.lax.sort((lo, hi, half), num_keys=2)
    ok_s = jnp.repeat(ok, 3)[h_s]
    same = (lo_s[:-1] == lo_s[1:]) & (hi_s[:-1] == hi_s[1:]) & ok_s[:-1] & ok_s[1:]
    no = jnp.zeros((1,), bool)
    same_next = jnp.concatenate([same, no])  # s and s+1 share the edge
    same_prev = jnp.concatenate([no, same])
    # exactly two half-edges on the edge: pair them; groups of 1 or >= 3 get no partner
    pair_next = same_next & ~same_prev & ~jnp.concatenate([same_next[1:], no])
    pair_prev = same_prev & ~same_next & ~jnp.concatenate([no, same_prev[:-1]])
    partner = jnp.where(pair_next, jnp.roll(h_s, -1), jnp.where(pair_prev, jnp.roll(h_s, 1), -1))
    opposite = jnp.where(partner >= 0, faces.reshape(-1)[jnp.maximum(partner, 0)], -1)
    return jnp.zeros((3 * n_faces,), jnp.int32).at[h_s].set(opposite).reshape(n_faces, 3)


def _pair_select(tri_p, tri_q, dep_p, dep_q, centres_p, centres_q, Xv, Yv, Wv, faces, topology, horizontal: bool):
    """Which adjacent pixel pairs (p left of / above q) are blended, and how (no gradient flows through any of it).

    Returns (valid, tri, k, use_p, s), each (...): the pair is blended; the chosen face; its exit edge (the edge
    opposite vertex k); whether p is the base pixel; the sign s of the face's det. See :func:`antialias`."""
    Xv, Yv, Wv = (jax.lax.stop_gradient(q) for q in (Xv, Yv, Wv))
    differ = tri_p != tri_q
    use_p = (tri_p >= 0) & ((tri_q < 0) | (dep_p <= dep_q))
    tri = jnp.where(use_p, tri_p, tri_q)
    active = differ & (tri >= 0)
    vid = faces[jnp.maximum(tri, 0)]  # (..., 3)
    X, Y, w = Xv[vid], Yv[vid], Wv[vid]
    bx = jnp.where(use_p, centres_p[0], centres_q[0])[..., None]
    by = jnp.where(use_p, centres_p[1], centres_q[1])[..., None]
    ox = jnp.where(use_p, centres_q[0], centres_p[0])[..., None]
    oy = jnp.where(use_p, centres_q[1], centres_p[1])[..., None]
    a, b = X - bx * w, Y - by * w  # local to the base pixel (the chosen face's own pixel)
    e_b = _edge_functions(a, b)
    e_o = _edge_functions(X - ox * w, Y - oy * w)
    own = jnp.sum(e_b * w, axis=-1)  # our det (X, Y, w rows of the three vertices, base-relative)
    s = jnp.sign(own)[..., None]
    se_b, se_o = s * e_b, s * e_o

    # Exit edge: first zero crossing of a decreasing edge function along base -> other.
    dec = se_o < se_b
    t_all = jnp.where(dec, se_b / jnp.where(dec, se_b - se_o, 1.0), jnp.inf)
    k = jnp.argmin(t_all, axis=-1)[..., None]
    t_raw = jnp.take_along_axis(t_all, k, axis=-1)[..., 0]

    def pick(q):
        return jnp.take_along_axis(q, k, axis=-1)[..., 0]

    # Edge k's screen gradient (A = de/dpx, B = de/dpy): horizontal pairs take steep edges (|A| >= |B|),
    # vertical pairs the others, so each edge is handled along one axis only.
    wj, wk = jnp.roll(w, -1, axis=-1), jnp.roll(w, -2, axis=-1)
    A = pick(wk * jnp.roll(Y, -1, axis=-1) - wj * jnp.roll(Y, -2, axis=-1))
    B = pick(wj * jnp.roll(X, -2, axis=-1) - wk * jnp.roll(X, -1, axis=-1))
    axis_ok = (jnp.abs(A) >= jnp.abs(B)) if horizontal else (jnp.abs(B) > jnp.abs(A))

    # Silhouette: no face across the edge, or that face's far vertex o on the same side of the plane through the
    # eye and the edge as our own third vertex (det with o in place of vertex k has our det's sign), by more than
    # _AA_FLAT of our det. o on the plane (a face of zero area: marching tets puts several vertices on a grid
    # vertex where the SDF is 0 there) counts as the surface continuing: blending there drew false edges inside
    # the silhouette, and the sign of a det that is 0 up to rounding is noise.
    opp = pick(topology[jnp.maximum(tri, 0)])
    o = jnp.maximum(opp, 0)
    a_o, b_o, w_o = Xv[o] - bx[..., 0] * Wv[o], Yv[o] - by[..., 0] * Wv[o], Wv[o]
    aj, ak = pick(jnp.roll(a, -1, axis=-1)), pick(jnp.roll(a, -2, axis=-1))
    bj, bk = pick(jnp.roll(b, -1, axis=-1)), pick(jnp.roll(b, -2, axis=-1))
    wj_, wk_ = pick(wj), pick(wk)
    det_o = a_o * (bj * wk_ - bk * wj_) - b_o * (aj * wk_ - ak * wj_) + w_o * (aj * bk - ak * bj)
    silhouette = (opp < 0) | (s[..., 0] * det_o > _AA_FLAT * jnp.abs(own))

    valid = active & jnp.isfinite(t_raw) & (t_raw <= 1.0 + _AA_EPS) & axis_ok & silhouette
    return valid, jnp.maximum(tri, 0), k[..., 0], use_p, s[..., 0]


def _pair_weights(valid, tri, k, use_p, s, base, other, Xv, Yv, Wv, faces):
    """Blend weights (wp, wq), each (...), of selected pairs (:func:`_pair_select`), differentiable in the two
    vertices of the exit edge k through the crossing t = se_b / (se_b - se_o) of that edge's function (se: the
    function times s at the base / other pixel centre): the base pixel gets max(1/2 - t, 0), the face's reach
    into the other pixel is max(t - 1/2, 0); t is clamped to [0, 1] (no gradient when clamped)."""
    vid = faces[tri]  # (..., 3)
    vj = jnp.take_along_axis(vid, ((k + 1) % 3)[..., None], axis=-1)[..., 0]
    vl = jnp.take_along_axis(vid, ((k + 2) % 3)[..., None], axis=-1)[..., 0]

    def edge_function(cx, cy):  # e_k = a_j b_l - a_l b_j, relative to the centre (cx, cy)
        aj, bj = Xv[vj] - cx * Wv[vj], Yv[vj] - cy * Wv[vj]
        al, bl = Xv[vl] - cx * Wv[vl], Yv[vl] - cy * Wv[vl]
        return s * (aj * bl - al * bj)

    se_b, se_o = edge_function(*base), edge_function(*other)
    t = jnp.clip(se_b / jnp.where(valid, se_b - se_o, 1.0), 0.0, 1.0)
    near_half = jnp.maximum(0.5 - t, 0.0)  # base pixel's area (1-D) beyond the edge
    far_half = jnp.maximum(t - 0.5, 0.0)  # the face's reach into the other pixel
    wp = jnp.where(valid, jnp.where(use_p, near_half, far_half), 0.0)
    wq = jnp.where(valid, jnp.where(use_p, far_half, near_half), 0.0)
    return wp, wq


# (p, q) slices of the horizontal pairs (q right of p) and the vertical pairs (q below p) of an (H, W) image.
_PAIR_SLICES = ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1], np.s_[1:]))


def _pair_sets(raster: Raster, clip: jax.Array, faces: jax.Array, topology: jax.Array):
    """The horizontal and vertical pixel-pair sets of one view, each a dict of (..., ) arrays: the selection
    (:func:`_pair_select`), the base / other centres, and the flat pixel indices of p and q."""
    height, width = raster.tri_id.shape
    Xv, Yv, Wv = pixel_homogeneous(clip, height, width)
    px, py = _pixel_centres(height, width)
    idx = jnp.arange(height * width, dtype=jnp.int32).reshape(height, width)
    tri, dep = raster.tri_id, raster.depth
    sets = []
    for horizontal, (P, Q) in zip((True, False), _PAIR_SLICES):
        cp, cq = (px[P], py[P]), (px[Q], py[Q])
        valid, t, k, use_p, s = _pair_select(tri[P], tri[Q], dep[P], dep[Q], cp, cq, Xv, Yv, Wv, faces, topology,
                                             horizontal)
        base = (jnp.where(use_p, cp[0], cq[0]), jnp.where(use_p, cp[1], cq[1]))
        other = (jnp.where(use_p, cq[0], cp[0]), jnp.where(use_p, cq[1], cp[1]))
        sets.append({"valid": valid, "tri": t, "k": k, "use_p": use_p, "s": s, "base": base, "other": other,
                     "p": idx[P], "q": idx[Q]})
    return sets, (Xv, Yv, Wv)


def antialias(color: jax.Array, raster: Raster, clip: jax.Array, faces: jax.Array,
              topology: jax.Array | None = None, face_valid: jax.Array | None = None) -> jax.Array:
    """nvdiffrast-style analytic silhouette antialiasing: color (H, W, C) -> (H, W, C).

    For each horizontally / vertically adjacent pixel pair (p, q) with different ``tri_id``: the face of the
    nearer pixel (smaller ``depth``; background is farthest; on a tie p's) is chosen, with its own pixel as the
    base. Its exit edge is the first edge its region leaves along base -> other centre (crossing at fraction
    ``t = e(base) / (e(base) - e(other))`` of that edge's function, exact for the projected line, vertices behind
    the camera included). The pair is blended only if
      * ``t <= 1 + 1/16`` (the edge lies between the two centres; t is then clamped to [0, 1]),
      * the edge is handled on this axis: horizontal pairs take edges with ``|A| >= |B|`` (steeper than 45
        degrees on screen), vertical pairs the rest (``A, B`` = the edge function's x, y derivatives),
      * the edge is a **silhouette edge**: no other face shares it in ``topology`` (:func:`edge_topology`: open
        boundary or non-manifold), or the face across it lies on the same side of the plane through the eye and
        the edge as the chosen face (the surface folds away: one of the two faces is front-, the other
        back-facing). Edges between two faces continuing across (smooth interior edges) are never blended, nor
        edges whose face across is flat (its far vertex within 1e-3 of our det of that plane).
    Blend (1-D box filter of the pixel footprint along the pair's axis): with ``delta = c_other - c_base``, if
    ``t < 1/2`` the base pixel gets ``+(1/2 - t) delta``, else the other pixel gets ``-(t - 1/2) delta``.
    Gradients: w.r.t. colours, and w.r.t. the two vertices of the edge through ``t`` (zero when clamped).
    ``topology`` defaults to ``edge_topology(faces, face_valid)``; pass it precomputed when rendering many views.
    Every pair is differentiated; :func:`antialias_sparse` differentiates only the blended ones.
    """
    if topology is None:
        topology = edge_topology(faces, face_valid)
    sets, (Xv, Yv, Wv) = _pair_sets(raster, clip, faces, topology)
    out = color
    for q, (P, Q) in zip(sets, _PAIR_SLICES):
        wp, wq = _pair_weights(q["valid"], q["tri"], q["k"], q["use_p"], q["s"], q["base"], q["other"], Xv, Yv, Wv,
                               faces)
        delta = color[Q] - color[P]
        out = out.at[P].add(wp[..., None] * delta).at[Q].add(-wq[..., None] * delta)
    return out


def default_antialias_budget(height: int, width: int) -> int:
    """Blended pairs :func:`antialias_sparse` keeps by default: 16 (H + W), about 4x the pairs along the outline
    of an object that fills the frame (each silhouette pixel blends about one pair)."""
    return 16 * (height + width)


def antialias_sparse(color: jax.Array, raster: Raster, clip: jax.Array, faces: jax.Array,
                     topology: jax.Array | None = None, face_valid: jax.Array | None = None,
                     max_pairs: int | None = None) -> tuple[jax.Array, jax.Array]:
    """:func:`antialias` with the blended pairs compacted first: (color (H, W, C), overflow () int32).

    The selection runs on every pixel pair without a gradient; the blend and its gradient run on the selected
    pairs only, at most ``max_pairs`` (static; default :func:`default_antialias_budget`). Silhouettes are a line
    through the image, so the backward pass scatters O(H + W) gradients instead of O(H W). Pairs past the budget
    are not blended and counted in ``overflow`` (0: the result equals :func:`antialias`)."""
    height, width = raster.tri_id.shape
    if topology is None:
        topology = edge_topology(faces, face_valid)
    max_pairs = default_antialias_budget(height, width) if max_pairs is None else int(max_pairs)
    sets, (Xv, Yv, Wv) = _pair_sets(raster, clip, faces, topology)
    cat = {key: jnp.concatenate([q[key].reshape(-1) for q in sets])
           for key in ("valid", "tri", "k", "use_p", "s", "p", "q")}
    for key in ("base", "other"):
        cat[key] = tuple(jnp.concatenate([q[key][i].reshape(-1) for q in sets]) for i in range(2))
    count = jnp.sum(cat["valid"], dtype=jnp.int32)
    (sel,) = jnp.nonzero(cat["valid"], size=max_pairs, fill_value=0)
    live = jnp.arange(max_pairs) < count
    pick = {key: (tuple(v[sel] for v in value) if isinstance(value, tuple) else value[sel])
            for key, value in cat.items()}
    wp, wq = _pair_weights(live, pick["tri"], pick["k"], pick["use_p"], pick["s"], pick["base"], pick["other"], Xv,
                           Yv, Wv, faces)
    flat = color.reshape(height * width, -1)
    delta = flat[pick["q"]] - flat[pick["p"]]
    out = flat.at[pick["p"]].add(wp[:, None] * delta).at[pick["q"]].add(-wq[:, None] * delta)
    return out.reshape(color.shape), jnp.maximum(count - max_pairs, 0)


# ----------------------------------------------------------------------------------------------------------------
# Normals
# ----------------------------------------------------------------------------------------------------------------

def safe_normalize(v: jax.Array, eps: float = 1e-12) -> jax.Array:
    """v / max(|v|, eps) over the last axis, with a finite gradient at v = 0 (background pixels interpolate to 0,
    where ``jnp.linalg.norm``'s gradient is 0/0: NaN, which a zero cotangent does not cancel)."""
    sq = jnp.sum(v * v, axis=-1, keepdims=True)
    return v * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def vertex_normals(vertices: jax.Array, faces: jax.Array, face_valid: jax.Array | None = None) -> jax.Array:
    """(V, 3) area-weighted unit vertex normals: n_v = normalize(sum over valid faces at v of
    (v1 - v0) x (v2 - v0)); (0, 0, 1) where |n_v|^2 <= 1e-20 (unused vertices), as the official
    ``Mesh._compute_vertex_normal``. Gradients stay finite there."""
    v = vertices[faces]
    n = jnp.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    if face_valid is not None:
        n = jnp.where(face_valid[:, None], n, 0.0)
    acc = jnp.zeros_like(vertices).at[faces.reshape(-1)].add(jnp.repeat(n, 3, axis=0), mode="drop")
    sq = jnp.sum(acc * acc, axis=-1, keepdims=True)
    ok = sq > 1e-20
    acc = jnp.where(ok, acc, jnp.asarray([0.0, 0.0, 1.0], vertices.dtype))
    return acc / jnp.sqrt(jnp.where(ok, sq, 1.0))
