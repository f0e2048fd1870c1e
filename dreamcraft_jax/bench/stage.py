"""``bench stage``: ms per step of full coarse-stage steps (render + both priors + update) with real-size random
priors, per stage, resolution and view count, and the wall time of the official run projected from them.

    python -m dreamcraft_jax.bench stage [--nerf_resolutions 128 384] [--neus_resolutions 256] [--views 1 4]
        [--out stage.json]

Per case: the random-view step's latency split into render / guidance / update (``VolumeStage.timing_split``; with
``--no_split`` the whole step only), the reference step's latency, the pipelined time of alternating (reference,
random) pairs (the training loop's rhythm), one evaluation render, the first calls' compile times, the sample
budgets' use, and the device-memory peak so far. NeRF cases start from the scene fitted for ``--fit_steps``;
NeuS cases from the NeuS init carried over from it, after ``--neus_fit_steps`` reference steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

from dreamcraft_jax import cameras as cam
from dreamcraft_jax import parallel
from dreamcraft_jax.bench import report as report_lib
from dreamcraft_jax.bench.harness import error_record, peak_memory_bytes, pipelined_steps_ms, time_calls, write_partial
from dreamcraft_jax.bench.project import project_wall
from dreamcraft_jax.bench.scenes import fit_scene, neus_reference_fit, phase_mid_step, stage_case
from dreamcraft_jax.config_file import load_config
from dreamcraft_jax.guidance.random_priors import random_priors
from dreamcraft_jax.kernels.spec import KernelSpec


def add_parser(subparsers) -> argparse.ArgumentParser:
    t = subparsers.add_parser("stage", help="full coarse NeRF / NeuS steps with real-size random priors")
    t.add_argument("--config", default="configs/dreamcraft3d.py")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    t.add_argument("--nerf_resolutions", nargs="*", type=int, default=[128, 384])
    t.add_argument("--neus_resolutions", nargs="*", type=int, default=[256])
    t.add_argument("--views", nargs="+", type=int, default=[1, 4])
    t.add_argument("--fit_steps", type=int, default=300)
    t.add_argument("--neus_fit_steps", type=int, default=200,
                   help="reference steps of the NeuS case before its timing (its grid starts fully occupied)")
    t.add_argument("--at_step", type=int, default=-1,
                   help="training step the timed steps run at (-1: the middle of the steps at that resolution)")
    t.add_argument("--tiny", action="store_true", help="tiny priors (CPU smoke test of the same code path)")
    t.add_argument("--data", type=int, default=-1, help="devices on the data axis (-1: all)")
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--no_split", action="store_true",
                   help="time the random step whole, without its render / guidance / update split")
    t.add_argument("--out", default="")
    return t


def eval_view_ms(stage, state, repeats: int) -> tuple[float, float]:
    """(ms of one evaluation render, s of its first call incl. compilation): rgb, normals, depth, opacity of the
    reference view at ``eval`` resolution, no gradient; what each validation view and turntable frame costs."""
    render = stage.eval_render(int(stage.cfg.eval.height), int(stage.cfg.eval.width))
    camera = cam.reference_camera(stage.cfg.camera)
    t0 = time.perf_counter()
    jax.block_until_ready(render(state, camera))
    first_s = time.perf_counter() - t0
    return time_calls(lambda s: render(s, camera), state, repeats=repeats)["median_ms"], first_s


def _time_case(args, stage_name, res, views, cfg, mesh, priors, prior_params, fitted) -> dict:
    """One (stage, resolution, views) case's result entry."""
    from dreamcraft_jax.stages.timing import step_latency_ms
    from dreamcraft_jax.stages.volume_stage import RANDOM, REF

    at_step = args.at_step if args.at_step >= 0 else phase_mid_step(cfg, stage_name, res)
    stage, state, targets, pp = stage_case(cfg, stage_name, res, views, mesh, priors, prior_params, fitted, at_step)
    t1 = time.perf_counter()
    ref_step = stage.step_fn((REF, (res, res)))
    random_step = stage.step_fn((RANDOM, (res, res)))  # compiled once: timed, then its metrics
    # The first call of each step compiles it: what a run pays once per stage and resolution.
    first_call_s = {}
    for kind, fn in (("ref", ref_step), ("random", random_step)):
        t2 = time.perf_counter()
        jax.block_until_ready(fn(jax.tree.map(lambda x: x.copy(), state), targets, pp))
        first_call_s[kind] = time.perf_counter() - t2
    if stage_name == "coarse_neus":
        state = neus_reference_fit(stage, state, targets, res, args.neus_fit_steps, ref_step, pp)
    if args.no_split:  # the random step's latency only (two compiles fewer)
        split = {"kind": "random", "height": res, "width": res,
                 "step_ms": step_latency_ms(random_step, state, targets, pp, repeats=args.repeats)}
    else:
        split = stage.timing_split(state, {(RANDOM, (res, res)): random_step}, repeats=args.repeats)
    ref_ms = step_latency_ms(ref_step, state, targets, pp, repeats=args.repeats)
    pair_ms = pipelined_steps_ms((ref_step, random_step), state, targets, pp, args.repeats)
    eval_ms, first_call_s["eval_view"] = eval_view_ms(stage, state, args.repeats)
    n_views = views * parallel.view_shards(mesh)
    # What the fixed sample budgets hold at this step (a budget well above use is wasted work).
    _, metrics = random_step(jax.tree.map(lambda x: x.copy(), state), targets, pp)
    sampling = {k: float(v) for k, v in jax.device_get(metrics).items()
                if k.split("/")[-1] in ("samples_per_ray", "candidates_per_ray", "overflow")}
    return {"random_step": split, "ref_step_ms": ref_ms, "views_per_step": n_views,
            "alternating_pipelined_ms_per_step": pair_ms, "eval_view_ms": eval_ms,
            "first_call_s": first_call_s,
            "sampling": sampling, "budgets_per_ray": {
                "candidates": float(stage.render.candidate_samples_per_ray),
                "samples": float(stage.render.samples_per_ray)},
            "at_step": at_step, "active_levels": int(jnp.sum(stage.level_mask(at_step) != 0)),
            "fit_steps_before": args.neus_fit_steps if stage_name == "coarse_neus" else 0,
            "random_views_per_s": n_views / (split["step_ms"] * 1e-3),
            "wall_incl_compile_s": time.perf_counter() - t1,
            # The process's device-memory peak so far (cases run in order; None on CPU).
            "peak_memory_bytes_so_far": peak_memory_bytes()}


