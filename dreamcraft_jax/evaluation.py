"""Validation renders and the turntable video of a stage, through the stage interface only
(:meth:`Stage.eval_render`, :meth:`Stage.eval_cameras`, :meth:`Stage.eval_metrics`). Every process renders
(the renders are sharded over all devices); process 0 writes."""

from __future__ import annotations

import concurrent.futures
import logging
from pathlib import Path

import jax
import numpy as np

from dreamcraft_jax import cameras as cam
from dreamcraft_jax.export import media
from dreamcraft_jax.run_folder import is_writer

log = logging.getLogger("dreamcraft_jax")


def validate_views(stage, render, state, folder: Path, step: int, writer,
                   image_writer: concurrent.futures.Executor | None = None) -> dict:
    """Render the stage's validation views at eval resolution (``state``: what ``render`` takes, the stage's
    ``eval_inputs``), log their metrics (e.g. the reference PSNR) and write one panel PNG (a row per view) to
    ``folder/val/step_<n>.png``. The PNG (~0.4 s of host work at 512 px) is made by ``image_writer`` when given,
    so training goes on meanwhile; the caller shuts it down (waiting) before the stage ends. Returns the metrics
    ({} on processes other than 0)."""
    outs = {name: render(state, camera) for name, camera in stage.eval_cameras().items()}
    if not is_writer():
        return {}
    outs = jax.device_get(outs)
    metrics = {}
    for name, images in outs.items():
        metrics.update(stage.eval_metrics(name, images))

    def save():
        path = folder / "val" / f"step_{step:06d}.png"
        try:
            media.save_image(path, np.concatenate([media.panel(images) for images in outs.values()], axis=0))
        except Exception as e:  # noqa: BLE001 - a lost diagnostic image must not stop (or silently end) a run
            log.warning("validation image %s not written: %s: %s", path, type(e).__name__, e)

    if image_writer is None:
        save()
    else:
        image_writer.submit(save)
    if metrics:
        writer.write({"step": step, **metrics})
    return metrics


def write_turntable(cfg, render, state, path: Path, panels=("rgb", "normal", "depth", "opacity")) -> str | None:
    """The orbit video (``eval.n_video_views`` frames at ``eval.elevation_deg``) of ``render(state, camera)``
    (``state``: the stage's ``eval_inputs``), each frame the ``panels`` side by side; a frame's panel is made on a
    host thread while the device renders the next frame."""
    cams = cam.orbit_cameras(cfg.eval.n_video_views, cfg.eval.elevation_deg, cfg.camera.distance,
                             cfg.camera.fovy_deg)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = []
        for i in range(cfg.eval.n_video_views):
            camera = jax.tree.map(lambda a: a[i], cams)
            out = render(state, camera)
            if is_writer():
                futures.append(pool.submit(media.panel, jax.device_get(out), tuple(panels)))
        frames = [f.result() for f in futures]
    return media.write_video(path, frames, fps=cfg.eval.fps) if is_writer() else None
