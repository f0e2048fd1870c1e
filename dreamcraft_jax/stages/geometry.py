"""Stage 2, DMTet geometry (dreamcraft3d-geometry): the NeuS surface as an explicit mesh, refined by rasterised
renders at full resolution.

State. ``params = {"sdf": (V,), "deformation": (V, 3), "encoding": hash table, "feature_net": MLP}`` on the tet
grid of :mod:`dreamcraft_jax.fields.dmtet` (``geometry.tet_resolution`` cubes per side); ``extras = {"box": (2, 3)}``
the tight box the grid spans. Vertex p = box_min + (grid vertex + tanh(deformation) / r) (box_max - box_min).

Init from the coarse NeuS (the official ``create_from``): marching tets of the NeuS SDF at threshold 0 on the scene
box [-r, r]^3; the box of that mesh padded by 10 % of its extent per side (clipped to the scene box); per-vertex SDF =
the NeuS SDF at the grid vertices of that tight box (not clamped); deformation 0; the hash grid and feature MLP
copied (the texture is inherited and still queried in scene coordinates). Without a previous stage (a template
state, or a standalone run): the sphere of radius ``neus.sphere_radius`` and a fresh texture.

One step (``train.mode`` accumulate, both substeps every step, as the official system):
  mesh    = marching tets of (deformed positions, sdf), static budgets ``geometry.max_faces / max_vertices``
  per view (ref views, then random views): clip = P w2c v; rasterize; opacity = antialias(coverage);
           n = normalize(interpolate(area-weighted vertex normals)); normal = antialias(lerp(0, (n + 1) / 2, cov));
           albedo = sigmoid(feature_net(hash(interpolate(v))))[:3]; rgb = antialias(lerp(white, albedo, cov))
  step kind "rgb" (step % geometry.n_rgb == 0): the reference rgb MSE (x lambda_rgb) and mask MSE (x lambda_mask)
           apply and the 2D prior scores the rgb renders; kind "normal": the 2D prior scores the normal renders.
           Zero123 always scores the rgb renders.
  normal consistency (mean over the mesh's edges of 1 - cos of its two vertex normals) x lambda_normal_consistency,
           counted twice (the official code adds it in the reference and in the guidance substep).
The texture is queried at the interpolated surface points, and its spatial derivative is passed back to the
vertices, as the official renderer does (its tcnn hash grid computes d/dx): the rgb losses move the geometry through
the silhouettes (antialias), the normals and the texture lookup.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamcraft_jax import cameras as cam
from dreamcraft_jax import losses, parallel
from dreamcraft_jax.config import resolution_at, schedule_value
from dreamcraft_jax.fields import dmtet, nerf, neus
from dreamcraft_jax.guidance.sds import resize_to_model
from dreamcraft_jax.kernels.spec import KernelSpec
from dreamcraft_jax.render import raster
from dreamcraft_jax.stages import timing, views
from dreamcraft_jax.stages.base import StepDefStage, register
from dreamcraft_jax.stages.volume_stage import load_references, stage_targets
from dreamcraft_jax.train_step import StepDef, TrainState, init_train_state

log = logging.getLogger(__name__)

RGB = "rgb"
NORMAL = "normal"
WHITE = (1.0, 1.0, 1.0)
_SDF_CHUNK = 1 << 16  # grid vertices per NeuS SDF evaluation at init (bounded memory)


def default_tet_cache() -> Path:
    """Where tet grids are cached when ``geometry.tet_cache_dir`` is empty: $XDG_CACHE_HOME/dreamcraft_jax/tets."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dreamcraft_jax" / "tets"


def normal_consistency(normals: jax.Array, faces: jax.Array, face_valid: jax.Array) -> jax.Array:
    """Mean over the valid faces' half-edges of 1 - cos(n_a, n_b) of the two end vertices' unit normals (V, 3).

    The official term averages over unique edges; marching tets gives a closed manifold mesh, where every edge has
    exactly two half-edges carrying the same value, so the two means are equal (and this one needs no sort).
    """
    a, b = faces, jnp.roll(faces, -1, axis=1)
    cos = jnp.sum(normals[a] * normals[b], axis=-1)  # (F, 3)
    w = face_valid[:, None].astype(normals.dtype)
    return jnp.sum((1.0 - cos) * w) / jnp.maximum(3.0 * jnp.sum(w[:, 0]), 1.0)


