"""Tests of dreamcraft_jax.render.raster against brute-force NumPy references written here.

References (float64): a per-pixel, per-face rasteriser solving the perspective-correct barycentrics as a 3x3
linear system (fill rule: the pixel centre moved by (1e-4, 1e-8) px must lie strictly inside), an
nvdiffrast-style scanline antialiaser with a dictionary edge topology, 16x supersampled coverage, closed-form
areas and normals.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dreamcraft_jax import cameras
from dreamcraft_jax.render import raster as R

H, W = 24, 32  # every small scene: one compiled program per function
V_MAX, F_MAX = 104, 40
TILE = 8
NEAR, FAR = 0.5, 5.0

rasterize = jax.jit(functools.partial(R.rasterize, height=H, width=W, tile=TILE))


# ----------------------------------------------------------------------------------------------------------------
# NumPy references
# ----------------------------------------------------------------------------------------------------------------

def _pixel_homog(clip, h, w):
    c = np.asarray(clip, np.float64)
    return (c[..., 0] + c[..., 3]) * w / 2, (c[..., 1] + c[..., 3]) * h / 2, c[..., 3], c[..., 2]


def _solve_bary(face_verts, h, w, px, py, per_point=False):
    """lambda (N, F, 3), ok (N, F) at points (px, py) (N,) of faces given by their clip vertices: (F, 3, 4) shared
    by all points, or with ``per_point`` (N, 3, 4), one per point (then F = 1). Solves sum l_i (X_i - px w_i) = 0,
    sum l_i (Y_i - py w_i) = 0, sum l_i = 1: the barycentrics of the triangle's point on the pixel's ray."""
    X, Y, w_, _ = _pixel_homog(face_verts, h, w)
    if per_point:
        X, Y, w_ = X[:, None], Y[:, None], w_[:, None]
    else:
        X, Y, w_ = X[None], Y[None], w_[None]
    rows_x = X - px[:, None, None] * w_
    rows_y = Y - py[:, None, None] * w_
    M = np.stack([rows_x, rows_y, np.ones_like(rows_x)], axis=-2)  # (N, F, 3, 3)
    det = np.linalg.det(M)
    scale = np.prod(np.linalg.norm(M, axis=-1), axis=-1)
    ok = np.abs(det) > 1e-10 * scale
    M = np.where(ok[..., None, None], M, np.eye(3))
    lam = np.linalg.solve(M, np.broadcast_to(np.array([0.0, 0.0, 1.0]), M.shape[:-1])[..., None])[..., 0]
    return lam, ok


def ref_rasterize(clip, faces, valid, h=H, w=W, shift=(1e-4, 1e-8)):
    """Brute force: dict of tri_id (h, w), lam (h, w, 3), depth (h, w), cover (h, w, F), zndc (h, w, F)."""
    jj, ii = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    px = (ii + 0.5 + shift[0]).ravel()
    py = (jj + 0.5 + shift[1]).ravel()
    fv = np.asarray(clip, np.float64)[np.asarray(faces)]
    lam, ok = _solve_bary(fv, h, w, px, py)
    _, _, wv, zv = _pixel_homog(fv, h, w)
    wp = np.sum(lam * wv[None], axis=-1)
    zp = np.sum(lam * zv[None], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        zndc = np.where(wp > 0, zp / np.where(wp > 0, wp, 1.0), np.inf)
    cover = ok & np.asarray(valid)[None] & np.all(lam > 0, axis=-1) & (wp > 0) & (zndc >= -1) & (zndc <= 1)
    zc = np.where(cover, zndc, np.inf)
    best = np.argmin(zc, axis=-1)  # first minimum: the lowest face index on ties
    fg = np.isfinite(np.min(zc, axis=-1))
    tri = np.where(fg, best, -1)
    # barycentrics and depth of the winner at the centre itself (the shift only decides coverage)
    lam0, _ = _solve_bary(fv[best], h, w, (ii + 0.5).ravel(), (jj + 0.5).ravel(), per_point=True)
    lam0 = lam0[:, 0]
    lam_b = np.where(fg[:, None], lam0, 0.0)
    depth = np.where(fg, np.sum(lam0 * wv[best], axis=-1), 0.0)
    return dict(tri_id=tri.reshape(h, w), lam=lam_b.reshape(h, w, 3), depth=depth.reshape(h, w),
                cover=cover.reshape(h, w, -1), zndc=zc.reshape(h, w, -1))


def ambiguous_pixels(clip, faces, valid, h=H, w=W, d=3e-3, dz=1e-4):
    """Pixels where the reference's answer changes within d px of the centre, or the two nearest covering faces
    are within dz in NDC depth: float32 may decide these either way."""
    base = ref_rasterize(clip, faces, valid, h, w)
    amb = np.zeros((h, w), bool)
    for sx, sy in ((d, d), (-d, -d), (d, -d), (-d, d)):
        amb |= ref_rasterize(clip, faces, valid, h, w, (sx, sy))["tri_id"] != base["tri_id"]
    z = np.sort(base["zndc"], axis=-1)
    amb |= np.isfinite(z[..., 1]) & (z[..., 1] - z[..., 0] < dz)
    return amb, base


def _ss_coverage(screen_tris, h, w, n=4):
    """Supersampled union coverage (h, w) of 2-D triangles (T, 3, 2) in pixel coordinates, n x n samples/pixel."""
    off = (np.arange(n) + 0.5) / n
    jj, ii = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    sx = np.broadcast_to(ii[..., None, None] + off[None, None, None, :], (h, w, n, n)).reshape(h, w, n * n)
    sy = np.broadcast_to(jj[..., None, None] + off[None, None, :, None], (h, w, n, n)).reshape(h, w, n * n)
    covered = np.zeros(sx.shape, bool)
    for tri in screen_tris:
        e = []
        for i in range(3):
            (x0, y0), (x1, y1) = tri[(i + 1) % 3], tri[(i + 2) % 3]
            e.append((x1 - x0) * (sy - y0) - (y1 - y0) * (sx - x0))
        e = np.stack(e)
        covered |= np.all(e > 0, axis=0) | np.all(e < 0, axis=0)
    return covered.mean(axis=-1)


def _ref_antialias(color, tri_id, depth, clip, faces, h, w, eps=1.0 / 16):
    """nvdiffrast-style scanline antialiasing in 2-D (all w > 0), as documented in raster.antialias."""
    color = np.asarray(color, np.float64)
    out = color.copy()
    clip = np.asarray(clip, np.float64)
    faces = np.asarray(faces)
    sx = (clip[:, 0] / clip[:, 3] + 1) * w / 2
    sy = (clip[:, 1] / clip[:, 3] + 1) * h / 2
    edges = {}
    for f, (a, b, c) in enumerate(faces):
        for (u, v), opp in (((b, c), a), ((c, a), b), ((a, b), c)):
            edges.setdefault((min(u, v), max(u, v)), []).append((f, opp))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    for vertical in (False, True):
        for j in range(h - (1 if vertical else 0)):
            for i in range(w - (0 if vertical else 1)):
                p, q = (j, i), ((j + 1, i) if vertical else (j, i + 1))
                t0, t1 = tri_id[p], tri_id[q]
                if t0 == t1:
                    continue
                if t0 >= 0 and (t1 < 0 or depth[p] <= depth[q]):
                    tri, base, other, ds = t0, p, q, 1.0
                else:
                    tri, base, other, ds = t1, q, p, -1.0
                bx, by = base[1] + 0.5, base[0] + 0.5
                vid = faces[tri]
                pts = [(sx[v] - bx, sy[v] - by) for v in vid]
                if vertical:  # make the pair's axis x
                    pts = [(y, x) for x, y in pts]
                best, best_dc = None, -np.inf
                for k in range(3):
                    (xj, yj), (xk, yk) = pts[(k + 1) % 3], pts[(k + 2) % 3]
                    if (yj >= 0) == (yk >= 0):
                        continue
                    dc = ds * (xj - yj * (xk - xj) / (yk - yj))
                    if dc > best_dc:
                        best, best_dc = k, dc
                if best is None or not (-eps < best_dc < 1 + eps):
                    continue
                (xj, yj), (xk, yk) = pts[(best + 1) % 3], pts[(best + 2) % 3]
                if abs(yk - yj) < abs(xk - xj) or (vertical and abs(yk - yj) == abs(xk - xj)):
                    continue  # handled along the other axis
                va, vb, vc = vid[(best + 1) % 3], vid[(best + 2) % 3], vid[best]
                share = [o for f, o in edges[(min(va, vb), max(va, vb))] if f != tri]
                if len(share) == 1:
                    pa, pb = (sx[va], sy[va]), (sx[vb], sy[vb])
                    own = cross(pa, pb, (sx[vc], sy[vc]))
                    if cross(pa, pb, (sx[share[0]], sy[share[0]])) * own <= 1e-3 * own * own:
                        continue  # the surface continues across the edge (or a flat face): not a silhouette
                dc = min(max(best_dc, 0.0), 1.0)
                if dc < 0.5:
                    out[base] += (0.5 - dc) * (color[other] - color[base])
                else:
                    out[other] += (dc - 0.5) * (color[base] - color[other])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------------

def _camera():
    return cameras.make_camera(15.0, 30.0, 3.0, 45.0)


def _pad(clip, faces, valid):
    clip = np.asarray(clip, np.float32)
    faces = np.asarray(faces, np.int32)
    valid = np.asarray(valid, bool)
    cp = np.tile(np.array([[0.0, 0.0, 0.0, 1.0]], np.float32), (V_MAX, 1))
    cp[: len(clip)] = clip
    fp = np.zeros((F_MAX, 3), np.int32)
    fp[: len(faces)] = faces
    vp = np.zeros((F_MAX,), bool)
    vp[: len(valid)] = valid
    return jnp.asarray(cp), jnp.asarray(fp), jnp.asarray(vp)


def _camera_to_world(cam, p_cam):
    c2w = np.asarray(cam.c2w, np.float64)
    return np.asarray(p_cam, np.float64) @ c2w[:3, :3].T + c2w[:3, 3]


# Triangles given in camera space (x right, y up, looking along -z), each with a role.
SPECIAL = {
    "behind": [[0.0, 0.0, 1.0], [1.0, 0.0, 1.5], [0.0, 1.0, 2.0]],
    "partly_behind": [[-0.5, -0.3, -2.0], [0.6, -0.2, -1.8], [0.1, 0.5, 1.0]],  # crosses w = 0 and near
    "crosses_near": [[-0.25, -0.05, -0.2], [0.35, 0.1, -1.5], [0.0, 0.4, -1.0]],
    "beyond_far": [[-0.5, -0.5, -7.0], [0.5, -0.4, -7.0], [0.0, 0.5, -7.5]],
    "crosses_far": [[-1.2, -0.2, -4.0], [0.8, 0.2, -7.0], [0.0, 0.9, -6.0]],
    "off_screen": [[10.0, 0.0, -2.0], [11.0, 0.0, -2.0], [10.5, 1.0, -2.0]],
    "invalid": [[-0.3, -0.3, -1.2], [0.3, -0.3, -1.2], [0.0, 0.3, -1.2]],
    "backdrop": [[-9.0, -7.0, -4.8], [9.0, -7.0, -4.8], [0.0, 9.0, -4.8]],  # covers the screen
}


def random_scene(seed, n_random=24):
    """(clip, faces, valid, roles) padded to V_MAX / F_MAX: random triangles in front of the camera (some crossing
    the far plane), the SPECIAL ones, and two degenerate faces (a repeated vertex, collinear vertices)."""
    rng = np.random.default_rng(seed)
    cam = _camera()
    tris, roles = [], []
    for _ in range(n_random):
        c = np.array([rng.uniform(-1.0, 1.0), rng.uniform(-0.7, 0.7), -rng.uniform(1.5, 4.6)])
        tris.append(c + rng.uniform(0.15, 0.9) * rng.normal(size=(3, 3)))
        roles.append("random")
    for name, tri in SPECIAL.items():
        tris.append(np.asarray(tri))
        roles.append(name)
    verts_cam = np.concatenate(tris)
    faces = [[3 * k, 3 * k + 1, 3 * k + 2] for k in range(len(tris))]
    line = np.array([[-0.4, -0.2, -2.0], [0.0, 0.0, -2.0], [0.4, 0.2, -2.0]])  # collinear in camera space
    verts_cam = np.concatenate([verts_cam, line])
    n = len(tris) * 3
    faces += [[n, n + 1, n + 2], [0, 0, 1]]
    roles += ["degenerate", "degenerate"]
    valid = [r != "invalid" for r in roles]
    clip = R.clip_positions(jnp.asarray(_camera_to_world(cam, verts_cam), jnp.float32), cam, H, W, NEAR, FAR)
    cp, fp, vp = _pad(clip, faces, valid)
    return cp, fp, vp, roles


def _pix_to_clip(xy, w, z_ndc=0.25, h=H, wd=W):
    """Pixel positions (N, 2) and w (N,) -> clip (N, 4) with those screen positions."""
    xy, w = np.asarray(xy, np.float64), np.asarray(w, np.float64)
    x = (2 * xy[:, 0] / wd - 1) * w
    y = (2 * xy[:, 1] / h - 1) * w
    return np.stack([x, y, z_ndc * w, w], axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# Projection
# ----------------------------------------------------------------------------------------------------------------

def test_clip_positions_follow_get_rays():
    cam = cameras.make_camera(20.0, -40.0, 3.8, 35.0)
    h, w = 24, 40
    rays_o, rays_d = cameras.get_rays(cam, h, w)
    rays_o, rays_d = np.asarray(rays_o, np.float64), np.asarray(rays_d, np.float64)
    forward = -np.asarray(cam.c2w)[:3, 2]
    near, far = 0.5, 20.0
    pix = [(0, 0), (5, 17), (23, 39), (12, 20)]
    ts = np.array([0.7, 2.5, 6.0])
    pts = np.concatenate([rays_o[j, i] + ts[:, None] * rays_d[j, i] for j, i in pix])
    clip = np.asarray(R.clip_positions(jnp.asarray(pts, jnp.float32), cam, h, w, near, far), np.float64)
    sx = (clip[:, 0] / clip[:, 3] + 1) * w / 2
    sy = (clip[:, 1] / clip[:, 3] + 1) * h / 2
    want = np.repeat(np.array([(i + 0.5, j + 0.5) for j, i in pix]), len(ts), axis=0)
    np.testing.assert_allclose(np.stack([sx, sy], -1), want, atol=2e-4)  # row 0 at the top: y is flipped
    view_depth = np.tile(ts, len(pix)) * np.repeat([rays_d[j, i] @ forward for j, i in pix], len(ts))
    np.testing.assert_allclose(clip[:, 3], view_depth, rtol=1e-5)
    # z/w is -1 on the near plane and +1 on the far plane
    centre = np.asarray(cam.position) + np.array([near, far])[:, None] * forward
    c = np.asarray(R.clip_positions(jnp.asarray(centre, jnp.float32), cam, h, w, near, far))
    np.testing.assert_allclose(c[:, 2] / c[:, 3], [-1.0, 1.0], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_rasterize_matches_brute_force(seed):
    clip, faces, valid, roles = random_scene(seed)
    got = rasterize(clip, faces, valid)
    amb, ref = ambiguous_pixels(clip, faces, valid)
    assert amb.mean() < 0.05
    assert int(got.overflow) == 0
    tri = np.asarray(got.tri_id)
    np.testing.assert_array_equal(tri[~amb], ref["tri_id"][~amb])
    fg = (~amb) & (ref["tri_id"] >= 0)
    assert fg.sum() > 0.5 * H * W
    np.testing.assert_allclose(np.asarray(got.bary)[fg], ref["lam"][fg][:, 1:], atol=2e-5)
    np.testing.assert_allclose(np.asarray(got.depth)[fg], ref["depth"][fg], rtol=2e-5)
    assert np.all(np.asarray(got.depth)[tri < 0] == 0) and np.all(np.asarray(got.bary)[tri < 0] == 0)
    # the special faces behave as described, in the result and in the reference
    drawn = set(np.unique(tri[tri >= 0]).tolist())
    role_of = {f: r for f, r in enumerate(roles)}
    for f, role in role_of.items():
        covers = ref["cover"][..., f].any()
        if role in ("behind", "beyond_far", "off_screen", "invalid", "degenerate"):
            assert not covers and f not in drawn, role
        if role in ("partly_behind", "crosses_near", "crosses_far"):
            assert covers, role  # the scene exercises the clipping


def test_rasterize_budgets_and_tiles_do_not_change_the_result():
    clip, faces, valid, _ = random_scene(2)
    base = rasterize(clip, faces, valid)
    other = jax.jit(functools.partial(R.rasterize, height=H, width=W, tile=16, chunk=3))(clip, faces, valid)
    for a, b in ((base.tri_id, other.tri_id), (base.bary, other.bary), (base.depth, other.depth)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_budget_overflow_is_reported():
    clip, faces, valid, _ = random_scene(3)
    ref = ref_rasterize(clip, faces, valid)
    # lower bounds from the reference: a face's list entry exists for every tile where it covers a pixel
    cov = ref["cover"].reshape(H // TILE, TILE, W // TILE, TILE, -1).any(axis=(1, 3))  # (ty, tx, F)
    pairs_needed = int(cov.sum())
    budget = 5
    small = jax.jit(functools.partial(R.rasterize, height=H, width=W, tile=TILE, pair_budget=budget))(
        clip, faces, valid)
    assert int(small.overflow_pairs) >= pairs_needed - budget > 0
    cap = 2
    capped = jax.jit(functools.partial(R.rasterize, height=H, width=W, tile=TILE, max_per_tile=cap))(
        clip, faces, valid)
    assert int(capped.overflow_pairs) == 0
    assert int(capped.overflow_tiles) >= int(np.maximum(cov.sum(-1) - cap, 0).sum()) > 0
    assert int(rasterize(clip, faces, valid).overflow) == 0


def _coverage_counts(clip, faces, n_faces):
    """(H, W) how many faces cover each pixel, each face rasterised alone."""
    counts = np.zeros((H, W), int)
    per_face = []
    for f in range(n_faces):
        only = jnp.zeros((F_MAX,), bool).at[f].set(True)
        m = np.asarray(rasterize(clip, faces, only).tri_id) == f
        counts += m
        per_face.append(m)
    return counts, per_face


def test_shared_edges_cover_each_pixel_once_exact_ties():
    # Vertices with rows y in {1.5, 4.5, ...} (y / 12 exact) and w powers of two: clip values, edge functions and
    # the ties on edges through pixel centres are exact in float32.
    # A quad on pixel centres split along its diagonal (which passes through centres too), at w = 1 and w = 2.
    corners = [(2.5, 1.5), (26.5, 1.5), (26.5, 19.5), (2.5, 19.5)]
    jj, ii = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    want = (ii >= 2.5) & (ii < 26.5) & (jj >= 1.5) & (jj < 19.5)  # top-left rule: top and left edges are in
    for w in (1.0, 2.0):
        clip, faces, _ = _pad(_pix_to_clip(corners, [w] * 4), [[0, 1, 2], [0, 2, 3]], [True, True])
        counts, per_face = _coverage_counts(clip, faces, 2)
        np.testing.assert_array_equal(counts, want.astype(int))
        both = np.asarray(rasterize(clip, faces, jnp.arange(F_MAX) < 2).tri_id)
        np.testing.assert_array_equal(both, np.where(per_face[0], 0, np.where(per_face[1], 1, -1)))
        assert 0 < per_face[0].sum() < want.sum()
        ref = ref_rasterize(clip, faces, np.arange(F_MAX) < 2)
        np.testing.assert_array_equal(both, ref["tri_id"])
    # a fan of 8 faces around a vertex on a pixel centre, with w varying per vertex
    centre = (16.5, 10.5)
    ring = [(8.5, 4.5), (16.5, 1.5), (24.5, 4.5), (28.5, 10.5), (24.5, 16.5), (16.5, 22.5), (8.5, 16.5), (4.5, 10.5)]
    ws = [2.0, 1.0, 4.0, 0.5, 2.0, 1.0, 0.5, 4.0]
    clip, faces, _ = _pad(_pix_to_clip([centre] + ring, [1.0] + ws),
                          [[0, 1 + k, 1 + (k + 1) % 8] for k in range(8)], [True] * 8)
    counts, _ = _coverage_counts(clip, faces, 8)
    ref = ref_rasterize(clip, faces, np.arange(F_MAX) < 8)
    assert counts.max() == 1 and counts[10, 16] == 1
    np.testing.assert_array_equal(counts == 1, ref["tri_id"] >= 0)
    both = np.asarray(rasterize(clip, faces, jnp.arange(F_MAX) < 8).tri_id)
    np.testing.assert_array_equal(both, ref["tri_id"])
    # a degenerate face along pixel centres covers nothing
    clip, faces, _ = _pad(_pix_to_clip([(4.5, 4.5), (10.5, 7.5), (16.5, 10.5)], [1.0, 1.0, 1.0]), [[0, 1, 2]],
                          [True])
    assert np.all(np.asarray(rasterize(clip, faces, jnp.arange(F_MAX) < 1).tri_id) == -1)


def test_shared_edges_cover_each_pixel_once_perspective_grid():
    # a 4 x 3 grid of quads on a tilted plane, seen in perspective: no cracks, no double cover
    cam = _camera()
    gx, gy = np.meshgrid(np.linspace(-1.1, 1.0, 5), np.linspace(-0.8, 0.75, 4))
    pts = np.stack([gx, gy, -2.5 - 0.6 * gx + 0.3 * gy], -1).reshape(-1, 3)
    faces = []
    for r in range(3):
        for c in range(4):
            a, b, d, e = r * 5 + c, r * 5 + c + 1, (r + 1) * 5 + c, (r + 1) * 5 + c + 1
            faces += [[a, b, e], [a, e, d]]
    clip = R.clip_positions(jnp.asarray(_camera_to_world(cam, pts), jnp.float32), cam, H, W, NEAR, FAR)
    clip, faces, valid = _pad(clip, faces, [True] * 24)
    counts, _ = _coverage_counts(clip, faces, 24)
    ref = ref_rasterize(clip, faces, valid)
    inside = ref["cover"].any(-1)
    assert inside.sum() > 150 and counts.max() == 1
    np.testing.assert_array_equal(counts == 1, inside)


def test_depth_ties_go_to_the_lower_face_index():
    cam = _camera()
    tri = _camera_to_world(cam, [[-0.8, -0.6, -2.0], [0.8, -0.5, -2.2], [0.0, 0.7, -1.9]])
    clip = R.clip_positions(jnp.asarray(np.concatenate([tri, tri]), jnp.float32), cam, H, W, NEAR, FAR)
    # two copies with their own vertices (same values, same order: bit-equal depths)
    clip, faces, valid = _pad(clip, [[0, 1, 2], [3, 4, 5]], [True, True])
    tri_id = np.asarray(rasterize(clip, faces, valid).tri_id)
    assert np.all(np.isin(tri_id, [-1, 0])) and (tri_id == 0).sum() > 50
    # one face per loop step: the tie is decided across steps, not within one
    one = jax.jit(functools.partial(R.rasterize, height=H, width=W, tile=TILE, chunk=1))(clip, faces, valid)
    np.testing.assert_array_equal(np.asarray(one.tri_id), tri_id)
    valid = valid.at[0].set(False)
    tri_id = np.asarray(rasterize(clip, faces, valid).tri_id)
    assert np.all(np.isin(tri_id, [-1, 1])) and (tri_id == 1).sum() > 50


# ----------------------------------------------------------------------------------------------------------------
# Interpolation
# ----------------------------------------------------------------------------------------------------------------

def _ref_interp(clip, faces, tri_id, attr, mask):
    """(N, C) lambda . attr at the masked pixels, lambda by the 3x3 solve for each pixel's given face."""
    jj, ii = np.nonzero(mask)
    fv = np.asarray(clip, np.float64)[faces[tri_id[jj, ii]]]  # (N, 3, 4)
    lam, _ = _solve_bary(fv, H, W, ii + 0.5, jj + 0.5, per_point=True)
    return np.sum(lam[:, 0, :, None] * attr[faces[tri_id[jj, ii]]], axis=1)


