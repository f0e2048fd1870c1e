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
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax import bench_compile, parallel
from dreamcraft_jax import cameras as cam
from dreamcraft_jax import config as config_lib
from dreamcraft_jax.fields import hashgrid, nerf
from dreamcraft_jax.fields.mlp import apply_mlp
from dreamcraft_jax.guidance.random_priors import TINY_UNET, TINY_VAE, random_params, random_priors
from dreamcraft_jax.models.reference_configs import SD21_BASE_UNET, SD_VAE, ZERO123_UNET
from dreamcraft_jax.render import volume
from dreamcraft_jax.xla_flags import DEFAULT_XLA_FLAGS, apply_xla_flags


def _default_rounds() -> int:
    """Pipelined batches per timing: 3 on an accelerator; 1 on the CPU, where the benches run as smoke tests of
    tiny cases (the test suite) and a batch of a compile-bound suite's steps is what costs."""
    return 1 if jax.devices()[0].platform == "cpu" else 3


def _time(fn, *args, repeats: int, warmup: int = 2, pipelined: bool = False, rounds: int | None = None) -> dict:
    """Median / min / max ms of ``repeats`` calls, each ended with ``block_until_ready`` (latency).

    ``pipelined``: also ``pipelined_ms``, the time of ``repeats`` calls issued back to back with one wait at the
    end, divided by ``repeats``: the step time of a training loop, where the host enqueues step n + 1 while the
    device still runs step n (JAX dispatch is asynchronous), so host launch overhead hides behind device work.
    As in a training loop, each call's result replaces the previous one (whose buffers go back to the allocator
    once its call has run). ``pipelined_held_ms`` keeps all ``repeats`` results alive instead, as this bench
    did before: each call then writes its outputs to new addresses, which XLA's CUDA graphs must be updated for.
    Both are the median over ``rounds`` batches (``*_rounds_ms`` list them; default :func:`_default_rounds`):
    one batch is one sample.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1000.0 * (time.perf_counter() - t0))
    out = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": repeats}
    if pipelined:
        rounds = _default_rounds() if rounds is None else rounds
        for key, hold in (("pipelined", False), ("pipelined_held", True)):
            batches = []
            for _ in range(max(1, rounds)):
                t0 = time.perf_counter()
                if hold:
                    result = [fn(*args) for _ in range(repeats)]
                else:
                    for _ in range(repeats):
                        result = fn(*args)
                jax.block_until_ready(result)
                batches.append(1000.0 * (time.perf_counter() - t0) / repeats)
                del result
            out[f"{key}_ms"] = statistics.median(batches)
            out[f"{key}_rounds_ms"] = batches
    return out


def _write_partial(path: str, benchmark: str, results: dict) -> None:
    """The results so far, with the header a full report has (a run cut off by its time limit keeps them, and
    `bench project` reads them)."""
    Path(path).write_text(json.dumps({"benchmark": benchmark, "partial": True,
                                      "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                                      "results": results}, indent=2))


def _peak_memory_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU backends have no memory stats
        return None
    return stats.get("peak_bytes_in_use")


def _load_config(path: str, overrides=()):
    """The config of a config file, with ``--set key=value`` overrides (typed like the value they replace)."""
    import importlib.util

    from dreamcraft_jax.config import validate

    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for item in overrides or ():
        key, sep, text = item.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        try:
            for part in parents:
                node = node[part]
            old = node[leaf]
        except (KeyError, AttributeError, TypeError):
            raise SystemExit(f"error: --set {item!r}: no config key {key!r}") from None
        if not sep:
            raise SystemExit(f"error: --set needs key=value, got {item!r}")
        try:
            if isinstance(old, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1")
            else:
                value = type(old)(text) if isinstance(old, (int, float, str)) else text
        except ValueError:
            raise SystemExit(f"error: --set {item!r}: {key} takes a {type(old).__name__}") from None
        with cfg.unlocked():
            node[leaf] = value
    validate(cfg)
    from dreamcraft_jax.models import layers

    layers.configure_groupnorm_kernels(cfg.kernels)  # before any prior is traced
    return cfg


def fit_scene(cfg, steps: int):
    """Fit the bundled example from the reference view for ``steps`` steps at 128 px: (stage, state, metrics of
    the last step); 0 steps: the initial state, nothing compiled, no metrics."""
    from dreamcraft_jax.runner import load_targets
    from dreamcraft_jax.stages.coarse_nerf import REF, CoarseNerf, targets_from_reference

    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    cfg = cfg.copy_and_resolve_references()  # the caller's config keeps its training mode
    with cfg.unlocked():
        cfg.train.mode = "reference_only"
    stage = CoarseNerf.from_config(cfg, mesh)
    state = stage.init_state()
    if steps <= 0:
        return stage, state, {}
    targets = parallel.replicate(targets_from_reference(load_targets(cfg, 128, 128)), mesh)
    step = stage.step_fn(REF, 128, 128)
    for _ in range(steps):
        state, metrics = step(state, targets)
    jax.block_until_ready(state)
    return stage, state, {k: float(v) for k, v in jax.device_get(metrics).items()}


def _rel_diff(got, ref, grid_spec=None) -> tuple[float, list[float] | None]:
    """max |got - ref| / max |ref| over the whole hash table and, with ``grid_spec``, per level (each level's
    difference relative to that level's own max: a defect of some levels stands out from rounding over all)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)

    def rel(a, b):
        return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30)

    per_level = None if grid_spec is None else [
        rel(got[int(o):int(o + n)], ref[int(o):int(o + n)]) for o, n in zip(grid_spec.offsets, grid_spec.level_sizes)]
    return rel(got, ref), per_level


def _agreement(image, ref_image, table_grad, ref_table_grad, grid_spec=None) -> dict:
    """Max |image difference| and the hash-table gradient's difference relative to the reference's max (per level
    too with ``grid_spec``). Atomics sum in another order than XLA's scatter: rounding-level agreement expected."""
    total, per_level = _rel_diff(table_grad, ref_table_grad, grid_spec)
    out = {"max_abs_image_diff_vs_xla": float(jnp.max(jnp.abs(image - ref_image))),
           "table_grad_rel_diff_vs_xla": total}
    if per_level is not None:
        out["table_grad_rel_diff_per_level"] = per_level
    return out


def _render_bench_loss(out: dict, need_normals: bool, need_perturb: bool) -> jax.Array:
    """Scalar of a render's outputs whose gradient reaches every part the variants differ in."""
    total = jnp.sum(out["rgb"]) + jnp.sum(out["opacity"])
    if need_normals:
        total = total + jnp.sum(out["normal"])
    if need_perturb:
        total = total + jnp.sum(out["sample_normal_perturb"])
    return total


def _f64_encode_points(table, unit, grid, mask, *, valid=None, **backend_options):
    """:func:`nerf.encode_points` with the table gathered in float64 (x64 on) and the features rounded to
    float32: the float32 points' own trilinear weights, so the same forward to an ulp, and the table
    gradient's products and sums in float64. ``backend_options`` (backend, remat, backward, ...) pick how the
    real call computes the same values: ignored here."""
    del backend_options
    features = hashgrid.encode(table.astype(jnp.float64), unit.astype(jnp.float32), grid, level_mask=mask,
                               valid=valid, skip_masked_levels=True)
    return features.astype(jnp.float32)


