"""DMTet geometry: Kuhn tet grid, marching tetrahedra (static shapes), deformation, small components."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

from dreamcraft_jax.fields import dmtet

march = jax.jit(dmtet.marching_tets, static_argnames=("max_faces", "max_vertices"))

# The documented local edge order of TetGrid.tet_edges, written out independently of the module's constant.
EDGE_ORDER = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def full_budget(grid):
    """Budgets no mesh can exceed: 2 faces per tet, 1 vertex per edge."""
    return dict(max_faces=2 * len(grid.tets), max_vertices=len(grid.edges))


def signed_volumes(points, tets):
    p = points.astype(np.float64)[tets]
    return np.einsum("ij,ij->i", np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), p[:, 3] - p[:, 0]) / 6


def expected_counts(sdf, grid):
    """(faces, vertices) by counting: a tet with 1 or 3 outside vertices gives 1 triangle, with 2 gives 2."""
    k = (sdf[grid.tets] > 0).sum(1)
    faces = int(np.sum((k == 1) | (k == 3)) + 2 * np.sum(k == 2))
    outside = sdf > 0
    crossing = outside[grid.edges[:, 0]] != outside[grid.edges[:, 1]]
    return faces, int(crossing.sum())


def triangles(vertices, faces):
    p = vertices.astype(np.float64)[faces]
    return p, np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])


@pytest.mark.parametrize("r", [1, 3, 4])
def test_tet_grid_structure(r):
    g = dmtet.make_tet_grid(r)
    n = r + 1
    assert g.vertices.shape == (n**3, 3) and g.vertices.dtype == np.float32
    assert g.tets.shape == (6 * r**3, 4) and g.tets.dtype == np.int32
    # Vertices are exactly the lattice {0, 1/r, ..., 1}^3.
    assert set(map(tuple, np.round(g.vertices * r).astype(int).tolist())) == set(itertools.product(range(n), repeat=3))
    np.testing.assert_allclose(g.vertices * r, np.round(g.vertices * r), atol=1e-5)
    # Equal, positive volumes filling the unit cube.
    vol = signed_volumes(g.vertices, g.tets)
    np.testing.assert_allclose(vol, 1.0 / (6 * r**3), rtol=1e-5)
    assert abs(vol.sum() - 1.0) < 1e-5
    # Conforming: every triangle shared by exactly 2 tets, except the 2 r^2 per side of the cube on its boundary.
    tris = {}
    for tet in g.tets.tolist():
        for face in itertools.combinations(tet, 3):
            tris[tuple(sorted(face))] = tris.get(tuple(sorted(face)), 0) + 1
    boundary = [f for f, c in tris.items() if c == 1]
    assert set(tris.values()) <= {1, 2} and len(boundary) == 12 * r**2
    for f in boundary:  # all three corners on one side of the cube
        p = g.vertices[list(f)]
        assert any(np.all(p[:, d] == s) for d in range(3) for s in (0.0, 1.0))
    # Edges: unique, i < j, exactly the tets' edges; count of the 7 lattice directions; Euler V - E + F - T = 1.
    tet_edge_set = {tuple(sorted((t[i], t[j]))) for t in g.tets.tolist() for i, j in EDGE_ORDER}
    assert np.all(g.edges[:, 0] < g.edges[:, 1])
    assert len({tuple(e) for e in g.edges.tolist()}) == len(g.edges) == len(tet_edge_set)
    assert {tuple(e) for e in g.edges.tolist()} == tet_edge_set
    assert len(g.edges) == 3 * r * n * n + 3 * r * r * n + r**3
    assert n**3 - len(g.edges) + len(tris) - len(g.tets) == 1
    # tet_edges[t, k] is the edge joining the k-th local vertex pair.
    for k, (i, j) in enumerate(EDGE_ORDER):
        np.testing.assert_array_equal(g.edges[g.tet_edges[:, k]], np.sort(g.tets[:, [i, j]], axis=1))


def test_load_tet_grid_cache(tmp_path):
    fresh = dmtet.make_tet_grid(3)

    def same(a, b):
        return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("vertices", "tets", "edges", "tet_edges"))

    def save(path, grid, tets, resolution):
        arrays = dict(vertices=grid.vertices, edges=grid.edges, tet_edges=grid.tet_edges)
        np.savez(path, tets=tets, format=np.int64(1), resolution=np.int64(resolution), **arrays)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing cache and a good one are silent
        g = dmtet.load_tet_grid(3, tmp_path)
        files = sorted(p.name for p in tmp_path.iterdir())
        assert len(files) == 1 and same(g, fresh)  # no temporary file left behind
        path = tmp_path / files[0]
        stamp = path.stat().st_mtime_ns
        assert same(dmtet.load_tet_grid(3, tmp_path), fresh) and path.stat().st_mtime_ns == stamp  # not rebuilt

    other = dmtet.make_tet_grid(2)
    bad_tets = fresh.tets.copy()
    bad_tets[5, 2] = -1
    corruptions = [
        lambda: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),  # truncated
        lambda: path.write_bytes(b"not an npz"),
        lambda: save(path, other, other.tets, 3),  # another resolution's grid under this name
        lambda: save(path, fresh, bad_tets, 3),  # an index out of range
    ]
    for corrupt in corruptions:
        corrupt()
        with pytest.warns(UserWarning, match="rebuilding"):
            assert same(dmtet.load_tet_grid(3, tmp_path), fresh)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert same(dmtet.load_tet_grid(3, tmp_path), fresh)  # the rewritten cache is good


def test_planes_exact_and_wound_along_gradient():
    """A linear SDF on a jittered grid: crossings exactly on the plane, every face normal along grad sdf, all 14
    tet cases seen, counts as counted."""
    r = 5
    g = dmtet.make_tet_grid(r)
    rng = np.random.default_rng(0)
    positions = (g.vertices + rng.uniform(-0.1, 0.1, g.vertices.shape) / r).astype(np.float32)
    assert np.all(signed_volumes(positions, g.tets) > 0)
    codes = set()
    for _ in range(6):
        normal = rng.normal(size=3)
        normal /= np.linalg.norm(normal)
        offset = normal @ np.full(3, 0.5) + rng.uniform(-0.2, 0.2)
        sdf = (positions.astype(np.float64) @ normal - offset).astype(np.float32)
        codes |= set(((sdf[g.tets] > 0) * [1, 2, 4, 8]).sum(1).tolist())
        mesh = march(positions, sdf, g, **full_budget(g))
        assert (int(mesh.n_faces), int(mesh.n_vertices)) == expected_counts(sdf, g) and not mesh.overflow
        vertices, faces = dmtet.compact_mesh(mesh)
        np.testing.assert_allclose(vertices @ normal - offset, 0.0, atol=2e-6)
        _, cross = triangles(vertices, faces)
        area2 = np.linalg.norm(cross, axis=1)
        assert np.all(cross @ normal > -1e-9)
        big = area2 > 1e-3 / r**2  # slivers' normals are rounding noise
        assert big.mean() > 0.9 and np.all((cross[big] / area2[big, None]) @ normal > 0.999)
    assert codes >= set(range(1, 15))


def test_random_sdf_closed_and_outward():
    """Random SDF with an outside boundary: closed, consistently wound, and each face's normal has a positive dot
    with the gradient of the piecewise-linear SDF in the tet that contains it (found by brute force)."""
    r = 4
    g = dmtet.make_tet_grid(r)
    rng = np.random.default_rng(1)
    sdf = rng.normal(size=len(g.vertices)).astype(np.float32)
    on_boundary = np.any((g.vertices == 0) | (g.vertices == 1), axis=1)
    sdf[on_boundary] = 1.0
    assert set(((sdf[g.tets] > 0) * [1, 2, 4, 8]).sum(1).tolist()) >= set(range(1, 15))
    mesh = march(g.vertices, sdf, g, **full_budget(g))
    assert (int(mesh.n_faces), int(mesh.n_vertices)) == expected_counts(sdf, g)
    vertices, faces = dmtet.compact_mesh(mesh)
    tm = trimesh.Trimesh(vertices, faces, process=False)
    assert tm.is_watertight and tm.is_winding_consistent and tm.volume > 0
    assert len(np.unique(vertices, axis=0)) == len(vertices)

    p, cross = triangles(vertices, faces)
    centroid = p.mean(1)
    corners = g.vertices.astype(np.float64)[g.tets]  # (T, 4, 3)
    # Barycentric coordinates of every centroid in every tet; the containing tet has all of them >= 0.
    basis = np.linalg.inv(np.transpose(corners[:, 1:] - corners[:, :1], (0, 2, 1)))  # (T, 3, 3)
    lam = np.einsum("tij,ftj->fti", basis, centroid[:, None] - corners[None, :, 0])
    inside = np.all(lam > -1e-9, axis=-1) & (lam.sum(-1) < 1 + 1e-9)
    assert np.all(inside.sum(1) == 1)
    tet = inside.argmax(1)
    # grad of the linear interpolant: basis^T @ (sdf_i - sdf_0).
    values = sdf.astype(np.float64)[g.tets[tet]]
    grad = np.einsum("fji,fj->fi", basis[tet], values[:, 1:] - values[:, :1])
    assert np.all(np.einsum("fi,fi->f", cross, grad) > 0)


def sphere_errors(r, radius=0.35):
    g = dmtet.make_tet_grid(r)
    sdf = (np.linalg.norm(g.vertices.astype(np.float64) - 0.5, axis=1) - radius).astype(np.float32)
    mesh = march(g.vertices, sdf, g, **full_budget(g))
    vertices, faces = dmtet.compact_mesh(mesh)
    p, cross = triangles(vertices, faces)
    area = 0.5 * np.linalg.norm(cross, axis=1).sum()
    volume = np.einsum("fi,fi->f", cross, p[:, 0] - 0.5).sum() / 6  # divergence theorem, about the centre
    return mesh, vertices, faces, area / (4 * np.pi * radius**2) - 1, volume / (4 / 3 * np.pi * radius**3) - 1


def test_sphere_area_volume_converge_quadratically():
    """Sphere of radius R = 0.35: marching tets at r = 16 and 32.

    Bound: on a crossing edge (length L <= sqrt(3) h) the convex |x - c| - R lies under its chord, within
    L^2 / (8 (R - L)), so every vertex radius is in [R - d, R], d = 3 h^2 / (8 (R - sqrt(3) h)). A point of a
    triangle (diameter <= sqrt(3) h) has radius^2 >= (R - d)^2 - h^2, so the closed outward surface lies in that
    shell and its volume is between the two balls. The errors (area and volume) must also shrink ~4x when h
    halves (second order).
    """
    radius = 0.35
    results = {}
    for r in (16, 32):
        mesh, vertices, faces, area_err, volume_err = sphere_errors(r, radius)
        h = 1.0 / r
        d = 3 * h**2 / (8 * (radius - np.sqrt(3) * h))
        rad = np.linalg.norm(vertices.astype(np.float64) - 0.5, axis=1)
        assert np.all(rad <= radius + 1e-6) and np.all(rad >= radius - d - 1e-6)
        inner = np.sqrt((radius - d) ** 2 - h**2)
        assert (inner / radius) ** 3 - 1 < volume_err < 0
        results[r] = (area_err, volume_err)
        assert not mesh.overflow and int(mesh.face_valid.sum()) == int(mesh.n_faces) == len(faces)
        assert len(np.unique(vertices, axis=0)) == len(vertices)  # one vertex per crossing edge
        assert len(np.unique(np.sort(faces, axis=1), axis=0)) == len(faces)
        tm = trimesh.Trimesh(vertices, faces, process=False)
        assert tm.is_watertight and tm.is_winding_consistent and tm.volume > 0 and tm.euler_number == 2
    for k in range(2):
        assert 3.5 < results[16][k] / results[32][k] < 4.5, results


def test_budget_overflow_drops_never_corrupts():
    g = dmtet.make_tet_grid(8)
    sdf = (np.linalg.norm(g.vertices - 0.5, axis=1) - 0.3).astype(np.float32)
    true_faces, true_vertices = expected_counts(sdf, g)
    full = march(g.vertices, sdf, g, max_faces=true_faces, max_vertices=true_vertices)
    assert not full.overflow and int(full.face_valid.sum()) == true_faces
    full_faces = {tuple(f) for f in np.asarray(full.faces).tolist()}

    small = march(g.vertices, sdf, g, max_faces=true_faces // 2, max_vertices=true_vertices)
    assert bool(small.overflow) and int(small.n_faces) == true_faces and int(small.n_vertices) == true_vertices
    valid = np.asarray(small.face_valid)
    assert valid.sum() == true_faces // 2
    assert {tuple(f) for f in np.asarray(small.faces)[valid].tolist()} <= full_faces
    np.testing.assert_array_equal(np.asarray(small.vertices), np.asarray(full.vertices))
    # compact_mesh keeps only the vertices the kept faces use, at the same positions.
    vertices, faces = dmtet.compact_mesh(small)
    assert len(np.unique(faces)) == len(vertices)
    np.testing.assert_array_equal(vertices[faces], np.asarray(full.vertices)[np.asarray(small.faces)[valid]])

    budget = true_vertices // 2
    few = march(g.vertices, sdf, g, max_faces=true_faces, max_vertices=budget)
    assert bool(few.overflow) and int(few.n_faces) == true_faces and int(few.n_vertices) == true_vertices
    valid = np.asarray(few.face_valid)
    kept = {f for f in full_faces if max(f) < budget}  # exactly the faces whose vertices all fit
    assert {tuple(f) for f in np.asarray(few.faces)[valid].tolist()} == kept and 0 < len(kept) < true_faces
    assert np.all(np.asarray(few.faces)[~valid] == 0)
    assert np.all(np.asarray(few.vertex_valid)) and few.vertices.shape == (budget, 3)
    np.testing.assert_array_equal(np.asarray(few.vertices), np.asarray(full.vertices)[:budget])


def test_crossing_gradients_closed_form():
    """d/d(sdf, positions) of sum(w * vertices) against the derivative of p_a + (p_b - p_a) s_a / (s_a - s_b)."""
    g = dmtet.make_tet_grid(2)
    rng = np.random.default_rng(2)
    positions = (g.vertices + rng.uniform(-0.05, 0.05, g.vertices.shape)).astype(np.float32)
    sdf = rng.normal(size=len(g.vertices)).astype(np.float32)
    budget = full_budget(g)
    w = rng.normal(size=(budget["max_vertices"], 3)).astype(np.float32)

    def loss(p, s):
        mesh = dmtet.marching_tets(p, s, g, **budget)
        return jnp.sum(jnp.where(mesh.vertex_valid[:, None], mesh.vertices, 0.0) * w)

    grad_p, grad_s = jax.jit(jax.grad(loss, argnums=(0, 1)))(positions, sdf)
    # Vertex k is the k-th crossing edge in grid.edges order.
    p64, s64 = positions.astype(np.float64), sdf.astype(np.float64)
    ends = g.edges[(s64[g.edges[:, 0]] > 0) != (s64[g.edges[:, 1]] > 0)]
    assert len(ends) > 10
    a, b = ends[:, 0], ends[:, 1]
    sa, sb, wk = s64[a], s64[b], w[: len(ends)].astype(np.float64)
    t = sa / (sa - sb)
    dv = p64[b] - p64[a]
    expect_s, expect_p = np.zeros_like(s64), np.zeros_like(p64)
    np.add.at(expect_s, a, np.sum(wk * dv, 1) * (-sb) / (sa - sb) ** 2)
    np.add.at(expect_s, b, np.sum(wk * dv, 1) * sa / (sa - sb) ** 2)
    np.add.at(expect_p, a, wk * (1 - t)[:, None])
    np.add.at(expect_p, b, wk * t[:, None])
    np.testing.assert_allclose(np.asarray(grad_s), expect_s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_p), expect_p, rtol=1e-4, atol=1e-5)
    mesh = march(positions, sdf, g, **budget)
    np.testing.assert_allclose(np.asarray(mesh.vertices)[: len(ends)], p64[a] + dv * t[:, None], atol=1e-6)


def test_jit_matches_eager_and_empty():
    g = dmtet.make_tet_grid(3)
    sdf = np.random.default_rng(3).normal(size=len(g.vertices)).astype(np.float32)
    eager = dmtet.marching_tets(g.vertices, sdf, g, max_faces=100, max_vertices=80)
    jitted = march(g.vertices, sdf, jax.device_put(g), max_faces=100, max_vertices=80)
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    empty = march(g.vertices, np.ones_like(sdf), g, max_faces=100, max_vertices=80)
    assert int(empty.n_faces) == 0 and int(empty.n_vertices) == 0 and not empty.overflow
    assert not np.any(empty.face_valid) and np.all(np.asarray(empty.faces) == 0)
    box_min, box_max = dmtet.isosurface_box(empty, 2.0)
    np.testing.assert_array_equal(np.asarray(box_min), [-2.0] * 3)
    np.testing.assert_array_equal(np.asarray(box_max), [2.0] * 3)


def test_deformed_positions():
    g = dmtet.make_tet_grid(4)
    box_min, box_max = np.array([-1.0, -0.5, 0.0]), np.array([1.0, 1.5, 3.0])
    zero = dmtet.deformed_positions(g.vertices, np.zeros_like(g.vertices), box_min, box_max, 4)
    ijk = np.round(g.vertices * 4)
    np.testing.assert_allclose(np.asarray(zero), box_min + ijk / 4 * (box_max - box_min), atol=1e-6)
    # tanh saturates: +-1 cell of the grid, scaled by the box.
    deformation = np.where(np.arange(3) == 1, -30.0, 30.0) * np.ones_like(g.vertices)
    moved = dmtet.deformed_positions(g.vertices, deformation, box_min, box_max, 4)
    np.testing.assert_allclose(np.asarray(moved), box_min + (ijk + [1, -1, 1]) / 4 * (box_max - box_min), atol=1e-6)


def test_isosurface_box():
    vertices = np.array([[-1.0, 0.0, -1.9], [1.0, 0.5, 1.9], [0.0, 0.25, 0.0], [9.0, -9.0, 9.0]], np.float32)
    mesh = dmtet.SurfaceMesh(
        vertices=jnp.asarray(vertices),
        faces=jnp.zeros((1, 3), jnp.int32),
        face_valid=jnp.zeros(1, bool),
        vertex_valid=jnp.array([True, True, True, False]),  # the last slot is junk and must be ignored
        n_faces=jnp.int32(0),
        n_vertices=jnp.int32(3),
        overflow=jnp.bool_(False),
    )
    box_min, box_max = dmtet.isosurface_box(mesh, 2.0)
    # x: [-1, 1] +- 0.2; y: [0, 0.5] +- 0.05; z: [-1.9, 1.9] +- 0.38, clipped to +-2.
    np.testing.assert_allclose(np.asarray(box_min), [-1.2, -0.05, -2.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(box_max), [1.2, 0.55, 2.0], atol=1e-6)


def test_remove_small_components():
    big = trimesh.creation.icosphere(subdivisions=4, radius=1.0)  # 5120 faces: threshold int(51.2) = 51
    medium = trimesh.creation.icosphere(subdivisions=2, radius=0.3)  # 320 faces: kept
    tiny = trimesh.creation.icosphere(subdivisions=0, radius=0.05)  # 20 faces: dropped
    parts = [(big, [0, 0, 0]), (tiny, [3, 0, 0]), (medium, [0, 4, 0])]
    vertices, faces, offset = [], [], 0
    for mesh, centre in parts:
        vertices.append(mesh.vertices + centre)
        faces.append(mesh.faces + offset)
        offset += len(mesh.vertices)
    vertices, faces = np.concatenate(vertices), np.concatenate(faces)
    order = np.random.default_rng(4).permutation(len(faces))  # components interleaved in the face list
    out_v, out_f = dmtet.remove_small_components(vertices, faces[order])
    assert len(out_f) == 5120 + 320 and len(out_v) == len(big.vertices) + len(medium.vertices)
    assert np.all(np.linalg.norm(out_v - [3, 0, 0], axis=1) > 1.0)  # nothing of the tiny sphere is left
    kept = order[np.isin(order, np.flatnonzero(np.linalg.norm(vertices[faces].mean(1) - [3, 0, 0], axis=1) > 1))]
    np.testing.assert_array_equal(out_v[out_f], vertices[faces[kept]])
    # A larger fraction drops the medium sphere too; zero keeps everything.
    assert len(dmtet.remove_small_components(vertices, faces, 0.1)[1]) == 5120
    assert len(dmtet.remove_small_components(vertices, faces, 0.0)[1]) == len(faces)
