"""The training loop around a stage: run folder, checkpoints, metrics, validation renders, turntable video.

Run folder layout (one sub-folder per stage: coarse_nerf/, coarse_neus/)::

    <workdir>/config.json                  the config as given (config.resume.json when resumed)
    <workdir>/<stage>/config.json          the stage's resolved config (config.resume-<step>.json per resume)
    <workdir>/<stage>/metrics.jsonl        one JSON object per logged step
    <workdir>/<stage>/checkpoints/<step>/  orbax checkpoints of the whole TrainState
    <workdir>/<stage>/val/step_<n>.png     reference view + a side view: rgb | normal | depth | opacity
    <workdir>/<stage>/video/turntable.mp4  final orbit (gif where no mp4 encoder exists)
    <workdir>/<stage>/timing.json          ms per step split into render / guidance / update
    <workdir>/<stage>/DONE                 the step the stage finished at (a resumed pipeline skips the stage
                                           unless its max_steps is now larger)

An existing, non-empty run folder is never reused unless ``--config.resume`` names it. Ctrl-C stops the run after
the step in flight and writes a last checkpoint (a second Ctrl-C stops at once, still checkpointing the last
finished step when one is at hand). Only process 0 writes (multi-host).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import logging
import signal
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from dreamcraft_jax import cameras as cam
from dreamcraft_jax import losses, parallel
from dreamcraft_jax.config import STAGES, resolution_at, schedule_is_zero, stage_config, validate
from dreamcraft_jax.data.reference import example_depth_path, example_image_path, load_reference
from dreamcraft_jax.export import media
from dreamcraft_jax.models import layers
from dreamcraft_jax.stages.coarse_nerf import RANDOM, REF, CoarseNerf, TrainState, step_kind, targets_from_reference
from dreamcraft_jax.stages.coarse_neus import CoarseNeus
from dreamcraft_jax.xla_flags import apply_xla_flags

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

    def __init__(self, directory: Path, keep: int | None, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(read_only=True) if read_only else ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

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


STAGE_CLASSES = {"coarse_nerf": CoarseNerf, "coarse_neus": CoarseNeus}
DONE = "DONE"  # written into a stage folder when the stage has reached its last step


def stages_to_run(cfg) -> list[str]:
    return list(cfg.stages) if cfg.stage == "all" else [cfg.stage]


def _stage_dir(path: Path, stage: str) -> Path:
    """A run folder or a stage folder -> the folder of ``stage`` inside it."""
    if (path / stage / "checkpoints").is_dir():
        return path / stage
    if path.name == stage or (path / "checkpoints").is_dir():
        return path
    raise RunFolderError(f"{path} holds no {stage}/checkpoints folder to start from")


def enable_compilation_cache(path: str, min_compile_time_s: float = 1.0) -> Path | None:
    """Point JAX's persistent compilation cache at ``path`` (``~`` expanded; "" = leave it off). Programs that
    took at least ``min_compile_time_s`` to compile are stored and loaded by later processes. An unusable folder
    only costs the cache (a warning), never the run."""
    if not path:
        return None
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache folder %s is not usable (%s); compiling without it (set "
                    "--config.compilation_cache_dir to a writable folder, or '' to silence this)", directory, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    return directory


def train(cfg, progress: bool = True) -> Path:
    """Run the configured stage(s) (``cfg.stage``: one stage, or "all" = ``cfg.stages`` in order); returns the
    run folder. Each stage writes into ``<run folder>/<stage>/``; a later stage starts from the previous
    stage's last checkpoint (``cfg.init_from`` for a single later stage)."""
    validate(cfg)
    apply_xla_flags(cfg.xla_flags)  # before the first device use (the distributed init, the mesh) reads them
    layers.configure_groupnorm_kernels(cfg.kernels)  # before any prior is traced
    parallel.maybe_initialize_distributed(cfg)
    workdir, resuming = resolve_workdir(cfg)
    names = stages_to_run(cfg)
    previous_dir = None
    if names[0] != "coarse_nerf":  # a later stage starts from the last checkpoint of the stage before it
        if cfg.init_from:
            previous_dir = _stage_dir(Path(cfg.init_from), _previous_stage(names[0]))
        elif not (resuming and (workdir / names[0] / "checkpoints").is_dir()):
            raise RunFolderError(
                f"stage {names[0]} starts from a {_previous_stage(names[0])} checkpoint: pass "
                f"--config.init_from=<run folder of that stage> (or --config.stage=all to run both)")
    # Everything that can fail on bad input happens before anything is written.
    mesh = parallel.mesh_from_config(cfg)
    first_cfg = stage_config(cfg, names[0])
    references = _load_references(first_cfg)
    enable_compilation_cache(cfg.compilation_cache_dir)  # after the input checks: a bad run creates nothing
    priors, prior_params = _load_priors(cfg, mesh)
    if is_writer():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / ("config.json" if not resuming else "config.resume.json")).write_text(
            cfg.to_json_best_effort(indent=2))
    for name in names:
        stage_dir = workdir / name
        scfg = stage_config(cfg, name)
        done = stage_dir / DONE
        if done.is_file() and int(done.read_text().split()[0]) >= scfg.train.max_steps:
            log.info("stage %s already finished in %s", name, stage_dir)
            previous_dir = stage_dir
            continue
        run_stage(scfg, STAGE_CLASSES[name], stage_dir, previous_dir, mesh, priors, prior_params, progress,
                  references if name == names[0] else None)
        previous_dir = stage_dir
    return workdir


