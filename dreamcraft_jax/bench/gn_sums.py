"""``bench gn_sums``: the GroupNorm per-channel sums alone (``kernels/channel_sums.py``), XLA's reductions
against the split-row kernels under several launch plans, per activation shape.

    python -m dreamcraft_jax.bench gn_sums [--shapes 4x512x512x128 ...] [--plans auto c32w4 ...] [--out gn.json]

Per (shape, plan): forward (moments) and backward (dz sums with SiLU) ms, each the min of the latency median and
the pipelined time, GB/s of the bytes read, the largest difference to XLA's sums relative to their largest
magnitude, and ``gn_fwd_bwd_ms``: the whole GroupNorm + SiLU (32 groups) forward and backward as the models run
it (``layers.group_norm_act``), its sums on XLA or on the kernels with that plan (on a GPU only: elsewhere the
models keep XLA's sums, so every row times the same thing).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.bench.harness import error_record, time_calls, write_partial
from dreamcraft_jax.kernels.spec import KernelSpec

# The GroupNorm inputs of the SDS steps: VAE encoder levels at 4 views (512 -> 64 px), UNet levels at 4 views
# with CFG (batch 8), and the 1-view VAE 512 px / Zero123 32 px ones.
GN_SUMS_SHAPES = ("4x512x512x128", "4x256x256x256", "4x128x128x512", "4x64x64x512", "8x64x64x320",
                  "8x32x32x640", "8x16x16x1280", "8x8x8x2560", "1x512x512x128", "2x32x32x640")
GN_SUMS_PLANS = ("auto", "c32w4", "c32w8", "c64w8", "c64w8f", "c128w8f", "c32w4t2048")


def add_parser(subparsers) -> argparse.ArgumentParser:
    g = subparsers.add_parser("gn_sums", help="GroupNorm per-channel sums alone: XLA against the split-row kernels")
    g.add_argument("--shapes", nargs="+", default=list(GN_SUMS_SHAPES), help="BxHxWxC activation shapes")
    g.add_argument("--plans", nargs="+", default=list(GN_SUMS_PLANS),
                   help="kernel launch plans: auto (per shape) or "
                        "c<chunk>w<warps>[t<target programs>][s<stages>][f = fold rows]")
    g.add_argument("--repeats", type=int, default=20)
    g.add_argument("--out", default="")
    return g


def plan_kwargs(name: str) -> dict:
    """"c64w8f" -> chunk 64, 8 warps, fold; "t2048": target programs; "s2": pipeline stages; "auto": {} (the
    plan channel_sums.plan picks per shape)."""
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


def run(args) -> dict:
    """The gn_sums report: one entry ``<shape> <plan>`` per shape and plan, ``<shape> xla`` first."""
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
            kw = plan_kwargs(plan_name)
            variants[plan_name] = (functools.partial(cs.shifted_channel_sums, **kw),
                                   functools.partial(cs.backward_channel_sums, silu=True, **kw), kw)
        reference = None
        for name, (fwd, bwd, plan_kw) in variants.items():
            key = f"{shape_name} {name}"
            try:
                fwd_j = jax.jit(fwd)
                bwd_j = jax.jit(lambda x, dy, m, r, s, bb, bwd=bwd: bwd(x, dy, m, r, s, bb))
                out = [np.asarray(v) for v in fwd_j(x)[1:]] + [
                    np.asarray(v) for v in bwd_j(x, dy, mean_c, rstd_c, scale, bias)]
                t_f = time_calls(fwd_j, x, repeats=args.repeats, pipelined=True)
                t_b = time_calls(bwd_j, x, dy, mean_c, rstd_c, scale, bias, repeats=args.repeats, pipelined=True)
                # The models' GroupNorm with this plan (XLA's sums for the "xla" variant).
                kernels = KernelSpec(groupnorm_sums_max_rows=0 if plan_kw is None else 1 << 20,
                                     groupnorm_sums_plan=tuple((plan_kw or {}).items()))
                gn_j = jax.jit(lambda x, s, bb, cot, kernels=kernels: jax.vjp(
                    lambda *a: layers.group_norm_act(*a, 32, 1e-6, True, kernels=kernels), x, s, bb)[1](cot))
                t_gn = time_calls(gn_j, x, scale, bias, dy, repeats=args.repeats, pipelined=True)
            except Exception as e:  # record and go on (e.g. a plan that does not compile)
                results[key] = error_record(e)
                print(f"{key}: {results[key]['error']}", file=sys.stderr)
                continue
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
                write_partial(args.out, "gn_sums", results)
            print(f"{key:<30} fwd {fwd_ms:7.3f} ms {row['fwd_GBps']:7.0f} GB/s   bwd {bwd_ms:7.3f} ms "
                  f"{row['bwd_GBps']:7.0f} GB/s   GroupNorm fwd+bwd {row['gn_fwd_bwd_ms']:7.3f} ms   diff {err:.1e}",
                  flush=True)
    return {"benchmark": "gn_sums", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "dtype": "bfloat16" if gpu else "float32", "results": results}
