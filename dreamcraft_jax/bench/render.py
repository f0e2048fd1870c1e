"""``bench render``: forward+backward of one coarse-stage view through the renderer, per backend variant.

    python -m dreamcraft_jax.bench render [--config configs/coarse_nerf.py] [--resolution 384] [--out file.json]

Each variant (XLA, and with ``--pallas`` the Pallas kernels under several kernel choices) renders the same
off-reference view forward+backward; its time, sample counts and agreement with the XLA variant of the same
outputs (image, hash-table gradient) are recorded. ``--split`` also times march (occupancy marching + the
density-only pruning pass), hash-grid encode, MLPs and compositing alone, each forward+backward on the same
packed samples; ``--f64_reference`` judges every table gradient against one accumulated in float64. The scene is
first fitted for ``--fit_steps`` reference-view steps at 128 px on the bundled example, so the occupancy grid and
the sample counts are those of a real object rather than of the initial blob.

Timing: median of ``--repeats`` calls after warm-up, each ended with ``block_until_ready``
(:func:`~dreamcraft_jax.bench.harness.time_calls`).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax import cameras as cam
from dreamcraft_jax.bench import report as report_lib
from dreamcraft_jax.bench.harness import error_record, peak_memory_bytes, time_calls, write_partial
from dreamcraft_jax.bench.scenes import fit_scene
from dreamcraft_jax.config_file import load_config
from dreamcraft_jax.fields import hashgrid, nerf
from dreamcraft_jax.fields.mlp import apply_mlp
from dreamcraft_jax.render import volume


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("render", help="coarse-stage render forward+backward, pure-jnp path")
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
    return p


def rel_diff(got, ref, grid_spec=None) -> tuple[float, list[float] | None]:
    """max |got - ref| / max |ref| over the whole hash table and, with ``grid_spec``, per level (each level's
    difference relative to that level's own max: a defect of some levels stands out from rounding over all)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)

    def rel(a, b):
        return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30)

    per_level = None if grid_spec is None else [
        rel(got[int(o):int(o + n)], ref[int(o):int(o + n)]) for o, n in zip(grid_spec.offsets, grid_spec.level_sizes)]
    return rel(got, ref), per_level


def agreement(image, ref_image, table_grad, ref_table_grad, grid_spec=None) -> dict:
    """Max |image difference| and the hash-table gradient's difference relative to the reference's max (per level
    too with ``grid_spec``). Atomics sum in another order than XLA's scatter: rounding-level agreement expected."""
    total, per_level = rel_diff(table_grad, ref_table_grad, grid_spec)
    out = {"max_abs_image_diff_vs_xla": float(jnp.max(jnp.abs(image - ref_image))),
           "table_grad_rel_diff_vs_xla": total}
    if per_level is not None:
        out["table_grad_rel_diff_per_level"] = per_level
    return out


def render_loss(out: dict, need_normals: bool, need_perturb: bool) -> jax.Array:
    """Scalar of a render's outputs whose gradient reaches every part the variants differ in."""
    total = jnp.sum(out["rgb"]) + jnp.sum(out["opacity"])
    if need_normals:
        total = total + jnp.sum(out["normal"])
    if need_perturb:
        total = total + jnp.sum(out["sample_normal_perturb"])
    return total


def f64_encode_points(table, unit, grid, mask, *, valid=None, **backend_options):
    """:func:`nerf.encode_points` with the table gathered in float64 (x64 on) and the features rounded to
    float32: the float32 points' own trilinear weights, so the same forward to an ulp, and the table
    gradient's products and sums in float64. ``backend_options`` (backend, remat, backward, ...) pick how the
    real call computes the same values: ignored here."""
    del backend_options
    features = hashgrid.encode(table.astype(jnp.float64), unit.astype(jnp.float32), grid, level_mask=mask,
                               valid=valid, skip_masked_levels=True)
    return features.astype(jnp.float32)


