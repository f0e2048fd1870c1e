"""The one sharded training step, built from a stage's per-device loss (every stage goes through here).

A stage describes one step kind with a :class:`StepDef`; :func:`build_step` returns the jitted step::

    step(state: TrainState, data, frozen) -> (new_state, metrics)

    extras, batch, shared, guide = prepare(state, data)        # replicated, outside shard_map (e.g. the
                                                               # occupancy-grid update, the step's cameras)
    per device (shard_map over the mesh):
        frozen  = all-gather of the FSDP-split leaves of ``frozen`` (the priors' weights)
        loss, metrics, images = render(params_v, batch_d, shared)          # params_v: device-varying copy
        loss   += guidance(frozen, images, batch_d, guide)                 # when the stage has guidance
        grads   = pmean(d loss / d params_v), metrics = pmean(metrics)     # mean over every view
    params, opt_state = optimizer update, skipped (and counted) when the loss or a gradient is not finite

``batch`` is split along the view axes (its leaves' leading axis is the global view count), ``shared`` is
replicated, ``frozen`` is placed with ``frozen_specs``. Taking the gradient w.r.t. a varying copy of the
replicated params keeps per-device gradients, which ``pmean`` averages explicitly: the same step on 1 and N
devices up to float summation order (:func:`dreamcraft_jax.parallel.as_varying`).

With ``separate_guidance`` the step runs as three compiled programs (render forward keeping the backward's
residuals; the guidance alone, on inputs of the priors' sizes; the render's backward fed with the guidance's
gradient w.r.t. the images, then the update): same gradient, and the guidance program compiles once for every
resolution and stage that shares the priors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dreamcraft_jax import parallel


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue identically: one pytree, saved whole by orbax."""

    params: Any
    opt_state: Any
    extras: Any  # stage-specific state that is not trained by the optimiser, e.g. {"grid": OccupancyGrid}
    step: jax.Array  # () int32
    rng: jax.Array  # (2,) uint32 raw PRNG key; per-step keys are fold_in(rng, step)
    nonfinite_skips: jax.Array  # () int32, updates skipped because of NaN / Inf


def init_train_state(params, optimizer: optax.GradientTransformation, extras, rng, mesh,
                     rules=parallel.DEFAULT_RULES, min_size: int = 1 << 16) -> TrainState:
    """A fresh TrainState at step 0 on ``mesh``: params, opt_state and extras placed by the sharding ``rules``
    (paths ``params/...``, ``opt_state/...``, ``extras/...``), the counters and the rng replicated."""
    def placed(tree, name):
        return parallel.place(tree, name, mesh, rules, min_size)[0]

    return TrainState(params=placed(params, "params"), opt_state=placed(optimizer.init(params), "opt_state"),
                      extras=placed(extras, "extras"), step=parallel.replicate(jnp.zeros((), jnp.int32), mesh),
                      rng=parallel.replicate(rng, mesh),
                      nonfinite_skips=parallel.replicate(jnp.zeros((), jnp.int32), mesh))


def _default_merge(metrics: dict, guide_loss, guide_metrics: dict) -> dict:
    return {**metrics, **guide_metrics, "guidance_loss": guide_loss}


@dataclasses.dataclass(frozen=True)
class StepDef:
    """One step kind of a stage, as pure functions (see the module docstring for where each runs).

    prepare:  (state, data) -> (extras, batch, shared, guide): the new ``state.extras``, per-view inputs (split
              along the view axes), replicated inputs of ``render``, and ``guide`` (replicated inputs of
              ``guidance``; ``None`` without guidance).
    render:   (params, batch, shared) -> (loss, metrics, images): this device's loss without the guidance, and
              the images the guidance scores (``None`` without guidance).
    guidance: (frozen, images, views, guide) -> (loss, metrics) on this device's images, or ``None``;
              ``views = guide_views(batch)``: the per-view inputs it needs (so that its separately compiled
              program sees only those).
    merge:    (render metrics, guidance loss, guidance metrics) -> metrics of the step (before "loss" is set).
    summary:  (state before the step, new extras) -> extra metrics (e.g. the active hash-grid levels).
    frozen_specs: PartitionSpecs of ``frozen`` (``parallel.REPLICATED`` for a tree placed whole).
    param_specs: PartitionSpecs of the trainable params as placed (``parallel.REPLICATED``: all whole). A leaf
              split along ``fsdp`` is all-gathered inside the step and its gradient reduce-scattered back to the
              shard (``parallel.reduce_grads``), so each device keeps 1/fsdp of it, its gradient and its
              optimiser state.
    """

    prepare: Callable
    render: Callable
    guidance: Callable | None = None
    guide_views: Callable = lambda batch: batch
    merge: Callable = _default_merge
    summary: Callable | None = None
    frozen_specs: Any = parallel.REPLICATED
    param_specs: Any = parallel.REPLICATED