def _previous_stage(name: str) -> str:
    order = list(STAGE_CLASSES)
    return order[max(order.index(name) - 1, 0)]


def _load_references(cfg) -> dict:
    phases = sorted({resolution_at(cfg, s) for s in [0, *cfg.data.resolution_milestones]})
    refs = {hw: load_targets(cfg, *hw) for hw in phases}
    refs["eval"] = load_targets(cfg, cfg.eval.height, cfg.eval.width)
    return refs


def _load_priors(cfg, mesh):
    """Load the priors once for all stages (their per-stage settings are applied by ``Priors.configured``)."""
    from dreamcraft_jax.guidance.priors import demo_prior_paths, load_priors, reference_rgb_on_white

    cfg = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
    if cfg.guidance.demo_priors:
        cfg.guidance.sd.pretrained, cfg.guidance.zero123.pretrained = demo_prior_paths(cfg.guidance.demo_priors)
    uses = any(not schedule_is_zero(stage_config(cfg, n).loss[k]) for n in stages_to_run(cfg)
               for k in ("lambda_sd", "lambda_3d_sd"))
    if not uses:
        return None, None
    if cfg.guidance.random_real_size:
        from dreamcraft_jax.guidance.random_priors import random_priors

        priors, params = random_priors(cfg, tiny=False)
        what = "real-size (SD 2.1-base / Zero123 shapes) networks with random weights"
    else:
        ref = load_targets(cfg, cfg.guidance.zero123.resolution, cfg.guidance.zero123.resolution)
        priors, params = load_priors(cfg, reference_rgb_on_white(ref.rgb, ref.mask), mesh)
        what = "tiny random stand-ins"
    if priors.random_weights:
        log.warning("=" * 100)
        log.warning("RANDOM PRIORS: the diffusion priors of this run are %s; their guidance is noise. Real runs "
                    "set --config.guidance.sd.pretrained / --config.guidance.zero123.pretrained.", what)
        log.warning("=" * 100)
    return priors, params


class _StopRequest:
    """Ctrl-C (SIGINT) as a request: the loop stops after the step in flight, whose input the step has donated, so
    a KeyboardInterrupt raised inside it would leave no state to checkpoint. A second Ctrl-C raises at once.
    Only the main thread can own signal handlers; elsewhere SIGINT keeps its default behaviour."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after the step in flight and writing a checkpoint (Ctrl-C again to stop now)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _alive(state) -> bool:
    """False once a step has consumed (donated) ``state``'s buffers."""
    return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))


