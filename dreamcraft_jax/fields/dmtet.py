"""DMTet geometry (stage 2): a tetrahedral grid, marching tetrahedra with static shapes, deformed vertices.

Tet grid (``make_tet_grid``): ``r`` cubes per side on [0, 1]^3, ``(r + 1)^3`` vertices (r = 64: 274,625, about as
many as the official Quartet ``128_tets.npz``), each cube split into the 6 Kuhn (Freudenthal) tetrahedra

    cube corner c, permutation p of (x, y, z):  (c, c + e_p0, c + e_p0 + e_p1, c + (1, 1, 1))

all of volume h^3 / 6 (h = 1 / r), conforming across cubes (every square face is cut along the diagonal through its
lowest and highest corner from both sides), reordered where needed so that every tet is positively oriented:
det(v1 - v0, v2 - v0, v3 - v0) > 0, as the official grid's tets are.

Marching tetrahedra (``marching_tets``), sign convention: the NeuS SDF is negative inside. A grid vertex is
*outside* when sdf > 0 and inside when sdf <= 0. The official ``MarchingTetrahedraHelper`` thresholds ``sdf > 0``
as its "occupancy" and threestudio passes an SDF unchanged as the level (a density is negated), so its "occupied"
vertices are our outside ones; its triangle table winds normals toward the occupied side on its (positively
oriented) tets, i.e. outward, which is the convention here too:

    face normal (v1 - v0) x (v2 - v0) points from sdf < 0 to sdf > 0 (outward; counter-clockwise seen from outside).

An edge (a, b) with exactly one outside end is crossing; its surface vertex is the zero of the linear interpolant

    v = p_a + (p_b - p_a) t,   t = sdf_a / (sdf_a - sdf_b)  in [0, 1],

differentiable in positions and sdf (the topology is not). One vertex per crossing grid edge, so tets that share an
edge share its vertex and the mesh is watertight. Output vertex k is the k-th crossing edge in ``grid.edges`` order;
faces come in tet order. Shapes are static: ``max_faces`` / ``max_vertices`` slots, masks say which are real,
faces and vertices past a budget are dropped (never wrong) and ``overflow`` says so.

DMTet vertices (``deformed_positions``): box_min + (grid_vertex + tanh(deformation) / r) (box_max - box_min), the
official ``(1/128) tanh`` for its 128 grid written as 1/r of ours.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
import warnings
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Local edge k of a tet joins its vertices LOCAL_EDGES[k]; ``TetGrid.tet_edges`` follows this order.
LOCAL_EDGES = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=np.int32)

# Bumped when the cached arrays change meaning, so that old caches are rebuilt.
_CACHE_FORMAT = 1


def _case_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per case (bit i of the code = tet vertex i is outside): (16,) triangle counts, (16, 2, 3) local edges.

    Cases with one outside (or one inside) vertex cut its 3 edges: one triangle. Cases with outside {a, b} and
    inside {c, d} cut the 4 edges ac, ad, bd, bc, a quad in that cyclic order (consecutive edges share an end),
    split along ac-bd into (ac, ad, bd) and (ac, bd, bc).

    Winding is decided on the reference tet (0, e_x, e_y, e_z) with the crossings at edge midpoints: a triangle is
    reversed when (p1 - p0) x (p2 - p0) . (outside centroid - inside centroid) < 0. This holds for every positive
    tet and every crossing parameter t in (0, 1): orientation-preserving affine maps keep the sign, and the signed
    volume of each triangle with an outside vertex (the lone outside vertex; a for (ac, ad, bd), b for
    (ac, bd, bc)) is a product of the t's (or 1 - t's) times a fixed tet determinant, so it never changes sign.
    """
    ref = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    mid = 0.5 * (ref[LOCAL_EDGES[:, 0]] + ref[LOCAL_EDGES[:, 1]])
    edge_of = {tuple(sorted(e)): k for k, e in enumerate(LOCAL_EDGES.tolist())}
    counts = np.zeros(16, dtype=np.int32)
    table = np.zeros((16, 2, 3), dtype=np.int32)
    for code in range(1, 15):
        out = np.array([(code >> i) & 1 for i in range(4)], dtype=bool)
        outs, ins = np.flatnonzero(out).tolist(), np.flatnonzero(~out).tolist()
        if len(outs) == 1 or len(ins) == 1:
            lone = outs[0] if len(outs) == 1 else ins[0]
            tris = [[edge_of[tuple(sorted((lone, o)))] for o in range(4) if o != lone]]
        else:
            (a, b), (c, d) = outs, ins
            ac, ad, bd, bc = (edge_of[tuple(sorted(e))] for e in ((a, c), (a, d), (b, d), (b, c)))
            tris = [[ac, ad, bd], [ac, bd, bc]]
        direction = ref[out].mean(0) - ref[~out].mean(0)
        for k, tri in enumerate(tris):
            p = mid[tri]
            if np.dot(np.cross(p[1] - p[0], p[2] - p[0]), direction) < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[code, k] = tri
        counts[code] = len(tris)
    return counts, table