def _compare_with_f64_table_gradient(results, table_grads, images, variants, params, rays_o, rays_d, key, grid,
                                     level_mask, xla_stage, grid_spec) -> None:
    """Each variant's table gradient against one accumulated in float64 (the XLA render of the same outputs, its
    hash-grid products and scatter-adds in float64, and every parameter, so every MLP matmul, in float64): which
    of two float32 gradients is off, not just by how much they differ. Adds ``table_grad_rel_err_vs_f64`` (+ per
    level) to each variant and an ``f64 <outputs>`` entry (its sample count and image difference) to the results.

    The MLPs must run in float64 too: in float32 on a GPU, XLA's matmuls take TF32, and at the fine levels, where
    the finite-difference normals' +-1/eps terms nearly cancel, a reference with TF32 MLPs agrees with XLA's own
    TF32 path by construction (as the first H200 run showed), not with the exact gradient."""
    from unittest import mock

    for suffix, need_normals, need_perturb in (("rgb", False, False), ("rgb+normals", True, True)):
        names = [v[0] for v in variants if v[0].split(" ", 1)[1] == suffix and v[0] in table_grads
                 and not v[0].startswith("xla-unjittered")]
        if not names:
            continue

        def loss(p, need_normals=need_normals, need_perturb=need_perturb):
            p = jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, p)
            out = volume.render_rays(rays_o, rays_d, grid, key, xla_stage.field_fns(p, level_mask),
                                     xla_stage.render, need_normals=need_normals, need_normal_perturb=need_perturb)
            return _render_bench_loss(out, need_normals, need_perturb), out

        try:
            with jax.enable_x64(True), mock.patch.object(nerf, "encode_points", _f64_encode_points):
                (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
                truth, image = np.asarray(grads["encoding"], np.float64), np.asarray(out["rgb"])
        except Exception as e:  # a diagnostic: record and go on
            results[f"f64 {suffix}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"f64 {suffix}: {results[f'f64 {suffix}']['error']}", file=sys.stderr, flush=True)
            continue
        results[f"f64 {suffix}"] = {"n_samples": int(out["n_samples"]),
                                    "max_abs_image_diff_vs_xla": float(np.max(np.abs(image - np.asarray(
                                        images.get("xla " + suffix, image)))))}
        for name in names:
            err, per_level = _rel_diff(table_grads[name], truth, grid_spec)
            results[name].update(table_grad_rel_err_vs_f64=err, table_grad_rel_err_vs_f64_per_level=per_level)
            print(f"{name}: table gradient vs float64 {err:.2e}; per level " +
                  " ".join(f"{d:.1e}" for d in per_level), flush=True)


def bench_render(args) -> dict:
    cfg = _load_config(args.config, args.set)
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

    def with_backend(backend, **field_kw):
        return dataclasses.replace(stage, field=dataclasses.replace(field, backend=backend, **field_kw),
                                   render=dataclasses.replace(spec, backend=backend))

    xla, xla_no_remat = with_backend("xla"), with_backend("xla", remat_encoding=not field.remat_encoding)
    variants = [("xla rgb", False, False, xla), ("xla rgb+normals", True, True, xla),
                (f"xla rgb remat={not field.remat_encoding}", False, False, xla_no_remat),
                # The same rays in another order: how much XLA's own table gradient moves with the order of its
                # scatter-add (float32 sums of cancelling +-1/(2 eps) finite-difference terms). Without jitter and
                # normal noise (drawn per ray / sample slot, they would move with the order).
                ("xla-unjittered rgb+normals", True, False, xla),
                ("xla-unjittered-permuted rgb+normals", True, False, xla)]
    if args.pallas:
        pallas = with_backend("pallas")  # the config's kernel choices
        # The others name what they change and leave the finite-difference kernel off unless they are "fd".
        atomic = with_backend("pallas", hashgrid_backward="atomic", fused_finite_difference=False)
        unfused = with_backend("pallas", fused_density=False, fused_finite_difference=False)
        reduced = with_backend("pallas", hashgrid_backward="reduced", fused_finite_difference=False)
        no_fd = with_backend("pallas", fused_finite_difference=False)
        fd = with_backend("pallas", hashgrid_backward="reduced", fused_finite_difference=True)
        fd_plain = with_backend("pallas", fused_finite_difference=True)  # no block pre-reduction anywhere
        fd_mlp = with_backend("pallas", hashgrid_backward="reduced", fused_finite_difference=True, fused_mlp=True)
        fd_mlp_columns = with_backend("pallas", hashgrid_backward="reduced", fused_finite_difference=True,
                                      fused_mlp=True, fd_columns=True)
        fd_mlp_x3, fd_mlp_ieee = (with_backend("pallas", hashgrid_backward="reduced", fused_finite_difference=True,
                                               fused_mlp=True, fused_mlp_precision=p) for p in ("tf32x3", "ieee"))
        fd_levels = with_backend("pallas", hashgrid_backward="reduced", fused_finite_difference=True,
                                 encoder_per_level=True)
        variants += [("pallas rgb", False, False, pallas), ("pallas rgb+normals", True, True, pallas),
                     ("pallas-unfused rgb", False, False, unfused),
                     ("pallas-unfused rgb+normals", True, True, unfused),
                     ("pallas-reduced rgb", False, False, reduced), ("pallas-reduced rgb+normals", True, True, reduced),
                     ("pallas-fd rgb+normals", True, True, fd), ("pallas-fd-plain rgb+normals", True, True, fd_plain),
                     # The main pass encodes the samples with the encoder kernel, not in the finite-difference
                     # kernel's call (CENTER): what that fusion saves.
                     ("pallas-fd-nocenter rgb+normals", True, True, fd),
                     ("pallas-fd-mlp rgb+normals", True, True, fd_mlp), ("pallas-fd-mlp rgb", False, False, fd_mlp),
                     ("pallas-fd-mlp-columns rgb+normals", True, True, fd_mlp_columns),
                     # The fused MLPs' matmuls in three-pass TF32 / float32 FMAs: time and numerics (with
                     # --f64_reference) against the one-pass TF32 default.
                     ("pallas-fd-mlp-tf32x3 rgb+normals", True, True, fd_mlp_x3),
                     ("pallas-fd-mlp-ieee rgb+normals", True, True, fd_mlp_ieee),
                     ("pallas-fd-levels rgb+normals", True, True, fd_levels),
                     ("pallas-fd-levels rgb", False, False, fd_levels),
                     ("pallas-atomic rgb", False, False, atomic), ("pallas-atomic rgb+normals", True, True, atomic),
                     ("pallas-nofd rgb+normals", True, True, no_fd),
                     ("pallas rgb+normals no-perturb", True, False, pallas)]
    if args.variants:
        unknown = set(args.variants) - {v[0] for v in variants}
        if unknown:
            raise SystemExit(f"unknown --variants {sorted(unknown)}; choose from {[v[0] for v in variants]}")
        variants = [v for name in args.variants for v in variants if v[0] == name]  # in the order asked for
    images, table_grads = {}, {}
    permutation = jnp.asarray(np.random.default_rng(0).permutation(n_rays))
    inverse = jnp.argsort(permutation)
    for variant, need_normals, need_perturb, st in variants:
        unjittered, permuted = variant.startswith("xla-unjittered"), variant.startswith("xla-unjittered-permuted")
        separate_main_pass = variant.startswith("pallas-fd-nocenter")

        def loss(p, rays_o, rays_d, key, need_normals=need_normals, need_perturb=need_perturb, st=st,
                 unjittered=unjittered, permuted=permuted, separate_main_pass=separate_main_pass):
            key = None if unjittered else key
            if permuted:
                rays_o, rays_d = rays_o[permutation], rays_d[permutation]
            fns = st.field_fns(p, level_mask)
            if separate_main_pass:
                fns = dataclasses.replace(fns, radiance_normal=None)
            out = volume.render_rays(rays_o, rays_d, grid, key, fns, st.render,
                                     need_normals=need_normals, need_normal_perturb=need_perturb)
            if permuted:
                out = {k: v[inverse] if getattr(v, "ndim", 0) and v.shape[0] == n_rays else v
                       for k, v in out.items()}
            return _render_bench_loss(out, need_normals, need_perturb), out

        fwd_bwd = jax.jit(jax.value_and_grad(loss, has_aux=True))
        fwd = jax.jit(lambda p, o, d, k, loss=loss: loss(p, o, d, k)[0])
        try:
            (_, out), grads = jax.block_until_ready(fwd_bwd(params, rays_o, rays_d, key))
            timing = _time(fwd_bwd, params, rays_o, rays_d, key, repeats=args.repeats)
        except Exception as e:  # e.g. out of device memory: record it and go on with the other variants
            results[variant] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"{variant}: {results[variant]['error']}", file=sys.stderr)
            continue
        images[variant] = out["rgb"]
        table_grads[variant] = grads["encoding"]
        results[variant] = {
            "forward_backward": timing,
            "forward": _time(fwd, params, rays_o, rays_d, key, repeats=args.repeats),
            "field_samples_per_ray": float(out["n_samples"]) / n_rays,
            "candidates_per_ray": float(out["n_candidates"]) / n_rays,
            "overflow": int(out["overflow"]),
            "opacity_mean": float(jnp.mean(out["opacity"])),
        }
        # Agreement with the XLA variant of the same outputs, as soon as both exist (ask for it first): a run
        # cut short by a time limit still reports the checks of the variants that finished.
        xla_name = ("xla-unjittered " if permuted else "xla ") + variant.split(" ", 1)[1]
        if (variant.startswith("pallas") or permuted) and xla_name in images:
            results[variant].update(_agreement(images[variant], images[xla_name], table_grads[variant],
                                               table_grads[xla_name], field.grid))
            base = results[xla_name]["forward_backward"]["median_ms"]
            results[variant]["speedup_vs_xla"] = base / results[variant]["forward_backward"]["median_ms"]
        print(f"{variant}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[variant].items()
                                         if isinstance(v, (int, float))) +
              f", fwd+bwd {timing['median_ms']:.2f} ms", flush=True)
        if "table_grad_rel_diff_per_level" in results[variant]:
            print("  table gradient vs XLA per level: " + " ".join(
                f"{d:.1e}" for d in results[variant]["table_grad_rel_diff_per_level"]), flush=True)
        if args.out:  # partial results survive a time limit
            _write_partial(args.out, "render", results)

    if args.f64_reference:
        _compare_with_f64_table_gradient(results, table_grads, images, variants, params, rays_o, rays_d, key, grid,
                                         level_mask, xla, field.grid)
        if args.out:
            _write_partial(args.out, "render", results)
    if not args.split:
        return _render_report(args, cfg, field, spec, grid, fit_metrics, results)
    fns = xla.field_fns(params, level_mask)
    spec = xla.render

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
    return _render_report(args, cfg, field, spec, grid, fit_metrics, results)


def _render_report(args, cfg, field, spec, grid, fit_metrics, results) -> dict:
    return {
        "benchmark": "render",
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "config": args.config,
        "overrides": list(args.set),
        "resolution": args.resolution,
        "settings": {"hashgrid": dict(cfg.field.hashgrid), "num_samples_per_ray": cfg.render.num_samples_per_ray,
                     "step_size": spec.step_size, "grid_resolution": spec.grid_resolution,
                     "alpha_threshold": spec.alpha_threshold, "early_stop_eps": spec.early_stop_eps,
                     "candidate_samples_per_ray": spec.candidate_samples_per_ray,
                     "samples_per_ray": spec.samples_per_ray, "normal_type": field.normal_type,
                     "remat_encoding": field.remat_encoding},
        "fit": {"steps": args.fit_steps, "final_metrics": fit_metrics,
                "grid_occupancy": float(jnp.mean(grid.binary)),
                "active_levels": int(fit_metrics.get("active_levels", -1))},
        "results": results,
        "peak_memory_bytes": _peak_memory_bytes(),
    }


# ---------------------------------------------------------------------------------------------- SDS steps


def _flops(compiled) -> float | None:
    try:
        analysis = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float(analysis.get("flops", 0.0)) or None


def matmul_peak_tflops(repeats: int, n: int = 8192) -> float:
    """Measured bf16 matmul throughput (the peak MFU is quoted against).

    Timed pipelined (calls back to back, one wait): a single ~1.5 ms call waited for on its own also counts the
    dispatch and the wake-up of the host, which understated the peak by 10-20 % (632 vs 769 TFLOP/s on an
    H200 with PyTorch's event-timed matmul in the same lease), and so overstated every fraction of it.
    """
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t = _time(mm, a, b, repeats=max(repeats, 20), pipelined=True)
    return 2 * n ** 3 / (min(t["median_ms"], t["pipelined_ms"]) * 1e-3) / 1e12


# Analytic FLOPs per view (BENCHMARKS.md): XLA's cost analysis does not count cuDNN attention custom calls.
SDS_TFLOP_PER_VIEW = {"sd": 3.9, "zero123": 0.9}