def steps_needed(cfg, start: int) -> list[tuple[str, tuple[int, int]]]:
    """The (kind, (height, width)) steps a stage runs from ``start`` to ``train.max_steps``, in first-use order."""
    bounds = sorted({int(start), int(cfg.train.max_steps),
                     *(int(m) for m in cfg.data.resolution_milestones if start < int(m) < cfg.train.max_steps)})
    needed = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for step in range(lo, min(lo + 2, hi)):  # the kinds alternate with period 2 at most
            key = (step_kind(cfg.train.mode, step), resolution_at(cfg, step))
            if key not in needed:
                needed.append(key)
    return needed


def precompile(jobs: dict, workers: int) -> tuple[dict, dict]:
    """Compile ``jobs`` = {name: (jitted fn, example args)} in ``workers`` threads at once (XLA compiles outside
    the GIL). Returns ({name: compiled executable}, {name: seconds from submission to its compile's end})."""
    compiled, seconds = {}, {}
    t0 = time.perf_counter()

    def build(name):
        fn, args = jobs[name]
        out = fn.lower(*args).compile()
        return name, out, time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(int(workers), 1)) as pool:
        for name, out, done_s in pool.map(build, list(jobs)):
            compiled[name], seconds[name] = out, done_s
    return compiled, seconds


def _step_name(kind: str, hw: tuple[int, int]) -> str:
    return f"{kind}_{hw[0]}x{hw[1]}"


class _Precompiled:
    """A compiled executable called like its jitted function; arguments it was not compiled for (a type or
    sharding it did not see) go to the jitted function instead, which compiles for them, once, with a warning."""

    def __init__(self, jitted, compiled):
        self.jitted, self.compiled = jitted, compiled

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except (TypeError, ValueError) as e:  # raised while checking the arguments, before anything runs
                log.warning("a precompiled program does not take these arguments (%s); compiling it again",
                            str(e).splitlines()[0][:200])
                self.compiled = None
        return self.jitted(*args)


