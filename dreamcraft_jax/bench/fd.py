"""``bench fd``: the finite-difference kernel (``kernels.fd_hashgrid``) alone, forward and forward + backward.

    python -m dreamcraft_jax.bench fd [--block_points 128 64 256] [--num_warps 4 2 8] [--out fd.json]

Over output layouts, launch shapes (points per program x warps) and backwards (per-lane atomics, coarse levels
pre-reduced), on samples packed as the 384 px NeRF step's (:func:`packed_ray_samples`; official grid at 12 of 16
levels, the sample with its three forward neighbours, as the renderer's main pass asks). Each variant's features
against the first variant's (bit-equal expected: same rows, same order), its table gradient against the first's,
and its speedup over the first.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.bench.harness import error_record, record_variant, time_calls
from dreamcraft_jax.fields import hashgrid, nerf


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = subparsers.add_parser("fd", help="finite-difference kernel alone over launch shapes, on packed ray samples")
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
    return d


def packed_ray_samples(key, resolution: int, samples_per_hit: int, budget_per_ray: int,
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


def run(args) -> dict:
    """The fd report: one entry ``<layout> block<P> warps<W> prereduce<S>`` per variant."""
    from dreamcraft_jax.kernels.fd_hashgrid import CENTER, FORWARD, fd_encode_pallas

    spec = hashgrid.HashGridSpec(16, 2, 19, 16, 1.447269237440378)
    table = hashgrid.init_hashgrid(jax.random.PRNGKey(0), spec) * 1e3
    mask = (jnp.arange(spec.n_levels) < args.levels).astype(jnp.float32)
    x, valid, n_valid = packed_ray_samples(jax.random.PRNGKey(1), args.resolution, args.samples_per_hit,
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

            r = {"forward": time_calls(fwd, *inputs, repeats=args.repeats)}
            if args.forward_only:
                y, grad = fwd(*inputs), None
            else:
                fwd_bwd = jax.jit(fwd_bwd)
                y, grad = fwd_bwd(*inputs, layout_cots)
                r["forward_backward"] = time_calls(fwd_bwd, *inputs, layout_cots, repeats=args.repeats)
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
            r = error_record(e)
        record_variant(results, key, r, args.out, "fd")
    return {"benchmark": "fd", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "slots": int(x.shape[0]), "valid_samples": n_valid, "levels_on": args.levels,
            "neighbours": [list(n) for n in neighbours], "results": results}
