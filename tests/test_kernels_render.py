"""Pallas render kernels (kernels/march.py, kernels/composite.py) against their pure-jnp references.

CPU: the kernels run in Pallas interpret mode (``interpret=None`` resolves to it off GPU). Small ray blocks
(``block_rays`` 4..16) so every case spans several programs and padded rays.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dreamcraft_jax.kernels import common
from dreamcraft_jax.kernels import composite as ck
from dreamcraft_jax.kernels import march as mk
from dreamcraft_jax.render.volume import OccupancyGrid, RenderSpec

# ----------------------------------------------------------------------------------------------
# marching
# ----------------------------------------------------------------------------------------------

SPEC = RenderSpec(radius=1.0, num_samples_per_ray=40, stratified=True, grid_resolution=5,
                  alpha_threshold=0.0, early_stop_eps=0.0)


def _rays(n, seed):
    """n unit rays: most from distance ~3 aimed near the box (some miss it), every 5th starting inside it,
    every 7th pointing away from it."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n, 3))
    o = 3.0 * u / np.linalg.norm(u, axis=1, keepdims=True)
    o[::5] = rng.uniform(-0.9, 0.9, size=o[::5].shape)
    target = rng.uniform(-1.3, 1.3, size=(n, 3))
    d = target - o
    d[::7] = o[::7]  # away from the centre: misses unless it starts inside
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return jnp.asarray(o, jnp.float32), jnp.asarray(d, jnp.float32)


def _grid(spec, kind, seed=0):
    n = spec.grid_resolution ** 3
    if kind == "full":
        binary = np.ones(n, bool)
    elif kind == "empty":
        binary = np.zeros(n, bool)
    else:
        binary = np.random.default_rng(seed).uniform(size=n) < 0.5
    return OccupancyGrid(occs=jnp.zeros((n,), jnp.float32), binary=jnp.asarray(binary))


def _march_both(o, d, grid, key, spec, budget, block_rays=16):
    ref = jax.jit(mk.march_xla, static_argnums=(4, 5))(o, d, grid, key, spec, budget)
    got = jax.jit(lambda *a: mk.march_pallas(*a, spec, budget, block_rays=block_rays))(o, d, grid, key)
    return jax.tree.map(np.asarray, ref), jax.tree.map(np.asarray, got)


def _assert_same_samples(ref, got, n_rays):
    assert int(got.n_wanted) == int(ref.n_wanted)
    np.testing.assert_array_equal(got.valid, ref.valid)
    np.testing.assert_array_equal(got.ray_idx, ref.ray_idx)
    v = ref.valid
    np.testing.assert_array_equal(got.t0[v], ref.t0[v])  # bitwise on valid slots
    # t1 = t0 + group dt: XLA may contract it to an FMA in one of the two programs and not in the other
    np.testing.assert_allclose(got.t1[v], ref.t1[v], rtol=2e-7, atol=0)
    # invalid slots: normalised to the reference's fill (ray n_rays, interval of ray 0 step 0)
    assert np.all(got.ray_idx[~v] == n_rays)
    np.testing.assert_array_equal(got.t0[~v], ref.t0[~v])
    # valid slots are a prefix, all of the wanted ones when they fit
    np.testing.assert_array_equal(v, np.arange(v.shape[0]) < int(np.sum(v)))
    if int(ref.n_wanted) <= v.shape[0]:
        assert int(np.sum(v)) == int(ref.n_wanted)


@pytest.mark.parametrize("n_rays,stratified,block_rays", [(37, True, 16), (13, False, 4), (1, True, 16)])
def test_march_matches_reference_partial_grid(n_rays, stratified, block_rays):
    spec = SPEC.replace(stratified=stratified)
    o, d = _rays(n_rays, seed=n_rays)
    grid = _grid(spec, "partial", seed=1)
    budget = n_rays * spec.max_steps_per_ray  # no overflow possible
    ref, got = _march_both(o, d, grid, jax.random.PRNGKey(3), spec, budget, block_rays)
    _assert_same_samples(ref, got, n_rays)
    if n_rays > 1:  # a non-trivial case: rays with and without samples, one starting inside the box
        counts = np.bincount(ref.ray_idx[ref.valid], minlength=n_rays)
        assert int(ref.n_wanted) > 3 * n_rays and np.any(counts == 0) and np.sum(counts > 0) > n_rays // 2
        assert np.any(counts[::5] > 0) and np.all(np.abs(np.asarray(o[::5])) < 1.0)  # starts inside the box


def test_march_full_grid_and_no_pruning():
    n_rays = 29
    o, d = _rays(n_rays, seed=4)
    key = jax.random.PRNGKey(0)
    for spec in (SPEC, SPEC.replace(grid_prune=False)):
        ref, got = _march_both(o, d, _grid(spec, "full"), key, spec, n_rays * spec.max_steps_per_ray)
        _assert_same_samples(ref, got, n_rays)
        assert int(ref.n_wanted) > 10 * n_rays


