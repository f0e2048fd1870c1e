"""The training loop around a stage: run folder, checkpoints, metrics, validation renders, turntable video.

Run folder layout::

    <workdir>/config.json          the resolved config (config.resume-<step>.json for each resume)
    <workdir>/metrics.jsonl        one JSON object per logged step
    <workdir>/checkpoints/<step>/  orbax checkpoints of the whole TrainState
    <workdir>/val/step_<n>.png     reference view + a random view: rgb | normal | depth | opacity
    <workdir>/video/turntable.mp4  final orbit (gif where no mp4 encoder exists)

An existing, non-empty run folder is never reused unless ``--config.resume`` names it. Ctrl-C writes a last
checkpoint before exiting. Only process 0 writes (multi-host).
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from dreamcraft_jax import cameras as cam
from dreamcraft_jax import parallel
from dreamcraft_jax.config import resolution_at, validate
from dreamcraft_jax.data.reference import example_depth_path, example_image_path, load_reference
from dreamcraft_jax.export import media
from dreamcraft_jax.stages.coarse_nerf import CoarseNerf, TrainState, step_kind, targets_from_reference

log = logging.getLogger("dreamcraft_jax")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (exists, or nothing to resume)."""


def is_writer() -> bool:
    return jax.process_index() == 0


def resolve_workdir(cfg) -> tuple[Path, bool]:
    """(run folder, resuming?) from ``cfg.workdir`` / ``cfg.resume``; never silently reuses a folder."""
    if cfg.resume:
        path = Path(cfg.resume)
        if path.name.isdigit() and path.parent.name == "checkpoints":  # a step folder was given
            path = path.parent.parent
        if not (path / "checkpoints").is_dir():
            raise RunFolderError(f"--config.resume={cfg.resume}: no checkpoints/ folder there to resume from")
        return path, True
    if cfg.workdir:
        path = Path(cfg.workdir)
        if path.exists() and any(path.iterdir()):
            raise RunFolderError(
                f"run folder {path} already exists and is not empty: pass --config.resume={path} to continue "
                "it, or choose another --config.workdir")
        return path, False
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.output_root) / f"{cfg.name}-{stamp}"
    suffix = 1
    while path.exists():
        path = Path(cfg.output_root) / f"{cfg.name}-{stamp}-{suffix}"
        suffix += 1
    return path, False


def load_targets(cfg, height: int, width: int):
    """Reference image (and depth) at one resolution -> ReferenceImage."""
    image = cfg.image or example_image_path()
    depth = cfg.data.depth
    if depth == "example":
        depth = example_depth_path()
    return load_reference(image, height, width, recenter=cfg.data.recenter, border_ratio=cfg.data.border_ratio,
                          depth_path=depth or None, background=cfg.data.background,
                          depth_is_disparity=cfg.data.depth_is_disparity)


