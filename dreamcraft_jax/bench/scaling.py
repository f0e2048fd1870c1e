"""``bench scaling``: weak scaling (views per device fixed) and strong scaling (global views fixed) of the SD SDS
step, the Zero123 SDS step and the full coarse-NeRF random-view step over 1, 2, 4, 8 devices of this host, with
the prior replicated or FSDP-split.

    NCCL_NVLS_ENABLE=0 python -m dreamcraft_jax.bench scaling [--devices 1 2 4 8] [--out scaling.json]
        [--plot scaling.png]

Per case: latency and pipelined ms, views/s, the loss (per-view keys make the strong-scaling losses device-count
invariant: each is compared with the first of its (kind, views)), and the prior's bytes held per device; per
report, the weak-scaling efficiency / strong-scaling speedup against 1 device, from either timing. ``--plot``
draws them (matplotlib, the optional ``plots`` extra). On the CPU the devices are simulated
(``XLA_FLAGS=--xla_force_host_platform_device_count``): the report says so.
"""

from __future__ import annotations

import argparse

import jax

from dreamcraft_jax import parallel
from dreamcraft_jax.bench import report as report_lib
from dreamcraft_jax.bench.harness import error_record, pipelined_steps_ms, time_calls, write_partial
from dreamcraft_jax.bench.scenes import fit_scene, phase_mid_step, stage_case
from dreamcraft_jax.config_file import load_config
from dreamcraft_jax.guidance.random_priors import random_priors
from dreamcraft_jax.kernels.spec import KernelSpec


def add_parser(subparsers) -> argparse.ArgumentParser:
    c = subparsers.add_parser("scaling",
                              help="weak / strong scaling of the SDS steps and the coarse-NeRF step over devices")
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
    c.add_argument("--plot", default="", help="also write a PNG of efficiency / speedup vs devices "
                                              "(needs matplotlib: pip install dreamcraft-jax[plots])")
    return c


def prior_bytes_per_device(placed) -> int:
    """Bytes of a placed prior-params tree held by the first device (replicated: all of it; FSDP: its shard)."""
    dev = jax.devices()[0]
    total = 0
    for leaf in jax.tree.leaves(placed):
        total += sum(sh.data.nbytes for sh in leaf.addressable_shards if sh.device == dev)
    return total


def sds_scaling_fn(prior_name: str, priors, mesh, specs, step: int):
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


def scaling_case(kind, views, mesh, layout, priors, prior_params, cfg, fitted, res, repeats) -> dict:
    """Time one (kind, views, mesh) case: median and pipelined ms, views/s by each, the loss and the prior bytes
    per device."""
    from dreamcraft_jax import cameras as cam
    from dreamcraft_jax.stages.volume_stage import RANDOM

    n_shards = parallel.view_shards(mesh)
    if kind == "stage":
        stage, state, targets, pp = stage_case(cfg, "coarse_nerf", res, views // n_shards, mesh, priors,
                                               prior_params, fitted, phase_mid_step(cfg, "coarse_nerf", res))
        step = stage.step_fn((RANDOM, (res, res)))
        _, metrics = step(jax.tree.map(lambda x: x.copy(), state), targets, pp)
        timing = time_calls(lambda s: step(jax.tree.map(lambda x: x.copy(), s), targets, pp), state, repeats=repeats)
        timing["pipelined_ms"] = pipelined_steps_ms((step,), state, targets, pp, repeats)
        loss = float(metrics["loss"])
        placed = pp
    else:
        prior_name = "sd" if kind == "sd" else "3d_sd"
        pp_one = {prior_name: prior_params[prior_name]}
        specs = parallel.fsdp_specs(pp_one, mesh, int(cfg.parallel.fsdp_min_size)) if layout == "fsdp" else None
        placed = jax.device_put(pp_one, parallel.param_shardings(pp_one, mesh, int(cfg.parallel.fsdp_min_size))
                                if layout == "fsdp" else parallel.replicated(mesh))
        fn = sds_scaling_fn(prior_name, priors, mesh, specs, step=1000)
        k_img, k_cam, k_view = jax.random.split(jax.random.PRNGKey(11), 3)
        images = jax.random.uniform(k_img, (views, res, res, 3))
        cams = cam.sample_cameras(k_cam, views, 1000, cfg.camera)
        keys = jax.random.split(k_view, views)
        sharded = parallel.along_views(mesh)
        images, cams, keys = (jax.device_put(x, sharded) for x in (images, cams, keys))
        loss = float(fn(images, cams, keys, placed)[0])
        timing = time_calls(fn, images, cams, keys, placed, repeats=repeats, pipelined=True)
    return {"median_ms": timing["median_ms"], "views_per_s": views / (timing["median_ms"] * 1e-3),
            "pipelined_ms": timing["pipelined_ms"], "views_per_s_pipelined": views / (timing["pipelined_ms"] * 1e-3),
            "loss": loss, "prior_bytes_per_device": prior_bytes_per_device(placed)}


def scaling_efficiency(results: dict, timing: str = "median_ms") -> dict:
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


def measure(args) -> dict:
    """The scaling report: one entry ``<kind>_<weak|strong>[_vpd<V>]_<layout>_dev<n>`` per case."""
    cfg = load_config(args.config, args.set)
    platform_name = jax.devices()[0].platform
    n_avail = len(jax.devices())
    priors, prior_params = random_priors(cfg, args.tiny, kernels=KernelSpec.from_config(cfg.kernels))
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
                        r = scaling_case(kind, views, mesh, layout, priors, prior_params, cfg, fitted, res,
                                         args.repeats)
                    except Exception as e:  # out of memory etc.: record and go on
                        r = error_record(e)
                    r.update(devices=n, views=views, mode=mode, layout=layout, kind=kind)
                    if "loss" in r:
                        key = (kind, views)
                        reference.setdefault(key, r["loss"])
                        r["loss_rel_diff_vs_first"] = abs(r["loss"] - reference[key]) / max(abs(reference[key]), 1e-12)
                    results[name] = r
                    print(f"{name:<40} " + (f"{r['median_ms']:9.1f} ms {r['views_per_s']:8.2f} views/s"
                                            if "median_ms" in r else r.get("error", "")), flush=True)
                    if args.out:  # partial results survive a time limit
                        write_partial(args.out, "scaling", results)
    return {"benchmark": "scaling", "platform": platform_name, "device": str(jax.devices()[0].device_kind),
            "cpu_simulated": platform_name == "cpu",
            "note": ("CPU-SIMULATED devices (XLA_FLAGS=--xla_force_host_platform_device_count): they share the "
                     "host's cores, so the times show that the sharded steps run and agree, not how they scale")
            if platform_name == "cpu" else "", "jax": jax.__version__, "tiny": args.tiny,
            "resolution": res, "results": results, "efficiency": scaling_efficiency(results),
            "efficiency_pipelined": scaling_efficiency(results, "pipelined_ms")}


def run(args) -> dict:
    """Time the cases, print the table and, with ``--plot``, draw the plot (skipped, with one line saying so,
    where matplotlib is not installed); return the report."""
    report = measure(args)
    report_lib.print_scaling_table(report)
    if args.plot and report_lib.plot_scaling(report, args.plot):
        print(f"wrote {args.plot}")
    return report