def test_interpolate_values_and_gradients():
    clip, faces, valid, _ = random_scene(4)
    ras = rasterize(clip, faces, valid)
    tri = np.asarray(ras.tri_id)
    rng = np.random.default_rng(0)
    attr = rng.normal(size=(V_MAX, 3)).astype(np.float32)
    clip64, faces_np = np.asarray(clip, np.float64), np.asarray(faces)

    out = np.asarray(R.interpolate(jnp.asarray(attr), ras, faces, clip))
    fg = tri >= 0
    np.testing.assert_allclose(out[fg], _ref_interp(clip64, faces_np, tri, attr.astype(np.float64), fg), atol=1e-4)
    assert np.all(out[~fg] == 0)

    # pixels away from edges (all barycentrics > 0.05), random weights
    lam0 = np.concatenate([1 - np.asarray(ras.bary).sum(-1, keepdims=True), np.asarray(ras.bary)], -1)
    mask = fg & (lam0.min(-1) > 0.05)
    assert mask.sum() > 100
    wts = rng.normal(size=(H, W, 3)) * mask[..., None]

    def loss(a, c):
        return jnp.sum(jnp.asarray(wts, jnp.float32) * R.interpolate(a, ras, faces, c))

    g_attr, g_clip = jax.grad(loss, argnums=(0, 1))(jnp.asarray(attr), clip)

    def ref_loss(a, c):
        return np.sum(wts[mask] * _ref_interp(c, faces_np, tri, a, mask))

    # attributes enter linearly: the finite difference with any step is exact
    e = np.zeros_like(attr, np.float64)
    used = np.unique(faces_np[tri[mask]])
    for v in used[:6]:
        e[:] = 0
        e[v, 1] = 1.0
        fd = ref_loss(attr + e, clip64) - ref_loss(attr, clip64)
        np.testing.assert_allclose(float(g_attr[v, 1]), fd, rtol=1e-4, atol=1e-4)
    # positions: central differences of the float64 reference (faces per pixel held fixed)
    h = 1e-6
    g_clip = np.asarray(g_clip)
    for v in used[:8]:
        for k in (0, 1, 3):
            d = np.zeros_like(clip64)
            d[v, k] = h
            fd = (ref_loss(attr, clip64 + d) - ref_loss(attr, clip64 - d)) / (2 * h)
            np.testing.assert_allclose(g_clip[v, k], fd, rtol=2e-3, atol=2e-3 * (1 + abs(fd)))
    assert np.all(g_clip[:, 2] == 0)  # z does not move the surface point on screen
    # background pixels: 0 and no gradient
    g_bg = jax.grad(lambda c: jnp.sum(jnp.where(jnp.asarray(~fg)[..., None], R.interpolate(attr, ras, faces, c),
                                                0.0)))(clip)
    assert np.all(np.asarray(g_bg) == 0)