def _sds_case(kind: str, views: int, tiny: bool, attention_impl, dtype, param_dtype=jnp.float32):
    """(grad_fn, args) for one SDS step: d loss / d images for ``views`` renders."""
    from dreamcraft_jax.guidance.sds import sd_sds_from_images
    from dreamcraft_jax.guidance.zero123 import zero123_sds_loss
    from dreamcraft_jax.models.clip import Zero123CameraProjection
    from dreamcraft_jax.models.schedules import default_schedule
    from dreamcraft_jax.models.unet import UNet2DConditionModel
    from dreamcraft_jax.models.vae import AutoencoderKL

    unet_cfg = dict(TINY_UNET if tiny else (SD21_BASE_UNET if kind == "sd" else ZERO123_UNET))
    if kind == "zero123":
        unet_cfg.update(in_channels=8, use_linear_projection=False,
                        cross_attention_dim=32 if tiny else 768, attention_head_dim=2 if tiny else 8)
    unet = UNet2DConditionModel.from_config(unet_cfg, dtype=dtype, attention_impl=attention_impl)
    vae = AutoencoderKL.from_config(TINY_VAE if tiny else SD_VAE, dtype=dtype, attention_impl=attention_impl)
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(0), 5)
    # Frozen priors can be stored in the compute dtype: no per-step cast of ~1e9 float32 weights.
    unet_params = random_params(unet, *unet.dummy_inputs(), seed=1, dtype=param_dtype)
    vae_params = random_params(vae, jnp.zeros((1, 32, 32, 3)), seed=2, dtype=param_dtype)
    schedule = default_schedule()
    resolution = (64 if tiny else 512) if kind == "sd" else (32 if tiny else 256)
    images = jax.random.uniform(k3, (views, resolution, resolution, 3))
    ctx_dim = unet_cfg["cross_attention_dim"]

    def encode_fn(x, vp, key):
        mean, logvar = vae.apply({"params": vp}, x, method=AutoencoderKL.encode)
        return AutoencoderKL.sample(mean, logvar, key) * vae.scaling_factor

    if kind == "sd":
        context = jax.random.normal(k4, (2 * views, 77, ctx_dim), dtype)  # [cond; uncond] text embeddings

        def loss(images, key, up, vp, context):
            k_enc, k_sds = jax.random.split(key)

            def eps_fn(x_t, t):
                out = unet.apply({"params": up}, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), context)
                return tuple(jnp.split(out, 2))

            value, _ = sd_sds_from_images(images, k_sds, 0, encode_fn=lambda x: encode_fn(x, vp, k_enc),
                                          eps_fn=eps_fn, schedule=schedule, guidance_scale=7.5,
                                          resolution=resolution, min_step_percent=0.02, max_step_percent=0.98)
            return value

        args = (images, k5, unet_params, vae_params, context)
    else:
        from dreamcraft_jax import cameras as cam

        proj = Zero123CameraProjection(in_features=ctx_dim + 4, out_features=ctx_dim)
        proj_params = proj.init(k4, jnp.zeros((1, ctx_dim + 4)))["params"]
        embedding = jax.random.normal(k4, (1, ctx_dim))
        f = vae.downsample_factor
        ref_latent = jax.random.normal(k4, (1, resolution // f, resolution // f, 4))
        camera = cam.make_camera(jnp.full((views,), 15.0), jnp.linspace(-90, 90, views), 3.8, 20.0)

        def loss(images, key, up, vp, pp):
            k_enc, k_sds = jax.random.split(key)
            value, _ = zero123_sds_loss(
                images, camera, k_sds, 0,
                unet_fn=lambda x, t, c: unet.apply({"params": up}, x, t, c.astype(dtype)),
                encode_fn=lambda x: encode_fn(x, vp, k_enc), image_embedding=embedding, ref_latent=ref_latent,
                cc_projection_fn=lambda e: proj.apply({"params": pp}, e), resolution=resolution)
            return value

        args = (images, k5, unet_params, vae_params, proj_params)
    return jax.jit(jax.grad(loss)), args


def _compiler_options(text: str) -> dict:
    """"key=value;key=value" -> XLA options for one compile (``Lowered.compile``), e.g.
    ``xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL,CONVOLUTION`` (a list is comma-separated; the
    ``+NAME`` form of XLA_FLAGS is not accepted here); "" = XLA's defaults. Values stay strings: XLA parses them
    by the option's type."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: compiler option {item!r}: expected key=value (several joined by ';')")
        options[key.strip()] = value.strip()
    return options


def bench_sds(args) -> dict:
    from dreamcraft_jax.models import layers

    gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    impls = ["cudnn", None] if (gpu and args.compare_attention) else ["cudnn" if gpu else None]
    groupnorm_choices = [False, True] if args.compare_groupnorm else [args.groupnorm_kernel]
    sums_choices = args.groupnorm_sums_max_rows
    sums_before = layers._GROUPNORM_SUMS_MAX_ROWS
    option_sets = [_compiler_options(text) for text in args.compiler_options]
    results = {}
    for kind, views, impl, gn_kernel, sums_rows, (opt_i, options) in itertools.product(
            args.kinds, args.views, impls, groupnorm_choices, sums_choices, enumerate(option_sets)):
        if impl is None and gpu and views != args.views[0]:
            continue  # the XLA-attention comparison at one batch size is enough
        name = f"{kind}_views{views}" + ("" if impl == impls[0] else "_xla_attention")
        if args.compare_groupnorm and gn_kernel:
            name += "_groupnorm_kernel"
        if sums_rows != sums_choices[0]:
            name += f"_groupnorm_sums{sums_rows}"
        if opt_i:
            name += f"_options{opt_i}"
        layers.set_groupnorm_kernel(gn_kernel)  # read when the step is traced (lower, below)
        layers.set_groupnorm_sums_kernel(sums_rows)
        try:
            t0 = time.perf_counter()
            grad_fn, fn_args = _sds_case(kind, views, args.tiny, impl, dtype,
                                         jnp.bfloat16 if args.param_dtype == "bf16" else jnp.float32)
            jax.block_until_ready(fn_args)
            t1 = time.perf_counter()
            lowered = grad_fn.lower(*fn_args)
            t2 = time.perf_counter()
            compiled = lowered.compile(options or None)
            t_compile = time.perf_counter() - t2
            print(f"{name}: init {t1 - t0:.1f} s, trace+lower {t2 - t1:.1f} s, compile {t_compile:.1f} s",
                  file=sys.stderr, flush=True)
            timing = _time(compiled, *fn_args, repeats=args.repeats, pipelined=True)
            # Same inputs and keys in every process and variant: an A/B of flags or options must agree here.
            image_grads = np.asarray(jax.device_get(compiled(*fn_args)), np.float64)
        except Exception as e:  # record and go on (e.g. out of memory)
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"{name}: {results[name]['error']}", file=sys.stderr)
            continue
        flops = None if args.tiny else SDS_TFLOP_PER_VIEW[kind] * 1e12 * views
        results[name] = {"views": views, "attention": impl or "xla", "groupnorm_kernel": gn_kernel,
                         "groupnorm_sums_max_rows": sums_rows, "compiler_options": options,
                         "compile_s": t_compile, **timing,
                         "image_grad_l2": float(np.linalg.norm(image_grads)),
                         "image_grad_sum": float(image_grads.sum()),
                         "views_per_s": views / (timing["median_ms"] * 1e-3), "flops_model": flops,
                         "xla_cost_analysis_flops": _flops(compiled),
                         "tflops_per_s": flops / (timing["median_ms"] * 1e-3) / 1e12 if flops else None,
                         "pipelined_tflops_per_s": (flops / (timing["pipelined_ms"] * 1e-3) / 1e12
                                                    if flops else None)}
        print(f"{name:<28} {timing['median_ms']:9.2f} ms  {results[name]['views_per_s']:7.1f} views/s",
              flush=True)
    layers.set_groupnorm_kernel(False)
    layers.set_groupnorm_sums_kernel(sums_before)
    peak = matmul_peak_tflops(args.repeats) if gpu else None
    for r in results.values():
        if peak and r.get("tflops_per_s"):
            r["fraction_of_peak"] = r["tflops_per_s"] / peak
            r["pipelined_fraction_of_peak"] = r["pipelined_tflops_per_s"] / peak
    torch_ref = json.loads(Path(args.torch_json).read_text()) if args.torch_json else None
    return {"benchmark": "sds", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "dtype": jnp.dtype(dtype).name,
            "param_dtype": args.param_dtype, "tiny": args.tiny,
            "bf16_matmul_peak_tflops": peak,
            "results": results, "torch": torch_ref}


# ---------------------------------------------------------------------------------------------- full stage steps


def _eval_view_ms(stage, state, repeats: int) -> tuple[float, float]:
    """(ms of one evaluation render, s of its first call incl. compilation): rgb, normals, depth, opacity of the
    reference view at ``eval`` resolution, no gradient; what each validation view and turntable frame costs."""
    render = stage.render_fn(int(stage.cfg.eval.height), int(stage.cfg.eval.width))
    camera = cam.reference_camera(stage.cfg.camera)
    t0 = time.perf_counter()
    jax.block_until_ready(render(state.params, state.grid, camera, state.step))
    first_s = time.perf_counter() - t0
    return _time(lambda s: render(s.params, s.grid, camera, s.step), state, repeats=repeats)["median_ms"], first_s


def bench_stage(args) -> dict:
    """ms/step of full stage steps (render + both priors + update) with real-size random priors."""

    from dreamcraft_jax.runner import step_latency_ms, time_split
    from dreamcraft_jax.stages.coarse_nerf import RANDOM, REF

    cfg = _load_config(args.config, args.set)
    with cfg.unlocked():
        cfg.parallel.data, cfg.parallel.fsdp = args.data, 1
    t0 = time.perf_counter()
    nerf_stage, fitted, _ = fit_scene(cfg, args.fit_steps)
    print(f"fitted the scene in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    mesh = parallel.mesh_from_config(cfg)
    priors, prior_params = random_priors(cfg, args.tiny)
    results = {}
    cases = [("coarse_nerf", r) for r in args.nerf_resolutions] + [("coarse_neus", r) for r in args.neus_resolutions]
    for stage_name, res in cases:
        for views in args.views:
            name = f"{stage_name}_{res}px_views{views}"
            try:
                at_step = args.at_step if args.at_step >= 0 else _phase_mid_step(cfg, stage_name, res)
                stage, state, targets, pp = _stage_case(cfg, stage_name, res, views, mesh, priors, prior_params,
                                                        fitted, at_step)
                t1 = time.perf_counter()
                ref_step = stage.step_fn(REF, res, res)
                random_step = stage.step_fn(RANDOM, res, res)  # compiled once: timed, then its metrics
                # The first call of each step compiles it: what a run pays once per stage and resolution.
                first_call_s = {}
                for kind, fn in (("ref", ref_step), ("random", random_step)):
                    t2 = time.perf_counter()
                    jax.block_until_ready(fn(jax.tree.map(lambda x: x.copy(), state), targets, pp))
                    first_call_s[kind] = time.perf_counter() - t2
                if stage_name == "coarse_neus":
                    state = _neus_reference_fit(stage, state, targets, res, args.neus_fit_steps, ref_step, pp)
                if args.no_split:  # the random step's latency only (two compiles fewer)
                    split = {"kind": "random", "height": res, "width": res,
                             "step_ms": step_latency_ms(random_step, state, targets, pp, args.repeats)}
                else:
                    split = time_split(stage, state, targets, pp, (res, res), repeats=args.repeats,
                                       full_step=random_step)
                ref_ms = step_latency_ms(ref_step, state, targets, pp, args.repeats)
                pair_ms = _pipelined_steps_ms((ref_step, random_step), state, targets, pp, args.repeats)
                eval_ms, first_call_s["eval_view"] = _eval_view_ms(stage, state, args.repeats)
                n_views = views * parallel.view_shards(mesh)
                # What the fixed sample budgets hold at this step (a budget well above use is wasted work).
                _, metrics = random_step(jax.tree.map(lambda x: x.copy(), state), targets, pp)
                sampling = {k: float(v) for k, v in jax.device_get(metrics).items()
                            if k.split("/")[-1] in ("samples_per_ray", "candidates_per_ray", "overflow")}
                results[name] = {"random_step": split, "ref_step_ms": ref_ms, "views_per_step": n_views,
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
                                 "peak_memory_bytes_so_far": _peak_memory_bytes()}
                if args.out:  # partial results survive a time limit
                    _write_partial(args.out, "stage", results)
                parts = ("" if args.no_split else f" (render {split['render_ms']:.1f}, guidance "
                         f"{split['guidance_ms']:.1f}, update {split['update_ms']:.1f})")
                print(f"{name:<28} random {split['step_ms']:8.1f} ms{parts}  ref {ref_ms:8.1f} ms  "
                      f"ref+random pipelined {pair_ms:8.1f} ms/step  eval view {eval_ms:.1f} ms", flush=True)
            except Exception as e:  # out of memory etc.: record and go on
                results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                print(f"{name}: {results[name]['error']}", file=sys.stderr, flush=True)
    projection = _project_wall(cfg, results)
    return {"benchmark": "stage", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "devices": len(jax.devices()), "tiny": args.tiny,
            "config": args.config, "at_step": args.at_step,
            "kernels_backend": nerf_stage.render.backend, "overrides": list(args.set), "results": results,
            "projection": projection,
            "peak_memory_bytes": _peak_memory_bytes()}


def bench_eval(args) -> dict:
    """Evaluation renders (validation views, turntable frames) per sample budget: ms per view at eval
    resolution and what a smaller budget loses against the largest one (PSNR of rgb and normal images, max
    opacity difference), on the fitted scene (NeRF) and the NeuS that carries it over after its reference fit."""
    from dreamcraft_jax import losses
    from dreamcraft_jax.config import stage_config

    cfg = _load_config(args.config, args.set)
    with cfg.unlocked():
        cfg.parallel.data, cfg.parallel.fsdp = 1, 1
    _, fitted, _ = fit_scene(cfg, args.fit_steps)
    mesh = parallel.mesh_from_config(cfg)
    budgets = sorted({float(b) for b in args.budgets}, reverse=True)
    results = {}

    for stage_name in args.stages:
        scfg = stage_config(cfg, stage_name)
        res = int(scfg.data.heights[-1])
        stage, state, targets, _ = _stage_case(cfg, stage_name, res, 1, mesh, None, None, fitted,
                                               _phase_mid_step(cfg, stage_name, res))
        if stage_name == "coarse_neus":
            state = _neus_reference_fit(stage, state, targets, res, args.neus_fit_steps)
        camera = cam.reference_camera(scfg.camera)
        best = None
        for budget in budgets:
            name = f"{stage_name}_budget{budget:g}"
            render = stage.render_fn(int(scfg.eval.height), int(scfg.eval.width), samples_per_ray=budget)
            t0 = time.perf_counter()
            image = jax.device_get(render(state.params, state.grid, camera, state.step))
            first_s = time.perf_counter() - t0
            timing = _time(lambda s: render(s.params, s.grid, camera, s.step), state, repeats=args.repeats)
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
                _write_partial(args.out, "eval", results)
    return {"benchmark": "eval", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "config": args.config, "overrides": list(args.set), "results": results}


def _prior_bytes_per_device(placed) -> int:
    """Bytes of a placed prior-params tree held by the first device (replicated: all of it; FSDP: its shard)."""
    dev = jax.devices()[0]
    total = 0
    for leaf in jax.tree.leaves(placed):
        total += sum(sh.data.nbytes for sh in leaf.addressable_shards if sh.device == dev)
    return total


def _sds_scaling_fn(prior_name: str, priors, mesh, specs, step: int):
    """jit over ``mesh``: (images (B,H,W,3), cameras (B,), keys (B,2), prior params) -> (mean loss, d loss/d images),
    views split over data x fsdp, prior params replicated or FSDP-split (``specs``) and gathered inside."""
    from jax.sharding import PartitionSpec as P

    from dreamcraft_jax.guidance.priors import Priors

    one = Priors({prior_name: priors.priors[prior_name]})

    def local(images, cams, keys, pp):
        pp = parallel.gather_fsdp(pp, specs) if specs is not None else pp

        def loss(imgs):
            terms, _ = one.losses(pp, imgs, cams, keys, step)
            return terms[prior_name]

        value, grad = jax.value_and_grad(loss)(images)
        # Each device's loss is the mean over its views; the global mean is their mean.
        return jax.lax.pmean(value, parallel.VIEW_AXES), grad / parallel.view_shards(mesh)

    pspec = specs if specs is not None else P()
    return jax.jit(parallel.shard_map(local, mesh, in_specs=(parallel.VIEWS, parallel.VIEWS, parallel.VIEWS, pspec),
                                      out_specs=(P(), parallel.VIEWS)))


def bench_scaling(args) -> dict:
    """Weak scaling (views_per_device fixed) and strong scaling (global views fixed) of the SD SDS step, the
    Zero123 SDS step and the full coarse-NeRF random-view step over 1, 2, 4, 8 devices of this host, with the
    prior replicated or FSDP-split; the strong-scaling losses are compared with 1 device (per-view keys make
    them device-count invariant)."""
    from dreamcraft_jax import cameras as cam
    from dreamcraft_jax.stages.coarse_nerf import RANDOM

    cfg = _load_config(args.config, args.set)
    platform_name = jax.devices()[0].platform
    n_avail = len(jax.devices())
    priors, prior_params = random_priors(cfg, args.tiny)
    fitted = fit_scene(cfg, args.fit_steps)[1] if "stage" in args.kinds else None
    results, reference = {}, {}
    res = args.resolution
    for kind in args.kinds:
        cases = [("weak", vpd) for vpd in args.views_per_device] + ([("strong", None)] if args.global_views else [])
        for mode, vpd in cases:
            for n in args.devices:
                for layout in (args.layouts if kind != "stage" else ("replicated",)):
                    name = f"{kind}_{mode}{'' if vpd is None else f'_vpd{vpd}'}_{layout}_dev{n}"
                    if n > n_avail:
                        results[name] = {"skipped": f"{n} devices asked, {n_avail} present"}
                        continue
                    views = vpd * n if vpd is not None else args.global_views
                    if views % n:
                        results[name] = {"skipped": f"{views} views do not split over {n} devices"}
                        continue
                    data, fsdp = (n, 1) if layout == "replicated" else (1, n)
                    mesh = parallel.make_mesh(data, fsdp, devices=jax.devices()[:n])
                    try:
                        r = _scaling_case(kind, views, mesh, layout, priors, prior_params, cfg, fitted, res,
                                          args.repeats, cam, RANDOM)
                    except Exception as e:  # out of memory etc.: record and go on
                        r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    r.update(devices=n, views=views, mode=mode, layout=layout, kind=kind)
                    if "loss" in r:
                        key = (kind, views)
                        reference.setdefault(key, r["loss"])
                        r["loss_rel_diff_vs_first"] = abs(r["loss"] - reference[key]) / max(abs(reference[key]), 1e-12)
                    results[name] = r
                    print(f"{name:<40} " + (f"{r['median_ms']:9.1f} ms {r['views_per_s']:8.2f} views/s"
                                            if "median_ms" in r else r.get("error", "")), flush=True)
                    if args.out:  # partial results survive a time limit
                        _write_partial(args.out, "scaling", results)
    return {"benchmark": "scaling", "platform": platform_name, "device": str(jax.devices()[0].device_kind),
            "cpu_simulated": platform_name == "cpu",
            "note": ("CPU-SIMULATED devices (XLA_FLAGS=--xla_force_host_platform_device_count): they share the "
                     "host's cores, so the times show that the sharded steps run and agree, not how they scale")
            if platform_name == "cpu" else "", "jax": jax.__version__, "tiny": args.tiny,
            "resolution": res, "results": results, "efficiency": _scaling_efficiency(results),
            "efficiency_pipelined": _scaling_efficiency(results, "pipelined_ms")}


def _scaling_case(kind, views, mesh, layout, priors, prior_params, cfg, fitted, res, repeats, cam, RANDOM) -> dict:
    """Time one (kind, views, mesh) case; returns median ms, views/s, the loss and the prior bytes per device."""
    n_shards = parallel.view_shards(mesh)
    if kind == "stage":
        stage, state, targets, pp = _stage_case(cfg, "coarse_nerf", res, views // n_shards, mesh, priors,
                                                prior_params, fitted, _phase_mid_step(cfg, "coarse_nerf", res))
        step = stage.step_fn(RANDOM, res, res)
        _, metrics = step(jax.tree.map(lambda x: x.copy(), state), targets, pp)
        timing = _time(lambda s: step(jax.tree.map(lambda x: x.copy(), s), targets, pp), state, repeats=repeats)
        timing["pipelined_ms"] = _pipelined_steps_ms((step,), state, targets, pp, repeats)
        loss = float(metrics["loss"])
        placed = pp
    else:
        prior_name = "sd" if kind == "sd" else "3d_sd"
        pp_one = {prior_name: prior_params[prior_name]}
        specs = parallel.fsdp_specs(pp_one, mesh, int(cfg.parallel.fsdp_min_size)) if layout == "fsdp" else None
        placed = jax.device_put(pp_one, parallel.param_shardings(pp_one, mesh, int(cfg.parallel.fsdp_min_size))
                                if layout == "fsdp" else parallel.replicated(mesh))
        fn = _sds_scaling_fn(prior_name, priors, mesh, specs, step=1000)
        k_img, k_cam, k_view = jax.random.split(jax.random.PRNGKey(11), 3)
        images = jax.random.uniform(k_img, (views, res, res, 3))
        cams = cam.sample_cameras(k_cam, views, 1000, cfg.camera)
        keys = jax.random.split(k_view, views)
        sharded = parallel.along_views(mesh)
        images, cams, keys = (jax.device_put(x, sharded) for x in (images, cams, keys))
        loss = float(fn(images, cams, keys, placed)[0])
        timing = _time(fn, images, cams, keys, placed, repeats=repeats, pipelined=True)
    return {"median_ms": timing["median_ms"], "views_per_s": views / (timing["median_ms"] * 1e-3),
            "pipelined_ms": timing["pipelined_ms"], "views_per_s_pipelined": views / (timing["pipelined_ms"] * 1e-3),
            "loss": loss, "prior_bytes_per_device": _prior_bytes_per_device(placed)}


def _pipelined_steps_ms(steps, state, targets, prior_params, repeats: int, rounds: int | None = None) -> float:
    """ms per step of ``repeats`` rounds of ``steps`` (jitted step fns, e.g. a (reference, random) pair) issued
    back to back, the state threaded through as in training, one wait at the end: what the training loop (which
    only waits to log) spends per step, with the host's launch work hidden behind the device's. The median of
    ``rounds`` such batches (one batch is one sample; default :func:`_default_rounds`)."""
    state = jax.tree.map(lambda x: x.copy(), state)
    for _ in range(2):  # warm-up
        for step in steps:
            state, _ = step(state, targets, prior_params)
    jax.block_until_ready(state)
    batches = []
    for _ in range(max(1, _default_rounds() if rounds is None else rounds)):
        t0 = time.perf_counter()
        for _ in range(repeats):
            for step in steps:
                state, metrics = step(state, targets, prior_params)
        jax.block_until_ready((state, metrics))
        batches.append(1000.0 * (time.perf_counter() - t0) / (len(steps) * repeats))
    return statistics.median(batches)


def _scaling_efficiency(results: dict, timing: str = "median_ms") -> dict:
    """Weak: views/s at n devices / (n x views/s at 1); strong: time at 1 device / time at n devices.

    ``timing``: "median_ms" (latency, each call waited for) or "pipelined_ms" (calls back to back).
    """
    out = {}
    for name, r in results.items():
        if timing not in r or r["devices"] == 1:
            continue
        base = results.get(name.rsplit("_dev", 1)[0] + "_dev1")
        if not base or timing not in base:
            continue
        # Same views at n devices in weak mode are n x those at 1: views/s ratio = n * t1 / tn.
        ratio = base[timing] / r[timing]
        out[name] = ratio * r["views"] / (r["devices"] * base["views"]) if r["mode"] == "weak" else ratio
    return out


def _stage_case(cfg, stage_name: str, res: int, views_per_device: int, mesh, priors, prior_params, fitted,
                at_step: int):
    """(stage, state at ``at_step``, targets, placed prior params) of one timed stage step on ``mesh``: stage 1a
    starts from the fitted scene, stage 1b from the NeuS init that carries it over (``fitted`` None: each
    stage's own initial state)."""
    from dreamcraft_jax.config import stage_config
    from dreamcraft_jax.runner import load_targets
    from dreamcraft_jax.stages.coarse_nerf import CoarseNerf, targets_from_reference
    from dreamcraft_jax.stages.coarse_neus import CoarseNeus

    scfg = stage_config(cfg, stage_name)
    with scfg.unlocked():
        scfg.train.random_views_per_device = views_per_device
        scfg.train.ref_views_per_device = 1
        scfg.data.heights, scfg.data.widths, scfg.data.resolution_milestones = (res,), (res,), ()
    cls = CoarseNeus if stage_name == "coarse_neus" else CoarseNerf
    stage = cls.from_config(scfg, mesh, priors.configured(scfg) if priors is not None else None, prior_params)
    pp = stage.place_prior_params(prior_params)
    if stage_name == "coarse_neus" or fitted is None:  # None: the stage's initial state
        state = stage.init_state(previous=fitted)
    else:
        state = parallel.replicate(jax.device_get(fitted), mesh)
    # Placed like the step's own output: an uncommitted step counter made the first step compile for another
    # input sharding than every later one, so the next call (fed the step's output) compiled the step again.
    state = state.replace(step=parallel.replicate(jnp.asarray(at_step, jnp.int32), mesh))
    targets = parallel.replicate(targets_from_reference(load_targets(scfg, res, res)), mesh)
    return stage, state, targets, pp


def _neus_reference_fit(stage, state, targets, res: int, steps: int, ref_step=None, prior_params=None):
    """``steps`` reference steps of a NeuS case: it starts from a fully occupied grid, and these fit the SDF to
    the image and let the grid updates prune it, as the first steps of a run do (timings on a full grid would
    hold every ray at the sample budget). ``ref_step``: the caller's compiled reference step, if it has one, with
    the ``prior_params`` it was compiled for (the reference step does not use them)."""
    from dreamcraft_jax.stages.coarse_nerf import REF

    ref_step = ref_step or stage.step_fn(REF, res, res)
    for _ in range(steps):
        state, _ = ref_step(state, targets, {} if prior_params is None else prior_params)
    return state


def _phase_mid_step(cfg, stage_name: str, res: int) -> int:
    """The middle step of the steps a stage trains at resolution ``res`` (the progressive band switches hash
    levels on with the step, so timings depend on it), or of the whole stage if it never uses ``res``."""
    from dreamcraft_jax.config import stage_config

    scfg = stage_config(cfg, stage_name)
    milestones = [0, *scfg.data.resolution_milestones, scfg.train.max_steps]
    for i, h in enumerate(scfg.data.heights):
        if int(h) == res:
            return (milestones[i] + milestones[i + 1]) // 2
    return scfg.train.max_steps // 2


def _project_wall(cfg, results: dict) -> dict | None:
    """Wall time of the official 5000 + 5000 steps (alternate: half reference, half random-view steps) from the
    1-view step times: 1a at 128 px until step 3000 then 384, 1b at 256. Per step: the pipelined time of
    alternating (reference, random) pairs where measured, else the mean of the two latencies."""
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


def _clustered_points(key, n: int, points_per_ray: int = 64) -> jax.Array:
    """(n, 3) points in [0, 1]^3 in ray order: ``points_per_ray`` consecutive steps along random chords, as the
    renderer's packed samples come (consecutive points share the coarse cells; what the pre-reduction is for)."""
    n_rays = -(-n // points_per_ray)
    k_o, k_d, k_t = jax.random.split(key, 3)
    start = jax.random.uniform(k_o, (n_rays, 1, 3), minval=0.2, maxval=0.8)
    direction = jax.random.normal(k_d, (n_rays, 1, 3))
    direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
    t = (jnp.arange(points_per_ray, dtype=jnp.float32)[None, :, None] + jax.random.uniform(k_t, (n_rays, 1, 1)))
    return jnp.clip(start + direction * t * (0.6 / points_per_ray), 0.0, 1.0).reshape(-1, 3)[:n]


def _record_variant(results: dict, key: str, r: dict, out: str, benchmark: str) -> None:
    """Store one variant's result, print its line (timings in ms, other numbers, or its error) and, with an
    ``out`` path, write the results so far (a run cut off by its time limit keeps them)."""
    results[key] = r
    print(f"{key}: " + ", ".join(f"{k} {v['median_ms']:.3f} ms" if isinstance(v, dict) else f"{k} {v:.3g}"
                                 for k, v in r.items() if k != "error") + r.get("error", ""), flush=True)
    if out:
        _write_partial(out, benchmark, results)


# The GroupNorm inputs of the SDS steps: VAE encoder levels at 4 views (512 -> 64 px), UNet levels at 4 views
# with CFG (batch 8), and the 1-view VAE 512 px / Zero123 32 px ones.
GN_SUMS_SHAPES = ("4x512x512x128", "4x256x256x256", "4x128x128x512", "4x64x64x512", "8x64x64x320",
                  "8x32x32x640", "8x16x16x1280", "8x8x8x2560", "1x512x512x128", "2x32x32x640")
GN_SUMS_PLANS = ("auto", "c32w4", "c32w8", "c64w8", "c64w8f", "c128w8f", "c32w4t2048")


def _gn_sums_plan_kw(name: str) -> dict:
    """"c64w8f" -> chunk 64, 8 warps, fold; "t2048": target programs; "s2": pipeline stages; "auto": {} (the
    plan channel_sums.plan picks per shape)."""
    import re

    kw, keys = {}, {"c": "chunk", "w": "num_warps", "t": "target_programs", "s": "num_stages"}
    if name == "auto":
        return kw
    for key, num in re.findall(r"([cwts])(\d+)", name):
        kw[keys[key]] = int(num)
    if name.endswith("f"):
        kw["fold"] = True
    if not kw or re.sub(r"[cwts]\d+", "", name) not in ("", "f"):
        raise SystemExit(f"bad plan {name!r}: e.g. c32w4, c64w8f (chunk, warps, [t target programs], "
                         "[s stages], f = fold)")
    return kw


def bench_gn_sums(args) -> dict:
    """The GroupNorm per-channel sums alone (kernels/channel_sums.py): XLA's reductions against the split-row
    kernels under several launch plans, forward (moments) and backward (dz sums with SiLU), per activation shape;
    ms (min of latency median and pipelined), GB/s of the bytes read, and the largest difference to XLA's sums
    relative to their largest magnitude. ``gn_fwd_bwd_ms``: the whole GroupNorm + SiLU (32 groups) forward and
    backward as the models run it (``layers.group_norm_act``), its sums on XLA or on the kernels with that plan
    (on a GPU only: elsewhere the models keep XLA's sums, so every row times the same thing)."""
    from dreamcraft_jax.kernels import channel_sums as cs
    from dreamcraft_jax.models import layers

    gpu = jax.devices()[0].platform == "gpu"
    results = {}
    for shape_name in args.shapes:
        shape = tuple(int(v) for v in shape_name.split("x"))
        b, c = shape[0], shape[-1]
        k = jax.random.split(jax.random.PRNGKey(0), 4)
        dtype = jnp.bfloat16 if gpu else jnp.float32
        x = (jax.random.normal(k[0], shape) * 1.5 + 0.5).astype(dtype)
        dy = jax.random.normal(k[1], shape).astype(dtype)
        mean_c = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
        rstd_c = jax.lax.rsqrt(jnp.var(x.astype(jnp.float32), axis=(1, 2), keepdims=True) + 1e-6)
        scale, bias = 1.0 + 0.1 * jax.random.normal(k[2], (c,)), 0.1 * jax.random.normal(k[3], (c,))
        variants = {"xla": (cs.shifted_channel_sums_reference,
                            functools.partial(cs.backward_channel_sums_reference, silu=True), None)}
        for plan_name in args.plans:
            kw = _gn_sums_plan_kw(plan_name)
            variants[plan_name] = (functools.partial(cs.shifted_channel_sums, **kw),
                                   functools.partial(cs.backward_channel_sums, silu=True, **kw), kw)
        reference = None
        sums_before = layers._GROUPNORM_SUMS_MAX_ROWS
        for name, (fwd, bwd, plan_kw) in variants.items():
            key = f"{shape_name} {name}"
            try:
                fwd_j = jax.jit(fwd)
                bwd_j = jax.jit(lambda x, dy, m, r, s, bb, bwd=bwd: bwd(x, dy, m, r, s, bb))
                out = [np.asarray(v) for v in fwd_j(x)[1:]] + [
                    np.asarray(v) for v in bwd_j(x, dy, mean_c, rstd_c, scale, bias)]
                t_f = _time(fwd_j, x, repeats=args.repeats, pipelined=True)
                t_b = _time(bwd_j, x, dy, mean_c, rstd_c, scale, bias, repeats=args.repeats, pipelined=True)
                layers.set_groupnorm_sums_kernel(0 if plan_kw is None else layers.DEFAULT_GROUPNORM_SUMS_MAX_ROWS)
                # Traced (and timed) inside: the models' GroupNorm with this plan.
                with cs.plan_defaults(**(plan_kw or {})):
                    gn_j = jax.jit(lambda x, s, bb, cot: jax.vjp(
                        lambda *a: layers.group_norm_act(*a, 32, 1e-6, True), x, s, bb)[1](cot))
                    t_gn = _time(gn_j, x, scale, bias, dy, repeats=args.repeats, pipelined=True)
            except Exception as e:  # record and go on (e.g. a plan that does not compile)
                results[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                print(f"{key}: {results[key]['error']}", file=sys.stderr)
                continue
            finally:
                layers.set_groupnorm_sums_kernel(sums_before)
            if reference is None:
                reference = out
            err = max(float(np.max(np.abs(o - r)) / max(float(np.max(np.abs(r))), 1e-30))
                      for o, r in zip(out, reference))
            fwd_ms = min(t_f["median_ms"], t_f["pipelined_ms"])
            bwd_ms = min(t_b["median_ms"], t_b["pipelined_ms"])
            nbytes = x.size * x.dtype.itemsize
            row = {"shape": shape, "plan": None if plan_kw is None else cs.plan(
                       b, int(np.prod(shape[1:-1])), c, **plan_kw)._asdict(),
                   "fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_GBps": nbytes / (fwd_ms * 1e-3) / 1e9,
                   "bwd_GBps": 2 * nbytes / (bwd_ms * 1e-3) / 1e9, "max_rel_diff_vs_xla": err,
                   "gn_fwd_bwd_ms": min(t_gn["median_ms"], t_gn["pipelined_ms"])}
            results[key] = row
            if args.out:  # a run cut off by its time limit keeps the shapes done
                _write_partial(args.out, "gn_sums", results)
            print(f"{key:<30} fwd {fwd_ms:7.3f} ms {row['fwd_GBps']:7.0f} GB/s   bwd {bwd_ms:7.3f} ms "
                  f"{row['bwd_GBps']:7.0f} GB/s   GroupNorm fwd+bwd {row['gn_fwd_bwd_ms']:7.3f} ms   diff {err:.1e}",
                  flush=True)
    return {"benchmark": "gn_sums", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "dtype": "bfloat16" if gpu else "float32", "results": results}


def bench_hashgrid(args) -> dict:
    """Hash-grid encoding forward and forward+backward of N points (official grid L16 F2 T2^19): XLA against the
    Pallas kernel with each backward (XLA's scatter-add, atomics, atomics with the coarse levels pre-reduced per
    block), on uniform points and on points in ray order; each table gradient against XLA's and against a
    float64 accumulation of the same cotangent."""
    from dreamcraft_jax.kernels.hashgrid import encode_pallas, encode_xla

    spec = hashgrid.HashGridSpec(16, 2, 19, 16, 1.447269237440378)
    n = args.points
    table = hashgrid.init_hashgrid(jax.random.PRNGKey(0), spec) * 1e3
    mask = jnp.ones((spec.n_levels,), jnp.float32)
    cot = jax.random.normal(jax.random.PRNGKey(2), (n, spec.output_dim))
    results = {}
    for layout in args.layouts:
        x = (jax.random.uniform(jax.random.PRNGKey(1), (n, 3)) if layout == "uniform"
             else _clustered_points(jax.random.PRNGKey(1), n))
        with jax.enable_x64(True):
            # float32 points: their own weights, products and sums in float64
            exact = np.asarray(jax.jit(jax.grad(lambda t: jnp.sum(
                encode_xla(t, x, spec, mask) * cot.astype(jnp.float64))))(table.astype(jnp.float64)))
        scale = max(float(np.max(np.abs(exact))), 1e-30)
        encoders = {"xla": lambda t, x: encode_xla(t, x, spec, mask)}
        if args.pallas:
            for backward in ("xla", "atomic", "reduced"):
                encoders[f"pallas-{backward}-backward"] = functools.partial(
                    lambda t, x, backward: encode_pallas(
                        t, x, spec, mask, grad_table_only=True, xla_backward=backward == "xla",
                        pre_reduce_max_scale=nerf.PRE_REDUCE_MAX_SCALE if backward == "reduced" else 0.0),
                    backward=backward)
        reference = None
        for name, encode in encoders.items():
            key = f"{layout} {name}"
            try:
                fwd = jax.jit(encode)

                def fwd_bwd(t, x, g, encode=encode):
                    y, vjp = jax.vjp(lambda t: encode(t, x), t)
                    return y, vjp(g)[0]

                fwd_bwd = jax.jit(fwd_bwd)
                y, grad = fwd_bwd(table, x, cot)
                r = {"forward": _time(fwd, table, x, repeats=args.repeats),
                     "forward_backward": _time(fwd_bwd, table, x, cot, repeats=args.repeats),
                     "table_grad_rel_err_vs_f64": float(np.max(np.abs(np.asarray(grad, np.float64) - exact)))
                     / scale}
                if reference is None:
                    reference = (y, grad)
                else:
                    r["max_abs_feature_diff_vs_xla"] = float(jnp.max(jnp.abs(y - reference[0])))
                    r["table_grad_rel_diff_vs_xla"] = float(jnp.max(jnp.abs(grad - reference[1]))) / scale
                    r["speedup_vs_xla"] = (results[f"{layout} xla"]["forward_backward"]["median_ms"]
                                           / r["forward_backward"]["median_ms"])
            except Exception as e:  # record and go on with the other variants
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            _record_variant(results, key, r, args.out, "hashgrid")
    return {"benchmark": "hashgrid", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "points": n, "grid": {k: getattr(spec, k) for k in ("n_levels", "n_features_per_level", "log2_hashmap_size",
                                                             "base_resolution", "per_level_scale")},
            "results": results}


def _packed_ray_samples(key, resolution: int, samples_per_hit: int, budget_per_ray: int,
                        object_radius: float = 0.6, distance: float = 3.8, fovy_deg: float = 20.0):
    """(x (n_slots, 3) world, valid (n_slots,) bool, n_valid) laid out as the renderer packs its samples: the rays
    of a ``resolution``^2 view (camera at ``distance`` on +z, the stage configs' field of view) that hit a sphere
    of ``object_radius`` get ``samples_per_hit`` jittered steps along their chord, ray after ray, in the first
    slots of a ``budget_per_ray`` x rays budget; the other slots are invalid (zeros)."""
    half = np.tan(np.deg2rad(fovy_deg) / 2.0)
    u = (np.arange(resolution) + 0.5) / resolution * 2.0 - 1.0
    dx, dy = np.meshgrid(u * half, -u * half)
    d = np.stack([dx, dy, -np.ones_like(dx)], -1).reshape(-1, 3)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    o = np.array([0.0, 0.0, distance])
    b = d @ o  # |o + t d|^2 = r^2
    disc = b * b - (distance ** 2 - object_radius ** 2)
    hit = disc > 0
    t_in, t_out = -b[hit] - np.sqrt(disc[hit]), -b[hit] + np.sqrt(disc[hit])
    jitter = np.asarray(jax.random.uniform(key, (int(hit.sum()), samples_per_hit)))
    t = t_in[:, None] + (t_out - t_in)[:, None] * (np.arange(samples_per_hit)[None] + jitter) / samples_per_hit
    points = (o[None, None] + t[..., None] * d[hit][:, None]).reshape(-1, 3).astype(np.float32)
    n_slots = budget_per_ray * resolution * resolution
    x = np.zeros((n_slots, 3), np.float32)
    x[:len(points)] = points
    valid = np.arange(n_slots) < len(points)
    return jnp.asarray(x), jnp.asarray(valid), len(points)


def bench_fd(args) -> dict:
    """The finite-difference kernel (``kernels.fd_hashgrid``) alone, forward and forward + backward, over output
    layouts, launch shapes (points per program x warps) and backwards (per-lane atomics, coarse levels
    pre-reduced), on samples
    packed as the 384 px NeRF step's (official grid at 12 of 16 levels, the sample with its three forward
    neighbours, as the renderer's main pass asks). Each variant's features against the default's (bit-equal
    expected: same rows, same order) and its table gradient against the default's."""
    from dreamcraft_jax.kernels.fd_hashgrid import CENTER, FORWARD, fd_encode_pallas

    spec = hashgrid.HashGridSpec(16, 2, 19, 16, 1.447269237440378)
    table = hashgrid.init_hashgrid(jax.random.PRNGKey(0), spec) * 1e3
    mask = (jnp.arange(spec.n_levels) < args.levels).astype(jnp.float32)
    x, valid, n_valid = _packed_ray_samples(jax.random.PRNGKey(1), args.resolution, args.samples_per_hit,
                                            args.budget_per_ray)
    neighbours = (CENTER,) + FORWARD
    cots = tuple(jax.random.normal(jax.random.PRNGKey(2 + j), (x.shape[0], spec.output_dim))
                 for j in range(len(neighbours)))
    print(f"fd bench: {x.shape[0]} slots, {n_valid} valid samples, {args.levels} levels on", flush=True)
    results, reference = {}, None
    for layout, block, warps, pre_reduce in itertools.product(args.layouts, args.block_points, args.num_warps,
                                                              args.pre_reduce):
        key = f"{layout} block{block} warps{warps} prereduce{pre_reduce:g}"
        columns = layout == "columns"
        # The samples' arrays go in as arguments: closed over, each variant's program would embed them as constants.
        encode = functools.partial(fd_encode_pallas, spec=spec, radius=2.0, eps=0.01, neighbours=neighbours,
                                   block_points=block, num_warps=warps, pre_reduce_max_scale=pre_reduce,
                                   columns=columns)
        layout_cots = tuple(g.T for g in cots) if columns else cots
        inputs = (table, x, mask, valid)
        try:
            fwd = jax.jit(lambda t, x, mask, valid, encode=encode: encode(t, x, level_mask=mask, valid=valid))

            def fwd_bwd(t, x, mask, valid, cots, encode=encode):
                y, vjp = jax.vjp(lambda t: encode(t, x, level_mask=mask, valid=valid), t)
                return y, vjp(cots)[0]

            r = {"forward": _time(fwd, *inputs, repeats=args.repeats)}
            if args.forward_only:
                y, grad = fwd(*inputs), None
            else:
                fwd_bwd = jax.jit(fwd_bwd)
                y, grad = fwd_bwd(*inputs, layout_cots)
                r["forward_backward"] = _time(fwd_bwd, *inputs, layout_cots, repeats=args.repeats)
            y = tuple(e.T for e in y) if columns else y  # compared in the row layout
            timed = "forward" if args.forward_only else "forward_backward"
            if reference is None:
                reference = (y, grad, r)
            else:
                r["max_abs_feature_diff_vs_first"] = max(float(jnp.max(jnp.abs(a - b)))
                                                         for a, b in zip(y, reference[0]))
                if grad is not None:
                    r["table_grad_rel_diff_vs_first"] = (float(jnp.max(jnp.abs(grad - reference[1])))
                                                         / max(float(jnp.max(jnp.abs(reference[1]))), 1e-30))
                r[f"{timed}_speedup_vs_first"] = reference[2][timed]["median_ms"] / r[timed]["median_ms"]
        except Exception as e:  # record and go on with the other variants
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        _record_variant(results, key, r, args.out, "fd")
    return {"benchmark": "fd", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "slots": int(x.shape[0]), "valid_samples": n_valid, "levels_on": args.levels,
            "neighbours": [list(n) for n in neighbours], "results": results}


def bench_project(args) -> dict:
    """The 5000 + 5000-step projection of :func:`_project_wall` from stage-bench JSON files of several runs (a
    device call rarely fits all three cases): results merged in the order given, a later file's case replacing an
    earlier one's. A `bench eval` file gives each stage's evaluation-render time at the config's
    ``render.eval_samples_per_ray`` instead of the stage files' (timed at the budget of their day)."""
    cfg = _load_config(args.config, args.set)
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
    projection = _project_wall(cfg, results)
    if projection is None:
        wanted = "coarse_nerf_<res>px_views1 for every NeRF resolution and coarse_neus_<res>px_views1"
        raise SystemExit(f"error: the files lack a case the projection needs ({wanted}); have {sorted(results)}")
    return {"benchmark": "stage_projection", "devices": sorted(d for d in devices if d), "config": args.config,
            "overrides": list(args.set), "projection": projection,
            "sources": {name: sources[name] for name in sources if name.endswith(("_views1", "_eval_view"))}}


def bench_profile(args) -> dict:
    """Per-op device time of SDS steps and of the render part of stage steps (see :mod:`profiling`).

    Cases: ``sd_views<V>`` / ``zero123_views<V>`` (the SDS grad of ``bench sds``), ``coarse_nerf_<R>px`` /
    ``coarse_neus_<R>px`` (gradient of one random-view step without the priors: render, normals and the per-view
    losses, at the middle step of that resolution's phase); with ``_step`` appended, the whole step without the
    priors (gradient + grid update + Adam + NaN guard), which is where ``bench stage``'s "update" share lives;
    with ``_full``, the whole step with real-size random priors (``--tiny``: tiny ones). NeuS cases first run
    ``--neus_fit_steps`` reference steps, as ``bench stage`` does.
    """
    import re

    from dreamcraft_jax.profiling import op_profile, print_op_profile
    from dreamcraft_jax.stages.coarse_nerf import RANDOM

    gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    # Loaded up front: it also sets the config's GroupNorm kernels, which the SDS cases are traced with.
    results, fitted, cfg, priors = {}, None, _load_config(args.config, args.set), None
    for case in args.cases:
        sds = re.fullmatch(r"(sd|zero123)_views(\d+)", case)
        stage_case = re.fullmatch(r"(coarse_nerf|coarse_neus)_(\d+)px(_step|_full)?", case)
        if not (sds or stage_case):
            raise SystemExit(f"unknown profile case {case!r}: use sd_views<V>, zero123_views<V>, "
                             "coarse_nerf_<R>px or coarse_neus_<R>px (+ _step: the whole step without priors, "
                             "_full: with them)")
        try:
            if sds:
                grad_fn, fn_args = _sds_case(sds[1], int(sds[2]), args.tiny, "cudnn" if gpu else None, dtype,
                                             jnp.bfloat16)
            else:
                if fitted is None:
                    with cfg.unlocked():
                        cfg.parallel.data, cfg.parallel.fsdp = 1, 1
                    _, fitted, _ = fit_scene(cfg, args.fit_steps)
                name, res, what = stage_case[1], int(stage_case[2]), stage_case[3]
                if what == "_full" and priors is None:
                    priors = random_priors(cfg, args.tiny)
                stage, state, targets, pp = _stage_case(
                    cfg, name, res, 1, parallel.mesh_from_config(cfg), *(priors if what == "_full" else (None, None)),
                    fitted, _phase_mid_step(cfg, name, res))
                if name == "coarse_neus":
                    state = _neus_reference_fit(stage, state, targets, res, args.neus_fit_steps)
                if what:  # the step traced inside a jit that does not donate: repeat calls reuse the state
                    inner = stage.step_fn(RANDOM, res, res)
                    grad_fn = jax.jit(lambda st, t, p: inner(st, t, p))
                else:
                    grad_fn = stage.grads_fn(RANDOM, res, res)
                fn_args = (state, targets, pp if what == "_full" else {})
            compiled = grad_fn.lower(*fn_args).compile()
            if args.hlo_out:  # the fusions behind the op names in the table
                Path(args.hlo_out).mkdir(parents=True, exist_ok=True)
                (Path(args.hlo_out) / f"{case}.hlo.txt").write_text(compiled.as_text())
            table = op_profile(compiled, *fn_args, repeats=args.repeats, top=args.top)
        except Exception as e:  # record and go on
            results[case] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"{case}: {results[case]['error']}", file=sys.stderr, flush=True)
            continue
        results[case] = table
        print_op_profile(case, table, top=min(args.top, 20))
        if args.out:  # partial results survive a time limit
            _write_partial(args.out, "profile", results)
    return {"benchmark": "profile", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "tiny": args.tiny, "results": results}


def print_stage_table(report: dict) -> None:
    print(f"stage steps, {report['device']} x{report['devices']}, jax {report['jax']}, kernels "
          f"{report['kernels_backend']}{' (TINY priors)' if report['tiny'] else ' (real-size random priors)'}")
    print(f"{'case':<28} {'random ms':>10} {'render':>8} {'guide':>8} {'update':>8} {'ref ms':>8} "
          f"{'pair ms':>8} {'views/s':>8}")
    for name, r in report["results"].items():
        if "error" in r:
            print(f"{name:<28} {r['error']}")
            continue
        s = r["random_step"]
        split = "".join(f" {s[k]:>8.1f}" if k in s else f" {'-':>8}" for k in ("render_ms", "guidance_ms", "update_ms"))
        pair = r.get("alternating_pipelined_ms_per_step")
        print(f"{name:<28} {s['step_ms']:>10.1f}{split} {r['ref_step_ms']:>8.1f} "
              f"{pair if pair is None else round(pair, 1)!s:>8} {r['random_views_per_s']:>8.1f}")
    if report["projection"]:
        proj = report["projection"]
        first = (f" ({proj['minutes_with_first_calls']:.1f} min with the first calls' compilation)"
                 if "minutes_with_first_calls" in proj else "")
        print(f"projected 5000 + 5000 steps: {proj['minutes']:.1f} min{first}")


def print_scaling_table(report: dict) -> None:
    print(f"scaling, {report['device']} ({'CPU-SIMULATED devices' if report['cpu_simulated'] else report['platform']})"
          f", jax {report['jax']}{', TINY priors' if report['tiny'] else ''}, {report['resolution']} px")
    print(f"{'case':<42} {'ms':>9} {'pipelined':>9} {'views/s':>9} {'efficiency':>10} {'(pipelined)':>11} "
          f"{'prior MB/dev':>12} {'loss vs first':>13}")
    for name, r in report["results"].items():
        if "median_ms" not in r:
            print(f"{name:<42} {r.get('error') or r.get('skipped')}")
            continue
        eff = report["efficiency"].get(name, float("nan"))
        eff_p = report.get("efficiency_pipelined", {}).get(name, float("nan"))
        print(f"{name:<42} {r['median_ms']:9.1f} {r.get('pipelined_ms', float('nan')):9.1f} {r['views_per_s']:9.2f} "
              f"{eff:10.2f} {eff_p:11.2f} {r['prior_bytes_per_device'] / 2**20:12.2f} "
              f"{r['loss_rel_diff_vs_first']:13.1e}")


_PLOT_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot_scaling(report: dict, path: str) -> None:
    """PNG with two panels over device count: weak-scaling efficiency (ideal 1) and strong-scaling speedup
    (ideal n), one line per (kind, views per device, layout); the title says when the devices are simulated."""
    from PIL import Image, ImageDraw

    series: dict[str, list[tuple[int, float]]] = {}
    for name, value in report["efficiency"].items():
        r = report["results"][name]
        series.setdefault(name.rsplit("_dev", 1)[0], []).append((r["devices"], value))
    for name, r in report["results"].items():  # the 1-device points: 1 by definition
        base = name.rsplit("_dev", 1)[0]
        if r.get("devices") == 1 and "median_ms" in r and base in series:
            series[base].append((1, 1.0))
    w, h, pad = 520, 360, 50
    image = Image.new("RGB", (2 * w, h + 40 + 14 * len(series)), "white")
    draw = ImageDraw.Draw(image)
    title = "scaling, " + ("CPU-SIMULATED devices (times do not show scaling)" if report["cpu_simulated"]
                           else report["device"])
    draw.text((pad, 8), title, fill="black")
    max_dev = max([d for pts in series.values() for d, _ in pts] + [2])
    for panel, (mode, label, y_max) in enumerate((("weak", "weak scaling efficiency", 1.2),
                                                  ("strong", "strong scaling speedup", float(max_dev)))):
        x0 = panel * w + pad
        box = (x0, 30, x0 + w - 2 * pad, h - pad)
        draw.rectangle(box, outline="black")
        draw.text((x0, h - pad + 22), f"{label} vs devices (1..{max_dev})", fill="black")

        def to_px(d, v, box=box, y_max=y_max):
            x = box[0] + (np.log2(d) / max(np.log2(max_dev), 1)) * (box[2] - box[0])
            y = box[3] - min(v / y_max, 1.0) * (box[3] - box[1])
            return x, y

        ideal = [to_px(d, 1.0 if mode == "weak" else d) for d in (1, max_dev)]
        draw.line(ideal, fill=(200, 200, 200), width=1)
        for d in (1, 2, 4, 8, 16, 32, 64):
            if d <= max_dev:
                x, _ = to_px(d, 0)
                draw.text((x - 3, box[3] + 4), str(d), fill="black")
        draw.text((box[0] - 30, box[1]), f"{y_max:.1f}", fill="black")
        draw.text((box[0] - 30, box[3] - 10), "0", fill="black")
        for i, (name, pts) in enumerate(sorted(series.items())):
            if f"_{mode}" not in name:
                continue
            colour = _PLOT_COLOURS[i % len(_PLOT_COLOURS)]
            xy = [to_px(d, v) for d, v in sorted(pts)]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for x, y in xy:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    for i, name in enumerate(sorted(series)):
        draw.text((pad, h + 20 + 14 * i), name, fill=_PLOT_COLOURS[i % len(_PLOT_COLOURS)])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def print_sds_table(report: dict) -> None:
    torch_ref = report.get("torch") or {}
    print(f"SDS step (d loss / d images), {report['device']}, jax {report['jax']}, {report['dtype']}; "
          f"bf16 matmul peak {report['bf16_matmul_peak_tflops'] or float('nan'):.0f} TFLOP/s")
    print("latency: each call waited for; pipelined: calls back to back, one wait (a training loop)")
    print(f"{'case':<28} {'ms':>9} {'views/s':>8} {'TFLOP/s':>8} {'of peak':>8} {'torch ms':>9} {'speedup':>8} "
          f"{'pipelined ms':>13} {'torch pipel.':>13} {'speedup':>8}")
    for name, r in report["results"].items():
        if "error" in r:
            print(f"{name:<28} {r['error']}")
            continue
        case = name.split("_xla")[0].split("_groupnorm")[0].split("_options")[0]
        base = case.replace("sd_views", "sd_sds_512_views").replace("zero123_views", "zero123_sds_256_views")
        t_ms = torch_ref.get(base + "_ms")
        tf = r.get("tflops_per_s") or float("nan")
        nan = float("nan")
        p_ms, tp_ms = r.get("pipelined_ms"), torch_ref.get(base + "_pipelined_ms")
        c_ms, cp_ms = torch_ref.get(base + "_compiled_ms"), torch_ref.get(base + "_compiled_pipelined_ms")
        compiled = (f"   torch.compile {c_ms:.2f} / {cp_ms:.2f} ms: {c_ms / r['median_ms']:.2f}x / "
                    f"{cp_ms / p_ms:.2f}x" if (c_ms and cp_ms and p_ms) else "")
        print(f"{name:<28} {r['median_ms']:9.2f} {r['views_per_s']:8.1f} {tf:8.1f} "
              f"{r.get('fraction_of_peak', nan):8.2%} {t_ms or nan:9.2f} "
              f"{(t_ms / r['median_ms']) if t_ms else nan:7.2f}x {p_ms or nan:13.2f} {tp_ms or nan:13.2f} "
              f"{(tp_ms / p_ms) if (tp_ms and p_ms) else nan:7.2f}x{compiled}")


def print_table(report: dict) -> None:
    r = report["results"]
    print(f"render fwd+bwd, {report['resolution']}x{report['resolution']}, {report['device']}, jax {report['jax']}")
    print(f"{'variant':<24} {'fwd+bwd ms':>11} {'fwd ms':>8} {'samples/ray':>12} {'cand/ray':>9} {'overflow':>9}")
    for name in [k for k in r if not k.startswith(("split", "f64"))]:
        v = r[name]
        if "error" in v:
            print(f"{name:<24} {v['error']}")
            continue
        extra = (f"  {v['speedup_vs_xla']:.2f}x vs xla, image diff {v['max_abs_image_diff_vs_xla']:.1e}, "
                 f"table grad rel diff {v['table_grad_rel_diff_vs_xla']:.1e}" if "speedup_vs_xla" in v else "")
        if "table_grad_rel_err_vs_f64" in v:
            extra += f", vs float64 {v['table_grad_rel_err_vs_f64']:.1e}"
        print(f"{name:<24} {v['forward_backward']['median_ms']:>11.2f} {v['forward']['median_ms']:>8.2f} "
              f"{v['field_samples_per_ray']:>12.2f} {v['candidates_per_ray']:>9.2f} {v['overflow']:>9d}{extra}")
    if "split_rgb_variant" not in r:
        return
    s = r["split_rgb_variant"]
    print("split (rgb variant, each fwd+bwd on the same packed samples):")
    for k in ("march_occupancy_only", "march_with_density_pruning", "encode_fwd_bwd", "mlp_fwd_bwd",
              "composite_fwd_bwd"):
        print(f"  {k:<28} {s[k]['median_ms']:>9.2f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamcraft_jax.bench")
    parser.add_argument("--xla_flags", default=DEFAULT_XLA_FLAGS,
                        help="added to XLA_FLAGS before the backend starts, as training does (cfg.xla_flags; a "
                             "flag already in XLA_FLAGS wins); '' = XLA's defaults. Goes before the benchmark's "
                             "name: python -m dreamcraft_jax.bench --xla_flags '' sds ...")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("render", help="coarse-stage render forward+backward, pure-jnp path")
    p.add_argument("--config", default="configs/coarse_nerf.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. kernels.hashgrid_backward=reduced)")
    p.add_argument("--resolution", type=int, default=384)
    p.add_argument("--fit_steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--pallas", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the Pallas kernels (interpret mode off GPU: slow)")
    p.add_argument("--variants", nargs="*", default=[], help="only these variants (names as in the table)")
    p.add_argument("--split", action=argparse.BooleanOptionalAction, default=True,
                   help="also time march / encode / MLP / composite alone")
    p.add_argument("--f64_reference", action=argparse.BooleanOptionalAction, default=False,
                   help="also compare every variant's table gradient with one accumulated in float64")
    p.add_argument("--out", default="")
    q = sub.add_parser("sds", help="SD SDS at 512 and Zero123 SDS at 256 (real shapes, random weights)")
    q.add_argument("--kinds", nargs="+", default=["sd", "zero123"], choices=["sd", "zero123"])
    q.add_argument("--views", nargs="+", type=int, default=[1, 4])
    q.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke test of the same code path)")
    q.add_argument("--compare_attention", action="store_true", help="also time XLA attention on GPU")
    q.add_argument("--torch_json", default="", help="JSON of benchmarks/torch_sds_baseline.py to compare with")
    q.add_argument("--groupnorm_kernel", action=argparse.BooleanOptionalAction, default=False,
                   help="small GroupNorms through the Pallas kernel (kernels.fused_groupnorm); with "
                        "--compare_groupnorm both ways")
    q.add_argument("--compare_groupnorm", action="store_true",
                   help="time each case with and without the GroupNorm kernel (an A/B in one process)")
    q.add_argument("--compiler_options", nargs="+", default=[""], metavar="KEY=VALUE[;KEY=VALUE]",
                   help="XLA options per compile, one set per variant (each case with each; '' = XLA's "
                        "defaults), e.g. '' 'xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL,CONVOLUTION'")
    q.add_argument("--groupnorm_sums_max_rows", nargs="+", type=int,
                   default=[config_lib.base_config().kernels.groupnorm_sums_max_rows],
                   help="kernels.groupnorm_sums_max_rows (0: XLA's sums); several values: each case with each, "
                        "named after the first (an A/B in one process)")
    q.add_argument("--param_dtype", default="bf16", choices=["fp32", "bf16"],
                   help="storage dtype of the frozen prior weights")
    q.add_argument("--repeats", type=int, default=10)
    q.add_argument("--out", default="")
    t = sub.add_parser("stage", help="full coarse NeRF / NeuS steps with real-size random priors")
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
    e = sub.add_parser("eval", help="evaluation-render time per sample budget, and what a smaller budget loses")
    e.add_argument("--config", default="configs/dreamcraft3d.py")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    e.add_argument("--stages", nargs="+", default=["coarse_nerf", "coarse_neus"],
                   choices=["coarse_nerf", "coarse_neus"])
    e.add_argument("--budgets", nargs="+", type=float, default=[64, 32, 24])
    e.add_argument("--fit_steps", type=int, default=300)
    e.add_argument("--neus_fit_steps", type=int, default=200)
    e.add_argument("--repeats", type=int, default=5)
    e.add_argument("--out", default="")
    h = sub.add_parser("hashgrid", help="hash-grid encoding forward / forward+backward, XLA vs Pallas backwards")
    h.add_argument("--points", type=int, default=1 << 20)
    h.add_argument("--layouts", nargs="+", default=["uniform", "rays"], choices=["uniform", "rays"])
    h.add_argument("--pallas", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the Pallas kernel (interpret mode off GPU: slow)")
    h.add_argument("--repeats", type=int, default=10)
    h.add_argument("--out", default="")
    g = sub.add_parser("gn_sums", help="GroupNorm per-channel sums alone: XLA against the split-row kernels")
    g.add_argument("--shapes", nargs="+", default=list(GN_SUMS_SHAPES), help="BxHxWxC activation shapes")
    g.add_argument("--plans", nargs="+", default=list(GN_SUMS_PLANS),
                   help="kernel launch plans: auto (per shape) or "
                        "c<chunk>w<warps>[t<target programs>][s<stages>][f = fold rows]")
    g.add_argument("--repeats", type=int, default=20)
    g.add_argument("--out", default="")
    d = sub.add_parser("fd", help="finite-difference kernel alone over launch shapes, on packed ray samples")
    d.add_argument("--resolution", type=int, default=384)
    d.add_argument("--samples_per_hit", type=int, default=18,
                   help="samples on each ray that hits the object (18: the 384 px step's 11.5 per ray on average)")
    d.add_argument("--budget_per_ray", type=int, default=24)
    d.add_argument("--levels", type=int, default=12, help="levels on (progressive band)")
    d.add_argument("--block_points", nargs="+", type=int, default=[128, 64, 256])
    d.add_argument("--num_warps", nargs="+", type=int, default=[4, 2, 8])
    d.add_argument("--pre_reduce", nargs="+", type=float, default=[nerf.PRE_REDUCE_MAX_SCALE],
                   help="pre_reduce_max_scale values (0: per-lane atomics on every level)")
    d.add_argument("--layouts", nargs="+", default=["rows"], choices=["rows", "columns"],
                   help="output layout: (N, L*F) rows or (L*F, N) columns (fd_encode_pallas(columns=True))")
    d.add_argument("--forward_only", action="store_true", help="time the forward kernel only")
    d.add_argument("--repeats", type=int, default=10)
    d.add_argument("--out", default="")
    j = sub.add_parser("project", help="5000 + 5000-step wall-time projection from `bench stage` JSON files")
    j.add_argument("files", nargs="+", help="stage-bench JSON files; a later file's case replaces an earlier one's")
    j.add_argument("--config", default="configs/dreamcraft3d.py")
    j.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    j.add_argument("--out", default="")
    c = sub.add_parser("scaling", help="weak / strong scaling of the SDS steps and the coarse-NeRF step over devices")
    c.add_argument("--config", default="configs/dreamcraft3d.py")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    c.add_argument("--kinds", nargs="+", default=["sd", "zero123", "stage"], choices=["sd", "zero123", "stage"])
    c.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8])
    c.add_argument("--views_per_device", nargs="*", type=int, default=[1, 4],
                   help="weak-scaling cases (none: strong scaling only)")
    c.add_argument("--global_views", type=int, default=8,
                   help="strong scaling: views per step over all devices (0: no strong-scaling cases)")
    c.add_argument("--layouts", nargs="+", default=["replicated", "fsdp"], choices=["replicated", "fsdp"],
                   help="prior layouts of the SDS cases (the stage case is replicated)")
    c.add_argument("--resolution", type=int, default=128, help="render / image size of the cases")
    c.add_argument("--fit_steps", type=int, default=100)
    c.add_argument("--tiny", action="store_true", help="tiny priors (CPU)")
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--out", default="")
    c.add_argument("--plot", default="", help="also write a PNG of efficiency / speedup vs devices")
    f = sub.add_parser("profile", help="per-op device time of SDS steps and stage renders (profiler trace)")
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
    bench_compile.add_parser(sub)
    args = parser.parse_args(argv)
    # XLA's GPU client takes 75% of device memory by default; one executable's temporaries live in one buffer
    # (the 4-view 384 px NeRF step asks for ~100 GiB of an H200's 141), so the benches take 90% unless told
    # otherwise. Read when the backend starts, at the first device use below.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    if args.what == "profile" and args.kernel_breakdown:
        # Inside a command buffer (CUDA graph) the profiler sees one event for hundreds of kernels. Must be set
        # before the backend starts, which the first device use below does.
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
    try:
        apply_xla_flags(args.xla_flags)
    except ValueError as e:
        raise SystemExit(f"error: --xla_flags: {e}") from None
    if args.what == "compile":
        report = bench_compile.run(args)
        if report is None:  # a child process of the compile bench: its result line is printed
            return 0
    elif args.what == "hashgrid":
        report = bench_hashgrid(args)
    elif args.what == "gn_sums":
        report = bench_gn_sums(args)
    elif args.what == "fd":
        report = bench_fd(args)
    elif args.what == "project":
        report = bench_project(args)
        p = report["projection"]
        steps = list(p["step_ms"].values())
        for i, (part, minutes) in enumerate(p["parts"].items()):
            how = f"   {steps[i]['ms_per_step']:7.1f} ms/step ({steps[i]['from']})" if i < len(steps) else ""
            print(f"{part:<40} {minutes:6.1f} min{how}")
        if p.get("eval_renders_not_timed"):
            print(f"evaluation renders not timed for {', '.join(p['eval_renders_not_timed'])} (older files)")
        print(f"{'total':<40} {p['minutes']:6.1f} min")
    elif args.what == "profile":
        report = bench_profile(args)
    elif args.what == "eval":
        report = bench_eval(args)
    elif args.what == "stage":
        report = bench_stage(args)
        print_stage_table(report)
    elif args.what == "sds":
        report = bench_sds(args)
        print_sds_table(report)
    elif args.what == "scaling":
        report = bench_scaling(args)
        print_scaling_table(report)
        if args.plot:
            plot_scaling(report, args.plot)
            print(f"wrote {args.plot}")
    else:
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