@dataclasses.dataclass(frozen=True)
class GeometryStage(StepDefStage):
    """The DMTet stage, built once from its config; its methods build pure jitted functions."""

    name: str
    cfg: Any
    texture: nerf.NerfFieldSpec  # the hash grid + feature MLP (the NeuS field's shared part)
    neus_spec: neus.NeusFieldSpec  # to evaluate the previous stage's SDF at init
    grid: dmtet.TetGrid  # host arrays
    mesh: Any
    priors: Any = None
    prior_specs: Any = None
    prior_params: Any = None
    references: Any = None
    targets: Any = None
    device_grid: Any = None  # the tet grid placed on the mesh (replicated), an input of every step
    zbuffer: str = "xla"  # the rasteriser's per-tile z-buffer: "xla" reference or "pallas" kernel

    # ------------------------------------------------------------------ state

    @property
    def geo(self):
        return self.cfg.geometry

    @property
    def optimizer(self) -> optax.GradientTransformation:
        o = self.cfg.optimizer
        return optax.adam(float(self.geo.lr), b1=o.b1, b2=o.b2, eps=o.eps)

    def isosurface_init(self, sdf_fn) -> tuple[np.ndarray, np.ndarray]:
        """(box (2, 3), per-vertex sdf (V,)) from ``sdf_fn`` ((N, 3) -> (N,)): marching tets on the scene box,
        the padded box of that surface, the sdf at the grid vertices of that box (the official two passes)."""
        r = float(self.texture.radius)
        max_faces, max_vertices = int(self.geo.max_faces), int(self.geo.max_vertices)

        def sdf_at(points):
            n = points.shape[0]
            pad = -n % _SDF_CHUNK
            chunks = jnp.pad(points, ((0, pad), (0, 0))).reshape(-1, _SDF_CHUNK, 3)
            return jax.lax.map(sdf_fn, chunks).reshape(-1)[:n]

        @jax.jit
        def passes(grid):
            first = -r + 2.0 * r * grid.vertices
            surface = dmtet.marching_tets(first, sdf_at(first), grid, max_faces, max_vertices)
            box_min, box_max = dmtet.isosurface_box(surface, r)
            return (jnp.stack([box_min, box_max]), sdf_at(box_min + grid.vertices * (box_max - box_min)),
                    surface.n_faces)

        box, sdf, n_faces = passes(self.device_grid)
        if int(n_faces) == 0:
            raise ValueError("geometry init: the previous stage's SDF has no zero crossing on the scene box (no "
                             "surface to start from); check that the NeuS stage converged")
        return np.asarray(box), np.asarray(sdf)

    def init_params(self, key, previous: TrainState | None):
        base = self.texture
        if previous is not None and "sdf_net" in previous.params:
            prev = previous.params
            mask = jnp.ones((base.grid.n_levels,), jnp.float32)
            box, sdf = self.isosurface_init(lambda x: neus.sdf(prev, x, self.neus_spec, mask))
            texture = {"encoding": prev["encoding"], "feature_net": prev["feature_net"]}
        else:
            radius = float(self.neus_spec.sphere_radius)
            box, sdf = self.isosurface_init(lambda x: jnp.linalg.norm(x, axis=-1) - radius)
            fresh = neus.init_field(key, self.neus_spec)
            texture = {"encoding": fresh["encoding"], "feature_net": fresh["feature_net"]}
        n = self.grid.vertices.shape[0]
        params = {"sdf": jnp.asarray(sdf, jnp.float32), "deformation": jnp.zeros((n, 3), jnp.float32),
                  **jax.tree.map(lambda a: jnp.array(a, jnp.float32), texture)}
        return params, jnp.asarray(box, jnp.float32)

    def init_state(self, previous: TrainState | None = None, seed: int | None = None) -> TrainState:
        seed = self.cfg.seed if seed is None else seed
        k_params, k_run = jax.random.split(jax.random.PRNGKey(seed))
        params, box = self.init_params(k_params, previous)
        return init_train_state(params, self.optimizer, {"box": box}, k_run, self.mesh,
                                parallel.rules_from_config(self.cfg.parallel), int(self.cfg.parallel.fsdp_min_size))

    # ------------------------------------------------------------------ surface and renders

    def surface(self, params, box, grid) -> dict:
        """The mesh of ``params``: {"mesh": SurfaceMesh, "normals": (Vmax, 3), "topology": (Fmax, 3)}."""
        positions = dmtet.deformed_positions(grid.vertices, params["deformation"], box[0], box[1],
                                             grid.resolution)
        mesh = dmtet.marching_tets(positions, params["sdf"], grid, int(self.geo.max_faces),
                                   int(self.geo.max_vertices))
        normals = raster.vertex_normals(mesh.vertices, mesh.faces, mesh.face_valid)
        topology = raster.edge_topology(mesh.faces, mesh.face_valid)
        return {"mesh": mesh, "normals": normals, "topology": topology}

    @functools.cached_property
    def surface_fn(self):
        """jit of :meth:`surface` (one compile per stage object)."""
        return jax.jit(self.surface)

    def albedo(self, params, points, valid):
        """(N, 3) scene points -> (N, 3) albedo of the inherited texture field (all hash levels on),
        differentiable w.r.t. the points (the official tcnn grid passes d/dx back to the mesh's vertices)."""
        mask = jnp.ones((self.texture.grid.n_levels,), jnp.float32)
        enc = nerf.encode(params, points, self.texture, mask, valid, first_order_x_grad=True)
        return nerf.albedo_of_encoding(params, enc, self.texture, valid)

    def render_view(self, params, surf: dict, camera, height: int, width: int, near: float, far: float) -> dict:
        """One view: {"rgb" (H, W, 3) on white, "normal" (H, W, 3) (n + 1) / 2 on black, "opacity" (H, W),
        "depth" (H, W) view depth (0 on background), "overflow" () what any budget dropped: (tile, face) pairs
        of the rasteriser and silhouette pairs of the antialias (``geometry.antialias_budget``)}."""
        mesh = surf["mesh"]
        clip = raster.clip_positions(mesh.vertices, camera, height, width, near, far)
        rast = raster.rasterize(clip, mesh.faces, mesh.face_valid, height, width, zbuffer=self.zbuffer)
        cover = (rast.tri_id >= 0).astype(jnp.float32)[..., None]
        # One interpolation (normals | positions) and one antialias of all seven channels: both recompute the
        # per-pixel geometry, which is their whole cost, and blend each channel independently.
        attrs = raster.interpolate(jnp.concatenate([surf["normals"], mesh.vertices], -1), rast, mesh.faces, clip)
        n = raster.safe_normalize(attrs[..., :3])
        albedo = self.albedo(params, attrs[..., 3:].reshape(-1, 3), cover.reshape(-1) > 0).reshape(height, width, 3)
        white = jnp.asarray(WHITE, jnp.float32)
        maps = jnp.concatenate([white + (albedo - white) * cover, (n + 1.0) * 0.5 * cover, cover], -1)
        budget = int(self.geo.antialias_budget) or raster.default_antialias_budget(height, width)
        maps, aa_overflow = raster.antialias_sparse(maps, rast, clip, mesh.faces, surf["topology"], max_pairs=budget)
        return {"rgb": maps[..., :3], "normal": maps[..., 3:6], "opacity": maps[..., 6], "depth": rast.depth,
                "overflow": (rast.overflow_pairs + rast.overflow_tiles + aa_overflow).astype(jnp.float32)}

    # ------------------------------------------------------------------ steps

    def step_key(self, step: int):
        kind = RGB if step % int(self.geo.n_rgb) == 0 else NORMAL
        return kind, resolution_at(self.cfg, step)

    def step_inputs(self, key) -> tuple:
        _, hw = key
        return (self.targets[hw], self.device_grid), (self.prior_params if self.priors is not None else {})

    def view_batches(self, state: TrainState):
        """(ref, random) view batches: both every step (mode accumulate)."""
        return views.view_batches(self.cfg, self.mesh, state, True, True)

    def render_loss(self, params, batch, shared, kind: str, height: int, width: int):
        (targets, grid), step, box = shared
        ref_views, rand_views = batch
        g, w = self.geo, self.cfg.loss
        surf = self.surface(params, box, grid)
        mesh = surf["mesh"]
        nc = normal_consistency(surf["normals"], mesh.faces, mesh.face_valid)
        total = 2.0 * schedule_value(w.lambda_normal_consistency, step) * nc
        metrics = {"normal_consistency": nc, "n_faces": mesh.n_faces.astype(jnp.float32),
                   "n_vertices": mesh.n_vertices.astype(jnp.float32),
                   "mesh_overflow": mesh.overflow.astype(jnp.float32)}

        def ref_one(camera):
            out = self.render_view(params, surf, camera, height, width, float(g.near_ref), float(g.far_ref))
            terms = {}
            if kind == RGB:
                terms["rgb"] = losses.rgb_mse(out["rgb"], targets.rgb, targets.mask, WHITE)
                terms["mask"] = losses.mask_mse(out["opacity"], targets.mask)
            target = targets.rgb * targets.mask[..., None] + (1.0 - targets.mask[..., None])
            return terms, {"psnr": losses.psnr(out["rgb"], target), "raster_overflow": out["overflow"]}

        terms, stats = jax.lax.map(ref_one, ref_views[0])
        ref_loss = sum(schedule_value(w[f"lambda_{k}"], step) * jnp.mean(v) for k, v in terms.items())
        total = total + ref_loss
        metrics.update({"ref/loss": ref_loss, **{f"ref/{k}": jnp.mean(v) for k, v in {**terms, **stats}.items()}})

        images = None
        if self.priors is not None:
            def rand_one(camera):
                out = self.render_view(params, surf, camera, height, width, float(g.near_random),
                                       float(g.far_random))
                return out["rgb"], out["normal"], out["opacity"], out["overflow"]

            rgbs, normals, opacity, overflow = jax.lax.map(rand_one, rand_views[0])
            images = {}
            for name, prior in self.priors.priors.items():
                src = normals if (name == "sd" and kind == NORMAL) else rgbs
                images[name] = resize_to_model(src, prior.resolution)
            metrics.update({"random/opacity_mean": jnp.mean(opacity), "random/raster_overflow": jnp.mean(overflow)})
        metrics["random/loss"] = jnp.zeros((), jnp.float32)
        return total, metrics, images

    def step_def(self, kind: str, height: int, width: int) -> StepDef:
        uses_priors = self.priors is not None

        def prepare(state: TrainState, data):
            guide = None
            if uses_priors:
                guide = {"step": state.step, "schedules": views.guidance_schedules(self.priors, self.cfg, state.step)}
            return state.extras, self.view_batches(state), (data, state.step, state.extras["box"]), guide

        def render(params, batch, shared):
            return self.render_loss(params, batch, shared, kind, height, width)

        def guidance(prior_params, images, rand_views, guide):
            g_terms, metrics = views.prior_terms(self.priors, prior_params, images, rand_views, guide["step"],
                                                 guide["schedules"]["priors"])
            return sum(guide["schedules"]["weights"][name] * value for name, value in g_terms.items()), metrics

        def summary(state: TrainState, extras):
            del state
            return {"box_extent": jnp.max(extras["box"][1] - extras["box"][0])}

        return self.reference_and_random_step_def(prepare, render, guidance if uses_priors else None, summary)

    def param_shapes(self):
        n = self.grid.vertices.shape[0]
        texture = jax.eval_shape(lambda: neus.init_field(jax.random.PRNGKey(0), self.neus_spec))
        return {"sdf": jax.ShapeDtypeStruct((n,), jnp.float32),
                "deformation": jax.ShapeDtypeStruct((n, 3), jnp.float32),
                "encoding": texture["encoding"], "feature_net": texture["feature_net"]}

    def timing_split(self, state: TrainState, compiled_steps: dict | None = None, repeats: int = 5) -> dict:
        """ms of one normal-kind step (3 of every 4) at the last resolution split into render / guidance / update
        (:func:`stages.timing.split_step_ms`)."""
        hw = resolution_at(self.cfg, self.max_steps)
        return {"kind": NORMAL, "height": hw[0], "width": hw[1],
                **timing.split_step_ms(self, state, (NORMAL, hw), compiled_steps, repeats)}

    # ------------------------------------------------------------------ evaluation and outputs

    def eval_inputs(self, state: TrainState) -> dict:
        """{"params", "surface"}: the mesh is extracted once per state, not once per rendered view."""
        return {"params": state.params,
                "surface": self.surface_fn(state.params, state.extras["box"], self.device_grid)}

    def eval_render(self, height: int, width: int):
        """jit (eval_inputs(state), camera) -> {rgb, normal, depth, opacity} at (height, width), replicated."""
        near, far = float(self.geo.near_random), float(self.geo.far_random)

        def render(inputs: dict, camera):
            out = self.render_view(inputs["params"], inputs["surface"], camera, height, width, near, far)
            return {k: out[k] for k in ("rgb", "normal", "depth", "opacity")}

        return jax.jit(render)

    def eval_cameras(self) -> dict:
        c = self.cfg.camera
        return {"reference": cam.reference_camera(c), "side": cam.make_camera(15.0, 90.0, c.distance, c.fovy_deg)}

    def eval_metrics(self, name: str, images: dict) -> dict:
        if name != "reference" or self.references is None:
            return {}
        ref = self.references["eval"]
        target = ref.rgb * ref.mask[..., None] + (1.0 - ref.mask[..., None])
        return {"eval/ref_psnr": float(losses.psnr(images["rgb"], target))}

    def reference_images(self) -> dict | None:
        if self.references is None:
            return None
        ref = self.references["eval"]
        return {"rgb": ref.rgb * ref.mask[..., None] + (1 - ref.mask[..., None]), "opacity": ref.mask}

    video_panels = ("rgb", "normal")

    def export_mesh(self, state: TrainState) -> dict:
        """The stage's mesh on the host: {"vertices" (n, 3), "faces" (m, 3), "albedo" (n, 3), "normals" (n, 3),
        "overflow": bool}, components below ``geometry.min_component_fraction`` of the largest removed."""
        surf = self.surface_fn(state.params, state.extras["box"], self.device_grid)
        vertices, faces = dmtet.compact_mesh(jax.device_get(surf["mesh"]))
        vertices, faces = dmtet.remove_small_components(vertices, faces, float(self.geo.min_component_fraction))
        normals = np.asarray(raster.vertex_normals(jnp.asarray(vertices), jnp.asarray(faces)))
        valid = jnp.ones((len(vertices),), bool)
        albedo = np.asarray(jax.jit(self.albedo)(state.params, jnp.asarray(vertices, jnp.float32), valid))
        return {"vertices": vertices, "faces": faces, "albedo": albedo, "normals": normals,
                "overflow": bool(surf["mesh"].overflow)}

    def finish(self, state: TrainState, folder: Path) -> dict:
        """Write the mesh (GLB + OBJ with per-vertex albedo and normals) to ``folder/mesh/`` (process 0)."""
        from dreamcraft_jax.export.mesh import write_mesh
        from dreamcraft_jax.run_folder import is_writer

        out = self.export_mesh(state)
        if out["overflow"]:
            log.warning("geometry: the surface exceeded geometry.max_faces / max_vertices; the exported mesh lacks "
                        "the faces past the budget: raise the budgets")
        if not is_writer():
            return None
        return write_mesh(folder / "mesh" / "model", out["vertices"], out["faces"], out["albedo"], out["normals"])


@register("geometry")
def build(cfg, mesh, priors=None, prior_params=None) -> GeometryStage:
    kernels = KernelSpec.from_config(cfg.kernels)
    neus_spec = neus.NeusFieldSpec.from_config(cfg, kernels)
    cache = cfg.geometry.tet_cache_dir or default_tet_cache()
    grid = dmtet.load_tet_grid(int(cfg.geometry.tet_resolution), cache)
    references = load_references(cfg)
    targets = stage_targets(cfg, references, mesh)
    stage_priors = priors.configured(cfg) if priors is not None and priors.priors else None
    specs, placed = None, {}
    if stage_priors is not None and prior_params is not None:
        placed, specs = parallel.place(prior_params, "priors", mesh, parallel.rules_from_config(cfg.parallel),
                                       int(cfg.parallel.fsdp_min_size))
    return GeometryStage(name="geometry", cfg=cfg, texture=neus_spec.base, neus_spec=neus_spec, grid=grid,
                         mesh=mesh, priors=stage_priors, prior_specs=specs, prior_params=placed,
                         references=references, targets=targets, device_grid=parallel.replicate(grid, mesh),
                         zbuffer="pallas" if kernels.backend == "pallas" and kernels.raster_zbuffer else "xla")