# ----------------------------------------------------------------------------------------------------------------
# Antialiasing
# ----------------------------------------------------------------------------------------------------------------

def _aa_scenes():
    """(name, clip, faces, n_faces) of small scenes with all w > 0 (screen positions in pixels, w per vertex)."""
    single = (_pix_to_clip([(3.3, 4.1), (27.6, 7.2), (11.2, 21.7)], [1.0, 1.6, 2.3]), [[0, 1, 2]])
    quad_pts = [(3.2, 3.7), (27.4, 2.2), (29.1, 20.6), (4.6, 19.3)]
    flat = (_pix_to_clip(quad_pts, [1.0, 1.3, 1.9, 1.2]), [[0, 1, 2], [0, 2, 3]])
    # fold: face 1 shares edge (0, 2) with face 0 but its far vertex lies on face 0's side, behind it
    fold = (np.concatenate([_pix_to_clip([(4.2, 3.1), (28.3, 6.4), (8.7, 21.2)], [1.0, 1.2, 1.4], z_ndc=0.2),
                            _pix_to_clip([(20.9, 17.8)], [3.0], z_ndc=0.6)]), [[0, 1, 2], [0, 2, 3]])
    occl = (np.concatenate([_pix_to_clip([(1.2, 1.4), (30.7, 2.3), (15.3, 23.1)], [2.0, 2.5, 3.0], z_ndc=0.7),
                            _pix_to_clip([(8.4, 6.2), (22.7, 9.1), (13.6, 17.3)], [1.0, 1.1, 1.3], z_ndc=0.1)]),
            [[0, 1, 2], [3, 4, 5]])
    # the flat quad split by a zero-area face (0, 2, 4), vertex 4 a copy of vertex 2 (marching tets makes such
    # faces where the SDF is 0 at a grid vertex): the surface continues across it, so nothing inside is blended
    split = (np.concatenate([flat[0], flat[0][2:3]]), [[0, 1, 2], [0, 2, 4], [0, 4, 3]])
    return {"single": single, "flat": flat, "fold": fold, "occlusion": occl, "flat_split": split}