class WallClock:
    """Host wall-clock seconds of a stage by part, for ``wall_time.json``: where a run's time goes."""

    def __init__(self):
        self.start = time.perf_counter()
        self.parts: dict[str, float] = {}
        self.first_calls: dict[str, float] = {}
        self.compile_s: dict[str, float] = {}  # program -> seconds from the start of the compile part to its end

    @contextlib.contextmanager
    def part(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - t0

    def report(self, loop_s: float, steps_run: int, first_call_in_flight_s: float = 0.0) -> dict:
        """``steps_s``: the loop without its first calls (one step each, plus its compilation unless the stage
        compiled it up front: ``compile_s``), validation renders and checkpoint writes inside it, and a first call
        cut short by an interruption; ``ms_per_step`` over the steps that were not first calls."""
        first = sum(self.first_calls.values())
        steps_s = (loop_s - first - first_call_in_flight_s - self.parts.get("validation", 0.0)
                   - self.parts.get("checkpoints_in_loop", 0.0))
        timed_steps = steps_run - len(self.first_calls)
        out = {"total_s": time.perf_counter() - self.start, "loop_s": loop_s, "steps_s": steps_s,
               "steps_run": steps_run,
               "ms_per_step": 1000.0 * steps_s / timed_steps if timed_steps > 0 else None,
               "first_calls_s": dict(self.first_calls), "first_calls_total_s": first,
               **{f"{k}_s": v for k, v in self.parts.items()}}
        if self.compile_s:
            out["compiled_by_s"] = dict(self.compile_s)
        if first_call_in_flight_s:
            out["first_call_in_flight_s"] = first_call_in_flight_s
        return out


def run_stage(cfg, stage_cls, stage_dir: Path, previous_dir: Path | None, mesh, priors, prior_params,
              progress: bool, references: dict | None = None) -> Path:
    """Run one stage to ``cfg.train.max_steps`` in ``stage_dir`` (resuming from its checkpoints if any)."""
    clock = WallClock()
    references = references or _load_references(cfg)
    eval_ref = references["eval"]
    stage_priors = priors.configured(cfg) if priors is not None else None
    stage = stage_cls.from_config(cfg, mesh, stage_priors, prior_params)
    prior_params = stage.place_prior_params(prior_params)
    targets = {hw: parallel.replicate(targets_from_reference(r), mesh) for hw, r in references.items()
               if hw != "eval"}
    previous = None
    if previous_dir is not None:
        prev_cfg = stage_config(cfg, previous_dir.name) if previous_dir.name in STAGE_CLASSES else cfg
        prev_stage = STAGE_CLASSES[previous_dir.name if previous_dir.name in STAGE_CLASSES else "coarse_nerf"]
        template = prev_stage.from_config(prev_cfg, mesh).init_state()
        ckpt = Checkpointer(previous_dir / "checkpoints", None, read_only=True)
        previous = ckpt.restore(template)
        ckpt.close()
        log.info("%s starts from %s at step %d", stage.name, previous_dir, int(previous.step))

    if is_writer():
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "val").mkdir(exist_ok=True)
    checkpointer = Checkpointer(stage_dir / "checkpoints", cfg.train.keep_checkpoints)
    state = stage.init_state(previous=previous)
    resumed = checkpointer.latest_step() is not None
    if resumed:
        state = checkpointer.restore(state)
        log.info("resumed %s at step %d", stage_dir, int(state.step))
    if is_writer():
        name = "config.json" if not resumed else f"config.resume-{int(state.step)}.json"
        (stage_dir / name).write_text(cfg.to_json_best_effort(indent=2))
        media.save_image(stage_dir / "reference.png", media.panel(
            {"rgb": eval_ref.rgb * eval_ref.mask[..., None] + (1 - eval_ref.mask[..., None]),
             "opacity": eval_ref.mask}, order=("rgb", "opacity")))
        if stage_priors is not None and stage_priors.random_weights:
            (stage_dir / "RANDOM_PRIORS.txt").write_text(
                "The diffusion priors of this run had RANDOM weights: its guidance was noise.\n")
    metrics_writer = MetricsWriter(stage_dir / "metrics.jsonl")
    ref_camera = cam.reference_camera(cfg.camera)
    start = int(state.step)
    steps_fns = {key: stage.step_fn(key[0], *key[1]) for key in steps_needed(cfg, start)}
    render = stage.render_fn(cfg.eval.height, cfg.eval.width)
    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=not (progress and is_writer()),
               dynamic_ncols=True, desc=stage.name)
    clock.parts["setup"] = time.perf_counter() - clock.start
    loop_start = None
    first_call_since = None  # when the first call in flight started (an interruption reports it)
    step = start
    image_writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # validation PNGs, off the loop's path
    try:
        with _StopRequest() as stop:
            if int(cfg.train.compile_workers) > 0 and steps_fns:
                jobs = {_step_name(kind, hw): (fn, (state, targets[hw], prior_params))
                        for (kind, hw), fn in steps_fns.items()
                        # a three-program step (train.separate_guidance) compiles at first call
                        if hasattr(fn, "lower")}
                jobs["eval_render"] = (render, (state.params, state.grid, ref_camera, state.step))
                with clock.part("compile"):
                    compiled, clock.compile_s = precompile(jobs, int(cfg.train.compile_workers))
                log.info("%s: compiled %d programs in %.1f s (%d at a time)", stage.name, len(jobs),
                         clock.parts["compile"], int(cfg.train.compile_workers))
                steps_fns = {key: _Precompiled(fn, compiled[_step_name(*key)]) if _step_name(*key) in compiled else fn
                             for key, fn in steps_fns.items()}
                if "eval_render" in compiled:
                    render = _Precompiled(render, compiled["eval_render"])
            if stop.requested:
                raise KeyboardInterrupt
            loop_start = last_time = time.perf_counter()
            last_step = start
            first_done = set()
            while step < cfg.train.max_steps:
                hw = resolution_at(cfg, step)
                kind = step_kind(cfg.train.mode, step)
                fn = steps_fns[(kind, hw)]
                if (kind, hw) not in first_done:  # timed on its own (with its compilation unless precompiled)
                    first_done.add((kind, hw))
                    jax.block_until_ready(state)  # the steps still in flight are not this call's
                    first_call_since = time.perf_counter()
                    state, metrics = fn(state, targets[hw], prior_params)
                    jax.block_until_ready(state)
                    clock.first_calls[_step_name(kind, hw)] = time.perf_counter() - first_call_since
                    first_call_since = None
                else:
                    state, metrics = fn(state, targets[hw], prior_params)
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
                    with clock.part("validation"):
                        validate_views(cfg, render, state, ref_camera, stage_dir, step, eval_ref, metrics_writer,
                                       image_writer)
                if step % cfg.train.save_every == 0:
                    with clock.part("checkpoints_in_loop"):
                        checkpointer.save(state)
                bar.update(1)
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        now = time.perf_counter()
        loop_s = now - loop_start if loop_start is not None else 0.0
        if _alive(state):
            log.warning("interrupted at step %d: writing a last checkpoint to %s", int(state.step), stage_dir)
            checkpointer.save(state, force=True)
            checkpointer.wait()
        else:  # a second Ctrl-C inside a step, which had consumed its input
            log.error("interrupted inside a step: its input state is gone; the last checkpoint in %s stands",
                      stage_dir / "checkpoints")
        if is_writer():  # where the time went up to the interruption (a timed run cut short still reports)
            wall = clock.report(loop_s, (int(state.step) if _alive(state) else step) - start,
                                now - first_call_since if first_call_since is not None else 0.0)
            wall["interrupted_at_step"] = int(state.step) if _alive(state) else step
            (stage_dir / "wall_time.json").write_text(json.dumps(wall, indent=2))
        raise
    finally:
        bar.close()
        image_writer.shutdown(wait=True)  # every validation image is on disk before the stage goes on
    loop_s = time.perf_counter() - loop_start
    with clock.part("final_checkpoint"):
        checkpointer.save(state, force=True)
        checkpointer.wait()
        checkpointer.close()
    if cfg.train.time_split:
        # Every process takes part (the timed steps are sharded over all devices); process 0 writes. The loop's
        # compiled step of the timed kind is reused, so only the two prior-free variants compile here.
        hw = resolution_at(cfg, cfg.train.max_steps)
        with clock.part("time_split"):
            timing = time_split(stage, state, targets[hw], prior_params, hw,
                                full_step=steps_fns.get((REF if cfg.train.mode == "reference_only" else RANDOM, hw)))
        if is_writer():
            (stage_dir / "timing.json").write_text(json.dumps(timing, indent=2))
            log.info("%s ms/step split: %s", stage.name, {k: round(v, 2) for k, v in timing.items()
                                                           if isinstance(v, float)})
    if cfg.eval.video and cfg.eval.n_video_views > 0:
        with clock.part("video"):
            write_turntable(cfg, render, state, stage_dir / "video" / "turntable.mp4")
    if is_writer():
        wall = clock.report(loop_s, int(cfg.train.max_steps) - start)
        (stage_dir / "wall_time.json").write_text(json.dumps(wall, indent=2))
        log.info("%s wall time %.1f s: steps %.1f s (%s ms/step), first calls %.1f s, validation %.1f s, "
                 "video %.1f s", stage.name, wall["total_s"], wall["steps_s"],
                 f"{wall['ms_per_step']:.1f}" if wall["ms_per_step"] is not None else "-",
                 wall["first_calls_total_s"], wall.get("validation_s", 0.0), wall.get("video_s", 0.0))
        (stage_dir / DONE).write_text(f"{int(state.step)}\n")
    return stage_dir


