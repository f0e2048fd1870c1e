"""``bench eval``: evaluation renders (validation views, turntable frames) per sample budget.

    python -m dreamcraft_jax.bench eval [--stages coarse_nerf coarse_neus] [--budgets 64 32 24] [--out eval.json]

Per (stage, budget): ms per view at the stage's ``eval`` resolution (median of ``--repeats`` renders, each waited
for), the first call's seconds (compilation included), and what the budget loses against the largest one: PSNR of
the rgb and normal images and the max opacity difference. On the scene fitted for ``--fit_steps`` (NeRF) and the
NeuS that carries it over after ``--neus_fit_steps`` reference steps. `bench project` reads these files.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from dreamcraft_jax import cameras as cam
from dreamcraft_jax import parallel
from dreamcraft_jax.bench.harness import time_calls, write_partial
from dreamcraft_jax.bench.scenes import fit_scene, neus_reference_fit, phase_mid_step, stage_case
from dreamcraft_jax.config_file import load_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    e = subparsers.add_parser("eval", help="evaluation-render time per sample budget, and what a smaller budget loses")
    e.add_argument("--config", default="configs/dreamcraft3d.py")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    e.add_argument("--stages", nargs="+", default=["coarse_nerf", "coarse_neus"],
                   choices=["coarse_nerf", "coarse_neus"])
    e.add_argument("--budgets", nargs="+", type=float, default=[64, 32, 24])
    e.add_argument("--fit_steps", type=int, default=300)
    e.add_argument("--neus_fit_steps", type=int, default=200)
    e.add_argument("--repeats", type=int, default=5)
    e.add_argument("--out", default="")
    return e


def run(args) -> dict:
    """The eval report: one entry ``<stage>_budget<B>`` per stage and budget, largest budget first."""
    from dreamcraft_jax import losses
    from dreamcraft_jax.config import stage_config

    cfg = load_config(args.config, args.set)
    with cfg.unlocked():
        cfg.parallel.data, cfg.parallel.fsdp = 1, 1
    _, fitted, _ = fit_scene(cfg, args.fit_steps)
    mesh = parallel.mesh_from_config(cfg)
    budgets = sorted({float(b) for b in args.budgets}, reverse=True)
    results = {}

    for stage_name in args.stages:
        scfg = stage_config(cfg, stage_name)
        res = int(scfg.data.heights[-1])
        stage, state, targets, _ = stage_case(cfg, stage_name, res, 1, mesh, None, None, fitted,
                                              phase_mid_step(cfg, stage_name, res))
        if stage_name == "coarse_neus":
            state = neus_reference_fit(stage, state, targets, res, args.neus_fit_steps)
        camera = cam.reference_camera(scfg.camera)
        best = None
        for budget in budgets:
            name = f"{stage_name}_budget{budget:g}"
            render = stage.eval_render(int(scfg.eval.height), int(scfg.eval.width), samples_per_ray=budget)
            t0 = time.perf_counter()
            image = jax.device_get(render(state, camera))
            first_s = time.perf_counter() - t0
            timing = time_calls(lambda s: render(s, camera), state, repeats=args.repeats)
            best = best or image
            results[name] = {"stage": stage_name, "samples_per_ray": budget, "ms": timing["median_ms"],
                             "first_call_s": first_s, "height": int(scfg.eval.height),
                             "width": int(scfg.eval.width),
                             "vs_largest_budget": {"rgb_psnr": float(losses.psnr(image["rgb"], best["rgb"])),
                                                   "normal_psnr": float(losses.psnr(image["normal"], best["normal"])),
                                                   "opacity_max_abs": float(np.max(np.abs(
                                                       image["opacity"] - best["opacity"])))}}
            print(f"{name:<28} {timing['median_ms']:8.1f} ms  rgb {results[name]['vs_largest_budget']['rgb_psnr']:6.1f}"
                  f" dB  normal {results[name]['vs_largest_budget']['normal_psnr']:6.1f} dB vs budget "
                  f"{budgets[0]:g}", flush=True)
            if args.out:
                write_partial(args.out, "eval", results)
    return {"benchmark": "eval", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "config": args.config, "overrides": list(args.set), "results": results}