def apply_update(optimizer: optax.GradientTransformation, state: TrainState, extras, grads, metrics: dict,
                 summary: Callable | None = None):
    """(new state, metrics): the optimiser on ``grads``, skipped (and counted) when ``metrics["loss"]`` or a
    gradient is not finite."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))

    def keep(new, old):
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    metrics = dict(metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["skipped_nonfinite"] = (~finite).astype(jnp.float32)
    if summary is not None:
        metrics.update(summary(state, extras))
    new_state = TrainState(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                           extras=extras, step=state.step + 1, rng=state.rng,
                           nonfinite_skips=state.nonfinite_skips + (~finite).astype(jnp.int32))
    return new_state, metrics


def sharded_grads(sd: StepDef, mesh, params, batch, shared, guide, frozen):
    """(grads, metrics) of one step: the per-device loss under shard_map; the metrics pmean'd (replicated), the
    gradients averaged over every view and placed as the params are (``sd.param_specs``)."""
    uses_guidance = sd.guidance is not None and guide is not None
    frozen_specs = sd.frozen_specs if uses_guidance else parallel.REPLICATED

    def per_device(params, batch, shared, guide, frozen):
        frozen = parallel.gather_fsdp(frozen, frozen_specs) if uses_guidance else frozen
        params = parallel.gather_fsdp(params, sd.param_specs)

        def loss_fn(p):
            loss, metrics, images = sd.render(p, batch, shared)
            if uses_guidance and images is not None:
                g_loss, g_metrics = sd.guidance(frozen, images, sd.guide_views(batch), guide)
                metrics = sd.merge(metrics, g_loss, g_metrics)
                loss = loss + g_loss
            return loss, metrics

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(parallel.as_varying(params))
        metrics["loss"] = loss
        return parallel.reduce_grads(grads, sd.param_specs), jax.lax.pmean(metrics, parallel.VIEW_AXES)

    fn = parallel.shard_map(
        per_device, mesh,
        in_specs=(sd.param_specs, parallel.VIEWS, parallel.REPLICATED, parallel.REPLICATED, frozen_specs),
        out_specs=(sd.param_specs, parallel.REPLICATED))
    return fn(params, batch, shared, guide, frozen if uses_guidance else {})


def build_grads(sd: StepDef, mesh):
    """jit (state, data, frozen) -> (grads, metrics): the sharded gradient of one step, without the update."""

    def grads(state, data, frozen=None):
        _, batch, shared, guide = sd.prepare(state, data)
        return sharded_grads(sd, mesh, state.params, batch, shared, guide, frozen)

    return jax.jit(grads)


def build_step(sd: StepDef, optimizer: optax.GradientTransformation, mesh, separate_guidance: bool = False):
    """The jitted step (state, data, frozen) -> (new state, metrics); ``state`` is donated.

    ``separate_guidance`` (with a guidance): three programs instead of one, see :func:`_three_program_step`.
    """
    if separate_guidance and sd.guidance is not None:
        return _three_program_step(sd, optimizer, mesh)

    def step(state: TrainState, data, frozen=None):
        extras, batch, shared, guide = sd.prepare(state, data)
        grads, metrics = sharded_grads(sd, mesh, state.params, batch, shared, guide, frozen)
        return apply_update(optimizer, state, extras, grads, metrics, sd.summary)

    return jax.jit(step, donate_argnums=(0,))


def build_update(sd: StepDef, optimizer: optax.GradientTransformation):
    """jit (state, grads, data) -> (new state, metrics): the step's update alone (``prepare``'s extras, the
    optimiser with the finite guard) on given gradients, e.g. zeros: what a step spends besides its gradient, at
    the compile cost of the update only."""

    def update(state: TrainState, grads, data):
        extras = sd.prepare(state, data)[0]
        return apply_update(optimizer, state, extras, grads, {"loss": jnp.zeros((), jnp.float32)}, sd.summary)

    return jax.jit(update, donate_argnums=(0,))


def guidance_program(sd: StepDef, mesh):
    """jit (images, views, guide, frozen) -> (d guidance loss / d images, metrics): the guidance alone, sharded
    over the views; its metrics carry the loss as "__guidance_loss". Its inputs have the priors' sizes, not the
    render's, and the stage's schedules come in ``guide``, so step kinds, resolutions and stages that share the
    priors lower to one program (loaded from the persistent compilation cache after the first)."""
    frozen_specs = sd.frozen_specs

    def per_device(images, views, guide, frozen):
        frozen = parallel.gather_fsdp(frozen, frozen_specs)
        (loss, metrics), grads = jax.value_and_grad(
            lambda x: sd.guidance(frozen, x, views, guide), has_aux=True)(images)
        metrics = dict(metrics)
        metrics["__guidance_loss"] = loss
        return grads, jax.lax.pmean(metrics, parallel.VIEW_AXES)

    return jax.jit(parallel.shard_map(
        per_device, mesh, in_specs=(parallel.VIEWS, parallel.VIEWS, parallel.REPLICATED, frozen_specs),
        out_specs=(parallel.VIEWS, parallel.REPLICATED)))


def _three_program_step(sd: StepDef, optimizer: optax.GradientTransformation, mesh):
    """The step as three compiled programs: (1) ``prepare`` and the render part's forward, keeping the backward
    pass's residuals; (2) the guidance alone (its inputs: the images, the per-view batch and ``guide``; one
    compiled program for every step kind with images of the same shapes); (3) the render's backward fed with
    (2)'s gradient w.r.t. the images, then the update. Same gradient as the one-program step. The residuals leave
    (1) per device with a leading axis of 1, split along the view axes they vary along
    (:func:`parallel.stacked_spec`), and enter (3) with that device-varying type again."""
    box = {}  # the residuals' tree structure, found while tracing (1) and used while tracing (3)

    def forward(state: TrainState, data):
        extras, batch, shared, guide = sd.prepare(state, data)

        def per_device(params, batch, shared):
            params = parallel.gather_fsdp(params, sd.param_specs)

            def render_part(p):
                loss, metrics, images = sd.render(p, batch, shared)
                return (loss, images), (loss, metrics)

            (_, images), backward, (loss, metrics) = jax.vjp(render_part, parallel.as_varying(params), has_aux=True)
            leaves, box["residuals"] = jax.tree.flatten(backward)
            # Each residual leaves (1) with the device-varying type it has here and enters (3) with it again: (3)'s
            # backward casts invariant residuals to varying itself (e.g. a level mask in a recomputed encoding),
            # and casting a value that already varies is an error (jax >= 0.12), so none may be made varying on
            # the way.
            box["residual_specs"] = [parallel.stacked_spec(x) for x in leaves]
            box["loss_axes"] = parallel.varying_axes(loss)
            metrics["loss"] = loss
            return images, [x[None] for x in leaves], jax.lax.pmean(metrics, parallel.VIEW_AXES)

        args = (state.params, batch, shared)
        in_specs = (sd.param_specs, parallel.VIEWS, parallel.REPLICATED)

        def sharded(pick, out_specs):
            return parallel.shard_map(lambda *a: pick(per_device(*a)), mesh, in_specs, out_specs)(*args)

        # The residuals' specs are known only once the forward is traced: trace it abstractly first, keeping only
        # the images (out of a shard_map, every leaf needs a spec).
        jax.eval_shape(lambda: sharded(lambda out: out[0], parallel.VIEWS))
        images, residuals, metrics = sharded(lambda out: out,
                                             (parallel.VIEWS, box["residual_specs"], parallel.REPLICATED))
        return extras, sd.guide_views(batch), guide, images, residuals, metrics

    def backward_and_update(state: TrainState, extras, residuals, image_grads, metrics, guide_metrics):
        def per_device(residuals, image_grads):
            backward = jax.tree.unflatten(box["residuals"], [x[0] for x in residuals])
            loss_cotangent = parallel.as_varying(jnp.ones((), jnp.float32), tuple(sorted(box["loss_axes"])))
            (grads,) = backward((loss_cotangent, image_grads))
            return parallel.reduce_grads(grads, sd.param_specs)

        grads = parallel.shard_map(per_device, mesh, in_specs=(box["residual_specs"], parallel.VIEWS),
                                   out_specs=sd.param_specs)(residuals, image_grads)
        guide_metrics = dict(guide_metrics)
        g_loss = guide_metrics.pop("__guidance_loss")
        render_loss = metrics.pop("loss")
        metrics = sd.merge(metrics, g_loss, guide_metrics)
        metrics["loss"] = render_loss + g_loss
        return apply_update(optimizer, state, extras, grads, metrics, sd.summary)

    forward_jit = jax.jit(forward)
    guidance_jit = guidance_program(sd, mesh)
    update_jit = jax.jit(backward_and_update, donate_argnums=(0,))  # residuals: no output of their shapes

    def step(state: TrainState, data, frozen=None):
        extras, views, guide, images, residuals, metrics = forward_jit(state, data)
        image_grads, guide_metrics = guidance_jit(images, views, guide, frozen)
        return update_jit(state, extras, residuals, image_grads, metrics, guide_metrics)

    return step