CASE_TRIANGLE_COUNT, CASE_TRIANGLES = _case_tables()


@dataclasses.dataclass(frozen=True, eq=False)
class TetGrid:
    """A tetrahedral grid on [0, 1]^3 (a pytree: ``jax.device_put(grid)`` keeps it on device between calls).

    vertices  (V, 3) float32   V = (r + 1)^3; vertex (i, j, k) / r has index (i (r + 1) + j) (r + 1) + k
    tets      (T, 4) int32     T = 6 r^3, positively oriented
    edges     (E, 2) int32     unique, edges[:, 0] < edges[:, 1], sorted lexicographically
    tet_edges (T, 6) int32     edges[tet_edges[t, k]] = sorted(tets[t, LOCAL_EDGES[k]])
    resolution                 r, cubes per side (static)
    """

    vertices: np.ndarray
    tets: np.ndarray
    edges: np.ndarray
    tet_edges: np.ndarray
    resolution: int


jax.tree_util.register_dataclass(
    TetGrid, data_fields=["vertices", "tets", "edges", "tet_edges"], meta_fields=["resolution"]
)


def _lattice_vertices(resolution: int) -> np.ndarray:
    axis = np.arange(resolution + 1, dtype=np.float32) / np.float32(resolution)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)


def make_tet_grid(resolution: int) -> TetGrid:
    """The Kuhn tet grid with ``resolution`` cubes per side (see the module docstring); vectorised NumPy."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    n = resolution + 1
    stride = np.array([n * n, n, 1], dtype=np.int64)  # index step of a unit move along x, y, z
    corner_axis = np.arange(resolution, dtype=np.int64)
    ci, cj, ck = np.meshgrid(corner_axis, corner_axis, corner_axis, indexing="ij")
    corners = (ci * stride[0] + cj * stride[1] + ck * stride[2]).reshape(-1)  # (r^3,) lowest corner of each cube

    offsets, unit = [], np.eye(3, dtype=np.int64)
    for perm in itertools.permutations(range(3)):
        steps = np.cumsum(unit[list(perm)], axis=0)  # (3, 3): the path's corners after 1, 2, 3 unit steps
        if np.linalg.det(steps.astype(np.float64)) < 0:  # odd permutation: swap two vertices to orient it
            steps = steps[[0, 2, 1]]
        offsets.append(np.concatenate([[0], steps @ stride]))
    tets = (corners[:, None, None] + np.array(offsets)[None]).reshape(-1, 4)  # (6 r^3, 4), cube-major

    # Every edge joins a vertex to one of its 7 neighbours along (1, 0, 0), ..., (1, 1, 1), so (low vertex, index
    # difference) names it: a dense (V, 7) presence table + cumsum numbers the edges, without sorting.
    pairs = np.sort(tets[:, LOCAL_EDGES], axis=-1)  # (T, 6, 2), low index first
    neighbour = np.sort(np.array([[(k >> d) & 1 for d in range(3)] for k in range(1, 8)]) @ stride)  # (7,)
    direction = np.searchsorted(neighbour, pairs[..., 1] - pairs[..., 0])  # (T, 6), ascending index difference
    keys = pairs[..., 0] * 7 + direction
    present = np.zeros(7 * n**3, dtype=bool)
    present[keys.reshape(-1)] = True
    edge_index = np.cumsum(present) - 1
    edge_keys = np.flatnonzero(present)
    low = edge_keys // 7
    edges = np.stack([low, low + neighbour[edge_keys % 7]], axis=-1)  # lexicographic: by low, then by high
    return TetGrid(
        vertices=_lattice_vertices(resolution),
        tets=tets.astype(np.int32),
        edges=edges.astype(np.int32),
        tet_edges=edge_index[keys].astype(np.int32),
        resolution=resolution,
    )


def _grid_problems(arrays, resolution: int) -> str | None:
    """Why cached arrays are not a grid of this resolution (cheap structural checks), or None."""
    r, n = resolution, resolution + 1
    expected = {
        "vertices": ((n**3, 3), np.float32),
        "tets": ((6 * r**3, 4), np.int32),
        "tet_edges": ((6 * r**3, 6), np.int32),
        "edges": ((3 * r * n * n + 3 * r * r * n + r**3, 2), np.int32),  # 3 axis, 3 face-diagonal, 1 body dirs
    }
    for name, (shape, dtype) in expected.items():
        if arrays[name].shape != shape or arrays[name].dtype != dtype:
            return f"{name}: {arrays[name].shape} {arrays[name].dtype}, expected {shape} {dtype}"
    if int(arrays["format"]) != _CACHE_FORMAT or int(arrays["resolution"]) != r:
        return "format or resolution mismatch"
    if not np.array_equal(arrays["vertices"], _lattice_vertices(r)):
        return "vertices are not the lattice"
    for name, bound in (("tets", n**3), ("edges", n**3), ("tet_edges", len(arrays["edges"]))):
        if arrays[name].min() < 0 or arrays[name].max() >= bound:
            return f"{name} out of range"
    return None


def load_tet_grid(resolution: int, cache_dir: str | os.PathLike) -> TetGrid:
    """The grid from ``cache_dir/tet_grid_r{resolution}.npz``, built and cached (atomically) when missing.

    A cache that cannot be read or does not describe this grid is rebuilt and overwritten, never trusted.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / f"tet_grid_r{resolution}.npz"
    names = ("vertices", "tets", "edges", "tet_edges", "format", "resolution")
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in names}  # reads all, so zip CRC errors surface here
            problem = _grid_problems(arrays, resolution)
        except Exception as error:  # truncated, bad zip / CRC, missing key: rebuild
            problem = f"unreadable ({type(error).__name__}: {error})"
        if problem is None:
            return TetGrid(**{k: arrays[k] for k in ("vertices", "tets", "edges", "tet_edges")}, resolution=resolution)
        warnings.warn(f"rebuilding the tet grid cache {path}: {problem}", stacklevel=2)
    grid = make_tet_grid(resolution)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                vertices=grid.vertices,
                tets=grid.tets,
                edges=grid.edges,
                tet_edges=grid.tet_edges,
                format=np.int64(_CACHE_FORMAT),
                resolution=np.int64(resolution),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return grid


