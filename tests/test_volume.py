"""Tests of dreamcraft_jax.render.volume against closed forms and naive per-ray / per-cell Python loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.render import volume
from dreamcraft_jax.render.volume import FieldFns, OccupancyGrid, RenderSpec, Samples

# ----------------------------------------------------------------------------------------------
# ray / box
# ----------------------------------------------------------------------------------------------

def test_ray_box_intersect_closed_forms():
    s3, s5 = math.sqrt(3.0), math.sqrt(5.0)
    rays = [
        # (origin, direction, t_near, t_far) for the box [-1, 1]^3
        ((-3.0, 0.0, 0.0), (1.0, 0.0, 0.0), 2.0, 4.0),  # axis aligned, through the centre
        ((0.0, 0.5, 4.0), (0.0, 0.0, -1.0), 3.0, 5.0),  # along -z, off centre
        ((-3.0, -3.0, -3.0), (1 / s3, 1 / s3, 1 / s3), 2 * s3, 4 * s3),  # main diagonal
        # x: -2 + 2t/sqrt5 in [-1, 1] -> t in [sqrt5/2, 3 sqrt5/2]; y: -0.8 + t/sqrt5 in [-1, 1] -> [-0.2, 1.8] sqrt5
        ((-2.0, -0.8, 0.3), (2 / s5, 1 / s5, 0.0), 0.5 * s5, 1.5 * s5),
        ((0.2, 0.0, 0.0), (1.0, 0.0, 0.0), -1.2, 0.8),  # starts inside: entry behind the origin
    ]
    o = jnp.asarray([r[0] for r in rays], jnp.float32)
    d = jnp.asarray([r[1] for r in rays], jnp.float32)
    t_near, t_far = volume.ray_box_intersect(o, d, 1.0)
    np.testing.assert_allclose(np.asarray(t_near), [r[2] for r in rays], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(t_far), [r[3] for r in rays], rtol=1e-5, atol=1e-5)
    # radius scales the box
    t_near, t_far = volume.ray_box_intersect(o[:1], d[:1], 2.0)
    np.testing.assert_allclose([float(t_near[0]), float(t_far[0])], [1.0, 5.0], rtol=1e-6)


def test_ray_box_intersect_misses():
    o = jnp.asarray([[-3.0, 2.0, 0.0],  # parallel to x, beside the box
                     [-3.0, 0.0, 1.5],  # parallel to x, above the box
                     [-3.0, 0.0, 0.0]], jnp.float32)  # oblique, passes above the box
    d = jnp.asarray([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.6, 0.0, 0.8]], jnp.float32)
    t_near, t_far = volume.ray_box_intersect(o, d, 1.0)
    assert np.all(np.asarray(t_far) <= np.asarray(t_near))


# ----------------------------------------------------------------------------------------------
# segmented scan
# ----------------------------------------------------------------------------------------------

def _naive_seg_excl_cumsum(x, ids):
    out, acc = [], 0.0
    for k in range(len(x)):
        if k == 0 or ids[k] != ids[k - 1]:
            acc = 0.0
        out.append(acc)
        acc += float(x[k])
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segmented_exclusive_cumsum_vs_loop(seed):
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(1, 9, size=23)) + [1, 1, 1]
    rng.shuffle(lengths)
    n_rays = len(lengths)
    ids = np.concatenate([np.full(n, r) for r, n in enumerate(lengths)] + [np.full(11, n_rays)])  # sentinels
    x = rng.uniform(0.0, 2.0, size=ids.shape[0]).astype(np.float32)
    starts = volume.segment_starts(jnp.asarray(ids, jnp.int32))
    expected_starts = np.array([k == 0 or ids[k] != ids[k - 1] for k in range(len(ids))])
    np.testing.assert_array_equal(np.asarray(starts), expected_starts)
    got = jax.jit(volume.segmented_exclusive_cumsum)(jnp.asarray(x), starts)
    np.testing.assert_allclose(np.asarray(got), _naive_seg_excl_cumsum(x, ids), rtol=1e-5, atol=1e-5)


def test_segmented_exclusive_cumsum_single_segment_and_singletons():
    x = np.arange(1.0, 8.0, dtype=np.float32)
    one = volume.segmented_exclusive_cumsum(jnp.asarray(x), jnp.asarray([True] + [False] * 6))
    np.testing.assert_allclose(np.asarray(one), [0, 1, 3, 6, 10, 15, 21])
    singles = volume.segmented_exclusive_cumsum(jnp.asarray(x), jnp.ones((7,), bool))
    np.testing.assert_allclose(np.asarray(singles), np.zeros(7))


# ----------------------------------------------------------------------------------------------
# compositing
# ----------------------------------------------------------------------------------------------

def _slab_samples(rays, pad=0, zero_len_at=None):
    """rays: [(a, L, n)] -> Samples packing n equal intervals of [a, a + L] per ray, plus ``pad`` invalid slots.

    zero_len_at: {ray: k} inserts a zero-length interval (t0 == t1) before interval k of that ray.
    """
    ray_idx, t0, t1 = [], [], []
    for r, (a, length, n) in enumerate(rays):
        edges = a + length * np.arange(n + 1) / n
        for k in range(n):
            if zero_len_at and zero_len_at.get(r) == k:
                ray_idx.append(r), t0.append(edges[k]), t1.append(edges[k])
            ray_idx.append(r), t0.append(edges[k]), t1.append(edges[k + 1])
    n_valid = len(ray_idx)
    ray_idx += [len(rays)] * pad
    t0 += [7.0] * pad  # garbage intervals on invalid slots
    t1 += [9.0] * pad
    valid = np.arange(len(ray_idx)) < n_valid
    return Samples(ray_idx=jnp.asarray(ray_idx, jnp.int32), t0=jnp.asarray(t0, jnp.float32),
                   t1=jnp.asarray(t1, jnp.float32), valid=jnp.asarray(valid), n_wanted=jnp.int32(n_valid))


@jax.jit
def _composite_jit(sigma, samples, n_rays_dummy):
    n_rays = n_rays_dummy.shape[0]
    w, trans, alpha = volume.compositing_weights(sigma, samples)
    opacity = volume.accumulate(w, None, samples, n_rays)
    depth = volume.accumulate(w, samples.t_mid, samples, n_rays)
    return opacity, depth, w, trans, alpha


def _composite(sigma, samples, n_rays):
    return _composite_jit(sigma, samples, jnp.zeros((n_rays,)))


RAYS = [(1.0, 0.8, 37), (2.5, 1.3, 37), (0.3, 0.5, 11), (1.7, 0.25, 1), (0.0, 2.0, 53)]
SIGMAS = [2.0, 0.7, 9.0, 3.0, 1.5]


def _per_slot_sigma(samples, sigmas, invalid_value=1e3):
    ids = np.asarray(samples.ray_idx)
    return jnp.asarray([sigmas[i] if i < len(sigmas) else invalid_value for i in ids], jnp.float32)


def test_compositing_constant_slab_opacity_and_depth():
    samples = _slab_samples(RAYS, pad=9)
    sigma = _per_slot_sigma(samples, SIGMAS)
    opacity, depth, w, trans, alpha = _composite(sigma, samples, len(RAYS))
    for r, ((a, length, n), s) in enumerate(zip(RAYS, SIGMAS)):
        # opacity telescopes exactly: 1 - exp(-sigma L)
        np.testing.assert_allclose(float(opacity[r]), 1 - math.exp(-s * length), rtol=1e-5)
        # Discrete depth (compositing uses interval midpoints): with q = exp(-s dt), alpha = 1 - q,
        # depth = alpha * sum_{i<n} q^i (a + (i + 1/2) dt), and the sums in closed form
        # sum q^i = (1 - q^n)/(1 - q), sum i q^i = q (1 - n q^(n-1) + (n-1) q^n) / (1 - q)^2.
        dt = length / n
        q = math.exp(-s * dt)
        s0 = (1 - q**n) / (1 - q)
        s1 = q * (1 - n * q ** (n - 1) + (n - 1) * q**n) / (1 - q) ** 2
        discrete = (1 - q) * ((a + 0.5 * dt) * s0 + dt * s1)
        np.testing.assert_allclose(float(depth[r]), discrete, rtol=2e-5)
        # The continuous expectation int_a^{a+L} t s exp(-s (t - a)) dt = a (1 - e) + (1 - e)/s - L e,
        # e = exp(-s L); the midpoint rule differs by O((s dt)^2) relative: loose tolerance for n >= 37.
        e = math.exp(-s * length)
        continuous = a * (1 - e) + (1 - e) / s - length * e
        if n >= 37:
            np.testing.assert_allclose(float(depth[r]), continuous, rtol=(s * dt) ** 2)
    # invalid slots: zero weight, zero alpha (their huge sigma is ignored)
    v = np.asarray(samples.valid)
    assert np.all(np.asarray(w)[~v] == 0) and np.all(np.asarray(alpha)[~v] == 0)
    # transmittance restarts at 1 at each ray's first sample
    starts = np.asarray(volume.segment_starts(samples.ray_idx)) & v
    np.testing.assert_allclose(np.asarray(trans)[starts], 1.0)


def test_compositing_zero_length_and_invalid_slots_contribute_nothing():
    base = _slab_samples(RAYS)
    sigma = _per_slot_sigma(base, SIGMAS)
    op0, dep0, w0, _, _ = _composite(sigma, base, len(RAYS))
    # zero-length intervals inserted in rays 0, 2 and 4 (first, middle and last positions)
    zl = _slab_samples(RAYS, pad=5, zero_len_at={0: 0, 2: 5, 4: 52})
    sig_zl = _per_slot_sigma(zl, SIGMAS)
    op1, dep1, w1, _, _ = _composite(sig_zl, zl, len(RAYS))
    np.testing.assert_allclose(np.asarray(op1), np.asarray(op0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dep1), np.asarray(dep0), rtol=1e-6)
    zero_len = np.asarray(zl.t0 == zl.t1) & np.asarray(zl.valid)
    assert zero_len.sum() == 3 and np.all(np.asarray(w1)[zero_len] == 0)
    # invalid slots placed *inside* a ray's segment (same ray id, valid False, huge sigma) change nothing
    s = base
    m = s.valid.shape[0]
    hole = 40  # within ray 1
    valid = s.valid.at[hole].set(False)
    sig = sigma.at[hole].set(1e4)
    holed = Samples(ray_idx=s.ray_idx, t0=s.t0, t1=s.t1, valid=valid, n_wanted=s.n_wanted)
    op2, _, w2, _, _ = _composite(sig, holed, len(RAYS))
    a, length, n = RAYS[1]
    assert int(s.ray_idx[hole]) == 1 and m > hole
    np.testing.assert_allclose(float(op2[1]), 1 - math.exp(-SIGMAS[1] * length * (n - 1) / n), rtol=1e-5)
    assert float(w2[hole]) == 0.0


def test_compositing_opacity_gradient():
    samples = _slab_samples(RAYS, pad=4)
    sigma = _per_slot_sigma(samples, SIGMAS, invalid_value=0.5)

    def total_opacity(sig):
        w, _, _ = volume.compositing_weights(sig, samples)
        return jnp.sum(volume.accumulate(w, None, samples, len(RAYS)))

    g = np.asarray(jax.jit(jax.grad(total_opacity))(sigma))
    ids = np.asarray(samples.ray_idx)
    dts = np.asarray(samples.t1 - samples.t0)
    for k, r in enumerate(ids):
        if r >= len(RAYS):
            assert g[k] == 0.0
            continue
        a, length, n = RAYS[r]
        # opacity_r = 1 - exp(-sum_i sigma_i dt_i): d/dsigma_i = dt_i exp(-sigma L)
        np.testing.assert_allclose(g[k], dts[k] * math.exp(-SIGMAS[r] * length), rtol=1e-4)
    # summed over a ray's samples: d/dsigma of 1 - exp(-sigma L) = L exp(-sigma L)
    per_ray = np.bincount(ids, weights=g, minlength=len(RAYS) + 1)[: len(RAYS)]
    expected = [length * math.exp(-s * length) for (a, length, n), s in zip(RAYS, SIGMAS)]
    np.testing.assert_allclose(per_ray, expected, rtol=1e-4)


def test_accumulate_channels():
    samples = _slab_samples([(0.0, 1.0, 3), (1.0, 1.0, 2)], pad=2)
    w = jnp.asarray([0.1, 0.2, 0.3, 0.4, 0.5, 9.0, 9.0])
    c = jnp.asarray(np.arange(21, dtype=np.float32).reshape(7, 3))
    got = np.asarray(volume.accumulate(w, c, samples, 2))
    expected = np.array([0.1 * np.array([0, 1, 2]) + 0.2 * np.array([3, 4, 5]) + 0.3 * np.array([6, 7, 8]),
                         0.4 * np.array([9, 10, 11]) + 0.5 * np.array([12, 13, 14])])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# marching
# ----------------------------------------------------------------------------------------------

SPEC = RenderSpec(radius=1.0, num_samples_per_ray=40, stratified=False, grid_resolution=4,
                  alpha_threshold=0.0, early_stop_eps=0.0)


def _naive_box(o, d, r):
    """float64 slab test, per axis, written out."""
    lo, hi = -np.inf, np.inf
    for ax in range(3):
        if d[ax] == 0.0:
            if not (-r <= o[ax] <= r):
                return 1.0, 0.0
            continue
        t1, t2 = (-r - o[ax]) / d[ax], (r - o[ax]) / d[ax]
        lo, hi = max(lo, min(t1, t2)), min(hi, max(t1, t2))
    return lo, hi


def _naive_cell(p, r, g):
    c = [min(max(int(math.floor((p[ax] + r) / (2 * r) * g)), 0), g - 1) for ax in range(3)]
    return c[0] + c[1] * g + c[2] * g * g


def _naive_march(o, d, spec, binary=None):
    """[(ray, t0, t1)] from a per-ray loop: t0 = t_start + k dt while t0 + dt <= t_far, midpoint cell occupied."""
    dt = spec.step_size
    out = []
    for r in range(o.shape[0]):
        t_near, t_far = _naive_box(o[r], d[r], spec.radius)
        t_start = max(t_near, spec.near_plane)
        if t_far <= t_start:
            continue
        k = 0
        while t_start + k * dt + dt <= t_far:
            t0 = t_start + k * dt
            mid = o[r] + d[r] * (t0 + 0.5 * dt)
            if binary is None or binary[_naive_cell(mid, spec.radius, spec.grid_resolution)]:
                out.append((r, t0, t0 + dt))
            k += 1
    return out


def _rays(n, seed, spec):
    """n rays from distance ~3 aimed near the origin (some miss), directions unit; avoid rays whose interval
    length is within 1e-3 dt of a multiple of dt (float32 vs float64 could disagree on the last step)."""
    rng = np.random.default_rng(seed)
    o_list, d_list = [], []
    while len(o_list) < n:
        u = rng.normal(size=3)
        o = 3.0 * u / np.linalg.norm(u)
        target = rng.uniform(-1.3, 1.3, size=3)
        d = (target - o) / np.linalg.norm(target - o)
        o32, d32 = o.astype(np.float32), d.astype(np.float32)
        tn, tf = _naive_box(o32.astype(np.float64), d32.astype(np.float64), spec.radius)
        if tf > tn:
            frac = (tf - max(tn, 0.0)) / spec.step_size
            if abs(frac - round(frac)) < 1e-3:
                continue
        o_list.append(o32), d_list.append(d32)
    return np.stack(o_list), np.stack(d_list)


def _packed(samples):
    v = np.asarray(samples.valid)
    return (np.asarray(samples.ray_idx)[v], np.asarray(samples.t0)[v], np.asarray(samples.t1)[v])


def _check_against(samples, ref, n_rays, budget):
    ray, t0, t1 = _packed(samples)
    kept = ref[:budget]
    assert len(ray) == len(kept)
    np.testing.assert_array_equal(ray, [k[0] for k in kept])
    np.testing.assert_allclose(t0, [k[1] for k in kept], atol=2e-5)
    np.testing.assert_allclose(t1, [k[2] for k in kept], atol=2e-5)
    valid = np.asarray(samples.valid)
    np.testing.assert_array_equal(valid, np.arange(budget) < min(budget, len(ref)))
    assert np.all(np.asarray(samples.ray_idx)[~valid] == n_rays)
    assert int(samples.n_wanted) == len(ref)
    assert int(samples.overflow) == max(0, len(ref) - budget)


def _extra_rays():
    # a miss beside the box, a ray pointing away from the box, a ray starting inside the box (near plane 0)
    o = np.array([[-3.0, 2.0, 0.1], [-3.0, 0.1, 0.2], [0.23, -0.1, 0.05]], np.float32)
    d = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.6, 0.0, 0.8]], np.float32)
    return o, d


def _all_rays(n, seed, spec):
    o, d = _rays(n - 3, seed, spec)
    eo, ed = _extra_rays()
    # interleave the extra rays so they are not all at the end
    o = np.concatenate([o[:4], eo[:1], o[4:7], eo[1:2], o[7:], eo[2:]])
    d = np.concatenate([d[:4], ed[:1], d[4:7], ed[1:2], d[7:], ed[2:]])
    return o, d


def test_march_all_occupied_matches_naive_loop():
    n_rays = 13
    o, d = _all_rays(n_rays, 0, SPEC)
    ref = _naive_march(o.astype(np.float64), d.astype(np.float64), SPEC)
    budget = n_rays * SPEC.max_steps_per_ray
    grid = volume.init_occupancy_grid(SPEC)
    samples = jax.jit(volume.march, static_argnums=(4, 5))(jnp.asarray(o), jnp.asarray(d), grid, None, SPEC, budget)
    _check_against(samples, ref, n_rays, budget)
    rays_with = {k[0] for k in ref}
    assert 4 not in rays_with and 8 not in rays_with  # the miss and the ray pointing away
    assert 12 in rays_with  # the ray starting inside: its first sample starts at t = 0
    first = [k for k in ref if k[0] == 12][0]
    assert first[1] == 0.0
    ray, t0, _ = _packed(samples)
    assert float(t0[ray == 12][0]) == 0.0
    assert len(ref) > 60 and len(rays_with) >= 6  # a non-trivial case


def test_march_partial_grid_matches_naive_loop():
    n_rays = 13
    spec = SPEC.replace(grid_resolution=5)
    o, d = _all_rays(n_rays, 1, spec)
    rng = np.random.default_rng(5)
    binary = rng.uniform(size=5**3) < 0.4
    grid = OccupancyGrid(occs=jnp.zeros((5**3,), jnp.float32), binary=jnp.asarray(binary))
    ref = _naive_march(o.astype(np.float64), d.astype(np.float64), spec, binary)
    full = _naive_march(o.astype(np.float64), d.astype(np.float64), spec)
    assert 0 < len(ref) < len(full)
    budget = n_rays * spec.max_steps_per_ray
    samples = volume.march(jnp.asarray(o), jnp.asarray(d), grid, None, spec, budget)
    _check_against(samples, ref, n_rays, budget)


def test_march_empty_grid_gives_no_samples():
    n_rays = 13
    o, d = _all_rays(n_rays, 2, SPEC)
    n = SPEC.grid_resolution ** 3
    grid = OccupancyGrid(occs=jnp.zeros((n,), jnp.float32), binary=jnp.zeros((n,), bool))
    samples = volume.march(jnp.asarray(o), jnp.asarray(d), grid, None, SPEC, 100)
    assert not np.any(np.asarray(samples.valid))
    assert int(samples.n_wanted) == 0 and int(samples.overflow) == 0
    assert np.all(np.asarray(samples.ray_idx) == n_rays)


def _naive_merged(ref, budget, dt):
    """The over-budget march by brute force: the largest cap m with sum_r ceil(c_r / ceil(c_r / m)) <= budget,
    ray r keeps candidates 0, k_r, 2 k_r, ... (k_r = ceil(c_r / m)), each standing for min(k_r, rest) steps."""
    rays = sorted({k[0] for k in ref})
    per_ray = {r: [k for k in ref if k[0] == r] for r in rays}
    counts = np.array([len(per_ray[r]) for r in rays])

    def strides(m):
        return np.maximum(-(-counts // m), 1)

    m = next((m for m in range(int(counts.max()), 0, -1) if np.sum(-(-counts // strides(m))) <= budget), 1)
    out = []
    for r, k in zip(rays, strides(m)):
        cands = per_ray[r]
        for g in range(0, len(cands), int(k)):
            out.append((r, cands[g][1], cands[g][1] + min(int(k), len(cands) - g) * dt))
    return out[:budget]


@pytest.mark.parametrize("budget_of", [lambda c: c - 1, lambda c: c - 17, lambda c: c // 3, lambda c: 5])
def test_march_over_budget_samples_long_rays_coarser(budget_of):
    """Over budget no ray loses its samples: long rays keep every k-th candidate with k-step intervals (the
    occupied length of every ray is kept) until the budget is below the number of rays hit."""
    n_rays = 13
    o, d = _all_rays(n_rays, 0, SPEC)
    ref = _naive_march(o.astype(np.float64), d.astype(np.float64), SPEC)
    budget = budget_of(len(ref))
    grid = volume.init_occupancy_grid(SPEC)
    samples = volume.march(jnp.asarray(o), jnp.asarray(d), grid, None, SPEC, budget)
    merged = _naive_merged(ref, budget, SPEC.step_size)
    ray, t0, t1 = _packed(samples)
    assert len(ray) == len(merged) <= budget
    np.testing.assert_array_equal(ray, [k[0] for k in merged])
    np.testing.assert_allclose(t0, [k[1] for k in merged], atol=2e-5)
    np.testing.assert_allclose(t1, [k[2] for k in merged], atol=2e-5)
    assert int(samples.n_wanted) == len(ref) and int(samples.overflow) == len(ref) - budget
    hit = sorted({k[0] for k in ref})
    if budget >= len(hit):  # every ray hit keeps its whole occupied length
        assert sorted(set(ray.tolist())) == hit
        for r in hit:
            np.testing.assert_allclose(np.sum((t1 - t0)[ray == r]), sum(1 for k in ref if k[0] == r) * SPEC.step_size,
                                       rtol=1e-5)


def test_select_over_budget_keeps_the_front_of_every_ray():
    """The pruning re-pack over budget: every ray keeps its first m kept samples (m the largest cap that fits)."""
    n_rays, per_ray = 6, np.array([7, 0, 3, 12, 1, 5])
    ray = np.repeat(np.arange(n_rays), per_ray)
    m_slots = len(ray) + 4
    t0 = np.arange(m_slots, dtype=np.float32) * 0.1
    samples = volume.Samples(ray_idx=jnp.asarray(np.concatenate([ray, np.full(4, n_rays)]), jnp.int32),
                             t0=jnp.asarray(t0), t1=jnp.asarray(t0 + 0.05),
                             valid=jnp.asarray(np.arange(m_slots) < len(ray)), n_wanted=jnp.int32(len(ray)))
    keep = np.random.default_rng(0).uniform(size=m_slots) < 0.8
    kept_per_ray = [np.flatnonzero(keep[:len(ray)] & (ray == r)) for r in range(n_rays)]
    counts = np.array([len(k) for k in kept_per_ray])
    for budget in (int(counts.sum()), int(counts.sum()) - 1, 9, 4):
        m = max(m for m in range(1, 13) if np.minimum(counts, m).sum() <= budget or m == 1)
        expected = np.sort(np.concatenate([k[:m] for k in kept_per_ray]))[:budget]
        out = volume.select(samples, jnp.asarray(keep), budget, n_rays)
        v = np.asarray(out.valid)
        np.testing.assert_allclose(np.asarray(out.t0)[v], t0[expected])
        np.testing.assert_array_equal(np.asarray(out.ray_idx)[v], ray[expected])
        assert np.all(np.asarray(out.ray_idx)[~v] == n_rays) and int(out.n_wanted) == counts.sum()


def test_march_budget_larger_than_count_pads_invalid():
    n_rays = 13
    o, d = _all_rays(n_rays, 3, SPEC)
    ref = _naive_march(o.astype(np.float64), d.astype(np.float64), SPEC)
    budget = len(ref) + 31
    samples = volume.march(jnp.asarray(o), jnp.asarray(d), volume.init_occupancy_grid(SPEC), None, SPEC, budget)
    _check_against(samples, ref, n_rays, budget)
    assert int(samples.overflow) == 0


def test_march_stratified_offsets_within_one_step():
    n_rays = 13
    spec = SPEC.replace(stratified=True)
    o, d = _all_rays(n_rays, 0, spec)
    budget = n_rays * spec.max_steps_per_ray
    samples = volume.march(jnp.asarray(o), jnp.asarray(d), volume.init_occupancy_grid(spec),
                           jax.random.PRNGKey(0), spec, budget)
    ray, t0, t1 = _packed(samples)
    dt = spec.step_size
    np.testing.assert_allclose(t1 - t0, dt, atol=1e-5)
    for r in np.unique(ray):
        tn, tf = _naive_box(o[r].astype(np.float64), d[r].astype(np.float64), spec.radius)
        ts = t0[ray == r]
        start = max(tn, 0.0)
        assert start - 1e-5 <= ts[0] <= start + dt + 1e-5
        np.testing.assert_allclose(np.diff(ts), dt, atol=2e-5)
        assert ts[-1] + dt <= tf + 1e-5


# ----------------------------------------------------------------------------------------------
# occupancy grid
# ----------------------------------------------------------------------------------------------

def test_cell_index_hand_cases():
    spec = RenderSpec(radius=1.0, grid_resolution=4)
    pts = jnp.asarray([[-1.0, -1.0, -1.0],   # corner -> (0,0,0) -> 0
                       [0.9, -0.9, -0.9],    # (3,0,0) -> 3
                       [-0.9, 0.9, -0.9],    # (0,3,0) -> 12
                       [-0.9, -0.9, 0.9],    # (0,0,3) -> 48
                       [0.1, -0.6, 0.4],     # unit (.55,.2,.7) -> (2,0,2) -> 2 + 32 = 34
                       [-0.3, 0.2, -0.7],    # unit (.35,.6,.15) -> (1,2,0) -> 1 + 8 = 9
                       [1.0, 1.0, 1.0],      # on the far corner: clipped to (3,3,3) -> 63, inside
                       [1.01, 0.0, 0.0]], jnp.float32)  # outside
    idx, inside = volume.cell_index(pts, spec)
    np.testing.assert_array_equal(np.asarray(idx)[:7], [0, 3, 12, 48, 34, 9, 63])
    np.testing.assert_array_equal(np.asarray(inside), [True] * 7 + [False])
    coords = volume.cell_coords(4)
    np.testing.assert_array_equal(coords[34], [2, 0, 2])
    np.testing.assert_array_equal(coords[9], [1, 2, 0])
    np.testing.assert_array_equal(coords[63], [3, 3, 3])
    # radius 2: same unit position -> same cell
    idx2, _ = volume.cell_index(2.0 * pts[4:6], RenderSpec(radius=2.0, grid_resolution=4))
    np.testing.assert_array_equal(np.asarray(idx2), [34, 9])


GSPEC = RenderSpec(radius=1.0, grid_resolution=8, grid_update_every=4, grid_warmup_steps=16,
                   grid_ema_decay=0.9, grid_threshold=0.01, num_samples_per_ray=64)


def _cell_density(table, spec):
    """A density constant within each cell (the value table[cell]), cell computed here independently."""
    g, r = spec.grid_resolution, spec.radius
    table = jnp.asarray(table, jnp.float32)

    def density(x):
        c = jnp.clip(jnp.floor((x + r) / (2 * r) * g).astype(jnp.int32), 0, g - 1)
        return table[c[:, 0] + g * c[:, 1] + g * g * c[:, 2]]

    return density


def _ema_reference(old, touched, occ, spec):
    occs = np.where(touched, np.maximum(old * spec.grid_ema_decay, occ), old)
    thr = min(occs.mean(), spec.grid_threshold)
    return occs, occs > thr


@pytest.mark.parametrize("regime", ["mean_below_threshold", "threshold_below_mean"])
def test_update_occupancy_grid_warmup(regime):
    spec = GSPEC
    n = spec.grid_resolution ** 3
    dt = spec.step_size
    rng = np.random.default_rng(0)
    old = rng.uniform(0.0, 0.004, size=n).astype(np.float32)
    if regime == "mean_below_threshold":
        occ = rng.uniform(0.0, 0.008, size=n)  # mean ~0.004 < 0.01: threshold = mean
    else:
        occ = rng.uniform(0.0, 0.5, size=n)  # mean ~0.25 > 0.01: threshold = 0.01
    table = occ / dt
    grid = OccupancyGrid(occs=jnp.asarray(old), binary=jnp.asarray(rng.uniform(size=n) < 0.5))
    update = jax.jit(lambda grid, key, step: volume.update_occupancy_grid(
        grid, key, step, _cell_density(table, spec), spec))
    for step in (0, 12):  # both warm-up updates (multiples of 4, below 16)
        new = update(grid, jax.random.PRNGKey(step), step)
        occs_ref, bin_ref = _ema_reference(old.astype(np.float64), np.ones(n, bool),
                                           np.asarray(jnp.asarray(table, jnp.float32) * dt, np.float64), spec)
        np.testing.assert_allclose(np.asarray(new.occs), occs_ref, rtol=1e-5, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(new.binary), bin_ref)
    mean = occs_ref.mean()
    if regime == "mean_below_threshold":
        assert mean < 0.01
        assert np.any((occs_ref > mean) & (occs_ref <= 0.01))  # these are occupied only because thr = mean
    else:
        assert mean > 0.01
        assert np.any((occs_ref > 0.01) & (occs_ref <= mean))  # occupied only because thr = 0.01


def test_update_occupancy_grid_skips_off_steps_and_when_disabled():
    spec = GSPEC
    n = spec.grid_resolution ** 3
    rng = np.random.default_rng(1)
    grid = OccupancyGrid(occs=jnp.asarray(rng.uniform(size=n).astype(np.float32)),
                         binary=jnp.asarray(rng.uniform(size=n) < 0.5))

    def dens(x):
        return jnp.full(x.shape[:1], 100.0)

    update = jax.jit(lambda grid, step: volume.update_occupancy_grid(grid, jax.random.PRNGKey(0), step, dens, spec))
    for step in (1, 3, 17, 30):
        new = update(grid, step)
        np.testing.assert_array_equal(np.asarray(new.occs), np.asarray(grid.occs))
        np.testing.assert_array_equal(np.asarray(new.binary), np.asarray(grid.binary))
    # an update step does change it (the test above could otherwise pass vacuously)
    new = update(grid, 4)
    assert not np.array_equal(np.asarray(new.occs), np.asarray(grid.occs))
    off = spec.replace(grid_prune=False)
    new = volume.update_occupancy_grid(grid, jax.random.PRNGKey(0), 0, dens, off)
    np.testing.assert_array_equal(np.asarray(new.occs), np.asarray(grid.occs))
    np.testing.assert_array_equal(np.asarray(new.binary), np.asarray(grid.binary))


@pytest.mark.parametrize("step", [16, 40])
def test_update_occupancy_grid_after_warmup_draws(step):
    """After warm-up: n/4 uniform + n/4 occupied cells are evaluated; exactly those cells change."""
    spec = GSPEC
    g = spec.grid_resolution
    n = g**3
    dt = spec.step_size
    rng = np.random.default_rng(2)
    occupied_cells = np.array([5, 77, 300, 301, 510])
    binary = np.zeros(n, bool)
    binary[occupied_cells] = True
    old = rng.uniform(0.0, 0.02, size=n).astype(np.float32)
    table = rng.uniform(0.0, 0.03, size=n) / dt
    grid = OccupancyGrid(occs=jnp.asarray(old), binary=jnp.asarray(binary))
    recorded = []
    base = _cell_density(table, spec)

    def density(x):
        jax.debug.callback(lambda p: recorded.append(np.array(p)), x)
        return base(x)

    new = volume.update_occupancy_grid(grid, jax.random.PRNGKey(step), step, density, spec)
    jax.effects_barrier()
    assert len(recorded) == 1
    pts = recorded[0].astype(np.float64)
    assert pts.shape == (2 * (n // 4), 3)
    cells = np.array([_naive_cell(p, spec.radius, g) for p in pts])
    in_occ = np.isin(cells, occupied_cells)
    # the n/4 occupied draws all land in the 5 occupied cells; the n/4 uniform draws mostly elsewhere
    assert in_occ.sum() >= n // 4
    assert (~in_occ).sum() <= n // 4
    assert (~in_occ).sum() > n // 4 - 10  # uniform draws hit the 5 occupied cells ~1.25 times on average
    assert np.all(np.abs(pts) <= spec.radius)
    # each point is jittered uniformly over its whole cell
    frac = (pts + spec.radius) / (2 * spec.radius) * g - volume.cell_coords(g)[cells]
    assert np.all((frac >= -1e-5) & (frac <= 1 + 1e-5))
    assert np.all(frac.min(axis=0) < 0.05) and np.all(frac.max(axis=0) > 0.95)
    touched = np.zeros(n, bool)
    touched[cells] = True
    occ = np.asarray(jnp.asarray(table, jnp.float32) * dt, np.float64)
    occs_ref, bin_ref = _ema_reference(old.astype(np.float64), touched, occ, spec)
    np.testing.assert_allclose(np.asarray(new.occs), occs_ref, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(new.binary), bin_ref)
    assert np.all(np.asarray(new.occs)[~touched] == old[~touched])


def test_update_occupancy_grid_no_occupied_cells_falls_back_to_uniform():
    spec = GSPEC
    n = spec.grid_resolution ** 3
    grid = OccupancyGrid(occs=jnp.zeros((n,), jnp.float32), binary=jnp.zeros((n,), bool))
    new = volume.update_occupancy_grid(grid, jax.random.PRNGKey(0), 16, lambda x: jnp.full(x.shape[:1], 1.0), spec)
    occs = np.asarray(new.occs)
    assert np.all(np.isfinite(occs))
    touched = occs > 0
    # 2 * n/4 uniform draws over n cells touch about n (1 - (1 - 1/n)^(n/2)) = 0.39 n distinct cells
    expected = n * (1 - (1 - 1 / n) ** (n // 2))
    assert abs(touched.sum() - expected) < 0.1 * n
    np.testing.assert_allclose(occs[touched], spec.step_size, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# render_rays end to end
# ----------------------------------------------------------------------------------------------

SIGMA_BALL, R_BALL = 5.0, 0.5
COLOUR = np.array([0.9, 0.1, 0.5], np.float32)


def _ball_fns():
    colour = jnp.asarray(COLOUR)

    def density(x, valid=None):
        return jnp.where(jnp.sum(x * x, axis=-1) < R_BALL**2, SIGMA_BALL, 0.0)

    def radiance(x, valid=None):
        return density(x), jnp.broadcast_to(colour, x.shape)

    def normal(x, valid=None):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    return FieldFns(density=density, radiance=radiance, normal=normal)


def test_render_rays_constant_ball():
    spec = RenderSpec(radius=1.0, num_samples_per_ray=512, stratified=False, background=(0.2, 0.4, 0.6),
                      candidate_samples_per_ray=600.0, samples_per_ray=400.0, alpha_threshold=0.01,
                      early_stop_eps=1e-4)
    dt = spec.step_size
    heights = [0.0, 0.3, 0.45]
    o = np.array([[3.0, 0.0, h] for h in heights] + [[3.0, 2.0, 0.0], [3.0, 0.8, 0.0]], np.float32)
    d = np.tile(np.array([[-1.0, 0.0, 0.0]], np.float32), (5, 1))
    fn = jax.jit(lambda o, d: volume.render_rays(o, d, volume.init_occupancy_grid(spec), jax.random.PRNGKey(0),
                                                 _ball_fns(), spec))
    out = jax.tree.map(np.asarray, fn(jnp.asarray(o), jnp.asarray(d)))
    assert int(out["overflow"]) == 0
    bg = np.array(spec.background)
    n_inside_total = 0
    for r, h in enumerate(heights):
        # Naive discrete reference (float64): steps t0 = 2 + k dt from the box entry (x = 1 at t = 2) while
        # t0 + dt <= 4; a step is in the medium when its midpoint is inside the ball; alpha-pruned steps outside
        # the ball have zero weight anyway.
        t_mids = [2.0 + (k + 0.5) * dt for k in range(2000) if 2.0 + (k + 1) * dt <= 4.0]
        inside = [t for t in t_mids if (3.0 - t) ** 2 + h * h < R_BALL**2]
        n_inside_total += len(inside)
        trans, op_ref, depth_ref = 1.0, 0.0, 0.0
        for t in inside:
            w = trans * (1 - math.exp(-SIGMA_BALL * dt))
            op_ref, depth_ref = op_ref + w, depth_ref + w * t
            trans *= math.exp(-SIGMA_BALL * dt)
        np.testing.assert_allclose(out["opacity"][r], op_ref, rtol=1e-5)
        np.testing.assert_allclose(out["depth"][r], depth_ref, rtol=1e-5)
        chord = 2 * math.sqrt(R_BALL**2 - h**2)
        entry = 3.0 - chord / 2
        # The discretised medium covers whole steps whose midpoint is inside: its length is within dt of the
        # chord and its start within dt/2 of the entry; d(opacity)/d(length) <= sigma.
        expected_op = 1 - math.exp(-SIGMA_BALL * chord)
        assert abs(out["opacity"][r] - expected_op) <= SIGMA_BALL * dt * 1.01, (h, out["opacity"][r], expected_op)
        # unnormalised expected depth: entry (1 - e) + (1 - e)/sigma - chord e
        e = math.exp(-SIGMA_BALL * chord)
        expected_depth = entry * (1 - e) + (1 - e) / SIGMA_BALL - chord * e
        assert abs(out["depth"][r] - expected_depth) <= 1.5 * dt, (h, out["depth"][r], expected_depth)
    # colour composited over the background (exact given the rendered opacity)
    op = out["opacity"][:, None]
    np.testing.assert_allclose(out["rgb"], COLOUR * op + bg * (1 - op), rtol=1e-5, atol=1e-6)
    # a ray missing the box and one through the box but beside the ball: background exactly, opacity 0
    for r in (3, 4):
        assert out["opacity"][r] == 0.0 and out["depth"][r] == 0.0
        np.testing.assert_allclose(out["rgb"][r], bg, rtol=0, atol=1e-7)
    assert out["opacity"][0] > 0.99  # sanity: the centre ray is nearly opaque (1 - e^-5)
    # alpha pruning (threshold 0.01, alpha inside = 1 - e^{-sigma dt} = 0.033) keeps exactly the in-ball steps
    assert int(out["n_samples"]) == n_inside_total


def test_render_rays_textureless_front_light():
    # Light at the camera: at the entry point of the centre ray the normal faces the light: lit = 0.1 + 0.9 = 1.
    spec = RenderSpec(radius=1.0, num_samples_per_ray=512, stratified=False, background=(0.0, 0.0, 0.0),
                      candidate_samples_per_ray=600.0, samples_per_ray=400.0)
    o = jnp.asarray([[3.0, 0.0, 0.0]])
    d = jnp.asarray([[-1.0, 0.0, 0.0]])
    out = jax.jit(lambda o, d: volume.render_rays(
        o, d, volume.init_occupancy_grid(spec), jax.random.PRNGKey(0), _ball_fns(), spec,
        shading="textureless", light_pos=jnp.asarray([100.0, 0.0, 0.0])))(o, d)
    # every point on the centre ray has normal +-x; in front of the centre (x > 0) n.l = 1 -> lit 1, behind
    # (x < 0) n.l = -1 -> lit 0.1.  Weight of the front half: 1 - e^{-sigma R},
    # back half: e^{-sigma R}(1 - e^{-sigma R}).
    front = 1 - math.exp(-SIGMA_BALL * R_BALL)
    back = math.exp(-SIGMA_BALL * R_BALL) * (1 - math.exp(-SIGMA_BALL * R_BALL))
    expected = front * 1.0 + back * 0.1
    dt = spec.step_size
    np.testing.assert_allclose(np.asarray(out["rgb"])[0], expected, atol=SIGMA_BALL * dt * 1.5)
    np.testing.assert_allclose(np.asarray(out["normal_world"])[0], [1.0, 0.0, 0.0], atol=1e-3)


# ----------------------------------------------------------------------------------------------
# shading
# ----------------------------------------------------------------------------------------------

def test_shade_hand_values():
    spec = RenderSpec(ambient=0.1, diffuse=0.9)
    albedo = jnp.asarray([[0.5, 0.2, 1.0]] * 4)
    normal = jnp.asarray([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    points = jnp.asarray([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    light = jnp.asarray([[0.0, 0.0, 2.0],    # head-on: n.l = 1 -> 1.0
                         [1.0, 0.0, 1.0],    # 45 deg: 0.1 + 0.9 / sqrt2
                         [0.0, 0.0, -3.0],   # behind: clamp -> 0.1
                         [1.0, 1.0, 5.0]])   # grazing (l = +z, n = +x): 0.1
    lit = np.array([1.0, 0.1 + 0.9 / math.sqrt(2.0), 0.1, 0.1])
    lam = np.asarray(volume.shade(albedo, normal, points, light, "lambertian", spec))
    np.testing.assert_allclose(lam, np.asarray(albedo) * lit[:, None], rtol=1e-6)
    tex = np.asarray(volume.shade(albedo, normal, points, light, "textureless", spec))
    np.testing.assert_allclose(tex, np.broadcast_to(lit[:, None], (4, 3)), rtol=1e-6)
    alb = np.asarray(volume.shade(albedo, normal, points, light, "albedo", spec))
    np.testing.assert_array_equal(alb, np.asarray(albedo))
    # other ambient / diffuse
    spec2 = RenderSpec(ambient=0.3, diffuse=0.5)
    lam2 = np.asarray(volume.shade(albedo, normal, points, light, "lambertian", spec2))
    np.testing.assert_allclose(lam2[1], np.asarray(albedo)[1] * (0.3 + 0.5 / math.sqrt(2.0)), rtol=1e-6)
    with pytest.raises(ValueError):
        volume.shade(albedo, normal, points, light, "phong", spec)


# ----------------------------------------------------------------------------------------------
# budgets
# ----------------------------------------------------------------------------------------------

def test_step_size_and_budgets():
    spec = RenderSpec(radius=2.0, num_samples_per_ray=512, candidate_samples_per_ray=64.0, samples_per_ray=32.0)
    assert spec.step_size == pytest.approx(1.732 * 4.0 / 512)
    # 2 sqrt3 * 2 / (6.928 / 512) = 512 * 2 sqrt3 / 3.464 = 512.0277... -> ceil 513, + 1
    assert spec.max_steps_per_ray == 514
    assert spec.budgets(13) == (13 * 64, 13 * 32)
    tiny = spec.replace(candidate_samples_per_ray=1e6)
    assert tiny.budgets(3) == (3 * 514, 3 * 32)


def test_render_spec_takes_the_marching_backend_from_the_kernel_spec():
    """RenderSpec.from_config(cfg.render, radius, kernels): the marching backend is the KernelSpec's (the jnp
    reference without one); the types and passes the kernels share live in render.samples, volume re-exports
    those very objects."""
    from dreamcraft_jax.config import base_config
    from dreamcraft_jax.kernels.spec import KernelSpec
    from dreamcraft_jax.render import samples

    cfg = base_config()
    assert RenderSpec.from_config(cfg.render, 1.5, KernelSpec(backend="pallas")).backend == "pallas"
    spec = RenderSpec.from_config(cfg.render, 1.5)
    assert spec.backend == "xla" and spec.radius == 1.5
    assert spec == RenderSpec.from_config(cfg.render, 1.5, KernelSpec())
    for name in ("RenderSpec", "OccupancyGrid", "Samples", "march", "select", "compositing_weights", "accumulate"):
        assert getattr(volume, name) is getattr(samples, name), name
