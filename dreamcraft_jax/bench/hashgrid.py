"""``bench hashgrid``: hash-grid encoding forward and forward+backward of N points (official grid L16 F2 T2^19).

    python -m dreamcraft_jax.bench hashgrid [--points 1048576] [--layouts uniform rays] [--out hashgrid.json]

XLA against the Pallas kernel with each backward (XLA's scatter-add, atomics, atomics with the coarse levels
pre-reduced per block), on uniform points and on points in ray order (:func:`clustered_points`). Per variant: the
forward and forward+backward timings (:func:`~dreamcraft_jax.bench.harness.time_calls`), its table gradient
against a float64 accumulation of the same cotangent, and (kernels) its features and table gradient against
XLA's and its speedup.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.bench.harness import error_record, record_variant, time_calls
from dreamcraft_jax.fields import hashgrid, nerf


def add_parser(subparsers) -> argparse.ArgumentParser:
    h = subparsers.add_parser("hashgrid", help="hash-grid encoding forward / forward+backward, XLA vs Pallas backwards")
    h.add_argument("--points", type=int, default=1 << 20)
    h.add_argument("--layouts", nargs="+", default=["uniform", "rays"], choices=["uniform", "rays"])
    h.add_argument("--pallas", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the Pallas kernel (interpret mode off GPU: slow)")
    h.add_argument("--repeats", type=int, default=10)
    h.add_argument("--out", default="")
    return h


def clustered_points(key, n: int, points_per_ray: int = 64) -> jax.Array:
    """(n, 3) points in [0, 1]^3 in ray order: ``points_per_ray`` consecutive steps along random chords, as the
    renderer's packed samples come (consecutive points share the coarse cells; what the pre-reduction is for)."""
    n_rays = -(-n // points_per_ray)
    k_o, k_d, k_t = jax.random.split(key, 3)
    start = jax.random.uniform(k_o, (n_rays, 1, 3), minval=0.2, maxval=0.8)
    direction = jax.random.normal(k_d, (n_rays, 1, 3))
    direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
    t = (jnp.arange(points_per_ray, dtype=jnp.float32)[None, :, None] + jax.random.uniform(k_t, (n_rays, 1, 1)))
    return jnp.clip(start + direction * t * (0.6 / points_per_ray), 0.0, 1.0).reshape(-1, 3)[:n]


def run(args) -> dict:
    """The hashgrid report: one entry ``<layout> <encoder>`` per point layout and encoder, XLA first."""
    from dreamcraft_jax.kernels.hashgrid import encode_pallas, encode_xla

    spec = hashgrid.HashGridSpec(16, 2, 19, 16, 1.447269237440378)
    n = args.points
    table = hashgrid.init_hashgrid(jax.random.PRNGKey(0), spec) * 1e3
    mask = jnp.ones((spec.n_levels,), jnp.float32)
    cot = jax.random.normal(jax.random.PRNGKey(2), (n, spec.output_dim))
    results = {}
    for layout in args.layouts:
        x = (jax.random.uniform(jax.random.PRNGKey(1), (n, 3)) if layout == "uniform"
             else clustered_points(jax.random.PRNGKey(1), n))
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
                r = {"forward": time_calls(fwd, table, x, repeats=args.repeats),
                     "forward_backward": time_calls(fwd_bwd, table, x, cot, repeats=args.repeats),
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
                r = error_record(e)
            record_variant(results, key, r, args.out, "hashgrid")
    return {"benchmark": "hashgrid", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "points": n, "grid": {k: getattr(spec, k) for k in ("n_levels", "n_features_per_level", "log2_hashmap_size",
                                                             "base_resolution", "per_level_scale")},
            "results": results}
