"""``bench geometry``: full stage-2 (DMTet geometry) steps with real-size random priors, split into render /
guidance / update, and the official 5000-step stage projected from them.

    python -m dreamcraft_jax.bench geometry [--resolution 1024] [--tet_resolutions 64] [--zbuffers xla pallas]
        [--views 1] [--out geometry.json]

Per (tet resolution, z-buffer, views) case, on the stage's sphere init (``neus.sphere_radius``; the face count is
reported, a real object has more surface than a sphere in the same box) at ``--at_step``: the normal-kind step's
latency split into render / guidance / update (:func:`stages.timing.split_step_ms`), the rgb-kind step's latency,
the pipelined ms per step of the official cycle (one rgb step, ``geometry.n_rgb - 1`` normal steps), one
evaluation render, the first calls' compile times, the mesh's size and the budgets' overflow, the device-memory
peak so far. An evaluation render is split into the mesh extraction (once per state) and the view. The
projection: 5000 steps x the cycle's ms per step, and with the first calls. With ``--out`` each part is written
as soon as it is measured (first calls, then the cycle and the projection, the split, the rgb step, evaluation):
a case cut off by a time limit or failing midway keeps what it measured, beside its ``error``.
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
from dreamcraft_jax.bench.harness import (
    device_kind,
    error_record,
    peak_memory_bytes,
    pipelined_steps_ms,
    time_calls,
    write_partial,
)
from dreamcraft_jax.config_file import load_config
from dreamcraft_jax.guidance.random_priors import random_priors
from dreamcraft_jax.kernels.spec import KernelSpec


def add_parser(subparsers) -> argparse.ArgumentParser:
    g = subparsers.add_parser("geometry", help="stage-2 (DMTet) steps with real-size random priors, projection")
    g.add_argument("--config", default="configs/dreamcraft3d.py")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    g.add_argument("--resolution", type=int, default=1024, help="train resolution (the official 1024)")
    g.add_argument("--tet_resolutions", nargs="+", type=int, default=[64])
    g.add_argument("--zbuffers", nargs="+", default=["xla", "pallas"], choices=["xla", "pallas"])
    g.add_argument("--views", nargs="+", type=int, default=[1], help="random views per device")
    g.add_argument("--at_step", type=int, default=2500, help="training step the timed steps run at")
    g.add_argument("--tiny", action="store_true", help="tiny priors (CPU smoke test of the same code path)")
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--no_split", action="store_true", help="time the normal step whole, without its split")
    g.add_argument("--out", default="")
    return g


def _case(cfg, res: int, tet: int, zbuffer: str, views: int, mesh, priors, prior_params, args, r: dict,
          save) -> dict:
    """Fill ``r`` with the case's numbers, most wanted first (the cycle and the projection, then the split, the
    rgb step, evaluation), calling ``save()`` after each part: a run cut off by its time limit keeps what it
    measured."""
    from dreamcraft_jax.config import stage_config
    from dreamcraft_jax.stages.base import build_stage
    from dreamcraft_jax.stages.geometry import NORMAL, RGB
    from dreamcraft_jax.stages.timing import split_step_ms, step_latency_ms

    scfg = stage_config(cfg, "geometry")
    with scfg.unlocked():
        scfg.geometry.tet_resolution = tet
        scfg.kernels.raster_zbuffer = zbuffer == "pallas"
        scfg.train.random_views_per_device = views
        scfg.train.ref_views_per_device = 1
        scfg.data.heights, scfg.data.widths, scfg.data.resolution_milestones = (res,), (res,), ()
    t0 = time.perf_counter()
    stage = build_stage("geometry", scfg, mesh, priors, prior_params)
    state = stage.init_state()
    state = state.replace(step=parallel.replicate(jnp.asarray(args.at_step, jnp.int32), mesh))
    r["init_s"] = time.perf_counter() - t0
    r["views_per_step"] = {"ref": parallel.view_shards(mesh), "random": views * parallel.view_shards(mesh)}
    inputs = stage.step_inputs((RGB, (res, res)))
    steps, first_call_s = {}, r.setdefault("first_call_s", {})
    for kind in (RGB, NORMAL):
        steps[kind] = stage.step_fn((kind, (res, res)))
        t1 = time.perf_counter()
        _, metrics = jax.block_until_ready(steps[kind](jax.tree.map(lambda x: x.copy(), state), *inputs))
        first_call_s[kind] = time.perf_counter() - t1
        save()
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    r["mesh"] = {"faces": m.get("n_faces"), "vertices": m.get("n_vertices"), "max_faces": int(scfg.geometry.max_faces),
                 "tet_vertices": int(stage.grid.vertices.shape[0]), "mesh_overflow": m.get("mesh_overflow"),
                 "raster_overflow_ref": m.get("ref/raster_overflow"),
                 "raster_overflow_random": m.get("random/raster_overflow")}
    cycle = (steps[RGB],) + (steps[NORMAL],) * (int(scfg.geometry.n_rgb) - 1)
    r["cycle_pipelined_ms_per_step"] = cycle_ms = pipelined_steps_ms(cycle, state, *inputs, args.repeats)
    steps_total = int(scfg.train.max_steps)

    def with_first_calls():  # minutes: the steps plus every first call timed so far and the init
        return (steps_total * cycle_ms / 1e3 + sum(first_call_s.values()) + r["init_s"]) / 60.0

    r["projection"] = {"steps": steps_total, "minutes": steps_total * cycle_ms / 60e3,
                       "minutes_with_first_calls": with_first_calls()}
    save()
    if args.no_split:
        r["normal_step"] = {"step_ms": step_latency_ms(steps[NORMAL], state, *inputs, repeats=args.repeats)}
    else:
        r["normal_step"] = split_step_ms(stage, state, (NORMAL, (res, res)), {(NORMAL, (res, res)): steps[NORMAL]},
                                         repeats=args.repeats)
    r["rgb_step_ms"] = step_latency_ms(steps[RGB], state, *inputs, repeats=args.repeats)
    save()
    render = stage.eval_render(int(scfg.eval.height), int(scfg.eval.width))
    camera = cam.reference_camera(scfg.camera)
    t2 = time.perf_counter()
    view = jax.block_until_ready(stage.eval_inputs(state))
    first_call_s["eval_mesh"] = time.perf_counter() - t2
    t2 = time.perf_counter()
    jax.block_until_ready(render(view, camera))
    first_call_s["eval_view"] = time.perf_counter() - t2
    r["eval_view_ms"] = time_calls(lambda s: render(s, camera), view, repeats=args.repeats)["median_ms"]
    r["eval_mesh_ms"] = time_calls(stage.eval_inputs, state, repeats=args.repeats)["median_ms"]
    r["projection"]["minutes_with_first_calls"] = with_first_calls()  # now with evaluation's first calls
    r["peak_memory_bytes_so_far"] = peak_memory_bytes()
    return r


def run(args) -> dict:
    cfg = load_config(args.config, args.set)
    with cfg.unlocked():
        cfg.parallel.fsdp = 1
    mesh = parallel.mesh_from_config(cfg)
    priors, prior_params = random_priors(cfg, args.tiny, kernels=KernelSpec.from_config(cfg.kernels))
    results = {}

    def save():
        if args.out:
            write_partial(args.out, "geometry", results)

    for tet in args.tet_resolutions:
        for zbuffer in args.zbuffers:
            for views in args.views:
                name = f"tet{tet}_{args.resolution}px_{zbuffer}_views{views}"
                results[name] = r = {}
                try:
                    _case(cfg, args.resolution, tet, zbuffer, views, mesh, priors, prior_params, args, r, save)
                    s = r["normal_step"]
                    parts = "" if args.no_split else (f" (render {s['render_ms']:.1f}, guidance "
                                                      f"{s['guidance_ms']:.1f}, update {s['update_ms']:.1f})")
                    print(f"{name:<30} normal {s['step_ms']:8.1f} ms{parts}  rgb {r['rgb_step_ms']:8.1f} ms  cycle "
                          f"{r['cycle_pipelined_ms_per_step']:8.1f} ms/step  eval {r['eval_view_ms']:.1f} ms  "
                          f"faces {r['mesh']['faces']:.0f}  5000 steps {r['projection']['minutes']:.2f} min",
                          flush=True)
                except Exception as e:  # noqa: BLE001 - out of memory etc.: recorded, the other cases still run
                    r.update(error_record(e))  # with what the case measured before the error
                    print(f"{name}: {r['error']}", file=sys.stderr, flush=True)
                save()
    return {"benchmark": "geometry", "device": device_kind(), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "devices": len(jax.devices()), "tiny": args.tiny,
            "config": args.config, "overrides": list(args.set), "resolution": args.resolution,
            "at_step": args.at_step, "results": results, "peak_memory_bytes": peak_memory_bytes()}
