"""``bench profile``: per-op device time of SDS steps and of stage steps, from a profiler trace
(:func:`dreamcraft_jax.profiling.op_profile`).

    python -m dreamcraft_jax.bench profile sd_views1 zero123_views4 coarse_nerf_384px coarse_neus_256px_step
        [--top 25] [--hlo_out hlo/] [--out profile.json]

Cases: ``sd_views<V>`` / ``zero123_views<V>`` (the SDS grad of ``bench sds``), ``coarse_nerf_<R>px`` /
``coarse_neus_<R>px`` (gradient of one random-view step without the priors: render, normals and the per-view
losses, at the middle step of that resolution's phase); with ``_step`` appended, the whole step without the
priors (gradient + grid update + Adam + NaN guard), which is where ``bench stage``'s "update" share lives;
with ``_full``, the whole step with real-size random priors (``--tiny``: tiny ones). NeuS cases first run
``--neus_fit_steps`` reference steps, as ``bench stage`` does. Per case: the op table ``op_profile`` returns
(busy / wall / kernel ms, ops, by source line, by module).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from dreamcraft_jax import parallel
from dreamcraft_jax.bench.harness import error_record, write_partial
from dreamcraft_jax.bench.scenes import fit_scene, neus_reference_fit, phase_mid_step, stage_case
from dreamcraft_jax.bench.sds import sds_case
from dreamcraft_jax.config_file import load_config
from dreamcraft_jax.guidance.random_priors import random_priors
from dreamcraft_jax.kernels.spec import KernelSpec


def add_parser(subparsers) -> argparse.ArgumentParser:
    f = subparsers.add_parser("profile", help="per-op device time of SDS steps and stage renders (profiler trace)")
    f.add_argument("cases", nargs="+",
                   help="sd_views1 zero123_views4 coarse_nerf_384px coarse_neus_256px ...")
    f.add_argument("--config", default="configs/dreamcraft3d.py")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    f.add_argument("--fit_steps", type=int, default=150)
    f.add_argument("--neus_fit_steps", type=int, default=200)
    f.add_argument("--tiny", action="store_true", help="tiny priors (CPU)")
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--top", type=int, default=25)
    f.add_argument("--kernel_breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="turn XLA's GPU command buffers off so each kernel shows up on its own (busy time stays "
                        "right; wall time then includes the extra launches)")
    f.add_argument("--hlo_out", default="", help="folder: write each case's optimized HLO text there")
    f.add_argument("--out", default="")
    return f


def prepare_environment(args) -> None:
    """Before the backend starts (the CLI calls this before the first device use): with ``--kernel_breakdown``,
    XLA's GPU command buffers off. Inside a command buffer (CUDA graph) the profiler sees one event for hundreds
    of kernels."""
    if args.kernel_breakdown:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="


def _case_fn(case: str, args, cfg, state_cache: dict):
    """(jitted fn, its args) of one profile case; ``state_cache`` keeps the fitted scene and the random priors
    across cases."""
    from dreamcraft_jax.stages.volume_stage import RANDOM

    gpu = jax.devices()[0].platform == "gpu"
    sds = re.fullmatch(r"(sd|zero123)_views(\d+)", case)
    stage_match = re.fullmatch(r"(coarse_nerf|coarse_neus)_(\d+)px(_step|_full)?", case)
    if sds:
        return sds_case(sds[1], int(sds[2]), args.tiny, "cudnn" if gpu else None,
                        jnp.bfloat16 if gpu else jnp.float32, jnp.bfloat16)
    if "fitted" not in state_cache:
        with cfg.unlocked():
            cfg.parallel.data, cfg.parallel.fsdp = 1, 1
        state_cache["fitted"] = fit_scene(cfg, args.fit_steps)[1]
    name, res, what = stage_match[1], int(stage_match[2]), stage_match[3]
    if what == "_full" and "priors" not in state_cache:
        state_cache["priors"] = random_priors(cfg, args.tiny, kernels=KernelSpec.from_config(cfg.kernels))
    stage, state, targets, pp = stage_case(
        cfg, name, res, 1, parallel.mesh_from_config(cfg),
        *(state_cache["priors"] if what == "_full" else (None, None)), state_cache["fitted"],
        phase_mid_step(cfg, name, res))
    if name == "coarse_neus":
        state = neus_reference_fit(stage, state, targets, res, args.neus_fit_steps)
    if what:  # the step traced inside a jit that does not donate: repeat calls reuse the state
        inner = stage.step_fn((RANDOM, (res, res)))
        grad_fn = jax.jit(lambda st, t, p: inner(st, t, p))
    else:
        grad_fn = stage.grads_fn((RANDOM, (res, res)))
    return grad_fn, (state, targets, pp if what == "_full" else {})


def run(args) -> dict:
    """The profile report: one op table per case (or its error); each table is printed as it comes."""
    from dreamcraft_jax.profiling import op_profile, print_op_profile

    results, state_cache, cfg = {}, {}, load_config(args.config, args.set)
    for case in args.cases:
        if not (re.fullmatch(r"(sd|zero123)_views(\d+)", case)
                or re.fullmatch(r"(coarse_nerf|coarse_neus)_(\d+)px(_step|_full)?", case)):
            raise SystemExit(f"unknown profile case {case!r}: use sd_views<V>, zero123_views<V>, "
                             "coarse_nerf_<R>px or coarse_neus_<R>px (+ _step: the whole step without priors, "
                             "_full: with them)")
        try:
            grad_fn, fn_args = _case_fn(case, args, cfg, state_cache)
            compiled = grad_fn.lower(*fn_args).compile()
            if args.hlo_out:  # the fusions behind the op names in the table
                Path(args.hlo_out).mkdir(parents=True, exist_ok=True)
                (Path(args.hlo_out) / f"{case}.hlo.txt").write_text(compiled.as_text())
            table = op_profile(compiled, *fn_args, repeats=args.repeats, top=args.top)
        except Exception as e:  # record and go on
            results[case] = error_record(e)
            print(f"{case}: {results[case]['error']}", file=sys.stderr, flush=True)
            continue
        results[case] = table
        print_op_profile(case, table, top=min(args.top, 20))
        if args.out:  # partial results survive a time limit
            write_partial(args.out, "profile", results)
    return {"benchmark": "profile", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "tiny": args.tiny, "results": results}