def time_split(stage, state, targets, prior_params, hw, repeats: int = 5, full_step=None) -> dict:
    """ms of one random-view step split into render (fwd+bwd of the renderer and the per-view losses),
    guidance (the priors' share) and update (grid update + Adam), medians of ``repeats``.

    update = the update alone (:meth:`update_fn`, on zero gradients); render = full step without priors -
    update; guidance = full step - full step without priors. Of the programs timed, only the step without
    priors compiles a render (the update alone compiles in seconds), and only the full step holds the priors.
    ``full_step``: the caller's jitted ``stage.step_fn(kind, *hw)``, timed instead of a fresh one (each
    ``step_fn`` call is a new jit, compiled again), so a caller that also runs it compiles it only once.
    """
    import dataclasses

    def step_ms(s, pp):
        step = full_step if s is stage and full_step is not None else s.step_fn(kind, *hw)
        return step_latency_ms(step, state, targets, pp, repeats)

    kind = RANDOM if stage.cfg.train.mode != "reference_only" else REF
    no_priors = dataclasses.replace(stage, priors=None, prior_specs=None)
    state = jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, state)
    update = stage.update_fn()
    zero_grads = jax.tree.map(jax.numpy.zeros_like, state.params)
    update_ms = step_latency_ms(lambda s, grads, _: update(s, grads), state, zero_grads, None, repeats)
    plain_ms = step_ms(no_priors, {})
    full_ms = step_ms(stage, prior_params)
    return {"kind": kind, "height": hw[0], "width": hw[1], "step_ms": full_ms,
            "render_ms": max(plain_ms - update_ms, 0.0), "guidance_ms": max(full_ms - plain_ms, 0.0),
            "update_ms": update_ms}


