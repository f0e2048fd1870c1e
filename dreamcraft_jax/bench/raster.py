"""``bench raster``: the geometry stage's rasterisation path, forward and forward+backward, and marching tets.

    python -m dreamcraft_jax.bench raster [--faces 150000] [--resolution 1024] [--views 1 4] [--out raster.json]

Mesh: a bumpy UV sphere of about ``--faces`` faces filling most of the frame (fovy 20 at distance 3.8, as the
stage's cameras). Per view count: ``rasterize`` alone; the stage's render (one interpolation of normals |
colours, one sparse antialias of the opacity, normal and albedo maps) forward + backward w.r.t. the vertices and
the vertex colours, including the rasterisation; ms per view; for 1 view also ``interpolate``, ``antialias``
(every pixel pair differentiated) and ``antialias_sparse`` (the blended pairs only) alone, forward + backward on
a fixed rasterisation, and the number of blended pairs. Also marching tets of a sphere SDF on the stage's tet
grid (``--tet_resolution``), forward and with its gradient. The stage's goal: rasterise + interpolate +
antialias forward + backward <= 3 ms per 1024 x 1024 view for a 150k-face mesh on an H100.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax import cameras
from dreamcraft_jax.bench.harness import error_record, record_variant, time_calls
from dreamcraft_jax.fields import dmtet
from dreamcraft_jax.render import raster


def add_parser(subparsers) -> argparse.ArgumentParser:
    r = subparsers.add_parser("raster", help="rasterise / interpolate / antialias fwd+bwd, marching tets")
    r.add_argument("--faces", type=int, default=150_000)
    r.add_argument("--resolution", type=int, default=1024)
    r.add_argument("--views", type=int, nargs="+", default=[1, 4])
    r.add_argument("--zbuffers", nargs="+", default=["xla", "pallas"], choices=["xla", "pallas"],
                   help="the z-buffer paths to time (pallas off a GPU: interpret mode, slow)")
    r.add_argument("--tet_resolution", type=int, default=64, help="0: skip marching tets")
    r.add_argument("--repeats", type=int, default=10)
    r.add_argument("--out", default="")
    return r


def bumpy_sphere(n_faces: int, radius: float = 0.55) -> tuple[jax.Array, jax.Array]:
    """A closed UV sphere of ~n_faces faces (2 n_lat n_lon), its radius modulated by a smooth bump pattern so the
    silhouette is not a circle: vertices (V, 3) float32, faces (F, 3) int32, outward winding."""
    n = max(int(round((n_faces / 2) ** 0.5)), 4)
    theta = np.linspace(0.0, np.pi, n + 1)[1:-1]
    phi = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    unit = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    unit = np.concatenate([unit, [[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]])
    rows = n - 1
    r_ = np.arange(rows - 1)[:, None]
    c = np.arange(n)[None, :]
    a, b = r_ * n + c, r_ * n + (c + 1) % n
    quads = [np.stack([a, a + n, b + n], -1).reshape(-1, 3), np.stack([a, b + n, b], -1).reshape(-1, 3)]
    top, bottom, cc = len(unit) - 2, len(unit) - 1, np.arange(n)
    last = (rows - 1) * n
    caps = [np.stack([np.full(n, top), cc, (cc + 1) % n], -1),
            np.stack([np.full(n, bottom), last + (cc + 1) % n, last + cc], -1)]
    faces = np.concatenate(quads + caps)
    bump = 1.0 + 0.08 * np.sin(5 * unit[:, :1]) * np.cos(4 * unit[:, 1:2]) * np.sin(3 * unit[:, 2:])
    vertices = radius * unit * bump
    tri = vertices[faces]
    outward = np.einsum("fi,fi->f", np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), tri.mean(1)) > 0
    faces = np.where(outward[:, None], faces, faces[:, ::-1])
    return jnp.asarray(vertices, jnp.float32), jnp.asarray(faces, jnp.int32)


def render_loss(vertices, colors, faces, valid, topology, camera_batch, height, width, zbuffer="xla"):
    """Sum of the stage's antialiased maps (opacity, normal, albedo on white: one interpolation of normals |
    colours, one sparse antialias of the seven channels, as ``GeometryStage.render_view``) over the views, and
    what the budgets dropped."""
    normals = raster.vertex_normals(vertices, faces, valid)

    def one(camera):
        clip = raster.clip_positions(vertices, camera, height, width, 0.1, 1000.0)
        rast = raster.rasterize(clip, faces, valid, height, width, zbuffer=zbuffer)
        maps, aa_overflow = shade(rast, clip, normals, colors, faces, topology)
        return jnp.sum(maps * _WEIGHTS), rast.overflow_pairs + rast.overflow_tiles + aa_overflow

    totals, overflow = jax.lax.map(one, camera_batch)
    return jnp.sum(totals), jnp.sum(overflow)


_WEIGHTS = jnp.asarray([0.7] * 3 + [0.3] * 3 + [1.0])  # rgb, normal, opacity


def shade(rast, clip, normals, colors, faces, topology):
    """((H, W, 7) antialiased albedo on white | (n + 1) / 2 on black | opacity of one rasterised view, the
    antialias's dropped pairs)."""
    cover = (rast.tri_id >= 0).astype(jnp.float32)[..., None]
    attrs = raster.interpolate(jnp.concatenate([normals, colors], -1), rast, faces, clip)
    n = raster.safe_normalize(attrs[..., :3])
    maps = jnp.concatenate([1.0 + (attrs[..., 3:] - 1.0) * cover, (n + 1.0) * 0.5 * cover, cover], -1)
    return raster.antialias_sparse(maps, rast, clip, faces, topology)


def component_times(vertices, colors, faces, valid, topology, camera, h, w, zbuffer, repeats) -> dict:
    """One view's parts, each forward + backward w.r.t. the vertices (and colours) on a fixed rasterisation:
    ``interpolate`` (normals | colours), ``antialias`` (7 channels), and the rest of the shading around them."""
    normals = raster.vertex_normals(vertices, faces, valid)
    clip = raster.clip_positions(vertices, camera, h, w, 0.1, 1000.0)
    rast = jax.jit(lambda c: raster.rasterize(c, faces, valid, h, w, zbuffer=zbuffer))(clip)
    attr = jnp.concatenate([normals, colors], -1)
    maps = jax.random.uniform(jax.random.PRNGKey(1), (h, w, 7))
    interp = jax.jit(jax.grad(lambda c, a: jnp.sum(raster.interpolate(a, rast, faces, c) ** 2), argnums=(0, 1)))
    aa = jax.jit(jax.grad(lambda c, m: jnp.sum(raster.antialias(m, rast, c, faces, topology) ** 2),
                          argnums=(0, 1)))
    aa_sparse = jax.jit(jax.grad(lambda c, m: jnp.sum(
        raster.antialias_sparse(m, rast, c, faces, topology)[0] ** 2), argnums=(0, 1)))
    pairs = int(raster.antialias_sparse(maps, rast, clip, faces, topology, max_pairs=0)[1])
    return {"interpolate_fwd_bwd": time_calls(interp, clip, attr, repeats=repeats),
            "antialias_fwd_bwd": time_calls(aa, clip, maps, repeats=repeats),
            "antialias_sparse_fwd_bwd": time_calls(aa_sparse, clip, maps, repeats=repeats),
            "antialias_blended_pairs": pairs, "antialias_budget": raster.default_antialias_budget(h, w)}


def run(args) -> dict:
    vertices, faces = bumpy_sphere(args.faces)
    n_faces = int(faces.shape[0])
    valid = jnp.ones((n_faces,), bool)
    topology = jax.jit(raster.edge_topology)(faces, valid)
    colors = jax.random.uniform(jax.random.PRNGKey(0), vertices.shape)
    h = w = args.resolution
    mesh_info = {"faces": n_faces, "vertices": int(vertices.shape[0]), "resolution": h}
    results = {}
    print(f"mesh: {n_faces} faces, {vertices.shape[0]} vertices, {h}x{w}")
    reference_ids = {}  # views -> the XLA path's face ids
    for zbuffer in args.zbuffers:
        for views in args.views:
            cams = cameras.make_camera(10.0, jnp.linspace(0.0, 90.0, views), 3.8, 20.0)
            key = f"{zbuffer} {views} view" + ("s" if views > 1 else "")
            try:
                rasterize = jax.jit(lambda v, cams=cams, zbuffer=zbuffer: jax.lax.map(
                    lambda c: raster.rasterize(raster.clip_positions(v, c, h, w, 0.1, 1000.0), faces, valid, h, w,
                                               zbuffer=zbuffer), cams))
                loss = functools.partial(render_loss, faces=faces, valid=valid, topology=topology, camera_batch=cams,
                                         height=h, width=w, zbuffer=zbuffer)
                fwd = jax.jit(lambda v, c, loss=loss: loss(v, c))
                fwd_bwd = jax.jit(jax.value_and_grad(lambda v, c, loss=loss: loss(v, c)[0], argnums=(0, 1)))
                overflow = int(fwd(vertices, colors)[1])
                r = {"rasterize": time_calls(rasterize, vertices, repeats=args.repeats),
                     "forward": time_calls(fwd, vertices, colors, repeats=args.repeats),
                     "forward_backward": time_calls(fwd_bwd, vertices, colors, repeats=args.repeats)}
                r["forward_backward_ms_per_view"] = r["forward_backward"]["median_ms"] / views
                if views == 1:
                    r.update(component_times(vertices, colors, faces, valid, topology, jax.tree.map(
                        lambda x: x[0], cams), h, w, zbuffer, args.repeats))
                r["overflow"] = overflow
                ids = np.asarray(rasterize(vertices).tri_id)
                if zbuffer == "xla":
                    reference_ids[views] = ids
                elif views in reference_ids:  # the kernel's face ids against the reference's, pixel for pixel
                    r["tri_id_mismatch_fraction"] = float(np.mean(ids != reference_ids[views]))
            except Exception as e:  # noqa: BLE001 - a variant out of memory is recorded, the others still run
                r = error_record(e)
            record_variant(results, key, r, args.out, "raster")
    if args.tet_resolution > 0:
        try:
            grid = jax.device_put(dmtet.make_tet_grid(args.tet_resolution))
            sdf = jnp.linalg.norm(grid.vertices - 0.5, axis=-1) - 0.4
            extract = jax.jit(lambda p, s: dmtet.marching_tets(p, s, grid, 200_000, 100_000).n_faces)
            grad = jax.jit(jax.grad(lambda p, s: jnp.sum(dmtet.marching_tets(p, s, grid, 200_000, 100_000).vertices),
                                    argnums=(0, 1)))
            r = {"forward": time_calls(extract, grid.vertices, sdf, repeats=args.repeats),
                 "forward_backward": time_calls(grad, grid.vertices, sdf, repeats=args.repeats),
                 "faces": int(extract(grid.vertices, sdf))}
        except Exception as e:  # noqa: BLE001
            r = error_record(e)
        record_variant(results, f"marching tets r{args.tet_resolution}", r, args.out, "raster")
    return {"mesh": mesh_info, "results": results}