@pytest.mark.parametrize("name", ["single", "flat", "fold", "occlusion", "flat_split"])
def test_antialias_matches_scanline_reference(name):
    clip_np, faces_l = _aa_scenes()[name]
    clip, faces, valid = _pad(clip_np, faces_l, [True] * len(faces_l))
    ras = rasterize(clip, faces, valid)
    tri = np.asarray(ras.tri_id)
    shown = [0, 2] if name == "flat_split" else range(len(faces_l))  # the zero-area face covers no pixel
    assert all((tri == f).sum() > 5 for f in shown)  # every face with an area is visible somewhere
    color = np.random.default_rng(1).uniform(size=(H, W, 3)).astype(np.float32)
    got = np.asarray(jax.jit(R.antialias)(jnp.asarray(color), ras, clip, faces, None, valid))
    want = _ref_antialias(color, tri, np.asarray(ras.depth), clip_np, faces_l, H, W)
    np.testing.assert_allclose(got, want, atol=2e-5)
    changed = np.any(np.abs(got - color) > 1e-6, axis=-1)
    assert changed.sum() > 20
    if name in ("flat", "flat_split"):  # the interior edge is never blended: only pixels next to the background
        bg = tri < 0
        near_bg = np.zeros_like(bg)
        near_bg[:, :-1] |= bg[:, 1:]
        near_bg[:, 1:] |= bg[:, :-1]
        near_bg[:-1] |= bg[1:]
        near_bg[1:] |= bg[:-1]
        assert not np.any(changed & ~(near_bg | bg))


