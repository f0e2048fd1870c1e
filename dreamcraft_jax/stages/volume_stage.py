"""The volume-rendered stages (1a coarse NeRF, 1b coarse NeuS): one :class:`VolumeStage`, two fields.

The stage is the same for both; what differs is the field, a :class:`FieldModel` (``stages/coarse_nerf.py``,
``stages/coarse_neus.py``): its spec, params, optimiser, closures for the renderer and extra loss terms.

Data path of one step (built by :func:`dreamcraft_jax.train_step.build_step`):
  step_key = fold_in(rng, step)
  grid     = occupancy-grid update (every N steps, replicated)
  views    = reference cameras (one fixed ray offset per resolution) and/or random cameras, split along the view axes
  per device: render its views, losses; the random views' renders, resized to each prior's input size, scored
              by the priors (``lambda_sd``: the 2D prior, ``lambda_3d_sd``: Zero123) as one batch per device
  grads and metrics pmean'd; Adam (skipped, and counted, when the loss or a gradient is not finite)

Which views a step renders depends on ``train.mode``: ``alternate`` (official) renders the reference view on even
steps and random views on odd steps; ``accumulate`` both every step; ``reference_only`` only the reference view.
A step's key is (kind, (height, width)); each key compiles once. Random views are rendered one at a time
(``lax.map``, bounded memory). The frozen prior params enter the step as an argument, replicated or FSDP-split
along ``fsdp`` and all-gathered just before use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamcraft_jax import cameras as cam
from dreamcraft_jax import losses, parallel
from dreamcraft_jax.config import resolution_at, schedule_is_zero, schedule_value
from dreamcraft_jax.data.reference import reference_from_config
from dreamcraft_jax.render import volume
from dreamcraft_jax.stages import timing, views
from dreamcraft_jax.stages.base import StepDefStage
from dreamcraft_jax.train_step import (
    StepDef,
    TrainState,
    build_grads,
    init_train_state,
)

REF = "ref"
RANDOM = "random"
BOTH = "both"


@flax.struct.dataclass
class Targets:
    """Reference-view supervision at one resolution: rgb (H, W, 3), mask (H, W), depth (H, W) (zeros if none,
    larger = farther), ray_offset (2, 3): the fixed jitter of the reference rays' origins and directions
    (:func:`dreamcraft_jax.cameras.get_rays`)."""

    rgb: jax.Array
    mask: jax.Array
    depth: jax.Array
    ray_offset: jax.Array


def targets_from_reference(ref, soft_mask: bool = False, ray_offset=None) -> Targets:
    """Targets of a :class:`~dreamcraft_jax.data.reference.ReferenceImage`. The mask is binarised at 0.5 as the
    official code does (``rgba[..., 3:] > 0.5`` in ``threestudio/data/image.py``), for the rgb compositing, the
    mask loss and the depth selection alike, unless ``soft_mask``. ``ray_offset`` (2, 3): zeros if None."""
    depth = ref.depth if ref.depth is not None else np.zeros_like(ref.mask)
    mask = ref.mask if soft_mask else (ref.mask > 0.5).astype(np.float32)
    offset = np.zeros((2, 3), np.float32) if ray_offset is None else ray_offset
    return Targets(rgb=jnp.asarray(ref.rgb), mask=jnp.asarray(mask), depth=jnp.asarray(depth),
                   ray_offset=jnp.asarray(offset, jnp.float32))


def stage_targets(cfg, references: dict, mesh) -> dict:
    """{(h, w): Targets} replicated on ``mesh``, one per training resolution. Each resolution's reference rays
    get their own fixed offset, drawn from the seed (the official code redraws it when the rays are set: at
    setup and at each resolution change)."""
    out = {}
    phases = sorted(hw for hw in references if hw != "eval")
    for i, hw in enumerate(phases):
        offset = cam.ray_offset(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1 << 20 | i), cfg.camera.ray_jitter)
        out[hw] = parallel.replicate(targets_from_reference(references[hw], bool(cfg.data.soft_mask), offset), mesh)
    return out


def load_references(cfg) -> dict:
    """{(h, w): ReferenceImage} at every training resolution of the stage, and "eval" at the eval resolution."""
    phases = sorted({resolution_at(cfg, s) for s in [0, *cfg.data.resolution_milestones]})
    refs = {hw: reference_from_config(cfg, *hw) for hw in phases}
    refs["eval"] = reference_from_config(cfg, cfg.eval.height, cfg.eval.width)
    return refs


def step_kind(mode: str, step: int) -> str:
    """Which views step ``step`` renders (host-side)."""
    if mode == "reference_only":
        return REF
    if mode == "accumulate":
        return BOTH
    return REF if step % 2 == 0 else RANDOM


class FieldModel(Protocol):
    """The field of a volume stage (static; functions of explicit params)."""

    spec: Any  # the field's static spec (nerf.NerfFieldSpec / neus.NeusFieldSpec)

    def optimizer(self, cfg) -> optax.GradientTransformation: ...

    def init_params(self, key, previous: TrainState | None): ...

    def level_mask(self, step) -> jax.Array: ...

    def field_fns(self, params, mask, step, render: volume.RenderSpec) -> volume.FieldFns: ...

    def extra_terms(self, cfg, out: dict, is_ref: bool) -> dict: ...


@dataclasses.dataclass(frozen=True)
class VolumeStage(StepDefStage):
    """A volume-rendered stage, built once from its config; its methods build pure jitted functions."""

    name: str
    cfg: Any  # the stage's resolved ml_collections ConfigDict (read at trace time only)
    field: FieldModel
    render: volume.RenderSpec
    mesh: Any
    priors: Any = None  # guidance.priors.Priors configured for this stage, or None (no guidance terms)
    prior_specs: Any = None  # PartitionSpec tree of the prior params (replicated / FSDP)
    prior_params: Any = None  # the placed prior params ({} without priors)
    references: Any = None  # {(h, w): ReferenceImage, "eval": ReferenceImage} (host arrays)
    targets: Any = None  # {(h, w): Targets} replicated on the mesh

    # ------------------------------------------------------------------ state

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return self.field.optimizer(self.cfg)

    def init_state(self, previous: TrainState | None = None, seed: int | None = None) -> TrainState:
        seed = self.cfg.seed if seed is None else seed
        k_params, k_run = jax.random.split(jax.random.PRNGKey(seed))
        params = self.field.init_params(k_params, previous)
        if previous is not None:
            # Carried-over leaves would alias ``previous``'s buffers, which the first (donating) step deletes.
            params = jax.tree.map(jnp.copy, params)
        return init_train_state(params, self.optimizer, {"grid": self.initial_grid(previous)}, k_run,
                                self.mesh, parallel.rules_from_config(self.cfg.parallel),
                                int(self.cfg.parallel.fsdp_min_size))

    def initial_grid(self, previous: TrainState | None) -> volume.OccupancyGrid:
        """The previous volume stage's occupancy grid (EMA occupancies and binary mask) when it has one of this
        stage's size, as the official 1b loads 1a's ``estimator.occs`` / ``binaries`` and then keeps updating
        it with max(decay * occ, alpha); otherwise a fresh, fully occupied grid."""
        fresh = volume.init_occupancy_grid(self.render)
        grid = None if previous is None else previous.extras.get("grid")
        if grid is None or grid.occs.shape != fresh.occs.shape:
            return fresh
        return volume.OccupancyGrid(occs=jnp.array(grid.occs, jnp.float32), binary=jnp.array(grid.binary, bool))

    def level_mask(self, step):
        return self.field.level_mask(step)

    def field_fns(self, params, mask, step=None) -> volume.FieldFns:
        return self.field.field_fns(params, mask, step, self.render)

    # ------------------------------------------------------------------ steps

    def step_key(self, step: int):
        return step_kind(self.cfg.train.mode, step), resolution_at(self.cfg, step)

    @property
    def has_depth(self) -> bool:
        """Whether the reference comes with a depth map (``data.depth``), i.e. whether depth_rel applies."""
        return self.references is not None and self.references["eval"].depth is not None

    def uses_priors(self, kind: str) -> bool:
        return self.priors is not None and kind in (RANDOM, BOTH)

    def step_inputs(self, key) -> tuple:
        kind, hw = key
        return self.targets[hw], (self.prior_params if self.uses_priors(kind) else {})

    def step_def(self, kind: str, height: int, width: int) -> StepDef:
        """The step of one kind at one resolution as pure functions (:class:`train_step.StepDef`)."""
        uses_priors = self.uses_priors(kind)
        separate = bool(self.cfg.train.separate_guidance)

        def prepare(state: TrainState, targets: Targets):
            grid = self.update_grid(state)
            guide = None
            if uses_priors:
                # Separate programs take the schedules as inputs (one guidance program for every stage); in one
                # program they are constants of the trace.
                guide = {"step": state.step, "schedules": self.guidance_schedules(state.step) if separate else None}
            return {"grid": grid}, self.view_batches(state, kind), (grid, state.step, targets), guide

        def render(params, batch, shared):
            grid, step, targets = shared
            total, metrics, rgbs = self.render_loss(params, grid, *batch, step, targets, height, width)
            # Pre-resized to each prior's input size: inputs of one shape at every resolution, so the priors are
            # traced once per stage (Priors._traced_once).
            images = self.priors.resized(rgbs) if uses_priors else None
            return total, metrics, images

        def guidance(prior_params, images, rand_views, guide):
            return self.guidance_loss(prior_params, images, rand_views, guide["step"], guide["schedules"])

        def summary(state: TrainState, extras):
            return {"active_levels": jnp.sum(self.level_mask(state.step)),
                    "grid_occupancy": jnp.mean(extras["grid"].binary.astype(jnp.float32))}

        return self.reference_and_random_step_def(prepare, render, guidance if uses_priors else None, summary)

    def param_shapes(self):
        return jax.eval_shape(lambda: self.field.init_params(jax.random.PRNGKey(0), None))

    def grads_fn(self, key):
        """jit (state, targets, prior_params) -> (grads, metrics): the sharded gradient of step ``key`` alone."""
        kind, (height, width) = key
        return build_grads(self.step_def(kind, height, width), self.mesh)

    def update_grid(self, state: TrainState) -> volume.OccupancyGrid:
        mask = self.level_mask(state.step)
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)
        return volume.update_occupancy_grid(state.extras["grid"], key, state.step,
                                            self.field_fns(state.params, mask, state.step).density, self.render)

    def view_batches(self, state: TrainState, kind: str):
        """Global view batches (ref, random) for this step: cameras + per-view keys, or None."""
        return views.view_batches(self.cfg, self.mesh, state, kind in (REF, BOTH), kind in (RANDOM, BOTH))

    # ------------------------------------------------------------------ losses

    def _needs(self) -> tuple[bool, bool]:
        """(need_normals, need_normal_perturb), decided at trace time from the loss weights."""
        loss = self.cfg.loss
        normals = any(not schedule_is_zero(loss[k]) for k in
                      ("lambda_normal_smooth", "lambda_3d_normal_smooth", "lambda_orient"))
        normals = normals or self.cfg.render.shading != "albedo"
        return normals, not schedule_is_zero(loss.lambda_3d_normal_smooth)

    def view_terms(self, params, grid, camera, key, step, targets: Targets, is_ref: bool, height: int, width: int):
        """Render one view: ({loss name: unweighted value}, {stat: value}, rgb (H, W, 3))."""
        k_render, k_light = jax.random.split(key)
        if is_ref:
            camera = camera.replace(ray_offset=targets.ray_offset)
        rays_o, rays_d = cam.get_rays(camera, height, width)
        need_normals, need_perturb = self._needs()
        mask = self.level_mask(step)
        light = cam.light_directions(k_light, camera) if self.cfg.render.shading != "albedo" else None
        out = volume.render_rays(rays_o.reshape(-1, 3), rays_d.reshape(-1, 3), grid, k_render,
                                 self.field_fns(params, mask, step), self.render, need_normals=need_normals,
                                 need_normal_perturb=need_perturb, shading=self.cfg.render.shading,
                                 light_pos=light)
        rgb = out["rgb"].reshape(height, width, 3)
        opacity = out["opacity"].reshape(height, width)
        w = self.cfg.loss
        terms = {}
        if is_ref:
            terms["rgb"] = losses.rgb_mse(rgb, targets.rgb, targets.mask, self.render.background)
            terms["mask"] = losses.mask_mse(opacity, targets.mask)
            if self.has_depth and not schedule_is_zero(w.lambda_depth_rel):
                terms["depth_rel"] = losses.depth_pearson(out["depth"].reshape(height, width), targets.depth,
                                                          targets.mask)
        if not schedule_is_zero(w.lambda_normal_smooth):
            terms["normal_smooth"] = losses.normal_smooth_2d(out["normal"].reshape(height, width, 3))
        if need_perturb:
            terms["3d_normal_smooth"] = losses.normal_smooth_3d(out["sample_normal"], out["sample_normal_perturb"],
                                                                out["valid"])
        if not schedule_is_zero(w.lambda_orient):
            terms["orient"] = losses.orientation(out["weights"], out["sample_normal"], out["dirs"], out["valid"],
                                                 out["opacity"])
        if not is_ref and not schedule_is_zero(w.lambda_sparsity):
            terms["sparsity"] = losses.sparsity(opacity)
        if not schedule_is_zero(w.lambda_opaque):
            terms["opaque"] = losses.opaque_entropy(opacity)
        terms.update(self.field.extra_terms(self.cfg, out, is_ref))
        n_rays = height * width
        stats = {"samples_per_ray": out["n_samples"] / n_rays,
                 "candidates_per_ray": out["n_candidates"] / n_rays,
                 "overflow": out["overflow"].astype(jnp.float32),
                 "opacity_mean": jnp.mean(opacity)}
        if is_ref:
            target = targets.rgb * targets.mask[..., None] + jnp.asarray(self.render.background) * (
                1.0 - targets.mask[..., None])
            stats["psnr"] = losses.psnr(rgb, target)
        return terms, stats, rgb

    def weighted_total(self, terms: dict, step) -> jax.Array:
        return sum(schedule_value(self.cfg.loss[f"lambda_{name}"], step) * value for name, value in terms.items())

    def render_loss(self, params, grid, ref_views, rand_views, step, targets, height, width):
        """This device's loss without the priors: (loss, metrics, random-view renders (V, H, W, 3) or None).
        Reference and random parts are each averaged over their views, then added."""
        total = 0.0
        metrics, rand_rgbs = {}, None
        for is_ref, batch, prefix in ((True, ref_views, "ref"), (False, rand_views, "random")):
            if batch is None:
                continue
            cams, keys = batch

            def one(args, is_ref=is_ref):
                camera, key = args
                terms, stats, rgb = self.view_terms(params, grid, camera, key, step, targets, is_ref, height, width)
                return self.weighted_total(terms, step), terms, stats, rgb

            if self.cfg.train.get("remat_views", False):
                one = jax.checkpoint(one)
            loss, terms, stats, rgbs = jax.lax.map(one, (cams, keys))
            view_loss = jnp.mean(loss)
            if not is_ref:
                rand_rgbs = rgbs
            total = total + view_loss
            metrics[f"{prefix}/loss"] = view_loss
            metrics.update({f"{prefix}/{k}": jnp.mean(v) for k, v in terms.items()})
            metrics.update({f"{prefix}/{k}": jnp.mean(v) for k, v in stats.items()})
        return total, metrics, rand_rgbs

    def guidance_schedules(self, step) -> dict:
        """:func:`dreamcraft_jax.stages.views.guidance_schedules` of this stage's priors and loss weights."""
        return views.guidance_schedules(self.priors, self.cfg, step)

    def guidance_loss(self, prior_params, images, rand_views, step, schedules: dict | None = None):
        """(weighted prior loss, metrics) of this device's random views (:func:`views.prior_terms`). ``images``:
        per prior the renders resized to its input size (:meth:`Priors.resized`). ``schedules``:
        :meth:`guidance_schedules` (then no number of this stage's config is a constant of the trace), or None to
        read the config."""
        g_terms, metrics = views.prior_terms(self.priors, prior_params, images, rand_views, step,
                                             None if schedules is None else schedules["priors"])
        if schedules is None:
            return self.weighted_total(g_terms, step), metrics
        return sum(schedules["weights"][name] * value for name, value in g_terms.items()), metrics

    # ------------------------------------------------------------------ evaluation

    def eval_render(self, height: int, width: int, chunk_rays: int | None = None,
                    samples_per_ray: float | None = None):
        """jit (state, camera) -> {rgb (H,W,3), normal (H,W,3), depth (H,W), opacity (H,W)}.

        Deterministic (no jitter, no stratification). Rays go in chunks of ``chunk_rays`` (default
        ``eval.chunk_rays``) so memory is bounded at any resolution, and the chunks are split over the view axes
        so every device renders its share; the images come back replicated. Sample budget per ray:
        ``samples_per_ray`` (default ``render.eval_samples_per_ray``), with max(training candidates, 2 x that)
        candidates.
        """
        chunk_rays = int(self.cfg.eval.chunk_rays) if chunk_rays is None else int(chunk_rays)
        budget = float(self.cfg.render.eval_samples_per_ray if samples_per_ray is None else samples_per_ray)
        spec = self.render.replace(stratified=False, samples_per_ray=budget,
                                   candidate_samples_per_ray=max(self.cfg.render.candidate_samples_per_ray,
                                                                 2 * budget))
        n_dev = parallel.view_shards(self.mesh)
        n_rays = height * width
        chunk = min(chunk_rays, -(-n_rays // n_dev))
        n_chunks = -(-n_rays // (chunk * n_dev)) * n_dev

        def render_chunks(params, grid, rays_o, rays_d, step):
            fns = self.field_fns(params, self.level_mask(step), step)

            def one(args):
                o, d = args
                out = volume.render_rays(o, d, grid, None, fns, spec, need_normals=True)
                return {k: out[k] for k in ("rgb", "normal", "depth", "opacity")}

            return jax.lax.map(one, (rays_o, rays_d))

        sharded = parallel.shard_map(
            render_chunks, self.mesh,
            in_specs=(parallel.REPLICATED, parallel.REPLICATED, parallel.VIEWS, parallel.VIEWS, parallel.REPLICATED),
            out_specs=parallel.VIEWS)

        def render(state: TrainState, camera):
            rays_o, rays_d = cam.get_rays(camera, height, width)
            pad = n_chunks * chunk - n_rays
            rays_o = jnp.pad(rays_o.reshape(-1, 3), ((0, pad), (0, 0)))
            rays_d = jnp.pad(rays_d.reshape(-1, 3), ((0, pad), (0, 0)), constant_values=1.0)
            rays_d = rays_d / jnp.linalg.norm(rays_d, axis=-1, keepdims=True)
            outs = sharded(state.params, state.extras["grid"], rays_o.reshape(n_chunks, chunk, 3),
                           rays_d.reshape(n_chunks, chunk, 3), state.step)
            images = {k: v.reshape((n_chunks * chunk,) + v.shape[2:])[:n_rays].reshape((height, width) + v.shape[2:])
                      for k, v in outs.items()}
            return jax.lax.with_sharding_constraint(images, parallel.replicated(self.mesh))

        return jax.jit(render)

    def eval_cameras(self) -> dict:
        """The reference view, with the ray offset of the last training resolution (the rays its losses fit, so
        its PSNR measures the fit, not the offset: a 1-pixel shift alone costs ~20 dB on a sharp image), and a
        side view."""
        c = self.cfg.camera
        reference = cam.reference_camera(c)
        if self.targets:
            reference = reference.replace(ray_offset=self.targets[resolution_at(self.cfg, self.max_steps)].ray_offset)
        return {"reference": reference, "side": cam.make_camera(15.0, 90.0, c.distance, c.fovy_deg)}

    def _eval_target(self):
        ref = self.references["eval"]
        return ref.rgb * ref.mask[..., None] + np.asarray(self.cfg.render.background) * (1.0 - ref.mask[..., None])

    def eval_metrics(self, name: str, images: dict) -> dict:
        if name != "reference" or self.references is None:
            return {}
        return {"eval/ref_psnr": float(losses.psnr(images["rgb"], self._eval_target()))}

    def reference_images(self) -> dict | None:
        if self.references is None:
            return None
        ref = self.references["eval"]
        return {"rgb": ref.rgb * ref.mask[..., None] + (1 - ref.mask[..., None]), "opacity": ref.mask}

    # ------------------------------------------------------------------ timing

    def timing_split(self, state: TrainState, compiled_steps: dict | None = None, repeats: int = 5) -> dict:
        """ms of one random-view step (reference step in ``reference_only`` mode) at the last resolution, split
        into render (fwd+bwd of the renderer and the per-view losses), guidance (the priors' share) and update
        (grid update + Adam), medians of ``repeats``: update = the update alone on zero gradients; render = the
        step without priors - update; guidance = the full step - the step without priors. ``compiled_steps``: the
        caller's compiled steps by key; the timed key's is reused instead of compiling it again."""
        kind = RANDOM if self.cfg.train.mode != "reference_only" else REF
        hw = resolution_at(self.cfg, self.max_steps)
        return {"kind": kind, "height": hw[0], "width": hw[1],
                **timing.split_step_ms(self, state, (kind, hw), compiled_steps, repeats)}


def build_volume_stage(name: str, field: FieldModel, cfg, mesh, priors=None, prior_params=None,
                       kernels=None) -> VolumeStage:
    """A volume stage with ``field``: loads the reference views (every training resolution and the eval one),
    places the targets and the prior params (by the config's sharding rules, ``parallel.rules``)."""
    references = load_references(cfg)
    targets = stage_targets(cfg, references, mesh)
    stage_priors = priors.configured(cfg) if priors is not None and priors.priors else None
    specs, placed = None, {}
    if stage_priors is not None and prior_params is not None:
        placed, specs = parallel.place(prior_params, "priors", mesh, parallel.rules_from_config(cfg.parallel),
                                       int(cfg.parallel.fsdp_min_size))
    render = volume.RenderSpec.from_config(cfg.render, field.spec.radius, kernels)
    return VolumeStage(name=name, cfg=cfg, field=field, render=render, mesh=mesh, priors=stage_priors,
                       prior_specs=specs, prior_params=placed, references=references, targets=targets)