def test_march_empty_grid_gives_no_samples():
    n_rays = 21
    o, d = _rays(n_rays, seed=5)
    ref, got = _march_both(o, d, _grid(SPEC, "empty"), jax.random.PRNGKey(0), SPEC, 64)
    _assert_same_samples(ref, got, n_rays)
    assert int(got.n_wanted) == 0 and not np.any(got.valid) and np.all(got.ray_idx == n_rays)


def test_march_budget_overflow_keeps_the_same_slots():
    n_rays = 37
    o, d = _rays(n_rays, seed=6)
    grid = _grid(SPEC, "partial", seed=2)
    key = jax.random.PRNGKey(7)
    march = jax.jit(mk.march_xla, static_argnums=(4, 5))
    wanted = int(march(o, d, grid, key, SPEC, n_rays * SPEC.max_steps_per_ray).n_wanted)
    hit = set(np.asarray(march(o, d, grid, key, SPEC, n_rays * SPEC.max_steps_per_ray).ray_idx).tolist()) - {n_rays}
    # one ray merged, several, most of them; fewer slots than rays hit (then the last rays are cut)
    for budget in (wanted - 1, wanted - 17, wanted // 4, 5):
        ref, got = _march_both(o, d, grid, key, SPEC, budget, block_rays=8)
        _assert_same_samples(ref, got, n_rays)
        assert int(got.n_wanted) == wanted
        assert int(got.overflow) == max(0, wanted - budget)
        if budget >= len(hit):  # sampled coarser, but every ray hit keeps its occupied length
            assert set(got.ray_idx[got.valid].tolist()) == hit
            np.testing.assert_allclose(np.sum((got.t1 - got.t0)[got.valid]), wanted * SPEC.step_size, rtol=1e-4)


def test_march_no_key_and_near_plane():
    n_rays = 19
    spec = SPEC.replace(near_plane=2.5)  # clips the start of most rays from distance 3
    o, d = _rays(n_rays, seed=8)
    ref, got = _march_both(o, d, _grid(spec, "partial", seed=3), None, spec, 200)
    _assert_same_samples(ref, got, n_rays)


def test_march_inside_shard_map():
    """Each of the 8 devices marches its own rays into its own packed set (the renderer's layout)."""
    mesh = jax.make_mesh((8,), ("data",))
    n_local = 6
    o, d = _rays(8 * n_local, seed=9)
    grid = _grid(SPEC, "partial", seed=4)
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    budget = 40

    def run(fn):
        def local(o, d, grid, k):
            s = fn(o, d, grid, k[0], SPEC, budget)
            return s.ray_idx, s.t0, s.valid, s.n_wanted[None]

        shard = NamedSharding(mesh, P("data"))
        args = [jax.device_put(x, shard) for x in (o, d)] + [grid, jax.device_put(keys, shard)]
        sm = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P("data")),
                           out_specs=P("data"))
        return [np.asarray(x) for x in jax.jit(sm)(*args)]

    ref = run(mk.march_xla)
    got = run(lambda *a: mk.march_pallas(*a, block_rays=4))
    for x, y in zip(ref, got):
        np.testing.assert_array_equal(y, x)
    assert np.any(ref[3] > budget) and np.any(ref[3] < budget)  # some devices overflow, some do not


# ----------------------------------------------------------------------------------------------
# compositing
# ----------------------------------------------------------------------------------------------


def _packed(lengths, n_tail, seed, *, holes=0, zero_len=0, sigma_range=(0.0, 20.0), dt_range=(0.005, 0.05)):
    """Packed inputs for ``len(lengths)`` rays: sorted ray_idx, increasing intervals per ray, ``holes`` invalid
    slots inside segments, ``zero_len`` intervals with t0 == t1, ``n_tail`` invalid tail slots (ray n_rays) with
    garbage intervals and a huge sigma."""
    rng = np.random.default_rng(seed)
    n_rays = len(lengths)
    ids = np.concatenate([np.full(n, r) for r, n in enumerate(lengths)] + [np.full(n_tail, n_rays)])
    ids = ids.astype(np.int32)
    m = ids.shape[0]
    dt = rng.uniform(*dt_range, size=m)
    t0 = np.zeros(m)
    for r in range(n_rays):
        sel = ids == r
        t0[sel] = rng.uniform(0.5, 2.0) + np.concatenate([[0.0], np.cumsum(dt[sel])[:-1]])
    t1 = t0 + dt
    valid = ids < n_rays
    inside = np.nonzero(valid)[0]
    valid[rng.choice(inside, size=holes, replace=False)] = False
    zl = rng.choice(np.nonzero(valid)[0], size=zero_len, replace=False)
    t1[zl] = t0[zl]
    sigma = rng.uniform(*sigma_range, size=m)
    tail = ids == n_rays
    t0[tail], t1[tail], sigma[tail] = 7.0, 9.0, 1e4
    color = rng.uniform(size=(m, 3))
    def f32(x):
        return jnp.asarray(x, jnp.float32)
    return (f32(sigma), f32(color), f32(t0), f32(t1), jnp.asarray(ids), jnp.asarray(valid)), n_rays