def step_latency_ms(step, state, targets, prior_params, repeats: int) -> float:
    """Median ms of ``repeats`` calls of a donating step (after one warm-up), each on a fresh copy of ``state``
    made and finished before its clock starts, so it is not counted as the step's time. (The copy was once
    inside the timed call; NeuS's "update" then read 11.6 ms, where the profiler puts the whole step without
    priors within 1 ms of its gradient.)"""
    import statistics

    def once():
        fresh = jax.block_until_ready(jax.tree.map(lambda x: x.copy(), state))
        t0 = time.perf_counter()
        jax.block_until_ready(step(fresh, targets, prior_params))
        return 1000.0 * (time.perf_counter() - t0)

    once()
    return statistics.median(once() for _ in range(repeats))


def validate_views(cfg, render, state, ref_camera, workdir: Path, step: int, eval_ref, writer,
                   image_writer: concurrent.futures.Executor | None = None) -> float:
    """Render the reference view and one orbit view at eval resolution; log the eval reference PSNR. Every
    process renders (the render is sharded over all devices); process 0 writes. The panel PNG (~0.4 s of host
    work at 512 px) is made and written by ``image_writer`` when given, so training goes on meanwhile; the caller
    shuts it down (waiting) before the stage ends."""
    side = cam.make_camera(15.0, 90.0, cfg.camera.distance, cfg.camera.fovy_deg)
    ref_out = render(state.params, state.grid, ref_camera, state.step)
    side_out = render(state.params, state.grid, side, state.step)
    if not is_writer():
        return float("nan")
    out, side_out = jax.device_get((ref_out, side_out))
    target = eval_ref.rgb * eval_ref.mask[..., None] + np.asarray(cfg.render.background) * (
        1.0 - eval_ref.mask[..., None])
    psnr = float(losses.psnr(out["rgb"], target))

    def save():
        path = workdir / "val" / f"step_{step:06d}.png"
        try:
            media.save_image(path, np.concatenate([media.panel(out), media.panel(side_out)], axis=0))
        except Exception as e:  # noqa: BLE001 - a lost diagnostic image must not stop (or silently end) a run
            log.warning("validation image %s not written: %s: %s", path, type(e).__name__, e)

    if image_writer is None:
        save()
    else:
        image_writer.submit(save)
    writer.write({"step": step, "eval/ref_psnr": psnr})
    return psnr


def write_turntable(cfg, render, state, path: Path) -> str | None:
    """The orbit video; each frame's panel is made on a host thread while the device renders the next frame.
    Every process renders the frames (the render is sharded over all devices); process 0 writes the video."""
    cams = cam.orbit_cameras(cfg.eval.n_video_views, cfg.eval.elevation_deg, cfg.camera.distance,
                             cfg.camera.fovy_deg)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        panels = []
        for i in range(cfg.eval.n_video_views):
            camera = jax.tree.map(lambda a: a[i], cams)
            out = render(state.params, state.grid, camera, state.step)
            if is_writer():
                panels.append(pool.submit(media.panel, jax.device_get(out)))
        frames = [f.result() for f in panels]
    return media.write_video(path, frames, fps=cfg.eval.fps) if is_writer() else None
