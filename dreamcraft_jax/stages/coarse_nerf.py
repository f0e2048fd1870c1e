"""Stage 1a, coarse NeRF: state, losses, one jitted sharded step, evaluation renders.

Data path of one step (see DESIGN.md):
  step_key = fold_in(rng, step)
  grid     = occupancy-grid update (every N steps, replicated)
  views    = reference cameras (ray jitter per view) and/or random cameras, split along mesh axis ``data``
  per device: render its views, losses, grads; grads and metrics pmean'd over ``data``
  Adam update (skipped, and counted, when the loss or a gradient is not finite)

Which views a step renders depends on ``train.mode``: ``alternate`` (official) renders the reference view on even
steps and random views on odd steps; ``accumulate`` both every step; ``reference_only`` only the reference view.
The Python loop picks the step *kind* from the step number, and each (kind, resolution) compiles once.
Random views are rendered one at a time (``lax.map``, bounded memory) and then scored by the diffusion priors
(:mod:`dreamcraft_jax.guidance.priors`) as one batch per device (``lambda_sd``: the 2D prior, ``lambda_3d_sd``:
Zero123). The frozen prior params enter the step as an argument, replicated or FSDP-split along ``fsdp`` and
all-gathered just before use.

:class:`CoarseNerf` is written so that the NeuS stage (:mod:`dreamcraft_jax.stages.coarse_neus`) only swaps the
field (params, field closures, optimiser, extra per-view terms).
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamcraft_jax import cameras as cam
from dreamcraft_jax import kernels, losses, parallel
from dreamcraft_jax.config import schedule_is_zero, schedule_value
from dreamcraft_jax.fields import nerf
from dreamcraft_jax.render import volume

REF = "ref"
RANDOM = "random"
BOTH = "both"


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue identically: one pytree, saved whole by orbax."""

    params: Any
    opt_state: Any
    grid: volume.OccupancyGrid
    step: jax.Array  # () int32
    rng: jax.Array  # (2,) uint32 raw PRNG key; per-step keys are fold_in(rng, step)
    nonfinite_skips: jax.Array  # () int32, updates skipped because of NaN / Inf


@flax.struct.dataclass
class Targets:
    """Reference-view supervision at one resolution: rgb (H, W, 3), mask (H, W), depth (H, W) (zeros if none)."""

    rgb: jax.Array
    mask: jax.Array
    depth: jax.Array


def targets_from_reference(ref) -> Targets:
    depth = ref.depth if ref.depth is not None else np.zeros_like(ref.mask)
    return Targets(rgb=jnp.asarray(ref.rgb), mask=jnp.asarray(ref.mask), depth=jnp.asarray(depth))


def step_kind(mode: str, step: int) -> str:
    """Which views step ``step`` renders (host-side)."""
    if mode == "reference_only":
        return REF
    if mode == "accumulate":
        return BOTH
    return REF if step % 2 == 0 else RANDOM