@flax.struct.dataclass
class SurfaceMesh:
    """Marching-tets output with static shapes (see the module docstring for conventions).

    vertices     (max_vertices, 3)  slot k < n_vertices: the k-th crossing edge's zero crossing; others hold a
                                    finite dummy position
    faces        (max_faces, 3) int32  outward-wound; invalid faces are (0, 0, 0) so gathers stay in range
    face_valid   (max_faces,) bool     real faces: slot < n_faces and all three vertices within the budget
    vertex_valid (max_vertices,) bool  slot < n_vertices
    n_faces, n_vertices  int32 ()      true counts, may exceed the budgets
    overflow     bool ()               n_faces > max_faces or n_vertices > max_vertices (something was dropped)
    """

    vertices: jax.Array
    faces: jax.Array
    face_valid: jax.Array
    vertex_valid: jax.Array
    n_faces: jax.Array
    n_vertices: jax.Array
    overflow: jax.Array


def marching_tets(positions, sdf, grid: TetGrid, max_faces: int, max_vertices: int) -> SurfaceMesh:
    """Zero level set of ``sdf`` on the tets of ``grid`` at vertex ``positions``; jit with
    ``jax.jit(marching_tets, static_argnames=("max_faces", "max_vertices"))``.

    positions (V, 3), sdf (V,) -> SurfaceMesh. Work and memory are O(T + E + budgets): a cumsum numbers the
    crossing edges and the faces of each tet (0, 1 or 2 from the case table), scatters compact them into the
    budgets, and only the kept slots gather positions, so gradients w.r.t. ``positions`` and ``sdf`` are
    scatter-adds over at most ``max_vertices`` crossings.
    """
    tets = jnp.asarray(grid.tets)
    edges = jnp.asarray(grid.edges)
    tet_edges = jnp.asarray(grid.tet_edges)
    outside = sdf > 0

    # Vertices: the k-th crossing edge fills slot k.
    crossing = outside[edges[:, 0]] != outside[edges[:, 1]]  # (E,)
    vertex_of_edge = jnp.cumsum(crossing, dtype=jnp.int32) - 1  # (E,) slot of a crossing edge
    n_vertices = jnp.sum(crossing, dtype=jnp.int32)
    slot = jnp.where(crossing, vertex_of_edge, max_vertices)  # max_vertices is out of range: dropped
    source_edge = (
        jnp.zeros(max_vertices, jnp.int32).at[slot].set(jnp.arange(edges.shape[0], dtype=jnp.int32), mode="drop")
    )
    vertex_valid = jnp.arange(max_vertices) < n_vertices
    a, b = edges[source_edge, 0], edges[source_edge, 1]
    sdf_a, sdf_b = sdf[a], sdf[b]
    # For a crossing one end is > 0 and the other <= 0, so sdf_a - sdf_b != 0; empty slots divide by 1.
    denominator = jnp.where(vertex_valid, sdf_a - sdf_b, 1.0)
    t = jnp.where(vertex_valid, sdf_a / denominator, 0.0)
    vertices = positions[a] + (positions[b] - positions[a]) * t[:, None]

    # Faces: tet t owns slots start_t .. start_t + count_t - 1; each slot records 2 t + (triangle 0 or 1).
    weights = jnp.array([1, 2, 4, 8], jnp.int32)
    code = jnp.sum(outside[tets].astype(jnp.int32) * weights, axis=-1)  # (T,)
    count = jnp.asarray(CASE_TRIANGLE_COUNT)[code]
    end = jnp.cumsum(count, dtype=jnp.int32)
    n_faces = end[-1]
    local = jnp.arange(2, dtype=jnp.int32)
    face_slot = jnp.where(local[None] < count[:, None], (end - count)[:, None] + local[None], max_faces)  # (T, 2)
    packed = 2 * jnp.arange(tets.shape[0], dtype=jnp.int32)[:, None] + local[None]
    face_source = jnp.zeros(max_faces, jnp.int32).at[face_slot.reshape(-1)].set(packed.reshape(-1), mode="drop")
    tet, which = face_source // 2, face_source % 2
    local_edges = jnp.asarray(CASE_TRIANGLES)[code[tet], which]  # (max_faces, 3)
    face_vertices = vertex_of_edge[jnp.take_along_axis(tet_edges[tet], local_edges, axis=1)]
    face_valid = (jnp.arange(max_faces) < n_faces) & jnp.all(face_vertices < max_vertices, axis=-1)
    faces = jnp.where(face_valid[:, None], face_vertices, 0)

    return SurfaceMesh(
        vertices=vertices,
        faces=faces,
        face_valid=face_valid,
        vertex_valid=vertex_valid,
        n_faces=n_faces,
        n_vertices=n_vertices,
        overflow=(n_faces > max_faces) | (n_vertices > max_vertices),
    )