@pytest.mark.parametrize("name", ["single", "fold", "occlusion"])
def test_sparse_antialias_equals_dense_within_its_budget(name):
    """antialias_sparse blends and differentiates only the selected pairs: with a budget of at least their
    count K it equals antialias (values and gradients w.r.t. clip and colour); with K - 3 it reports 3 dropped
    pairs and differs in at most 6 pixels; with 0 it reports K and returns the colours unchanged."""
    clip_np, faces_l = _aa_scenes()[name]
    clip, faces, valid = _pad(clip_np, faces_l, [True] * len(faces_l))
    ras = rasterize(clip, faces, valid)
    color = jnp.asarray(np.random.default_rng(2).uniform(size=(H, W, 3)).astype(np.float32))
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(H, W, 3)).astype(np.float32))
    topo = R.edge_topology(faces, valid)

    def dense(c, col):
        return R.antialias(col, ras, c, faces, topo)

    def sparse(c, col, budget):
        return R.antialias_sparse(col, ras, c, faces, topo, max_pairs=budget)

    ref = np.asarray(dense(clip, color))
    _, n_pairs = sparse(clip, color, 0)
    k = int(n_pairs)
    assert k > 10
    got, over = sparse(clip, color, k)
    assert int(over) == 0
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6)
    g_dense = jax.grad(lambda c, col: jnp.sum(dense(c, col) * weights), argnums=(0, 1))(clip, color)
    g_sparse = jax.grad(lambda c, col: jnp.sum(sparse(c, col, k + 5)[0] * weights), argnums=(0, 1))(clip, color)
    for a, b in zip(g_dense, g_sparse):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(g_dense[0])).max() > 0  # silhouette gradients are there to compare
    short, over = sparse(clip, color, k - 3)
    assert int(over) == 3
    assert np.sum(np.any(np.abs(np.asarray(short) - ref) > 1e-6, axis=-1)) <= 6
    none, over = sparse(clip, color, 0)
    assert int(over) == k
    np.testing.assert_array_equal(np.asarray(none), np.asarray(color))


