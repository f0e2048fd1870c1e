"""The stage set-ups several benches time: the fitted example scene and one stage step's (stage, state, targets,
prior params) at a resolution, a view count and a training step.

Shared by ``bench render`` (:func:`fit_scene`), ``bench stage``, ``bench eval``, ``bench scaling``, ``bench
profile`` and ``bench compile``. All the benches' stage set-ups
(built through ``stages.base.build_stage``) that are not in one bench's own module are here.
Not a bench itself: nothing to run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamcraft_jax import parallel


def fit_scene(cfg, steps: int):
    """Fit the bundled example from the reference view for ``steps`` steps at 128 px: (stage, state, metrics of
    the last step); 0 steps: the initial state, nothing compiled, no metrics."""
    from dreamcraft_jax.stages.base import build_stage
    from dreamcraft_jax.stages.volume_stage import REF

    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    cfg = cfg.copy_and_resolve_references()  # the caller's config keeps its training mode
    with cfg.unlocked():
        cfg.train.mode = "reference_only"
        cfg.data.heights, cfg.data.widths, cfg.data.resolution_milestones = (128,), (128,), ()
    stage = build_stage("coarse_nerf", cfg, mesh)
    state = stage.init_state()
    if steps <= 0:
        return stage, state, {}
    targets = stage.targets[(128, 128)]
    step = stage.step_fn((REF, (128, 128)))
    for _ in range(steps):
        state, metrics = step(state, targets)
    jax.block_until_ready(state)
    return stage, state, {k: float(v) for k, v in jax.device_get(metrics).items()}


def stage_case(cfg, stage_name: str, res: int, views_per_device: int, mesh, priors, prior_params, fitted,
               at_step: int):
    """(stage, state at ``at_step``, targets, placed prior params) of one timed stage step on ``mesh``: stage 1a
    starts from the fitted scene, stage 1b from the NeuS init that carries it over (``fitted`` None: each
    stage's own initial state)."""
    from dreamcraft_jax.config import stage_config
    from dreamcraft_jax.stages.base import build_stage

    scfg = stage_config(cfg, stage_name)
    with scfg.unlocked():
        scfg.train.random_views_per_device = views_per_device
        scfg.train.ref_views_per_device = 1
        scfg.data.heights, scfg.data.widths, scfg.data.resolution_milestones = (res,), (res,), ()
    stage = build_stage(stage_name, scfg, mesh, priors, prior_params)
    pp = stage.prior_params
    if stage_name == "coarse_neus" or fitted is None:  # None: the stage's initial state
        state = stage.init_state(previous=fitted)
    else:
        state = parallel.replicate(jax.device_get(fitted), mesh)
    # Placed like the step's own output: an uncommitted step counter made the first step compile for another
    # input sharding than every later one, so the next call (fed the step's output) compiled the step again.
    state = state.replace(step=parallel.replicate(jnp.asarray(at_step, jnp.int32), mesh))
    return stage, state, stage.targets[(res, res)], pp


def neus_reference_fit(stage, state, targets, res: int, steps: int, ref_step=None, prior_params=None):
    """``steps`` reference steps of a NeuS case: it starts from a fully occupied grid, and these fit the SDF to
    the image and let the grid updates prune it, as the first steps of a run do (timings on a full grid would
    hold every ray at the sample budget). ``ref_step``: the caller's compiled reference step, if it has one, with
    the ``prior_params`` it was compiled for (the reference step does not use them)."""
    from dreamcraft_jax.stages.volume_stage import REF

    ref_step = ref_step or stage.step_fn((REF, (res, res)))
    for _ in range(steps):
        state, _ = ref_step(state, targets, {} if prior_params is None else prior_params)
    return state


def phase_mid_step(cfg, stage_name: str, res: int) -> int:
    """The middle step of the steps a stage trains at resolution ``res`` (the progressive band switches hash
    levels on with the step, so timings depend on it), or of the whole stage if it never uses ``res``."""
    from dreamcraft_jax.config import stage_config

    scfg = stage_config(cfg, stage_name)
    milestones = [0, *scfg.data.resolution_milestones, scfg.train.max_steps]
    for i, h in enumerate(scfg.data.heights):
        if int(h) == res:
            return (milestones[i] + milestones[i + 1]) // 2
    return scfg.train.max_steps // 2