@dataclasses.dataclass(frozen=True)
class CoarseNerf:
    """Static description of the stage built once from the config; its methods build pure jitted functions."""

    cfg: Any  # the ml_collections ConfigDict (read at trace time only)
    field: Any  # nerf.NerfFieldSpec (NeuS: neus.NeusFieldSpec)
    render: volume.RenderSpec
    mesh: Any
    priors: Any = None  # guidance.priors.Priors or None (no guidance terms)
    prior_specs: Any = None  # PartitionSpec tree of the prior params (replicated / FSDP)

    name = "coarse_nerf"

    @classmethod
    def from_config(cls, cfg, mesh, priors=None, prior_params=None) -> CoarseNerf:
        """``priors``/``prior_params`` from :func:`dreamcraft_jax.guidance.priors.load_priors` (or None)."""
        backend = kernels.resolve_backend(cfg.kernels.backend)
        field = cls.field_spec(cfg, backend)
        min_size = int(cfg.parallel.fsdp_min_size)
        specs = parallel.fsdp_specs(prior_params, mesh, min_size) if prior_params is not None else None
        return cls(cfg=cfg, field=field, render=volume.RenderSpec.from_config(cfg.render, field.radius, backend),
                   mesh=mesh,
                   priors=priors if priors is not None and priors.priors else None, prior_specs=specs)

    @staticmethod
    def field_spec(cfg, backend: str = "xla"):
        return nerf.NerfFieldSpec.from_config(cfg.field, backend, cfg.kernels.hashgrid_backward,
                                              cfg.kernels.fused_density, cfg.kernels.fused_finite_difference,
                                              cfg.kernels.fused_mlp, cfg.kernels.encoder_per_level,
                                              cfg.kernels.fused_mlp_precision, cfg.kernels.fd_columns)

    def place_prior_params(self, prior_params):
        """Put the prior params on the mesh: FSDP-split where ``parallel.fsdp`` > 1, else replicated."""
        if prior_params is None or self.priors is None:
            return {}
        return jax.device_put(prior_params, parallel.param_shardings(prior_params, self.mesh,
                                                                     int(self.cfg.parallel.fsdp_min_size)))

    # ------------------------------------------------------------------ state

    @property
    def optimizer(self) -> optax.GradientTransformation:
        o = self.cfg.optimizer
        return optax.adam(o.lr, b1=o.b1, b2=o.b2, eps=o.eps)

    def init_params(self, key, previous=None):
        """Fresh field params (``previous``: the state of the stage before, unused here)."""
        del previous
        return nerf.init_field(key, self.field)

    def init_grid(self, previous=None) -> volume.OccupancyGrid:
        del previous
        return volume.init_occupancy_grid(self.render)

    def init_state(self, seed: int | None = None, previous: TrainState | None = None) -> TrainState:
        seed = self.cfg.seed if seed is None else seed
        key = jax.random.PRNGKey(seed)
        k_params, k_run = jax.random.split(key)
        params = self.init_params(k_params, previous)
        if previous is not None:
            # Carried-over leaves would alias ``previous``'s buffers, which the first (donating) step deletes.
            params = jax.tree.map(jnp.copy, params)
        state = TrainState(params=params, opt_state=self.optimizer.init(params), grid=self.init_grid(previous),
                           step=jnp.zeros((), jnp.int32), rng=k_run, nonfinite_skips=jnp.zeros((), jnp.int32))
        return parallel.replicate(state, self.mesh)

    # ------------------------------------------------------------------ field as closures

    def level_mask(self, step):
        return nerf.level_mask(step, self.field)

    def field_fns(self, params, mask, step=None) -> volume.FieldFns:
        del step
        spec = self.field
        return volume.FieldFns(
            density=lambda x, valid=None: nerf.density_no_grad(params, x, spec, mask, valid),
            radiance=lambda x, valid=None: nerf.density_and_albedo(params, x, spec, mask, valid),
            normal=lambda x, valid=None: nerf.normals(params, x, spec, mask, valid),
            radiance_normal=lambda x, valid=None: nerf.density_albedo_and_normals(params, x, spec, mask, valid),
        )

    def extra_terms(self, out: dict, is_ref: bool) -> dict:
        """Field-specific unweighted loss terms of one view (NeuS: eikonal)."""
        del out, is_ref
        return {}

    def _needs(self, kind: str) -> tuple[bool, bool]:
        """(need_normals, need_normal_perturb) for a step kind, decided at trace time from the loss weights."""
        loss = self.cfg.loss
        normals = any(not schedule_is_zero(loss[k]) for k in
                      ("lambda_normal_smooth", "lambda_3d_normal_smooth", "lambda_orient"))
        normals = normals or self.cfg.render.shading != "albedo"
        return normals, not schedule_is_zero(loss.lambda_3d_normal_smooth)

    # ------------------------------------------------------------------ losses of one view

    def view_terms(self, params, grid, camera, key, step, targets: Targets, is_ref: bool, height: int, width: int):
        """Render one view and return ({loss name: unweighted value}, {stat: value})."""
        k_rays, k_render, k_light = jax.random.split(key, 3)
        jitter = self.cfg.camera.ray_jitter if is_ref else 0.0
        rays_o, rays_d = cam.get_rays(camera, height, width, k_rays, jitter)
        need_normals, need_perturb = self._needs(REF if is_ref else RANDOM)
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
            if self.cfg.data.depth and not schedule_is_zero(w.lambda_depth_rel):
                terms["depth_rel"] = losses.depth_pearson(out["depth"].reshape(height, width), targets.depth,
                                                          targets.mask, self.cfg.data.depth_is_disparity)
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
        terms.update(self.extra_terms(out, is_ref))
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

    # ------------------------------------------------------------------ per-device loss and grads

    def _render_loss(self, params, grid, ref_views, rand_views, step, targets, height, width):
        """The per-device loss without the priors: (loss, metrics, random-view renders (V, H, W, 3) or None).

        Reference and random parts are each averaged over their views, then added.
        """
        total = 0.0
        metrics, rand_rgbs = {}, None
        for is_ref, views, prefix in ((True, ref_views, "ref"), (False, rand_views, "random")):
            if views is None:
                continue
            cams, keys = views

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
        """The step-dependent numbers of the priors' loss, evaluated at ``step`` (float32 scalars): each prior's
        :meth:`Priors.schedules_at` under "priors" and its loss weight lambda_<name> under "weights"."""
        return {"priors": self.priors.schedules_at(step),
                "weights": {name: jnp.asarray(schedule_value(self.cfg.loss[f"lambda_{name}"], step), jnp.float32)
                            for name in self.priors.priors}}

    def _guidance_loss(self, prior_params, images, rand_views, step, schedules: dict | None = None):
        """(weighted prior loss, metrics) of this device's random views, scored as one batch per prior; each
        prior's loss is already the mean over the batch. ``images``: the renders (V, H, W, 3), or per prior the
        renders resized to its input size (:meth:`Priors.resized`). ``schedules``: :meth:`guidance_schedules`
        (then no number of this stage's config is a constant of the trace), or None to read the config."""
        cams, keys = rand_views
        guide_keys = jax.vmap(lambda k: jax.random.fold_in(k, 7))(keys)
        g_terms, g_stats = self.priors.losses(prior_params, images, cams, guide_keys, step,
                                              None if schedules is None else schedules["priors"])
        metrics = {f"random/{k}": v for k, v in {**g_terms, **g_stats}.items()}
        if schedules is None:
            return self.weighted_total(g_terms, step), metrics
        return sum(schedules["weights"][name] * value for name, value in g_terms.items()), metrics

    def _local_loss(self, params, grid, ref_views, rand_views, step, targets, prior_params, kind, height, width):
        """Mean loss over this device's views (render terms, then the priors on the random views' renders)."""
        del kind
        total, metrics, rgbs = self._render_loss(params, grid, ref_views, rand_views, step, targets, height, width)
        if rgbs is not None and self.priors is not None:
            # Pre-resized to each prior's input size: inputs of one shape at every resolution, so the priors are
            # traced once per stage (Priors._traced_once).
            g_loss, g_metrics = self._guidance_loss(prior_params, self.priors.resized(rgbs), rand_views, step)
            total = total + g_loss
            metrics.update(g_metrics)
            metrics["random/loss"] = metrics["random/loss"] + g_loss
        return total, metrics

    def _view_batches(self, state: TrainState, kind: str):
        """Global view batches (ref, random) for this step: cameras + per-view keys, or None."""
        n_dev = parallel.view_shards(self.mesh)
        t = self.cfg.train
        step_key = jax.random.fold_in(state.rng, state.step)
        k_ref, k_cams, k_rand = jax.random.split(jax.random.fold_in(step_key, 1), 3)
        ref = rand = None
        if kind in (REF, BOTH):
            n = n_dev * t.ref_views_per_device
            camera = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), cam.reference_camera(self.cfg.camera))
            ref = (camera, jax.random.split(k_ref, n))
        if kind in (RANDOM, BOTH):
            n = n_dev * t.random_views_per_device
            rand = (cam.sample_cameras(k_cams, n, state.step, self.cfg.camera), jax.random.split(k_rand, n))
        return ref, rand

    def _grads(self, state: TrainState, targets: Targets, prior_params, kind: str, height: int, width: int, grid):
        ref, rand = self._view_batches(state, kind)
        local = partial(self._local_loss, kind=kind, height=height, width=width)
        uses_priors = self.priors is not None and kind in (RANDOM, BOTH)
        prior_params = prior_params if uses_priors else {}
        prior_specs = self.prior_specs if uses_priors else parallel.REPLICATED

        def per_device(params, grid, ref_views, rand_views, step, targets, prior_params):
            prior_params = parallel.gather_fsdp(prior_params, prior_specs) if uses_priors else prior_params
            (loss, metrics), grads = jax.value_and_grad(local, has_aux=True)(
                parallel.as_varying(params), grid, ref_views, rand_views, step, targets, prior_params)
            metrics["loss"] = loss
            return jax.lax.pmean(grads, parallel.VIEW_AXES), jax.lax.pmean(metrics, parallel.VIEW_AXES)

        sharded = parallel.shard_map(
            per_device, self.mesh,
            in_specs=(parallel.REPLICATED, parallel.REPLICATED, parallel.VIEWS, parallel.VIEWS,
                      parallel.REPLICATED, parallel.REPLICATED, prior_specs),
            out_specs=(parallel.REPLICATED, parallel.REPLICATED))
        return sharded(state.params, grid, ref, rand, state.step, targets, prior_params)

    def update_grid(self, state: TrainState) -> volume.OccupancyGrid:
        mask = self.level_mask(state.step)
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)
        return volume.update_occupancy_grid(state.grid, key, state.step,
                                            self.field_fns(state.params, mask, state.step).density, self.render)

    def grads_fn(self, kind: str, height: int, width: int):
        """jit (state, targets, prior_params) -> (grads, metrics): the sharded gradient of one step."""
        return jax.jit(lambda state, targets, prior_params=None: self._grads(
            state, targets, prior_params, kind, height, width, self.update_grid(state)))

    def step_fn(self, kind: str, height: int, width: int):
        """jit (state, targets, prior_params) -> (new_state, metrics): one full training step."""

        if self.cfg.train.separate_guidance and self.priors is not None and kind in (RANDOM, BOTH):
            return self._three_program_step(kind, height, width)

        def step(state: TrainState, targets: Targets, prior_params=None):
            grid = self.update_grid(state)
            grads, metrics = self._grads(state, targets, prior_params, kind, height, width, grid)
            return self._apply_grads(state, grid, grads, metrics)

        return jax.jit(step, donate_argnums=(0,))

    def update_fn(self):
        """jit (state, grads) -> (new_state, metrics): the step's update alone (occupancy-grid update, Adam with
        the finite-gradient guard) on given gradients, e.g. zeros: what a step spends besides its gradient, at the
        compile cost of the update only (no render, no priors)."""

        def update(state: TrainState, grads):
            grid = self.update_grid(state)
            return self._apply_grads(state, grid, grads, {"loss": jnp.zeros((), jnp.float32)})

        return jax.jit(update, donate_argnums=(0,))

    def _apply_grads(self, state: TrainState, grid, grads, metrics):
        """Adam on ``grads`` (the update skipped, and counted, when the loss or a gradient is not finite)."""
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        metrics = dict(metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["skipped_nonfinite"] = (~finite).astype(jnp.float32)
        metrics["active_levels"] = jnp.sum(self.level_mask(state.step))
        metrics["grid_occupancy"] = jnp.mean(grid.binary.astype(jnp.float32))
        new_state = TrainState(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                               grid=grid, step=state.step + 1, rng=state.rng,
                               nonfinite_skips=state.nonfinite_skips + (~finite).astype(jnp.int32))
        return new_state, metrics

    @functools.cached_property
    def _guidance_program(self):
        """jit (resized renders {prior: (V, R, R, 3)}, random views, step, schedules, prior params) -> (d prior
        loss / d renders, metrics): the priors alone, sharded over the views. Its input sizes are the priors', not
        the render's, so one compiled program serves every resolution and step kind of the stage; the stage's
        schedules (timestep ranges, loss weights: :meth:`guidance_schedules`) are inputs, so a later stage with
        other ranges lowers to the same program and loads it from the persistent compilation cache."""
        prior_specs = self.prior_specs

        def per_device(images, rand_views, step, schedules, prior_params):
            prior_params = parallel.gather_fsdp(prior_params, prior_specs)
            (loss, metrics), grads = jax.value_and_grad(
                lambda x: self._guidance_loss(prior_params, x, rand_views, step, schedules), has_aux=True)(images)
            metrics["guidance_loss"] = loss
            return grads, jax.lax.pmean(metrics, parallel.VIEW_AXES)

        return jax.jit(parallel.shard_map(
            per_device, self.mesh,
            in_specs=(parallel.VIEWS, parallel.VIEWS, parallel.REPLICATED, parallel.REPLICATED, prior_specs),
            out_specs=(parallel.VIEWS, parallel.REPLICATED)))

    def _three_program_step(self, kind: str, height: int, width: int):
        """The random-view step as three compiled programs (``train.separate_guidance``): (1) grid update, render
        and its losses forward, keeping the backward pass's residuals, and the renders resized to each prior's
        input size; (2) the priors (:attr:`_guidance_program`, shared by all resolutions); (3) the backward pass
        of (1) fed with (2)'s gradient w.r.t. the resized renders, then Adam. Same gradient as the one-program
        step; the priors, most of a random-view step's compile time, then compile once per stage, not once per
        resolution. The residuals leave (1) per device with a leading axis of 1, split along the view axes they vary
        along (:func:`parallel.stacked_spec`)."""
        box = {}  # the residuals' tree structure, found while tracing (1) and used while tracing (3)

        def forward(state: TrainState, targets: Targets):
            grid = self.update_grid(state)
            ref, rand = self._view_batches(state, kind)

            def per_device(params, grid, ref_views, rand_views, step, targets):
                def render_part(p):
                    loss, metrics, rgbs = self._render_loss(p, grid, ref_views, rand_views, step, targets,
                                                            height, width)
                    return (loss, self.priors.resized(rgbs)), (loss, metrics)

                (_, images), backward, (loss, metrics) = jax.vjp(render_part, parallel.as_varying(params),
                                                                 has_aux=True)
                leaves, box["residuals"] = jax.tree.flatten(backward)
                # Each residual leaves (1) with the device-varying type it has here and enters (3) with it again:
                # (3)'s backward casts invariant residuals to varying itself (e.g. the level mask, in the
                # recomputed encoding), and casting a value that already varies is an error (jax >= 0.12), so
                # none may be made varying on the way.
                box["residual_specs"] = [parallel.stacked_spec(x) for x in leaves]
                box["loss_axes"] = parallel.varying_axes(loss)
                metrics["loss"] = loss
                return images, [x[None] for x in leaves], jax.lax.pmean(metrics, parallel.VIEW_AXES)

            args = (state.params, grid, ref, rand, state.step, targets)
            in_specs = (parallel.REPLICATED, parallel.REPLICATED, parallel.VIEWS, parallel.VIEWS,
                        parallel.REPLICATED, parallel.REPLICATED)

            def sharded(pick, out_specs):
                return parallel.shard_map(lambda *a: pick(per_device(*a)), self.mesh, in_specs, out_specs)(*args)

            # The residuals' specs are known only once the forward is traced: trace it abstractly first, keeping
            # only the images (out of a shard_map, every leaf needs a spec).
            jax.eval_shape(lambda: sharded(lambda out: out[0], parallel.VIEWS))
            images, residuals, metrics = sharded(lambda out: out,
                                                 (parallel.VIEWS, box["residual_specs"], parallel.REPLICATED))
            # state.step + 0: a step buffer that (3) does not donate
            return grid, rand, images, residuals, metrics, state.step + 0, self.guidance_schedules(state.step)

        def backward_and_update(state: TrainState, grid, residuals, image_grads, metrics, guide_metrics):
            def per_device(residuals, image_grads):
                backward = jax.tree.unflatten(box["residuals"], [x[0] for x in residuals])
                loss_cotangent = parallel.as_varying(jnp.ones((), jnp.float32), tuple(sorted(box["loss_axes"])))
                (grads,) = backward((loss_cotangent, image_grads))
                return jax.lax.pmean(grads, parallel.VIEW_AXES)

            grads = parallel.shard_map(per_device, self.mesh, in_specs=(box["residual_specs"], parallel.VIEWS),
                                       out_specs=parallel.REPLICATED)(residuals, image_grads)
            guide_metrics = dict(guide_metrics)
            g_loss = guide_metrics.pop("guidance_loss")
            metrics = {**metrics, **guide_metrics, "loss": metrics["loss"] + g_loss,
                       "random/loss": metrics["random/loss"] + g_loss}
            return self._apply_grads(state, grid, grads, metrics)

        forward_jit = jax.jit(forward)
        update_jit = jax.jit(backward_and_update, donate_argnums=(0,))  # residuals: no output of their shapes

        def step(state: TrainState, targets: Targets, prior_params=None):
            grid, rand, images, residuals, metrics, step_now, schedules = forward_jit(state, targets)
            image_grads, guide_metrics = self._guidance_program(images, rand, step_now, schedules, prior_params)
            return update_jit(state, grid, residuals, image_grads, metrics, guide_metrics)

        return step

    # ------------------------------------------------------------------ evaluation

    def render_fn(self, height: int, width: int, chunk_rays: int | None = None,
                  samples_per_ray: float | None = None):
        """jit (params, grid, camera, step) -> {rgb (H,W,3), normal (H,W,3), depth (H,W), opacity (H,W)}.

        Deterministic (no jitter, no stratification). Rays go in chunks of ``chunk_rays`` (default
        ``eval.chunk_rays``) so memory is bounded at any resolution, and the chunks are split over the ``data``
        axis so every device renders its share. The images come back replicated: every process (multi-host)
        calls this together and can read the whole image; process 0 writes it. Sample budget per ray:
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

        def render(params, grid, camera, step):
            rays_o, rays_d = cam.get_rays(camera, height, width)
            pad = n_chunks * chunk - n_rays
            rays_o = jnp.pad(rays_o.reshape(-1, 3), ((0, pad), (0, 0)))
            rays_d = jnp.pad(rays_d.reshape(-1, 3), ((0, pad), (0, 0)), constant_values=1.0)
            rays_d = rays_d / jnp.linalg.norm(rays_d, axis=-1, keepdims=True)
            outs = sharded(params, grid, rays_o.reshape(n_chunks, chunk, 3), rays_d.reshape(n_chunks, chunk, 3), step)
            images = {k: v.reshape((n_chunks * chunk,) + v.shape[2:])[:n_rays].reshape((height, width) + v.shape[2:])
                      for k, v in outs.items()}
            return jax.lax.with_sharding_constraint(images, parallel.replicated(self.mesh))

        return jax.jit(render)
