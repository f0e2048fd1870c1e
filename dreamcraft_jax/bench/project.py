"""``bench project``: the wall time of the official 5000 + 5000-step run, projected from `bench stage` JSON files
of several runs (a device call rarely fits all three cases) and, optionally, a `bench eval` file.

    python -m dreamcraft_jax.bench project stage_a.json stage_b.json [eval.json] [--out projection.json]

Results merge in the order given, a later file's case replacing an earlier one's. The projection
(:func:`project_wall`): per phase, steps x ms per step (pipelined (reference, random) pairs where measured, else
the mean of the two latencies), plus the evaluation renders of a run and the first calls' compilation. Nothing is
timed here: no device work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dreamcraft_jax.bench import report as report_lib
from dreamcraft_jax.config_file import load_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    j = subparsers.add_parser("project", help="5000 + 5000-step wall-time projection from `bench stage` JSON files")
    j.add_argument("files", nargs="+", help="stage-bench JSON files; a later file's case replaces an earlier one's")
    j.add_argument("--config", default="configs/dreamcraft3d.py")
    j.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    j.add_argument("--out", default="")
    return j


def project_wall(cfg, results: dict) -> dict | None:
    """Wall time of the official 5000 + 5000 steps (alternate: half reference, half random-view steps) from the
    1-view step times of `bench stage` ``results``: 1a at 128 px until step 3000 then 384, 1b at 256. Per step:
    the pipelined time of alternating (reference, random) pairs where measured, else the mean of the two
    latencies. None when a phase's 1-view case is missing.

    Keys: ``minutes``, ``parts`` (minutes per phase and per stage's evaluation renders), ``step_ms`` (per phase:
    ``ms_per_step`` and where it is ``from``), ``first_calls_s`` and ``minutes_with_first_calls`` (or
    ``first_calls_not_timed``), ``eval_renders_not_timed`` where a stage's eval-view time is missing."""
    from dreamcraft_jax.config import stage_config

    def mean_step(stage, res):
        r = results.get(f"{stage}_{res}px_views1")
        if not r or "error" in r:
            return None
        if "alternating_pipelined_ms_per_step" in r:  # the training loop's own rhythm (older files lack it)
            return r["alternating_pipelined_ms_per_step"], "pipelined (reference, random) pairs"
        return 0.5 * (r["random_step"]["step_ms"] + r["ref_step_ms"]), "mean of the two step latencies"

    nerf_cfg, neus_cfg = stage_config(cfg, "coarse_nerf"), stage_config(cfg, "coarse_neus")
    phases = []
    milestones = [0, *nerf_cfg.data.resolution_milestones, nerf_cfg.train.max_steps]
    for i, h in enumerate(nerf_cfg.data.heights):
        phases.append(("coarse_nerf", h, milestones[i + 1] - milestones[i]))
    phases.append(("coarse_neus", neus_cfg.data.heights[0], neus_cfg.train.max_steps))
    total = 0.0
    parts, step_ms = {}, {}
    for stage, res, steps in phases:
        measured = mean_step(stage, res)
        if measured is None:
            return None
        ms, how = measured
        parts[f"{stage}_{res}px_{steps}_steps_min"] = ms * steps / 60000.0
        step_ms[f"{stage}_{res}px"] = {"ms_per_step": ms, "from": how}
        total += ms * steps / 60000.0
    # Evaluation renders of a run: 2 validation views every val_every steps and the turntable, timed on the
    # stage's last phase (files from before the eval timing lack it; then the part is left out, and said).
    missing = []
    for stage, scfg in (("coarse_nerf", nerf_cfg), ("coarse_neus", neus_cfg)):
        res = scfg.data.heights[-1]
        eval_ms = (results.get(f"{stage}_{res}px_views1") or {}).get("eval_view_ms")
        if eval_ms is None:
            missing.append(stage)
            continue
        views = 2 * (int(scfg.train.max_steps) // int(scfg.train.val_every))
        views += int(scfg.eval.n_video_views) if scfg.eval.video else 0
        parts[f"{stage}_eval_renders_{views}_views_min"] = eval_ms * views / 60000.0
        total += eval_ms * views / 60000.0
    out = {"minutes": total, "parts": parts, "step_ms": step_ms}
    if missing:
        out["eval_renders_not_timed"] = missing
    # Compilation, paid once per run: the first calls of each phase's two steps and of each stage's eval render.
    # Files from before this timing lack them: the sum is then given with the cases it lacks, and no total.
    first_s, first_missing = 0.0, []
    calls = [(f"{stage}_{res}px", ("ref", "random")) for stage, res, _ in phases]
    calls += [(f"{stage}_{scfg.data.heights[-1]}px", ("eval_view",))
              for stage, scfg in (("coarse_nerf", nerf_cfg), ("coarse_neus", neus_cfg))]
    for case, kinds in calls:
        measured = (results.get(f"{case}_views1") or {}).get("first_call_s", {})
        for kind in kinds:
            if kind in measured:
                first_s += measured[kind]
            else:
                first_missing.append(f"{case} {kind}")
    out["first_calls_s"] = first_s
    if first_missing:
        out["first_calls_not_timed"] = first_missing
    else:
        out["minutes_with_first_calls"] = total + first_s / 60.0
    return out


def measure(args) -> dict:
    """The projection report from ``args.files``. A `bench eval` file gives each stage's evaluation-render time at
    the config's ``render.eval_samples_per_ray`` instead of the stage files' (timed at the budget of their day)."""
    cfg = load_config(args.config, args.set)
    results, sources, devices, eval_ms = {}, {}, set(), {}
    for path in args.files:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read stage-bench JSON {path}: {e}") from None
        if report.get("benchmark") == "eval":
            devices.add(report.get("device"))
            for r in report["results"].values():
                if float(r["samples_per_ray"]) == float(cfg.render.eval_samples_per_ray):
                    eval_ms[r["stage"]] = (r["ms"], path)
            continue
        if report.get("benchmark") != "stage":
            raise SystemExit(f"error: {path} is neither a `bench stage` nor a `bench eval` result "
                             f"(benchmark={report.get('benchmark')!r})")
        devices.add(report.get("device"))
        for name, r in report["results"].items():
            if "error" not in r:
                results[name], sources[name] = r, path
    for stage_name, (ms, path) in eval_ms.items():  # the stage's last-phase case carries its eval-view time
        for name in [n for n in results if n.startswith(stage_name) and n.endswith("_views1")]:
            results[name] = {**results[name], "eval_view_ms": ms}
            sources[f"{stage_name}_eval_view"] = path
    projection = project_wall(cfg, results)
    if projection is None:
        wanted = "coarse_nerf_<res>px_views1 for every NeRF resolution and coarse_neus_<res>px_views1"
        raise SystemExit(f"error: the files lack a case the projection needs ({wanted}); have {sorted(results)}")
    return {"benchmark": "stage_projection", "devices": sorted(d for d in devices if d), "config": args.config,
            "overrides": list(args.set), "projection": projection,
            "sources": {name: sources[name] for name in sources if name.endswith(("_views1", "_eval_view"))}}


def run(args) -> dict:
    """Project, print the parts (:func:`report.print_projection`), return the report."""
    report = measure(args)
    report_lib.print_projection(report)
    return report
