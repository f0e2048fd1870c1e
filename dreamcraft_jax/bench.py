"""Benchmarks with JSON output.

    python -m dreamcraft_jax.bench render [--config configs/coarse_nerf.py] [--resolution 384] [--out file.json]

``render``: forward+backward of one coarse-stage view through the pure-jnp renderer (the baseline the Pallas
kernels of issue [3] must beat), split into march (occupancy marching + the density-only pruning pass),
hash-grid encode, MLPs and compositing, each timed forward+backward on the same packed samples. The scene is
first fitted for ``--fit_steps`` reference-view steps at 128 px on the bundled example, so the occupancy grid and
the sample counts are those of a real object rather than of the initial blob.

Timing: median of ``--repeats`` calls after warm-up, each ended with ``block_until_ready``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax import cameras as cam
from dreamcraft_jax import parallel
from dreamcraft_jax.fields import hashgrid, nerf
from dreamcraft_jax.fields.mlp import apply_mlp
from dreamcraft_jax.render import volume


def _time(fn, *args, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1000.0 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": repeats}


def _peak_memory_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU backends have no memory stats
        return None
    return stats.get("peak_bytes_in_use")


def _load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def fit_scene(cfg, steps: int):
    """Fit the bundled example from the reference view for ``steps`` steps at 128 px; returns the state."""
    from dreamcraft_jax.runner import load_targets
    from dreamcraft_jax.stages.coarse_nerf import REF, CoarseNerf, targets_from_reference

    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    with cfg.unlocked():
        cfg.train.mode = "reference_only"
    stage = CoarseNerf.from_config(cfg, mesh)
    state = stage.init_state()
    targets = parallel.replicate(targets_from_reference(load_targets(cfg, 128, 128)), mesh)
    step = stage.step_fn(REF, 128, 128)
    for _ in range(steps):
        state, metrics = step(state, targets)
    jax.block_until_ready(state)
    return stage, state, {k: float(v) for k, v in jax.device_get(metrics).items()}


def bench_render(args) -> dict:
    cfg = _load_config(args.config)
    stage, state, fit_metrics = fit_scene(cfg, args.fit_steps)
    field, spec = stage.field, stage.render
    params, grid = state.params, state.grid
    level_mask = nerf.level_mask(state.step, field)
    res = args.resolution
    n_rays = res * res
    camera = cam.make_camera(15.0, 30.0, cfg.camera.distance, cfg.camera.fovy_deg)  # an off-reference view
    rays_o, rays_d = cam.get_rays(camera, res, res)
    rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    key = jax.random.PRNGKey(0)
    fns = stage.field_fns(params, level_mask)
    results = {}

    no_remat = dataclasses.replace(stage, field=dataclasses.replace(field, remat_encoding=not field.remat_encoding))
    variants = (("rgb", False, False, stage), ("rgb+normals", True, True, stage),
                (f"rgb remat={not field.remat_encoding}", False, False, no_remat))
    for variant, need_normals, need_perturb, st in variants:
        def loss(p, rays_o, rays_d, key, need_normals=need_normals, need_perturb=need_perturb, st=st):
            out = volume.render_rays(rays_o, rays_d, grid, key, st.field_fns(p, level_mask), spec,
                                     need_normals=need_normals, need_normal_perturb=need_perturb)
            total = jnp.sum(out["rgb"]) + jnp.sum(out["opacity"])
            if need_normals:
                total = total + jnp.sum(out["normal"]) + jnp.sum(out["sample_normal_perturb"])
            return total, out

        fwd_bwd = jax.jit(jax.value_and_grad(loss, has_aux=True))
        fwd = jax.jit(lambda p, o, d, k, loss=loss: loss(p, o, d, k)[0])
        try:
            (_, out), _ = jax.block_until_ready(fwd_bwd(params, rays_o, rays_d, key))
            timing = _time(fwd_bwd, params, rays_o, rays_d, key, repeats=args.repeats)
        except Exception as e:  # e.g. out of device memory: record it and go on with the other variants
            results[variant] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"{variant}: {results[variant]['error']}", file=sys.stderr)
            continue
        results[variant] = {
            "forward_backward": timing,
            "forward": _time(fwd, params, rays_o, rays_d, key, repeats=args.repeats),
            "field_samples_per_ray": float(out["n_samples"]) / n_rays,
            "candidates_per_ray": float(out["n_candidates"]) / n_rays,
            "overflow": int(out["overflow"]),
            "opacity_mean": float(jnp.mean(out["opacity"])),
        }

    # Split on the packed samples of one call: each component forward+backward on its own inputs.
    samples, stats = jax.jit(lambda o, d, k: volume.sample_rays(o, d, grid, k, fns, spec))(rays_o, rays_d, key)
    march = jax.jit(lambda o, d, k: volume.sample_rays(o, d, grid, k, fns, spec))
    march_only = jax.jit(lambda o, d, k: volume.march(o, d, grid, k, spec, spec.budgets(n_rays)[0]))
    ray = jnp.minimum(samples.ray_idx, n_rays - 1)
    points = rays_o[ray] + rays_d[ray] * samples.t_mid[:, None]
    unit = jnp.clip((points + field.radius) / (2 * field.radius), 0.0, 1.0)

    def encode_vjp(table, x):
        y, vjp = jax.vjp(lambda t: hashgrid.encode(t, x, field.grid, level_mask), table)
        return y, vjp(jnp.ones_like(y))

    enc = hashgrid.encode(params["encoding"], unit, field.grid, level_mask)

    def mlp_vjp(p, e):
        def f(p, e):
            raw = apply_mlp(field.density_net, p["density_net"], e)
            feat = apply_mlp(field.feature_net, p["feature_net"], e)
            return jnp.sum(raw) + jnp.sum(feat)
        return jax.grad(f, argnums=(0, 1))(p, e)

    sigma = nerf.density(params, points, field, level_mask)
    albedo = jax.nn.sigmoid(jax.random.normal(key, (points.shape[0], 3)))

    def composite_vjp(sigma, albedo):
        def f(sigma, albedo):
            w, _, _ = volume.compositing_weights(sigma, samples)
            rgb = volume.accumulate(w, albedo, samples, n_rays)
            return jnp.sum(rgb) + jnp.sum(volume.accumulate(w, samples.t_mid, samples, n_rays))
        return jax.grad(f, argnums=(0, 1))(sigma, albedo)

    results["split_rgb_variant"] = {
        "march_occupancy_only": _time(march_only, rays_o, rays_d, key, repeats=args.repeats),
        "march_with_density_pruning": _time(march, rays_o, rays_d, key, repeats=args.repeats),
        "encode_fwd_bwd": _time(jax.jit(encode_vjp), params["encoding"], unit, repeats=args.repeats),
        "mlp_fwd_bwd": _time(jax.jit(mlp_vjp), {k: params[k] for k in ("density_net", "feature_net")}, enc,
                             repeats=args.repeats),
        "composite_fwd_bwd": _time(jax.jit(composite_vjp), sigma, albedo, repeats=args.repeats),
        "packed_slots": int(samples.valid.shape[0]),
        "valid_samples": int(jnp.sum(samples.valid)),
        "candidate_slots": spec.budgets(n_rays)[0],
    }
    return {
        "benchmark": "render",
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "config": args.config,
        "resolution": res,
        "settings": {"hashgrid": dict(cfg.field.hashgrid), "num_samples_per_ray": cfg.render.num_samples_per_ray,
                     "step_size": spec.step_size, "grid_resolution": spec.grid_resolution,
                     "alpha_threshold": spec.alpha_threshold, "early_stop_eps": spec.early_stop_eps,
                     "candidate_samples_per_ray": spec.candidate_samples_per_ray,
                     "samples_per_ray": spec.samples_per_ray, "normal_type": field.normal_type,
                     "remat_encoding": field.remat_encoding},
        "fit": {"steps": args.fit_steps, "final_metrics": fit_metrics,
                "grid_occupancy": float(jnp.mean(grid.binary))},
        "results": results,
        "peak_memory_bytes": _peak_memory_bytes(),
    }


def print_table(report: dict) -> None:
    r = report["results"]
    print(f"render fwd+bwd, {report['resolution']}x{report['resolution']}, {report['device']}, jax {report['jax']}")
    print(f"{'variant':<14} {'fwd+bwd ms':>11} {'fwd ms':>8} {'samples/ray':>12} {'cand/ray':>9} {'overflow':>9}")
    for name in [k for k in r if not k.startswith("split")]:
        v = r[name]
        if "error" in v:
            print(f"{name:<14} {v['error']}")
            continue
        print(f"{name:<14} {v['forward_backward']['median_ms']:>11.2f} {v['forward']['median_ms']:>8.2f} "
              f"{v['field_samples_per_ray']:>12.2f} {v['candidates_per_ray']:>9.2f} {v['overflow']:>9d}")
    s = r["split_rgb_variant"]
    print("split (rgb variant, each fwd+bwd on the same packed samples):")
    for k in ("march_occupancy_only", "march_with_density_pruning", "encode_fwd_bwd", "mlp_fwd_bwd",
              "composite_fwd_bwd"):
        print(f"  {k:<28} {s[k]['median_ms']:>9.2f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamcraft_jax.bench")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("render", help="coarse-stage render forward+backward, pure-jnp path")
    p.add_argument("--config", default="configs/coarse_nerf.py")
    p.add_argument("--resolution", type=int, default=384)
    p.add_argument("--fit_steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if not Path(args.config).exists():
        print(f"error: config file {args.config} not found", file=sys.stderr)
        return 2
    report = bench_render(args)
    print_table(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