def test_edge_topology_finds_opposite_vertices():
    faces = jnp.asarray([[0, 1, 2], [2, 1, 3], [0, 2, 4], [0, 2, 5], [6, 6, 7], [1, 3, 8]], jnp.int32)
    valid = jnp.asarray([True, True, True, True, True, False])
    topo = np.asarray(R.edge_topology(faces, valid))
    # face 0: edge (1, 2) -> face 1's vertex 3; edge (2, 0) is shared by faces 0, 2, 3 (non-manifold): -1
    np.testing.assert_array_equal(topo[0], [3, -1, -1])
    np.testing.assert_array_equal(topo[1], [-1, -1, 0])  # face 1's edge (2, 1) opposite its vertex 3 -> 0
    np.testing.assert_array_equal(topo[4], [-1, -1, -1])  # repeated vertex
    np.testing.assert_array_equal(topo[5], [-1, -1, -1])  # invalid face (its edge (1, 3) is not face 1's partner)


AA_H, AA_W = 40, 48


# (screen positions of vertices 0.., their w, faces, outline of the covered region): the moved vertex is 1.
# Triangle: vertex 1 has a steep edge (rows) and a shallow one (columns). Quad: vertex 1 is shared by two faces
# (their common edge is interior, not a silhouette), each with a wide angle there: nvdiffrast-style antialiasing
# misses a silhouette row or column where the face owning the silhouette edge covers no pixel centre next to it
# (a sliver at a vertex), so narrow fans would lose up to one pixel's worth of gradient per such row.
AA_MESHES = {
    "triangle": ([(4.0, 22.0), (24.0, 6.0), (42.0, 28.0)], [1.0, 1.5, 2.0], [[0, 1, 2]], [0, 1, 2]),
    "quad": ([(24.0, 32.0), (24.0, 6.0), (44.0, 9.0), (4.0, 8.0)], [1.3, 1.5, 2.0, 1.1], [[1, 2, 0], [1, 0, 3]],
             [1, 2, 0, 3]),
}


