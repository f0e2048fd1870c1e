"""Mesh files: a triangle mesh with per-vertex albedo and normals written as GLB and OBJ through trimesh.

Conventions: vertices (N, 3) float in world units (the scene's frame: z up, the reference camera on +x), faces
(M, 3) int with outward (counter-clockwise seen from outside) winding, albedo (N, 3) in [0, 1], normals (N, 3)
unit. GLB stores the albedo as the COLOR_0 vertex attribute (8-bit), OBJ as ``v x y z r g b`` (the common
extension MeshLab, Blender and trimesh read). A UV atlas with a baked texture comes with the texture stage.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["MeshExportError", "load_mesh", "write_mesh"]


class MeshExportError(ValueError):
    """The mesh cannot be written (empty, bad shapes, non-finite values)."""


def _check(vertices: np.ndarray, faces: np.ndarray, albedo: np.ndarray | None, normals: np.ndarray | None) -> None:
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise MeshExportError(f"expected vertices (N, 3) and faces (M, 3), got {vertices.shape} and {faces.shape}")
    if len(faces) == 0:
        raise MeshExportError("the mesh has no faces (the surface is empty): nothing to export")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshExportError(f"faces index vertices outside [0, {len(vertices)})")
    if not np.all(np.isfinite(vertices)):
        raise MeshExportError("the mesh has NaN or infinite vertex positions")
    for name, value in (("albedo", albedo), ("normals", normals)):
        if value is not None and value.shape != vertices.shape:
            raise MeshExportError(f"{name} must be (N, 3) like the vertices {vertices.shape}, got {value.shape}")


def write_mesh(stem: str | Path, vertices, faces, albedo=None, normals=None) -> dict[str, Path]:
    """Write ``<stem>.glb`` and ``<stem>.obj``; returns {"glb": path, "obj": path}.

    Each file is written to a temporary name and renamed, so an interrupted export leaves no half file.
    """
    import trimesh  # only at export time

    vertices = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64)
    albedo = None if albedo is None else np.clip(np.asarray(albedo, np.float64), 0.0, 1.0)
    normals = None if normals is None else np.asarray(normals, np.float64)
    _check(vertices, faces, albedo, normals)
    colors = None
    if albedo is not None:
        colors = np.concatenate([np.round(albedo * 255), np.full((len(albedo), 1), 255)], axis=1).astype(np.uint8)
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, vertex_normals=normals, vertex_colors=colors,
                           process=False)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind in ("glb", "obj"):
        path = stem.with_suffix(f".{kind}")
        tmp = path.with_name(f".{path.name}.tmp")
        data = mesh.export(file_type=kind, include_normals=normals is not None)
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
        os.replace(tmp, path)
        out[kind] = path
    return out


def load_mesh(path: str | Path):
    """The mesh of a GLB / OBJ file as one trimesh.Trimesh (a GLB scene's geometries concatenated), vertices in
    the file's order (no merging)."""
    import trimesh

    loaded = trimesh.load(str(path), process=False, force="mesh")
    return loaded