def _cotangents(outs, seed):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in outs)


def _vjp(fn, args, n_rays, cts):
    outs, pull = jax.vjp(lambda s, c: fn(s, c, *args[2:], n_rays), args[0], args[1])
    return outs, pull(cts)


def _check_composite(args, n_rays, block_rays, seed=0, val_tol=1e-6, grad_rtol=1e-5):
    cts = _cotangents(jax.eval_shape(lambda: ck.composite_xla(*args, n_rays)), seed)
    def pallas(*a):
        return ck.composite_pallas(*a, block_rays=block_rays)
    ref_out, ref_grad = jax.jit(lambda a, c: _vjp(ck.composite_xla, a, n_rays, c))(args, cts)
    got_out, got_grad = jax.jit(lambda a, c: _vjp(pallas, a, n_rays, c))(args, cts)
    for name, x, y in zip(("weights", "rgb", "opacity", "depth"), ref_out, got_out):
        y = np.asarray(y)
        assert y.shape == x.shape and np.all(np.isfinite(y)), name
        np.testing.assert_allclose(y, np.asarray(x), rtol=val_tol, atol=val_tol, err_msg=name)
    for name, x, y in zip(("d_sigma", "d_color"), ref_grad, got_grad):
        x, y = np.asarray(x), np.asarray(y)
        assert np.all(np.isfinite(y)), name
        np.testing.assert_allclose(y, x, rtol=grad_rtol, atol=grad_rtol * max(np.abs(x).max(), 1e-3), err_msg=name)
    # slots of no ray (the invalid tail, holes) get zero weight and zero gradient
    dead = ~np.asarray(args[5])
    assert np.all(np.asarray(got_out[0])[dead] == 0.0)
    assert np.all(np.asarray(got_grad[0])[dead] == 0.0) and np.all(np.asarray(got_grad[1])[dead] == 0.0)
    return got_out, got_grad


def test_composite_mixed_segments_holes_and_tail():
    # 11 rays (not a power of two), 3 of them without samples, block of 4 rays -> 3 programs, 1 padded ray
    lengths = [5, 0, 17, 1, 0, 9, 30, 2, 0, 12, 7]
    args, n_rays = _packed(lengths, n_tail=13, seed=0, holes=4, zero_len=3)
    out, _ = _check_composite(args, n_rays, block_rays=4)
    opacity = np.asarray(out[2])
    assert np.all(opacity[[1, 4, 8]] == 0.0) and np.all(opacity[[0, 2, 6]] > 0.0)


def test_composite_single_long_ray():
    # one ray with 700 samples beside short ones: a block loops to its longest segment
    args, n_rays = _packed([3, 700, 0, 4, 1], n_tail=5, seed=1, sigma_range=(0.0, 0.5), dt_range=(0.001, 0.004))
    out, _ = _check_composite(args, n_rays, block_rays=2)
    assert 0.2 < float(out[2][1]) < 0.99  # transmittance spread over the whole ray


def test_composite_large_sigma_no_nan():
    # tau up to ~5e3 per sample: T underflows to exactly 0 after the first samples of each ray
    args, n_rays = _packed([6, 40, 3, 25], n_tail=4, seed=2, sigma_range=(1e2, 1e5))
    out, _ = _check_composite(args, n_rays, block_rays=16)
    np.testing.assert_allclose(np.asarray(out[2]), 1.0, rtol=1e-6)
    w = np.asarray(out[0])
    assert np.sum(w == 0.0) > 40  # underflowed weights


def test_composite_no_valid_samples():
    args, n_rays = _packed([0, 0, 0], n_tail=8, seed=3)
    out, grad = _check_composite(args, n_rays, block_rays=4)
    for x in list(out) + list(grad):
        assert np.all(np.asarray(x) == 0.0)


def test_composite_weights_only_loss_matches_closed_form():
    """A loss on the weights alone (e.g. an orientation loss): d(sum_i w_i)/dsigma_i = dt_i exp(-sigma L)
    for a ray of constant sigma (sum w = opacity = 1 - exp(-sum sigma dt))."""
    n, length, s = 25, 0.8, 2.0
    t = np.linspace(0.0, length, n + 1, dtype=np.float32)
    args = (jnp.full((n + 3,), s, jnp.float32), jnp.ones((n + 3, 3), jnp.float32),
            jnp.asarray(np.r_[t[:-1], 0, 0, 0]), jnp.asarray(np.r_[t[1:], 0, 0, 0]),
            jnp.asarray([0] * n + [1] * 3, jnp.int32), jnp.asarray([True] * n + [False] * 3))
    g = jax.grad(lambda sig: jnp.sum(ck.composite_pallas(sig, *args[1:], 1)[0]))(args[0])
    dt = np.diff(t)
    np.testing.assert_allclose(np.asarray(g)[:n], dt * math.exp(-s * length), rtol=1e-4)
    assert np.all(np.asarray(g)[n:] == 0.0)