@pytest.mark.parametrize("mesh", ["triangle", "quad"])
def test_antialias_silhouette_gradient_matches_supersampled_area(mesh):
    # pixel positions on integer coordinates: the antialiased sum's gradient is then a midpoint rule, exact for
    # the linear edge displacement, and the remaining error is that of the supersampled finite difference
    pts, wv, tris, outline = AA_MESHES[mesh]
    xy, wv = np.array(pts), np.array(wv)
    clip = jnp.asarray(_pix_to_clip(xy, wv, h=AA_H, wd=AA_W), jnp.float32)
    faces = jnp.asarray(tris, jnp.int32)
    valid = jnp.ones((len(tris),), bool)
    ras = jax.jit(functools.partial(R.rasterize, height=AA_H, width=AA_W, tile=8))(clip, faces, valid)
    mask = (ras.tri_id >= 0).astype(jnp.float32)[..., None]

    def opacity_sum(c):
        return jnp.sum(R.antialias(mask, ras, c, faces))

    g = np.asarray(jax.jit(jax.grad(opacity_sum))(clip))[1]
    g_pix = g[:2] * 2.0 * wv[1] / np.array([AA_W, AA_H])  # d/d(pixel x, y) of vertex 1

    step = 6.0
    k = outline.index(1)
    prev, nxt = xy[outline[k - 1]], xy[outline[(k + 1) % len(outline)]]
    sign = np.sign(_signed_area(xy[outline]))
    # exact derivative of the area (shoelace): dA/dx_k = (y_next - y_prev) / 2, dA/dy_k = (x_prev - x_next) / 2
    exact = sign * 0.5 * np.array([nxt[1] - prev[1], prev[0] - nxt[0]])

    def ss_area(v1):
        q = xy.copy()
        q[1] = v1
        return _ss_coverage([q[t] for t in tris], AA_H, AA_W).sum()  # px^2

    for axis in (0, 1):
        d = np.zeros(2)
        d[axis] = step
        fd = (ss_area(xy[1] + d) - ss_area(xy[1] - d)) / (2 * step)
        # Supersampled FD error: the two counts differ exactly by the samples in the region swept by the two edges
        # at vertex 1; each of the 4 sample rows per pixel row crosses it in at most two intervals (one per edge),
        # each holding its length x 4 samples to within one: |fd - exact| <= 2 rows / 16 / (2 step), rows = 4 x
        # the swept region's height.
        ys = [prev[1], nxt[1], xy[1][1] - d[1], xy[1][1] + d[1]]
        rows = 4 * (max(ys) - min(ys))
        tol_ss = 2 * rows / 16 / (2 * step)
        assert abs(fd - exact[axis]) <= tol_ss
        # Antialiasing: with the vertices on pixel corners the per-row (per-column) crossings are the midpoint rule
        # of the linear edge displacement, exact; allow 1/8 per edge for the rows next to the vertices.
        np.testing.assert_allclose(g_pix[axis], exact[axis], atol=0.25)
        np.testing.assert_allclose(g_pix[axis], fd, atol=tol_ss + 0.25)


