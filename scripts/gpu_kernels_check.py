"""GPU check + microbench of the Pallas kernels vs their XLA references (one process, JSON to argv[1])."""
import json
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.fields.hashgrid import HashGridSpec, init_hashgrid
from dreamcraft_jax.kernels import composite as kcomp
from dreamcraft_jax.kernels import hashgrid as khg
from dreamcraft_jax.kernels import march as kmarch
from dreamcraft_jax.render import volume

out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}

def timeit(fn, *args, n=10):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ts)

def err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

def section(name, f):
    try:
        out[name] = f()
    except Exception as e:
        out[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
        traceback.print_exc()
    print(name, json.dumps(out[name])[:1500], flush=True)
    json.dump(out, open(sys.argv[1], "w"), indent=1)

spec = HashGridSpec(16, 2, 19, 16, 1.447269237440378)
table = init_hashgrid(jax.random.PRNGKey(0), spec) * 1e3
x = jax.random.uniform(jax.random.PRNGKey(1), (1 << 20, 3))
mask = jnp.ones((16,))
g = jax.random.normal(jax.random.PRNGKey(2), (1 << 20, 32))

def fwd_bwd(encode):
    """jit (table, x, g) -> (encode(table, x), its vjp with g w.r.t. the table)."""
    def fn(t, x, g):
        y, vjp = jax.vjp(lambda t: encode(t, x), t)
        return y, vjp(g)

    return jax.jit(fn)


def hg():
    res = {}
    ref_f = jax.jit(lambda t, x: khg.encode_xla(t, x, spec, mask))
    ref_vjp = jax.jit(lambda t, x, g: jax.vjp(lambda t: khg.encode_xla(t, x, spec, mask), t)[1](g)[0])
    yr, dr = ref_f(table, x), ref_vjp(table, x, g)
    res["xla_fwd_ms"] = timeit(ref_f, table, x)
    res["xla_fwd_bwd_ms"] = timeit(fwd_bwd(lambda t, x: khg.encode_xla(t, x, spec, mask)), table, x, g)
    for bp, nw in [(256, 4), (128, 4)]:
        for gto in (True, False):
            key = f"pallas_b{bp}_w{nw}" + ("_tableonly" if gto else "")
            kw = dict(block_points=bp, num_warps=nw, grad_table_only=gto)
            print("start", key, time.strftime("%X"), flush=True)
            try:
                f = jax.jit(lambda t, x: khg.encode_pallas(t, x, spec, mask, **kw))
                vjp = jax.jit(lambda t, x, g: jax.vjp(lambda t: khg.encode_pallas(t, x, spec, mask, **kw), t)[1](g)[0])
                fb = fwd_bwd(lambda t, x: khg.encode_pallas(t, x, spec, mask, **kw))
                r = {"fwd_err": err(f(table, x), yr), "bwd_err": err(vjp(table, x, g), dr)}
                if not gto:
                    r["fwd_ms"] = timeit(f, table, x)
                r["fwd_bwd_ms"] = timeit(fb, table, x, g)
                res[key] = r
            except Exception as e:
                res[key] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
            print(key, res[key], flush=True)
    return res

rspec = volume.RenderSpec(radius=2.0, num_samples_per_ray=512)
R = 384 * 384
def rays():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    o = jnp.tile(jnp.array([[3.8, 0.0, 0.0]]), (R, 1)) + 0.01 * jax.random.normal(k1, (R, 3))
    tgt = jax.random.uniform(k2, (R, 3), minval=-0.7, maxval=0.7)
    d = tgt - o
    d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
    return o, d
o, d = rays()
c = jnp.asarray(volume.cell_coords(32), jnp.float32)
binary = jnp.linalg.norm((c + 0.5) / 32 * 4 - 2, axis=-1) < 0.6
grid = volume.OccupancyGrid(occs=binary.astype(jnp.float32), binary=binary)
m1, m2 = rspec.budgets(R)

def mr():
    res = {}
    f_ref = jax.jit(lambda o, d, k: kmarch.march_xla(o, d, grid, k, rspec, m1))
    s_ref = f_ref(o, d, jax.random.PRNGKey(4))
    res["candidates_per_ray"] = float(s_ref.n_wanted) / R
    res["xla_ms"] = timeit(f_ref, o, d, jax.random.PRNGKey(4))
    for br, nw in [(64, 2), (128, 4)]:
        key = f"pallas_b{br}_w{nw}"
        print("start", key, time.strftime("%X"), flush=True)
        try:
            f = jax.jit(lambda o, d, k: kmarch.march_pallas(o, d, grid, k, rspec, m1, block_rays=br, num_warps=nw))
            s = f(o, d, jax.random.PRNGKey(4))
            v = np.asarray(s_ref.valid)
            res[key] = {"valid_equal": bool(np.array_equal(np.asarray(s.valid), v)),
                        "ray_mismatch": int(np.sum(np.asarray(s.ray_idx) != np.asarray(s_ref.ray_idx))),
                        "t0_maxerr": (float(np.max(np.abs(np.asarray(s.t0)[v] - np.asarray(s_ref.t0)[v])))
                                      if v.any() else 0.0),
                        "n_wanted": [int(s.n_wanted), int(s_ref.n_wanted)],
                        "ms": timeit(f, o, d, jax.random.PRNGKey(4))}
        except Exception as e:
            res[key] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
        print(key, res[key], flush=True)
    return res
section("march_384", mr)

def cp():
    res = {}
    s = kmarch.march_xla(o, d, grid, jax.random.PRNGKey(4), rspec, m2)
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    sigma = jax.random.uniform(ks[0], (m2,)) * 50
    color = jax.random.uniform(ks[1], (m2, 3))
    cot = jax.random.normal(ks[2], (R, 5))
    def loss(fn):
        def l(sig, col):
            w, rgb, op, dep = fn(sig, col, s.t0, s.t1, s.ray_idx, s.valid, R)
            return jnp.sum(rgb * cot[:, :3]) + jnp.sum(op * cot[:, 3]) + jnp.sum(dep * cot[:, 4]) + jnp.sum(w)
        return jax.jit(jax.value_and_grad(l, argnums=(0, 1)))
    lr = loss(kcomp.composite_xla)
    vr, (gs_r, gc_r) = lr(sigma, color)
    res["xla_fwd_bwd_ms"] = timeit(lr, sigma, color)
    for br, nw in [(64, 2), (128, 4), (32, 1)]:
        key = f"pallas_b{br}_w{nw}"
        print("start", key, time.strftime("%X"), flush=True)
        try:
            lp = loss(lambda *a: kcomp.composite_pallas(*a, block_rays=br, num_warps=nw))
            vp, (gs, gc) = lp(sigma, color)
            res[key] = {"value_err": err(vp, vr), "dsigma_err": err(gs, gs_r), "dcolor_err": err(gc, gc_r),
                        "fwd_bwd_ms": timeit(lp, sigma, color)}
        except Exception as e:
            res[key] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
        print(key, res[key], flush=True)
    return res
section("composite_384", cp)

json.dump(out, open(sys.argv[1], "w"), indent=1)
section("hashgrid_2p20", hg)
