"""``bench compile``: what a step's first call costs, split, per set of XLA flags (and config overrides).

    python -m dreamcraft_jax.bench compile [--cases coarse_nerf_128px_random] \
        [--variants default= no_autotune=--xla_gpu_autotune_level=0 per_level=|kernels.encoder_per_level=True]

A cold run compiles each step program at its first call: 400 s for stage 1's six programs on an H200, as much as
the training itself. This bench splits that cost into trace + lower (Python, JAX) and the XLA compile (HLO
passes, code generation, autotuning on the device), and times the compiled step (pipelined, as the training loop
issues it), so XLA flags that cut compile time can be weighed against what they cost per step.

Every flag variant runs in a fresh child process (``XLA_FLAGS`` is read once, when the backend starts, and XLA's
autotuning results are cached in memory per process), with JAX's persistent compilation cache off, so each
variant compiles from nothing. The steps run at the middle of their phase on the stage's initial state (a
compile-time measurement; step times compare variants with one another, not with ``bench stage``'s fitted
scene). The parent never starts a backend; a child prints one ``RESULT_TAG`` line with its JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jax

from dreamcraft_jax import parallel
from dreamcraft_jax.bench import report as report_lib
from dreamcraft_jax.bench.harness import pipelined_steps_ms
from dreamcraft_jax.bench.scenes import phase_mid_step, stage_case
from dreamcraft_jax.config_file import load_config
from dreamcraft_jax.guidance.random_priors import random_priors
from dreamcraft_jax.kernels.spec import KernelSpec

RESULT_TAG = "COMPILE_BENCH_RESULT "
DEFAULT_CASES = ("coarse_nerf_128px_random",)
DEFAULT_VARIANTS = ("default=",)


def add_parser(subparsers) -> argparse.ArgumentParser:
    c = subparsers.add_parser("compile", help="first-call cost of stage steps (trace + lower, XLA compile) and their "
                                              "step time, per set of XLA flags, each in a fresh process")
    c.add_argument("--config", default="configs/dreamcraft3d.py")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    c.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES),
                   help="<coarse_nerf|coarse_neus>_<R>px_<ref|random>")
    c.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                   help="name=XLA_FLAGS[|key=value...], each in its own process, e.g. default= "
                        "no_autotune=--xla_gpu_autotune_level=0 per_level=|kernels.encoder_per_level=True")
    c.add_argument("--repeats", type=int, default=20)
    c.add_argument("--timeout_s", type=int, default=900, help="per variant")
    c.add_argument("--tiny", action="store_true", help="tiny priors (CPU smoke test of the same code path)")
    c.add_argument("--child", default="", help=argparse.SUPPRESS)  # set by the parent for its children
    c.add_argument("--out", default="")
    return c


def parse_case(case: str) -> tuple[str, int, str]:
    """``<stage>_<R>px_<kind>`` -> (stage, R, kind), e.g. coarse_nerf_128px_random; kind: ref | random."""
    stage, _, rest = case.rpartition("_")
    kind = rest
    stage, _, res = stage.rpartition("_")
    if stage not in ("coarse_nerf", "coarse_neus") or not res.endswith("px") or not res[:-2].isdigit() \
            or kind not in ("ref", "random"):
        raise SystemExit(f"error: case {case!r}: expected <coarse_nerf|coarse_neus>_<R>px_<ref|random>, "
                         "e.g. coarse_nerf_128px_random")
    return stage, int(res[:-2]), kind


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """``name=FLAGS[|key=value|...]`` -> (name, XLA flags, config overrides of this variant), e.g.
    ``no_autotune=--xla_gpu_autotune_level=0`` or ``per_level=|kernels.encoder_per_level=True``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not (name[0].isalnum() and name.replace("_", "").replace("-", "").isalnum()):
        raise SystemExit(f"error: variant {text!r}: expected name=XLA_FLAGS[|key=value...] (flags may be empty: "
                         "default=)")
    flags, *sets = rest.split("|")
    for item in sets:
        if "=" not in item:
            raise SystemExit(f"error: variant {text!r}: config override {item!r} is not key=value")
    return name, flags.strip(), sets