def compare_with_f64_table_gradient(results, table_grads, images, variants, params, rays_o, rays_d, key, grid,
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
            return render_loss(out, need_normals, need_perturb), out

        try:
            with jax.enable_x64(True), mock.patch.object(nerf, "encode_points", f64_encode_points):
                (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
                truth, image = np.asarray(grads["encoding"], np.float64), np.asarray(out["rgb"])
        except Exception as e:  # a diagnostic: record and go on
            results[f"f64 {suffix}"] = error_record(e)
            print(f"f64 {suffix}: {results[f'f64 {suffix}']['error']}", file=sys.stderr, flush=True)
            continue
        results[f"f64 {suffix}"] = {"n_samples": int(out["n_samples"]),
                                    "max_abs_image_diff_vs_xla": float(np.max(np.abs(image - np.asarray(
                                        images.get("xla " + suffix, image)))))}
        for name in names:
            err, per_level = rel_diff(table_grads[name], truth, grid_spec)
            results[name].update(table_grad_rel_err_vs_f64=err, table_grad_rel_err_vs_f64_per_level=per_level)
            print(f"{name}: table gradient vs float64 {err:.2e}; per level " +
                  " ".join(f"{d:.1e}" for d in per_level), flush=True)


def _variants(stage, field, spec, pallas: bool) -> tuple[list, object]:
    """[(name, need_normals, need_perturb, stage variant)] and the XLA stage variant."""

    def with_backend(backend, **field_kw):
        new_field = dataclasses.replace(stage.field, spec=dataclasses.replace(field, backend=backend, **field_kw))
        return dataclasses.replace(stage, field=new_field, render=dataclasses.replace(spec, backend=backend))

    xla, xla_no_remat = with_backend("xla"), with_backend("xla", remat_encoding=not field.remat_encoding)
    variants = [("xla rgb", False, False, xla), ("xla rgb+normals", True, True, xla),
                (f"xla rgb remat={not field.remat_encoding}", False, False, xla_no_remat),
                # The same rays in another order: how much XLA's own table gradient moves with the order of its
                # scatter-add (float32 sums of cancelling +-1/(2 eps) finite-difference terms). Without jitter and
                # normal noise (drawn per ray / sample slot, they would move with the order).
                ("xla-unjittered rgb+normals", True, False, xla),
                ("xla-unjittered-permuted rgb+normals", True, False, xla)]
    if pallas:
        pallas_st = with_backend("pallas")  # the config's kernel choices
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
        variants += [("pallas rgb", False, False, pallas_st), ("pallas rgb+normals", True, True, pallas_st),
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
                     ("pallas rgb+normals no-perturb", True, False, pallas_st)]
    return variants, xla


def measure(args) -> dict:
    """The render report (see the module docstring); ``--variants`` picks and orders the variants."""
    cfg = load_config(args.config, args.set)
    stage, state, fit_metrics = fit_scene(cfg, args.fit_steps)
    field, spec = stage.field.spec, stage.render
    params, grid = state.params, state.extras["grid"]
    level_mask = nerf.level_mask(state.step, field)
    res = args.resolution
    n_rays = res * res
    camera = cam.make_camera(15.0, 30.0, cfg.camera.distance, cfg.camera.fovy_deg)  # an off-reference view
    rays_o, rays_d = cam.get_rays(camera, res, res)
    rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    key = jax.random.PRNGKey(0)
    results = {}
    variants, xla = _variants(stage, field, spec, args.pallas)
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
            return render_loss(out, need_normals, need_perturb), out

        fwd_bwd = jax.jit(jax.value_and_grad(loss, has_aux=True))
        fwd = jax.jit(lambda p, o, d, k, loss=loss: loss(p, o, d, k)[0])
        try:
            (_, out), grads = jax.block_until_ready(fwd_bwd(params, rays_o, rays_d, key))
            timing = time_calls(fwd_bwd, params, rays_o, rays_d, key, repeats=args.repeats)
        except Exception as e:  # e.g. out of device memory: record it and go on with the other variants
            results[variant] = error_record(e)
            print(f"{variant}: {results[variant]['error']}", file=sys.stderr)
            continue
        images[variant] = out["rgb"]
        table_grads[variant] = grads["encoding"]
        results[variant] = {
            "forward_backward": timing,
            "forward": time_calls(fwd, params, rays_o, rays_d, key, repeats=args.repeats),
            "field_samples_per_ray": float(out["n_samples"]) / n_rays,
            "candidates_per_ray": float(out["n_candidates"]) / n_rays,
            "overflow": int(out["overflow"]),
            "opacity_mean": float(jnp.mean(out["opacity"])),
        }
        # Agreement with the XLA variant of the same outputs, as soon as both exist (ask for it first): a run
        # cut short by a time limit still reports the checks of the variants that finished.
        xla_name = ("xla-unjittered " if permuted else "xla ") + variant.split(" ", 1)[1]
        if (variant.startswith("pallas") or permuted) and xla_name in images:
            results[variant].update(agreement(images[variant], images[xla_name], table_grads[variant],
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
            write_partial(args.out, "render", results)

    if args.f64_reference:
        compare_with_f64_table_gradient(results, table_grads, images, variants, params, rays_o, rays_d, key, grid,
                                        level_mask, xla, field.grid)
        if args.out:
            write_partial(args.out, "render", results)
    if args.split:
        results["split_rgb_variant"] = _split(args, xla, field, params, grid, level_mask, rays_o, rays_d, key)
    return _render_report(args, cfg, field, spec, grid, fit_metrics, results)


def _split(args, xla, field, params, grid, level_mask, rays_o, rays_d, key) -> dict:
    """Split on the packed samples of one call: each component forward+backward on its own inputs."""
    n_rays = rays_o.shape[0]
    fns = xla.field_fns(params, level_mask)
    spec = xla.render
    samples, _ = jax.jit(lambda o, d, k: volume.sample_rays(o, d, grid, k, fns, spec))(rays_o, rays_d, key)
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

    return {
        "march_occupancy_only": time_calls(march_only, rays_o, rays_d, key, repeats=args.repeats),
        "march_with_density_pruning": time_calls(march, rays_o, rays_d, key, repeats=args.repeats),
        "encode_fwd_bwd": time_calls(jax.jit(encode_vjp), params["encoding"], unit, repeats=args.repeats),
        "mlp_fwd_bwd": time_calls(jax.jit(mlp_vjp), {k: params[k] for k in ("density_net", "feature_net")}, enc,
                                  repeats=args.repeats),
        "composite_fwd_bwd": time_calls(jax.jit(composite_vjp), sigma, albedo, repeats=args.repeats),
        "packed_slots": int(samples.valid.shape[0]),
        "valid_samples": int(jnp.sum(samples.valid)),
        "candidate_slots": spec.budgets(n_rays)[0],
    }


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
        "peak_memory_bytes": peak_memory_bytes(),
    }


def run(args) -> dict:
    """Time the variants, print the table (:func:`report.print_table`), return the report."""
    report = measure(args)
    report_lib.print_table(report)
    return report