def deformed_positions(grid_vertices, deformation, box_min, box_max, resolution: int):
    """DMTet vertices (V, 3): box_min + (grid_vertex + tanh(deformation) / resolution) (box_max - box_min).

    grid_vertices (V, 3) in [0, 1]^3, deformation (V, 3), box_min / box_max (3,). The offset is at most one cell
    (1 / resolution), as the official (1/128) tanh on its 128 grid.
    """
    unit = jnp.asarray(grid_vertices) + jnp.tanh(deformation) / resolution
    return box_min + unit * (jnp.asarray(box_max) - jnp.asarray(box_min))


def isosurface_box(mesh: SurfaceMesh, scene_radius: float):
    """The official tight box for the second marching pass: (box_min (3,), box_max (3,)).

    lo, hi = min / max of the valid vertices; box = [lo - 0.1 (hi - lo), hi + 0.1 (hi - lo)] clipped to
    [-scene_radius, scene_radius]^3. A mesh without vertices gives the whole scene box.
    """
    valid = mesh.vertex_valid[:, None]
    lo = jnp.min(jnp.where(valid, mesh.vertices, jnp.inf), axis=0)
    hi = jnp.max(jnp.where(valid, mesh.vertices, -jnp.inf), axis=0)
    pad = 0.1 * (hi - lo)
    box_min = jnp.maximum(lo - pad, -scene_radius)
    box_max = jnp.minimum(hi + pad, scene_radius)
    empty = mesh.n_vertices == 0
    full = jnp.full((3,), scene_radius, dtype=mesh.vertices.dtype)
    return jnp.where(empty, -full, box_min), jnp.where(empty, full, box_max)