def measure(args) -> dict:
    """The stage report: one entry per case, and the projection of the official run's wall time."""
    cfg = load_config(args.config, args.set)
    with cfg.unlocked():
        cfg.parallel.data, cfg.parallel.fsdp = args.data, 1
    t0 = time.perf_counter()
    nerf_stage, fitted, _ = fit_scene(cfg, args.fit_steps)
    print(f"fitted the scene in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    mesh = parallel.mesh_from_config(cfg)
    priors, prior_params = random_priors(cfg, args.tiny, kernels=KernelSpec.from_config(cfg.kernels))
    results = {}
    cases = [("coarse_nerf", r) for r in args.nerf_resolutions] + [("coarse_neus", r) for r in args.neus_resolutions]
    for stage_name, res in cases:
        for views in args.views:
            name = f"{stage_name}_{res}px_views{views}"
            try:
                results[name] = r = _time_case(args, stage_name, res, views, cfg, mesh, priors, prior_params, fitted)
                if args.out:  # partial results survive a time limit
                    write_partial(args.out, "stage", results)
                split = r["random_step"]
                parts = ("" if args.no_split else f" (render {split['render_ms']:.1f}, guidance "
                         f"{split['guidance_ms']:.1f}, update {split['update_ms']:.1f})")
                print(f"{name:<28} random {split['step_ms']:8.1f} ms{parts}  ref {r['ref_step_ms']:8.1f} ms  "
                      f"ref+random pipelined {r['alternating_pipelined_ms_per_step']:8.1f} ms/step  eval view "
                      f"{r['eval_view_ms']:.1f} ms", flush=True)
            except Exception as e:  # out of memory etc.: record and go on
                results[name] = error_record(e)
                print(f"{name}: {results[name]['error']}", file=sys.stderr, flush=True)
    projection = project_wall(cfg, results)
    return {"benchmark": "stage", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "devices": len(jax.devices()), "tiny": args.tiny,
            "config": args.config, "at_step": args.at_step,
            "kernels_backend": nerf_stage.render.backend, "overrides": list(args.set), "results": results,
            "projection": projection,
            "peak_memory_bytes": peak_memory_bytes()}


def run(args) -> dict:
    """Time the cases, print the table (:func:`report.print_stage_table`), return the report."""
    report = measure(args)
    report_lib.print_stage_table(report)
    return report
