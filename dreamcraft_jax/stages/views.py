"""What every guided stage's step shares: its view batches and the priors' terms on the random views.

``view_batches`` draws the step's reference and random cameras with per-view keys (global batches, split along
the view axes by the step builder); ``guidance_schedules`` / ``prior_terms`` evaluate the priors on this device's
random views. The volume stages (1a, 1b) and the geometry stage call these, so a view drawn at a step and the
key its noise comes from are the same in every stage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamcraft_jax import cameras as cam
from dreamcraft_jax import parallel
from dreamcraft_jax.config import schedule_value


def view_batches(cfg, mesh, state, with_ref: bool, with_random: bool):
    """(ref, random) global view batches of ``state``'s step: each (cameras (n,), keys (n, 2)) or None.

    n = view shards x ``train.ref_views_per_device`` / ``train.random_views_per_device``; keys from
    fold_in(fold_in(rng, step), 1), random cameras from ``cfg.camera`` at the step (progressive ranges).
    """
    n_dev = parallel.view_shards(mesh)
    t = cfg.train
    step_key = jax.random.fold_in(state.rng, state.step)
    k_ref, k_cams, k_rand = jax.random.split(jax.random.fold_in(step_key, 1), 3)
    ref = rand = None
    if with_ref:
        n = n_dev * t.ref_views_per_device
        camera = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), cam.reference_camera(cfg.camera))
        ref = (camera, jax.random.split(k_ref, n))
    if with_random:
        n = n_dev * t.random_views_per_device
        rand = (cam.sample_cameras(k_cams, n, state.step, cfg.camera), jax.random.split(k_rand, n))
    return ref, rand


def guidance_schedules(priors, cfg, step) -> dict:
    """The step-dependent numbers of the priors' loss at ``step`` (float32 scalars): each prior's
    :meth:`Priors.schedules_at` under "priors" and its loss weight ``loss.lambda_<name>`` under "weights"."""
    return {"priors": priors.schedules_at(step),
            "weights": {name: jnp.asarray(schedule_value(cfg.loss[f"lambda_{name}"], step), jnp.float32)
                        for name in priors.priors}}


def prior_terms(priors, prior_params, images, rand_views, step, prior_schedules=None):
    """({prior name: loss}, {"random/<term or stat>": value}) of this device's random views, one batch per prior
    (each loss already the mean over the batch). ``images``: {prior name: (V, R, R, 3)} at each prior's size;
    per-view keys fold_in(key, 7) of the views' keys; ``prior_schedules``: ``guidance_schedules(...)["priors"]``
    or None for the priors' own."""
    cams, keys = rand_views
    guide_keys = jax.vmap(lambda k: jax.random.fold_in(k, 7))(keys)
    g_terms, g_stats = priors.losses(prior_params, images, cams, guide_keys, step, prior_schedules)
    return g_terms, {f"random/{k}": v for k, v in {**g_terms, **g_stats}.items()}


def merge_random_loss(metrics: dict, g_loss, g_metrics: dict) -> dict:
    """StepDef.merge of the guided stages: the priors' weighted loss is part of "random/loss"."""
    return {**metrics, **g_metrics, "random/loss": metrics["random/loss"] + g_loss}
