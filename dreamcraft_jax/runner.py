"""The training loop around the stages: the run folder, priors, checkpoints, metrics, validation, video.

``train(cfg)`` runs ``cfg.stage`` (one stage, or "all" = ``cfg.stages`` in order), each stage from the previous
stage's handoff, each in its own folder of the run folder (:mod:`dreamcraft_jax.run_folder` has the layout).
Stages are reached through :mod:`dreamcraft_jax.stages.base` alone (build, init_state, step_key, step_fn,
step_inputs, eval_render, handoff), so a new stage needs no change here.

Ctrl-C stops the run after the step in flight and writes a last checkpoint (a second Ctrl-C stops at once,
still checkpointing the last finished step when one is at hand). Only process 0 writes (multi-host).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import signal
import threading
import time
from pathlib import Path

import jax
import ml_collections
from tqdm import tqdm

from dreamcraft_jax import parallel
from dreamcraft_jax.checkpoints import Checkpointer, restore_latest
from dreamcraft_jax.config import STAGES, schedule_is_zero, stage_config, validate
from dreamcraft_jax.evaluation import validate_views, write_turntable
from dreamcraft_jax.export import media
from dreamcraft_jax.kernels.spec import KernelSpec
from dreamcraft_jax.metrics import MetricsWriter, scalars
from dreamcraft_jax.run_folder import (
    RunFolderError,
    finished_step,
    is_writer,
    mark_done,
    resolve_workdir,
    stage_dir,
)
from dreamcraft_jax.stages.base import build_stage
from dreamcraft_jax.xla_flags import apply_xla_flags

log = logging.getLogger("dreamcraft_jax")

__all__ = ["RunFolderError", "train", "run_stage", "enable_compilation_cache", "precompile"]


def stages_to_run(cfg) -> list[str]:
    return list(cfg.stages) if cfg.stage == "all" else [cfg.stage]


def _previous_stage(cfg, name: str) -> str:
    order = list(cfg.stages) if name in cfg.stages else list(STAGES)
    return order[max(order.index(name) - 1, 0)]


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
    """Run the configured stage(s); returns the run folder. A later stage starts from the previous stage's last
    checkpoint (``cfg.init_from`` for a single later stage)."""
    validate(cfg)
    apply_xla_flags(cfg.xla_flags)  # before the first device use (the distributed init, the mesh) reads them
    parallel.maybe_initialize_distributed(cfg)
    workdir, resuming = resolve_workdir(cfg)
    names = stages_to_run(cfg)
    previous_dir = None
    if names[0] != "coarse_nerf":  # a later stage starts from the last checkpoint of the stage before it
        before = _previous_stage(cfg, names[0])
        if cfg.init_from:
            previous_dir = stage_dir(Path(cfg.init_from), before)
        elif not (resuming and (workdir / names[0] / "checkpoints").is_dir()):
            raise RunFolderError(
                f"stage {names[0]} starts from a {before} checkpoint: pass "
                f"--config.init_from=<run folder of that stage> (or --config.stage=all to run both)")
    # Everything that can fail on bad input happens before anything is written: the mesh, the priors, and the
    # first stage (which loads its reference image).
    mesh = parallel.mesh_from_config(cfg)
    enable_compilation_cache(cfg.compilation_cache_dir)
    priors, prior_params = load_run_priors(cfg, mesh)
    first = build_stage(names[0], stage_config(cfg, names[0]), mesh, priors, prior_params)
    if is_writer():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / ("config.json" if not resuming else "config.resume.json")).write_text(
            cfg.to_json_best_effort(indent=2))
    for name in names:
        folder = workdir / name
        scfg = stage_config(cfg, name)
        done = finished_step(folder)
        if done is not None and done >= scfg.train.max_steps:
            log.info("stage %s already finished in %s", name, folder)
            previous_dir = folder
            continue
        stage = first if name == names[0] else build_stage(name, scfg, mesh, priors, prior_params)
        previous = None
        if previous_dir is not None:
            previous = restore_handoff(cfg, _previous_stage(cfg, name), previous_dir, mesh)
            log.info("%s starts from %s at step %d", name, previous_dir, int(previous.step))
        run_stage(stage, folder, previous, progress)
        previous_dir = folder
    return workdir


def load_run_priors(cfg, mesh):
    """Load the priors once for all stages (their per-stage settings are applied by ``Priors.configured``):
    (Priors, params), or (None, None) when no stage of the run uses them."""
    from dreamcraft_jax.data.reference import reference_from_config
    from dreamcraft_jax.guidance.priors import demo_prior_paths, load_priors, reference_rgb_on_white

    uses = any(not schedule_is_zero(stage_config(cfg, n).loss[k]) for n in stages_to_run(cfg)
               for k in ("lambda_sd", "lambda_3d_sd"))
    if not uses:
        return None, None
    kernels = KernelSpec.from_config(cfg.kernels)
    source = cfg.guidance.priors
    if source == "random_real_size":
        from dreamcraft_jax.guidance.random_priors import random_priors

        priors, params = random_priors(cfg, tiny=False, kernels=kernels)
        what = "real-size (SD 2.1-base / Zero123 shapes) networks with random weights"
    else:
        if source == "demo":
            cfg = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
            cfg.guidance.sd.pretrained, cfg.guidance.zero123.pretrained = demo_prior_paths(cfg.guidance.demo_dir)
        ref = reference_from_config(cfg, cfg.guidance.zero123.resolution, cfg.guidance.zero123.resolution)
        priors, params = load_priors(cfg, reference_rgb_on_white(ref.rgb, ref.mask), mesh, kernels=kernels)
        what = "tiny random stand-ins"
    if priors.random_weights:
        log.warning("=" * 100)
        log.warning("RANDOM PRIORS: the diffusion priors of this run are %s; their guidance is noise. Real runs "
                    "set --config.guidance.priors=pretrained with --config.guidance.sd.pretrained / "
                    "--config.guidance.zero123.pretrained.", what)
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


def _step_name(key) -> str:
    kind, (h, w) = key
    return f"{kind}_{h}x{w}"


def run_stage(stage, folder: Path, previous=None, progress: bool = True) -> Path:
    """Run one stage to its ``train.max_steps`` in ``folder`` (resuming from its checkpoints if any), starting
    from ``previous``: the handoff of the stage before (None: a fresh start)."""
    cfg = stage.cfg
    clock = WallClock()
    if is_writer():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "val").mkdir(exist_ok=True)
    checkpointer = Checkpointer(folder / "checkpoints", cfg.train.keep_checkpoints)
    state = stage.init_state(previous=previous)
    resumed = checkpointer.latest_step() is not None
    if resumed:
        state = checkpointer.restore(state)
        log.info("resumed %s at step %d", folder, int(state.step))
    if is_writer():
        name = "config.json" if not resumed else f"config.resume-{int(state.step)}.json"
        (folder / name).write_text(cfg.to_json_best_effort(indent=2))
        reference = stage.reference_images()
        if reference is not None:
            media.save_image(folder / "reference.png", media.panel(reference, order=tuple(reference)))
        priors = getattr(stage, "priors", None)
        if priors is not None and priors.random_weights:
            (folder / "RANDOM_PRIORS.txt").write_text(
                "The diffusion priors of this run had RANDOM weights: its guidance was noise.\n")
    metrics_writer = MetricsWriter(folder)
    start = int(state.step)
    max_steps = stage.max_steps
    steps_fns = {key: stage.step_fn(key) for key in stage.step_keys(start, max_steps)}
    inputs = {key: stage.step_inputs(key) for key in steps_fns}
    render = stage.eval_render(cfg.eval.height, cfg.eval.width)
    bar = tqdm(total=max_steps, initial=start, disable=not (progress and is_writer()), dynamic_ncols=True,
               desc=stage.name)
    clock.parts["setup"] = time.perf_counter() - clock.start
    loop_start = None
    first_call_since = None  # when the first call in flight started (an interruption reports it)
    step = start
    image_writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # validation PNGs, off the loop's path
    try:
        with _StopRequest() as stop:
            if int(cfg.train.compile_workers) > 0 and steps_fns:
                jobs = {_step_name(key): (fn, (state, *inputs[key])) for key, fn in steps_fns.items()
                        # a three-program step (train.separate_guidance) compiles at first call
                        if hasattr(fn, "lower")}
                jobs["eval_render"] = (render, (stage.eval_inputs(state), next(iter(stage.eval_cameras().values()))))
                with clock.part("compile"):
                    compiled, clock.compile_s = precompile(jobs, int(cfg.train.compile_workers))
                log.info("%s: compiled %d programs in %.1f s (%d at a time)", stage.name, len(jobs),
                         clock.parts["compile"], int(cfg.train.compile_workers))
                steps_fns = {key: _Precompiled(fn, compiled[_step_name(key)]) if _step_name(key) in compiled else fn
                             for key, fn in steps_fns.items()}
                if "eval_render" in compiled:
                    render = _Precompiled(render, compiled["eval_render"])
            if stop.requested:
                raise KeyboardInterrupt
            loop_start = last_time = time.perf_counter()
            last_step = start
            first_done = set()
            while step < max_steps:
                key = stage.step_key(step)
                fn = steps_fns[key]
                if key not in first_done:  # timed on its own (with its compilation unless precompiled)
                    first_done.add(key)
                    jax.block_until_ready(state)  # the steps still in flight are not this call's
                    first_call_since = time.perf_counter()
                    state, metrics = fn(state, *inputs[key])
                    jax.block_until_ready(state)
                    clock.first_calls[_step_name(key)] = time.perf_counter() - first_call_since
                    first_call_since = None
                else:
                    state, metrics = fn(state, *inputs[key])
                step += 1
                if step % cfg.train.log_every == 0 or step == max_steps:
                    record = scalars(metrics)
                    now = time.perf_counter()
                    kind, (height, width) = key
                    record.update(step=step, kind=kind, height=height, width=width,
                                  ms_per_step=1000.0 * (now - last_time) / max(step - last_step, 1))
                    last_time, last_step = now, step
                    metrics_writer.write(record)
                    shown = {k: record[k] for k in ("loss", "ref/psnr") if k in record}
                    bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in shown.items()})
                if step % cfg.train.val_every == 0 or step == max_steps:
                    with clock.part("validation"):
                        validate_views(stage, render, stage.eval_inputs(state), folder, step, metrics_writer,
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
            log.warning("interrupted at step %d: writing a last checkpoint to %s", int(state.step), folder)
            checkpointer.save(state, force=True)
            checkpointer.wait()
        else:  # a second Ctrl-C inside a step, which had consumed its input
            log.error("interrupted inside a step: its input state is gone; the last checkpoint in %s stands",
                      folder / "checkpoints")
        if is_writer():  # where the time went up to the interruption (a timed run cut short still reports)
            wall = clock.report(loop_s, (int(state.step) if _alive(state) else step) - start,
                                now - first_call_since if first_call_since is not None else 0.0)
            wall["interrupted_at_step"] = int(state.step) if _alive(state) else step
            (folder / "wall_time.json").write_text(json.dumps(wall, indent=2))
        raise
    finally:
        bar.close()
        metrics_writer.close()
        image_writer.shutdown(wait=True)  # every validation image is on disk before the stage goes on
    loop_s = time.perf_counter() - loop_start
    with clock.part("final_checkpoint"):
        checkpointer.save(state, force=True)
        checkpointer.wait()
        checkpointer.close()
    if cfg.train.time_split:
        # Every process takes part (the timed steps are sharded over all devices); process 0 writes. The loop's
        # compiled step of the timed kind is reused where the loop ran it.
        with clock.part("time_split"):
            timing = stage.timing_split(state, steps_fns)
        if timing is not None and is_writer():
            (folder / "timing.json").write_text(json.dumps(timing, indent=2))
            log.info("%s ms/step split: %s", stage.name, {k: round(v, 2) for k, v in timing.items()
                                                           if isinstance(v, float)})
    with clock.part("outputs"):  # every process: the outputs may be computed from sharded arrays
        written = stage.finish(state, folder)
    for kind, path in (written or {}).items():
        log.info("%s: wrote %s %s", stage.name, kind, path)
    if cfg.eval.video and cfg.eval.n_video_views > 0:
        with clock.part("video"):
            write_turntable(cfg, render, stage.eval_inputs(state), folder / "video" / "turntable.mp4",
                            stage.video_panels)
    if is_writer():
        wall = clock.report(loop_s, max_steps - start)
        (folder / "wall_time.json").write_text(json.dumps(wall, indent=2))
        log.info("%s wall time %.1f s: steps %.1f s (%s ms/step), first calls %.1f s, validation %.1f s, "
                 "video %.1f s", stage.name, wall["total_s"], wall["steps_s"],
                 f"{wall['ms_per_step']:.1f}" if wall["ms_per_step"] is not None else "-",
                 wall["first_calls_total_s"], wall.get("validation_s", 0.0), wall.get("video_s", 0.0))
        mark_done(folder, int(state.step))
    return folder


def restore_handoff(cfg, name: str, folder: Path, mesh):
    """The handoff of stage ``name`` (of the run config ``cfg``) from its last checkpoint in ``folder``."""
    stage = build_stage(name, stage_config(cfg, name), mesh)
    return stage.handoff(restore_latest(folder / "checkpoints", stage.init_state()))
