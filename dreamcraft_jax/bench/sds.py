"""``bench sds``: one SDS step, d loss / d images, of SD at 512 px and Zero123 at 256 px (real shapes, random
weights), per view count, attention implementation, GroupNorm kernel choice and XLA compiler-option set.

    python -m dreamcraft_jax.bench sds [--views 1 4] [--repeats 20] [--torch_json torch.json] [--out sds.json]

Per case: compile time, latency and pipelined time (:func:`~dreamcraft_jax.bench.harness.time_calls`), views/s,
TFLOP/s from the analytic FLOPs per view (``SDS_TFLOP_PER_VIEW``) and their fraction of the measured bf16 matmul
peak, and two fingerprints of the image gradient (same inputs and keys in every process: an A/B of flags or
options must agree on them). ``--tiny``: tiny widths, the CPU smoke test of the same code path.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax import config as config_lib
from dreamcraft_jax.bench import report as report_lib
from dreamcraft_jax.bench.harness import error_record, matmul_peak_tflops, time_calls, xla_flops
from dreamcraft_jax.guidance.random_priors import TINY_UNET, TINY_VAE, random_params
from dreamcraft_jax.kernels.spec import KernelSpec
from dreamcraft_jax.models.reference_configs import SD21_BASE_UNET, SD_VAE, ZERO123_UNET

# Analytic FLOPs per view (BENCHMARKS.md): XLA's cost analysis does not count cuDNN attention custom calls.
SDS_TFLOP_PER_VIEW = {"sd": 3.9, "zero123": 0.9}


def add_parser(subparsers) -> argparse.ArgumentParser:
    q = subparsers.add_parser("sds", help="SD SDS at 512 and Zero123 SDS at 256 (real shapes, random weights)")
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
    return q


def sds_case(kind: str, views: int, tiny: bool, attention_impl, dtype, param_dtype=jnp.float32, kernels=None):
    """(grad_fn, args) for one SDS step: d loss / d images for ``views`` renders; ``kind`` "sd" or "zero123"."""
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
    unet = UNet2DConditionModel.from_config(unet_cfg, dtype=dtype, attention_impl=attention_impl,
                                            kernels=kernels or KernelSpec())
    vae = AutoencoderKL.from_config(TINY_VAE if tiny else SD_VAE, dtype=dtype, attention_impl=attention_impl,
                                   kernels=kernels or KernelSpec())
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


def compiler_options(text: str) -> dict:
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


def measure(args) -> dict:
    """The SDS report: one entry per (kind, views, attention, GroupNorm kernel, sums rows, option set) case."""
    gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    impls = ["cudnn", None] if (gpu and args.compare_attention) else ["cudnn" if gpu else None]
    groupnorm_choices = [False, True] if args.compare_groupnorm else [args.groupnorm_kernel]
    sums_choices = args.groupnorm_sums_max_rows
    option_sets = [compiler_options(text) for text in args.compiler_options]
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
        kernels = KernelSpec(fused_groupnorm=gn_kernel, groupnorm_sums_max_rows=sums_rows)
        try:
            t0 = time.perf_counter()
            grad_fn, fn_args = sds_case(kind, views, args.tiny, impl, dtype,
                                        jnp.bfloat16 if args.param_dtype == "bf16" else jnp.float32, kernels)
            jax.block_until_ready(fn_args)
            t1 = time.perf_counter()
            lowered = grad_fn.lower(*fn_args)
            t2 = time.perf_counter()
            compiled = lowered.compile(options or None)
            t_compile = time.perf_counter() - t2
            print(f"{name}: init {t1 - t0:.1f} s, trace+lower {t2 - t1:.1f} s, compile {t_compile:.1f} s",
                  file=sys.stderr, flush=True)
            timing = time_calls(compiled, *fn_args, repeats=args.repeats, pipelined=True)
            # Same inputs and keys in every process and variant: an A/B of flags or options must agree here.
            image_grads = np.asarray(jax.device_get(compiled(*fn_args)), np.float64)
        except Exception as e:  # record and go on (e.g. out of memory)
            results[name] = error_record(e)
            print(f"{name}: {results[name]['error']}", file=sys.stderr)
            continue
        flops = None if args.tiny else SDS_TFLOP_PER_VIEW[kind] * 1e12 * views
        results[name] = {"views": views, "attention": impl or "xla", "groupnorm_kernel": gn_kernel,
                         "groupnorm_sums_max_rows": sums_rows, "compiler_options": options,
                         "compile_s": t_compile, **timing,
                         "image_grad_l2": float(np.linalg.norm(image_grads)),
                         "image_grad_sum": float(image_grads.sum()),
                         "views_per_s": views / (timing["median_ms"] * 1e-3), "flops_model": flops,
                         "xla_cost_analysis_flops": xla_flops(compiled),
                         "tflops_per_s": flops / (timing["median_ms"] * 1e-3) / 1e12 if flops else None,
                         "pipelined_tflops_per_s": (flops / (timing["pipelined_ms"] * 1e-3) / 1e12
                                                    if flops else None)}
        print(f"{name:<28} {timing['median_ms']:9.2f} ms  {results[name]['views_per_s']:7.1f} views/s",
              flush=True)
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


def run(args) -> dict:
    """Time the cases, print the table (:func:`report.print_sds_table`), return the report."""
    report = measure(args)
    report_lib.print_sds_table(report)
    return report