def _drop_unused_vertices(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    used, inverse = np.unique(faces.reshape(-1), return_inverse=True)  # keeps the vertices' relative order
    return vertices[used], inverse.reshape(-1, 3).astype(np.int32)


def compact_mesh(mesh: SurfaceMesh) -> tuple[np.ndarray, np.ndarray]:
    """The valid faces (m, 3) int32 and the vertices (n, 3) they use, re-indexed, as NumPy arrays."""
    faces = np.asarray(mesh.faces)[np.asarray(mesh.face_valid)]
    return _drop_unused_vertices(np.asarray(mesh.vertices), faces)


def remove_small_components(
    vertices: np.ndarray, faces: np.ndarray, min_fraction: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """Drop connected components with fewer than int(min_fraction x faces of the largest) faces (export time).

    As the official ``Mesh.remove_outlier`` (trimesh ``split``): components are faces joined through shared edges
    and are measured in faces, not area; a component of exactly the threshold stays. Unused vertices are dropped;
    the kept faces and vertices keep their relative order. vertices (N, 3), faces (M, 3) -> (N', 3), (M', 3).
    """
    import trimesh  # only at export time

    vertices, faces = np.asarray(vertices), np.asarray(faces)
    if len(faces) == 0:
        return vertices[:0], faces.astype(np.int32)
    adjacency = trimesh.Trimesh(vertices=vertices, faces=faces, process=False).face_adjacency
    labels = trimesh.graph.connected_component_labels(adjacency, node_count=len(faces))
    sizes = np.bincount(labels)
    threshold = int(sizes.max() * min_fraction)
    keep = sizes[labels] >= threshold
    return _drop_unused_vertices(vertices, faces[keep])