def test_composite_inside_shard_map():
    """8 devices, each with its own packed set (rays and samples sharded as the renderer does); forward and
    VJP per device against the reference on that device's inputs."""
    mesh = jax.make_mesh((8,), ("data",))
    n_rays, m = 5, 48
    local = []
    for dev in range(8):
        rng = np.random.default_rng(100 + dev)
        lengths = list(rng.multinomial(m - 6 - dev, np.ones(n_rays) / n_rays))
        lengths[dev % n_rays] = 0  # a ray without samples on every device
        args, _ = _packed(lengths, n_tail=m - sum(lengths), seed=dev, holes=1)
        local.append(args)
    stacked = [jnp.concatenate([a[i] for a in local]) for i in range(6)]
    ref_outs = [jax.eval_shape(lambda a: ck.composite_xla(*a, n_rays), a) for a in local]
    cts_local = [_cotangents(o, 200 + k) for k, o in enumerate(ref_outs)]
    cts = [jnp.concatenate([c[i] for c in cts_local]) for i in range(4)]
    shard = NamedSharding(mesh, P("data"))
    def put(xs):
        return [jax.device_put(x, shard) for x in xs]

    def body(sigma, color, t0, t1, ray_idx, valid, dw, drgb, dop, ddepth):
        args = (sigma, color, t0, t1, ray_idx, valid)
        outs, (g_sigma, g_color) = _vjp(lambda *a: ck.composite_pallas(*a, block_rays=2), args, n_rays,
                                        (dw, drgb, dop, ddepth))
        return (*outs, g_sigma, g_color)

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"),) * 10, out_specs=P("data")))
    got = [np.asarray(x) for x in fn(*put(stacked), *put(cts))]
    ref = jax.jit(lambda a, c: _vjp(ck.composite_xla, a, n_rays, c))  # same shapes on every device
    for dev in range(8):
        outs, grads = ref(local[dev], cts_local[dev])
        for k, x in enumerate(list(outs) + list(grads)):
            x = np.asarray(x)
            y = got[k].reshape((8,) + x.shape)[dev]
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=f"device {dev} output {k}")


def test_composite_interpret_flag_resolves_off_gpu():
    assert common.resolve_interpret(None) == (jax.default_backend() != "gpu")
    assert common.resolve_interpret(True) is True and common.resolve_interpret(False) is False


# ----------------------------------------------------------------------------------------------
# Triton lowering (no GPU here: lowered to Triton IR for CUDA, not compiled to PTX)
# ----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_kernels_lower_to_triton_ir(monkeypatch):
    """Every op in the kernels has a Triton lowering rule, every loaded / stored block is a power of two and the
    Triton modules verify. Uses private JAX hooks (the GPU model, the module builder). The GPU-info module moved
    in jax 0.12 (jax._src.pallas.triton.gpu_info -> jax._src.gpu_info), so it is taken from the registration
    module's own import (``gpu_info_lib`` in both); a missing hook fails rather than skips, as this is the only
    check that the Triton modules verify."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    gpu_info = registration.gpu_info_lib
    h100 = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
    build = registration.lowering.lower_jaxpr_to_triton_module
    verified = []

    def build_and_verify(*args, **kwargs):
        result = build(*args, **kwargs)
        verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(registration.gpu_info_lib, "get_gpu_info", lambda *a, **k: h100)
    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", build_and_verify)
    spec = RenderSpec(radius=1.0, num_samples_per_ray=512, grid_resolution=32)
    n_rays, m = 100, 777
    o, d = _rays(n_rays, seed=0)
    grid = _grid(spec, "partial")

    def march(o, d, grid, key):
        return mk.march_pallas(o, d, grid, key, spec, 64 * n_rays, interpret=False)

    text = jax.jit(march).trace(o, d, grid, jax.random.PRNGKey(0)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2
    args, n_rays = _packed([m // 100] * 100, n_tail=m - 700, seed=0)

    def loss(sigma, color):
        w, rgb, opacity, depth = ck.composite_pallas(sigma, color, *args[2:], n_rays, interpret=False)
        return jnp.sum(w * w) + jnp.sum(rgb) + jnp.sum(opacity) + jnp.sum(depth)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = grad.trace(args[0], args[1]).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2  # forward and backward
    assert verified == [True] * 4
