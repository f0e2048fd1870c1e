"""One-off exploration: where the SD SDS step at 4 views (512 px) can still lose time, variant by variant.

Each variant swaps one piece of the priors (the GroupNorm per-channel sums, the VAE's first convolution) for an
alternative formulation, rebuilds the SD SDS step of ``bench sds`` (real SD 2.1-base shapes, random bf16
weights, cuDNN attention) and times it (median of calls waited for one by one, and pipelined), with the device-
busy time and per-module split of a profiler trace. ``bound_*`` variants are not valid GroupNorms: they drop the
reductions to bound what any faster reduction could gain. ``base`` has XLA's GroupNorm sums (the state before
kernels/channel_sums.py); ``sums_kernel_<max rows>[...]`` turns those kernels on.

    python benchmarks/explore_sd_views4.py --out explore.json [--variants base dot ...] [--views 4 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax import bench, profiling
from dreamcraft_jax.models import layers
from dreamcraft_jax.models import vae as vae_module


@contextlib.contextmanager
def patched(module, **attrs):
    old = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


# ------------------------------------------------------------------ alternative per-channel sums


def _rows(x):
    b, c = x.shape[0], x.shape[-1]
    return x.reshape(b, -1, c)


def _split_sum(arrs, rows_per_chunk=128):
    """Sums over axis 1 of (B, N, C) arrays in two stages, a barrier between them (XLA may not merge them)."""
    n = arrs[0].shape[1]
    if n % rows_per_chunk or n <= rows_per_chunk:
        return tuple(jnp.sum(a, axis=1) for a in arrs)
    parts = tuple(jnp.sum(a.reshape(a.shape[0], n // rows_per_chunk, rows_per_chunk, a.shape[-1]), axis=2)
                  for a in arrs)
    parts = jax.lax.optimization_barrier(parts)
    return tuple(jnp.sum(p, axis=1) for p in parts)


def _dot_sum(arrs):
    """Sums over axis 1 of (B, N, C) arrays as contractions with a ones vector (float32 accumulation)."""
    ones = jnp.ones((arrs[0].shape[1],), jnp.bfloat16)
    return tuple(jnp.einsum("bnc,n->bc", a.astype(jnp.bfloat16) if a.dtype != jnp.float32 else a,
                            ones.astype(a.dtype), preferred_element_type=jnp.float32) for a in arrs)


def fwd_sums(reducer):
    def shifted_channel_sums(x):
        xs = _rows(x).astype(jnp.float32)
        shift = xs[:, 0, :]
        d = xs - shift[:, None, :]
        s1, s2 = reducer((d, d * d))
        return shift, s1, s2
    return shifted_channel_sums


def bwd_sums(reducer):
    def backward_channel_sums(x, dy, mean_c, rstd_c, scale, bias, silu):
        xhat, dz = layers._backward_dz(x, dy, mean_c, rstd_c, scale, bias, silu)
        return reducer((_rows(dz), _rows(dz * xhat)))
    return backward_channel_sums


def _bound_fwd(x):
    b, c = x.shape[0], x.shape[-1]
    n = int(np.prod(x.shape[1:-1]))
    z = jnp.zeros((b, c), jnp.float32)
    return z, z, jnp.full((b, c), float(n), jnp.float32)


def _bound_bwd(x, dy, mean_c, rstd_c, scale, bias, silu):
    z = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
    return z, z


# ------------------------------------------------------------------ conv_in through patches


class PatchConv(nn.Module):
    """3x3 'same' convolution of few input channels as one matmul over 3x3 patches (same params as layers.Conv2d)."""

    features: int
    dtype: object

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=0),
                            (self.features, 3, 3, cin), jnp.float32)  # OHWI, as layers.Conv2d
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        xp = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
        h, w = x.shape[1:3]
        patches = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], axis=-1)
        weights = kernel.transpose(1, 2, 3, 0).reshape(9 * cin, self.features)  # (kh, kw, in) rows, as patches
        y = jnp.einsum("bhwk,kf->bhwf", patches, weights.astype(self.dtype),
                       preferred_element_type=jnp.float32)
        return (y + bias).astype(self.dtype)


def _conv_with_patch_conv_in(features, name, dtype, kernel_size=3, stride=1, padding=None):
    if name == "conv_in" and kernel_size == 3 and stride == 1 and padding is None:
        return PatchConv(features, dtype, name=name)
    return layers.conv(features, name, dtype, kernel_size, stride, padding)


def variant_context(name):
    if name == "base":
        return contextlib.nullcontext()
    if name == "bound_fwd":
        return patched(layers, _shifted_channel_sums=_bound_fwd)
    if name == "bound_bwd":
        return patched(layers, _backward_channel_sums=_bound_bwd)
    if name == "bound_both":
        return patched(layers, _shifted_channel_sums=_bound_fwd, _backward_channel_sums=_bound_bwd)
    if name == "split":
        return patched(layers, _shifted_channel_sums=fwd_sums(_split_sum),
                       _backward_channel_sums=bwd_sums(_split_sum))
    if name == "dot":
        return patched(layers, _shifted_channel_sums=fwd_sums(_dot_sum), _backward_channel_sums=bwd_sums(_dot_sum))
    if name == "patch_conv_in":
        return patched(vae_module, conv=_conv_with_patch_conv_in)
    if name.startswith("sums_kernel_"):  # sums_kernel_<max rows>[_t<target>][_c<chunk>][_w<warps>][_s<stages>][_f]
        return _sums_kernel(name.split("_")[2:])
    if name == "groupnorm_kernel":
        return _kernel_on()
    raise ValueError(name)


@contextlib.contextmanager
def _kernel_on():
    layers.set_groupnorm_kernel(True)
    try:
        yield
    finally:
        layers.set_groupnorm_kernel(False)


@contextlib.contextmanager
def _sums_kernel(parts):
    """parts: [max rows, optional plan letters as in ``bench gn_sums``: t<target> c<chunk> w<warps> s<stages>]."""
    from dreamcraft_jax.bench import _gn_sums_plan_kw
    from dreamcraft_jax.kernels import channel_sums as cs

    plan_kw = _gn_sums_plan_kw("".join(parts[1:])) if parts[1:] else {}
    layers.set_groupnorm_sums_kernel(int(parts[0]))
    try:
        with cs.plan_defaults(**plan_kw):
            yield
    finally:
        layers.set_groupnorm_sums_kernel(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+",
                    default=["base", "bound_both", "bound_fwd", "bound_bwd", "split", "dot", "patch_conv_in"])
    ap.add_argument("--views", nargs="+", type=int, default=[4])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--profile_top", type=int, default=60)
    ap.add_argument("--tiny", action="store_true", help="tiny priors (CPU smoke test)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    layers.set_groupnorm_sums_kernel(0)  # base: XLA's GroupNorm sums; sums_kernel_* variants switch the kernels on
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    results["bf16_matmul_peak_tflops"] = bench.matmul_peak_tflops(args.repeats)
    print(f"peak {results['bf16_matmul_peak_tflops']:.0f} TFLOP/s", flush=True)
    for views in args.views:
        for name in args.variants:
            key = f"views{views}_{name}"
            try:
                with variant_context(name):
                    grad_fn, fn_args = bench._sds_case("sd", views, args.tiny, "cudnn", dtype, dtype)
                    t0 = time.perf_counter()
                    compiled = grad_fn.lower(*fn_args).compile()
                    compile_s = time.perf_counter() - t0
                timing = bench._time(compiled, *fn_args, repeats=args.repeats, pipelined=True)
                table = profiling.op_profile(compiled, *fn_args, repeats=3, top=args.profile_top)
                grad = np.asarray(compiled(*fn_args), np.float32)
                row = {**timing, "compile_s": compile_s, "busy_ms": table["busy_ms"], "kernels": table["kernels"],
                       "by_module": table["by_module"], "grad_abs_mean": float(np.abs(grad).mean()),
                       "of_peak_pipelined": 3.9 * views / (timing["pipelined_ms"] * 1e-3)
                       / results["bf16_matmul_peak_tflops"]}
                if name == "base":
                    row["ops"] = table["ops"]
                    results[f"views{views}_base_grad"] = grad  # compared below, popped before writing
                else:
                    ref = results.get(f"views{views}_base_grad")
                    if ref is not None:
                        row["grad_relerr_vs_base"] = float(np.linalg.norm(grad - ref) / np.linalg.norm(ref))
                results[key] = row
                print(f"{key:<28} {timing['median_ms']:7.2f} ms  pipelined {timing['pipelined_ms']:7.2f}  busy "
                      f"{table['busy_ms']:7.2f}  {row['of_peak_pipelined']:.1%} of peak  "
                      f"{row.get('grad_relerr_vs_base', '')}", flush=True)
            except Exception as e:  # record and go on
                results[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                print(key, results[key]["error"], file=sys.stderr, flush=True)
            with open(args.out, "w") as f:
                json.dump({k: v for k, v in results.items() if not k.endswith("_grad")}, f, indent=1)


if __name__ == "__main__":
    main()