class Checkpointer:
    """Thin wrapper over an orbax CheckpointManager for a TrainState."""

    def __init__(self, directory: Path, keep: int):
        self.manager = ocp.CheckpointManager(
            directory.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def save(self, state: TrainState, force: bool = False) -> None:
        step = int(state.step)
        if self.manager.latest_step() == step:
            return
        self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def latest_step(self):
        return self.manager.latest_step()

    def restore(self, like: TrainState, step: int | None = None) -> TrainState:
        step = self.manager.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class MetricsWriter:
    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        if not is_writer():
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def render_panel(render, state: TrainState, camera) -> np.ndarray:
    out = jax.device_get(render(state.params, state.grid, camera, state.step))
    return media.panel(out)


def train(cfg, progress: bool = True) -> Path:
    """Run the configured stage to ``cfg.train.max_steps``; returns the run folder."""
    validate(cfg)
    parallel.maybe_initialize_distributed(cfg)
    workdir, resuming = resolve_workdir(cfg)
    # Load the reference before creating anything on disk: a bad image must not leave an empty run folder.
    phases = sorted({resolution_at(cfg, s) for s in [0, *cfg.data.resolution_milestones]})
    references = {hw: load_targets(cfg, *hw) for hw in phases}
    eval_ref = load_targets(cfg, cfg.eval.height, cfg.eval.width)
    mesh = parallel.mesh_from_config(cfg)
    stage = CoarseNerf.from_config(cfg, mesh)
    targets = {hw: parallel.replicate(targets_from_reference(r), mesh) for hw, r in references.items()}

    if is_writer():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "val").mkdir(exist_ok=True)
    checkpointer = Checkpointer(workdir / "checkpoints", cfg.train.keep_checkpoints)
    state = stage.init_state()
    if resuming and checkpointer.latest_step() is not None:
        state = checkpointer.restore(state)
        log.info("resumed %s at step %d", workdir, int(state.step))
    if is_writer():
        name = "config.json" if not resuming else f"config.resume-{int(state.step)}.json"
        (workdir / name).write_text(cfg.to_json_best_effort(indent=2))
        media.save_image(workdir / "reference.png", media.panel(
            {"rgb": eval_ref.rgb * eval_ref.mask[..., None] + (1 - eval_ref.mask[..., None]),
             "opacity": eval_ref.mask}, order=("rgb", "opacity")))
    metrics_writer = MetricsWriter(workdir / "metrics.jsonl")
    render = stage.render_fn(cfg.eval.height, cfg.eval.width)
    ref_camera = cam.reference_camera(cfg.camera)
    steps_fns = {}
    start = int(state.step)
    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=not (progress and is_writer()),
               dynamic_ncols=True, desc=cfg.name)
    last_time, last_step = time.perf_counter(), start
    try:
        step = start
        while step < cfg.train.max_steps:
            hw = resolution_at(cfg, step)
            kind = step_kind(cfg.train.mode, step)
            if (kind, hw) not in steps_fns:
                steps_fns[(kind, hw)] = stage.step_fn(kind, *hw)
            state, metrics = steps_fns[(kind, hw)](state, targets[hw])
            step += 1
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                record = _scalars(metrics)
                now = time.perf_counter()
                record.update(step=step, kind=kind, height=hw[0], width=hw[1],
                              ms_per_step=1000.0 * (now - last_time) / max(step - last_step, 1))
                last_time, last_step = now, step
                metrics_writer.write(record)
                shown = {k: record[k] for k in ("loss", "ref/psnr") if k in record}
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in shown.items()})
            if step % cfg.train.val_every == 0 or step == cfg.train.max_steps:
                validate_views(cfg, render, state, ref_camera, workdir, step, eval_ref, metrics_writer)
            if step % cfg.train.save_every == 0:
                checkpointer.save(state)
            bar.update(1)
    except KeyboardInterrupt:
        log.warning("interrupted at step %d: writing a last checkpoint to %s", int(state.step), workdir)
        checkpointer.save(state, force=True)
        checkpointer.wait()
        raise
    finally:
        bar.close()
    checkpointer.save(state, force=True)
    checkpointer.wait()
    checkpointer.close()
    if cfg.eval.video and cfg.eval.n_video_views > 0 and is_writer():
        write_turntable(cfg, render, state, workdir / "video" / "turntable.mp4")
    return workdir


def validate_views(cfg, render, state, ref_camera, workdir: Path, step: int, eval_ref, writer) -> float:
    """Render the reference view and one orbit view at eval resolution; log the eval reference PSNR."""
    if not is_writer():
        return float("nan")
    out = jax.device_get(render(state.params, state.grid, ref_camera, state.step))
    target = eval_ref.rgb * eval_ref.mask[..., None] + np.asarray(cfg.render.background) * (
        1.0 - eval_ref.mask[..., None])
    psnr = float(-10.0 * np.log10(max(float(np.mean((out["rgb"] - target) ** 2)), 1e-12)))
    side = cam.make_camera(15.0, 90.0, cfg.camera.distance, cfg.camera.fovy_deg)
    side_out = jax.device_get(render(state.params, state.grid, side, state.step))
    image = np.concatenate([media.panel(out), media.panel(side_out)], axis=0)
    media.save_image(workdir / "val" / f"step_{step:06d}.png", image)
    writer.write({"step": step, "eval/ref_psnr": psnr})
    return psnr


def write_turntable(cfg, render, state, path: Path) -> str:
    cams = cam.orbit_cameras(cfg.eval.n_video_views, cfg.eval.elevation_deg, cfg.camera.distance,
                             cfg.camera.fovy_deg)
    frames = []
    for i in range(cfg.eval.n_video_views):
        camera = jax.tree.map(lambda a: a[i], cams)
        frames.append(render_panel(render, state, camera))
    return media.write_video(path, frames, fps=cfg.eval.fps)