def _signed_area(poly):
    p = np.asarray(poly)
    return 0.5 * np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1])


# ----------------------------------------------------------------------------------------------------------------
# Normals
# ----------------------------------------------------------------------------------------------------------------

def test_vertex_normals_of_an_icosahedron():
    t = (1 + 5**0.5) / 2
    v = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t],
                  [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], np.float64)
    f = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
                  [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5],
                  [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    # outward winding check of the fixture itself
    c = v[f].mean(1)
    assert np.all(np.einsum("ij,ij->i", np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), c) > 0)
    verts = np.concatenate([v * 0.7 + [0.1, -0.2, 0.3], [[5.0, 5.0, 5.0]]])  # plus an unused vertex
    faces = np.concatenate([f, [[12, 12, 12], [0, 3, 12]]])  # plus a degenerate and an invalid face
    valid = np.array([True] * 21 + [False])
    n = np.asarray(R.vertex_normals(jnp.asarray(verts, jnp.float32), jnp.asarray(faces, jnp.int32),
                                    jnp.asarray(valid)))
    np.testing.assert_allclose(n[:12], v / np.linalg.norm(v, axis=-1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(n[12], [0.0, 0.0, 1.0])
    grad = jax.grad(lambda x: jnp.sum(R.vertex_normals(x, jnp.asarray(faces, jnp.int32), jnp.asarray(valid))))(
        jnp.asarray(verts, jnp.float32))
    assert np.all(np.isfinite(np.asarray(grad)))


# ----------------------------------------------------------------------------------------------------------------
# Batching and sharding
# ----------------------------------------------------------------------------------------------------------------

def _render(clip, faces, valid, attr):
    ras = R.rasterize(clip, faces, valid, H, W, tile=TILE)
    col = R.interpolate(attr, ras, faces, clip)
    return ras.tri_id, R.antialias(col, ras, clip, faces, None, valid)


def _views(n):
    """n cameras on an arc looking at random triangles (the random scene's faces over random vertices)."""
    _, faces, valid, _ = random_scene(5)
    rng = np.random.default_rng(5)
    cams = cameras.make_camera(15.0, np.linspace(0.0, 80.0, n), 3.0, 45.0)
    verts = jnp.asarray(rng.uniform(-1.0, 1.0, size=(V_MAX, 3)), jnp.float32)
    clips = jax.vmap(lambda c: R.clip_positions(verts, c, H, W, NEAR, FAR))(cams)
    attr = jnp.asarray(rng.uniform(size=(V_MAX, 3)), jnp.float32)
    return clips, faces, valid, attr


def test_jit_vmap_over_views_equals_single_views():
    clips, faces, valid, attr = _views(2)
    batched = jax.jit(jax.vmap(_render, in_axes=(0, None, None, None)))(clips, faces, valid, attr)
    single = jax.jit(_render)
    for k in range(2):
        one = single(clips[k], faces, valid, attr)
        np.testing.assert_array_equal(np.asarray(batched[0][k]), np.asarray(one[0]))
        np.testing.assert_allclose(np.asarray(batched[1][k]), np.asarray(one[1]), atol=1e-6)
    assert np.asarray(batched[0] >= 0).mean() > 0.2


def test_inside_shard_map_equals_unsharded():
    clips, faces, valid, attr = _views(8)
    mesh = jax.make_mesh((8,), ("data",))
    per_view = jax.vmap(_render, in_axes=(0, None, None, None))
    sharded = jax.jit(jax.shard_map(per_view, mesh=mesh, in_specs=(P("data"), P(), P(), P()),
                                    out_specs=(P("data"), P("data"))))
    got = sharded(jax.device_put(clips, NamedSharding(mesh, P("data"))), faces, valid, attr)
    want = jax.jit(per_view)(clips, faces, valid, attr)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-6)
