"""The run folder: where a run writes, and how a later run finds what an earlier one wrote.

    <workdir>/config.json                  the config as given (config.resume.json when resumed)
    <workdir>/<stage>/config.json          the stage's resolved config (config.resume-<step>.json per resume)
    <workdir>/<stage>/metrics.jsonl        one JSON object per logged step
    <workdir>/<stage>/events.out.tfevents.*  the same scalars for TensorBoard (``tensorboard --logdir <workdir>``)
    <workdir>/<stage>/checkpoints/<step>/  orbax checkpoints of the whole TrainState
    <workdir>/<stage>/reference.png        the reference view as the stage sees it
    <workdir>/<stage>/val/step_<n>.png     the validation views: rgb | normal | depth | opacity
    <workdir>/<stage>/video/turntable.mp4  final orbit (gif where no mp4 encoder exists)
    <workdir>/<stage>/timing.json          ms per step split into render / guidance / update
    <workdir>/<stage>/wall_time.json       where the stage's wall-clock time went
    <workdir>/<stage>/DONE                 the step the stage finished at (a resumed pipeline skips the stage
                                           unless its max_steps is now larger)

An existing, non-empty run folder is never reused unless ``--config.resume`` names it. Only process 0 writes.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import jax

from dreamcraft_jax.config import STAGES

DONE = "DONE"


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
        if (path / "checkpoints").is_dir() and path.name in STAGES:  # a stage folder was given
            path = path.parent
        if not any((path / stage / "checkpoints").is_dir() for stage in STAGES):
            raise RunFolderError(f"--config.resume={cfg.resume}: no <stage>/checkpoints/ folder there to resume "
                                 f"from (stages: {', '.join(STAGES)})")
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


def stage_dir(path: Path, stage: str) -> Path:
    """A run folder or a stage folder -> the folder of ``stage`` inside it (which must hold checkpoints)."""
    if (path / stage / "checkpoints").is_dir():
        return path / stage
    if path.name == stage or (path / "checkpoints").is_dir():
        return path
    raise RunFolderError(f"{path} holds no {stage}/checkpoints folder to start from")


def finished_step(folder: Path) -> int | None:
    """The step a stage folder's DONE marker records, or None."""
    done = folder / DONE
    return int(done.read_text().split()[0]) if done.is_file() else None


def mark_done(folder: Path, step: int) -> None:
    (folder / DONE).write_text(f"{int(step)}\n")