def child_result(args) -> dict:
    """This process's variant: every case traced, lowered, compiled, run once, then timed. Keys: ``device``,
    ``jax``, ``xla_flags_seen``, ``overrides_seen``, ``setup_s`` and per case ``trace_lower_s``, ``compile_s``,
    ``first_run_s``, ``pipelined_ms_per_step``, ``repeats``, ``finite_loss``."""
    from dreamcraft_jax.stages.volume_stage import RANDOM, REF

    t_start = time.perf_counter()
    cfg = load_config(args.config, args.set)
    with cfg.unlocked():
        cfg.parallel.data, cfg.parallel.fsdp = 1, 1
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    priors, prior_params = random_priors(cfg, args.tiny, kernels=KernelSpec.from_config(cfg.kernels))
    out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "xla_flags_seen": os.environ.get("XLA_FLAGS", ""), "overrides_seen": list(args.set),
           "setup_s": time.perf_counter() - t_start, "cases": {}}
    for case in args.cases:
        stage_name, res, kind = parse_case(case)
        stage, state, targets, pp = stage_case(cfg, stage_name, res, 1, mesh, priors, prior_params, None,
                                               phase_mid_step(cfg, stage_name, res))
        step = stage.step_fn((REF if kind == "ref" else RANDOM, (res, res)))
        if not hasattr(step, "lower"):
            raise SystemExit(f"error: {case}: the step is not one program (train.separate_guidance?); "
                             "this bench times one-program steps")
        t0 = time.perf_counter()
        lowered = step.lower(state, targets, pp)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        state, metrics = compiled(state, targets, pp)
        jax.block_until_ready((state, metrics))
        t3 = time.perf_counter()
        finite = bool(jax.numpy.isfinite(metrics["loss"]))
        ms = pipelined_steps_ms((compiled,), state, targets, pp, args.repeats)  # as the training loop issues them
        out["cases"][case] = {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "first_run_s": t3 - t2,
                              "pipelined_ms_per_step": ms, "repeats": args.repeats, "finite_loss": finite}
    return out


def _child_command(args, name: str, sets=()) -> list[str]:
    # --xla_flags '': the parent's XLA_FLAGS (its --xla_flags applied) + the variant's, nothing added in the child.
    cmd = [sys.executable, "-m", "dreamcraft_jax.bench", "--xla_flags", "", "compile", "--child", name,
           "--config", args.config,
           "--repeats", str(args.repeats), "--cases", *args.cases]
    for item in [*args.set, *sets]:
        cmd += ["--set", item]
    return cmd + (["--tiny"] if args.tiny else [])


def measure(args) -> dict:
    """Each ``--variants`` entry in its own child process; returns the report (one entry per variant)."""
    for case in args.cases:
        parse_case(case)  # bad names fail here, not in every child
    variants = [parse_variant(v) for v in args.variants]
    base_flags = os.environ.get("XLA_FLAGS", "")
    results = {}
    commands = {}
    for name, flags, sets in variants:
        env = dict(os.environ, XLA_FLAGS=f"{base_flags} {flags}".strip())
        commands[name] = _child_command(args, name, sets)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)  # every variant compiles from nothing
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(commands[name], env=env, capture_output=True, text=True, timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            results[name] = {"xla_flags": flags, "overrides": sets, "error": f"timed out after {args.timeout_s} s"}
            print(f"{name}: timed out after {args.timeout_s} s", file=sys.stderr, flush=True)
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results[name] = {"xla_flags": flags, "overrides": sets,
                             "error": f"exit {proc.returncode}: {' | '.join(tail)[:500]}"}
            print(f"{name}: {results[name]['error']}", file=sys.stderr, flush=True)
            continue
        results[name] = {"xla_flags": flags, "overrides": sets, "process_s": time.perf_counter() - t0,
                         **json.loads(lines[-1][len(RESULT_TAG):])}
        for case, r in results[name]["cases"].items():
            print(f"{name:<16} {case:<28} trace+lower {r['trace_lower_s']:6.1f} s  compile {r['compile_s']:6.1f} s"
                  f"  first run {r['first_run_s']:5.1f} s  {r['pipelined_ms_per_step']:8.2f} ms/step", flush=True)
        if args.out:  # partial results survive a time limit
            _write_partial(args.out, results, args, commands)
    return _report(results, args, commands)


def _report(results: dict, args, commands: dict) -> dict:
    # The device as the children saw it: the parent never starts a backend (it would hold the GPU's memory).
    seen = next((r for r in results.values() if "device" in r), {})
    return {"benchmark": "compile", "device": seen.get("device", "?"), "jax": seen.get("jax", jax.__version__),
            "config": args.config, "overrides": list(args.set), "tiny": args.tiny, "cases": list(args.cases),
            "base_xla_flags": os.environ.get("XLA_FLAGS", ""), "results": results,
            # "python", not this interpreter's path: the command to rerun, and no machine's paths in the JSON.
            "commands": {name: shlex.join(["python", *cmd[1:]]) for name, cmd in commands.items() if name in results}}


def _write_partial(path: str, results: dict, args, commands: dict) -> None:
    # Not harness.write_partial: its header asks the (never started) backend for the device.
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**_report(results, args, commands), "partial": True}, indent=2))


def run(args) -> dict | None:
    """A child prints its tagged result line and returns None; the parent runs the variants, prints the table
    (:func:`report.print_compile_table`) and returns the report."""
    if args.child:
        print(RESULT_TAG + json.dumps(child_result(args)), flush=True)
        return None
    report = measure(args)
    report_lib.print_compile_table(report)
    return report
