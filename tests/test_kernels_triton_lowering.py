"""Every Pallas kernel lowers through the Triton backend for an H200, on this CPU-only machine.

Interpret-mode tests check the kernels' values; they never run the Triton lowering, which has limits of its own
(power-of-two block shapes, no slicing of register tensors, the ops it knows). Lowering for an abstract GPU
device (``jax.sharding.use_abstract_mesh``) runs that lowering without a GPU and emits each kernel's Triton IR,
so a kernel that cannot lower fails here, not on the lent GPU. The IR sizes also guard compile time: the
finite-difference kernel handles one level per program and must stay smaller than the 16-level unrolled
encoder (its 16-level unrolled predecessor was ~8x larger and did not finish compiling in minutes on an H200).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from conftest import lowered_for_gpu
from dreamcraft_jax.fields.hashgrid import HashGridSpec
from dreamcraft_jax.kernels import composite as ck
from dreamcraft_jax.kernels import density as dk
from dreamcraft_jax.kernels import fd_hashgrid as fk
from dreamcraft_jax.kernels import hashgrid as hk
from dreamcraft_jax.kernels import march as mk
from dreamcraft_jax.render.volume import OccupancyGrid, RenderSpec

SPEC = HashGridSpec()  # the official L16 F2 T2^19 grid
N = 1 << 14
TRITON_CALL = "__gpu$xla.gpu.triton"


def _lower_for_gpu(fn, *args) -> list[int]:
    """Lower ``jit(fn)(*args)`` for CUDA as on an H200; returns the size (characters) of each Triton kernel's IR."""
    text = lowered_for_gpu(fn, *args)
    sizes = [len(ir) for ir in re.findall(r'ir = "(.*?)", name', text)]
    assert text.count(TRITON_CALL) == len(sizes) > 0, "no Triton kernel in the lowered module"
    return sizes


def _points():
    x = jax.ShapeDtypeStruct((N, 3), jnp.float32)
    table = jax.ShapeDtypeStruct((SPEC.total_params, SPEC.n_features_per_level), jnp.float32)
    mask = jax.ShapeDtypeStruct((SPEC.n_levels,), jnp.float32)
    valid = jax.ShapeDtypeStruct((N,), jnp.bool_)
    return table, x, mask, valid


@pytest.fixture(scope="module")
def encoder_sizes():
    table, x, mask, valid = _points()

    def forward(t, x, m, v):
        return hk.encode_pallas(t, x, SPEC, m, valid=v, interpret=False)

    def backward(t, x, m, v):  # table, positions and level mask: the full backward kernel
        return jax.grad(lambda t, x, m: jnp.sum(hk.encode_pallas(t, x, SPEC, m, valid=v, interpret=False) ** 2),
                        argnums=(0, 1, 2))(t, x, m)

    def backward_reduced(t, x, m, v):
        return jax.grad(lambda t: jnp.sum(hk.encode_pallas(
            t, x, SPEC, m, valid=v, interpret=False, grad_table_only=True, pre_reduce_max_scale=128.0) ** 2))(t)

    return {name: _lower_for_gpu(fn, table, x, mask, valid)
            for name, fn in (("forward", forward), ("backward", backward), ("reduced", backward_reduced))}


def test_hash_grid_encoder_lowers(encoder_sizes):
    # forward + backward kernels where the loss needs the features; the reduced backward alone otherwise
    assert len(encoder_sizes["forward"]) == 1 and len(encoder_sizes["backward"]) == 2
    assert len(encoder_sizes["reduced"]) == 2


@pytest.mark.parametrize("neighbours,columns", [(fk.CENTRAL, False), ((fk.CENTER,) + fk.FORWARD, False),
                                               ((fk.CENTER,) + fk.FORWARD, True)],
                         ids=["central", "center_forward", "center_forward_columns"])
def test_finite_difference_kernel_lowers_one_level_per_program(encoder_sizes, neighbours, columns):
    table, x, mask, valid = _points()

    def fd_loss(t, x, m, v):
        return jax.value_and_grad(lambda t: sum(jnp.sum(e ** 2) for e in fk.fd_encode_pallas(
            t, x, SPEC, 0.5, 0.01, m, v, neighbours=neighbours, interpret=False, columns=columns)))(t)

    sizes = _lower_for_gpu(fd_loss, table, x, mask, valid)
    # forward, backward of the pre-reduced coarse levels, backward of the fine levels
    assert len(sizes) == 3
    assert max(sizes) < encoder_sizes["forward"][0], (sizes, encoder_sizes)


def test_per_level_encoder_lowers_to_a_fraction_of_the_unrolled_one(encoder_sizes):
    """kernels.hashgrid_levels: forward + the reduced backward (coarse and fine level calls) lower for the GPU,
    each program a fraction of the 16-level unrolled encoder's (lowering and kernel compile time)."""
    from dreamcraft_jax.kernels import hashgrid_levels as hl

    table, x, mask, valid = _points()

    def loss(t, x, m, v):
        return jax.value_and_grad(lambda t: jnp.sum(hl.encode_levels_pallas(
            t, x, SPEC, m, v, interpret=False, pre_reduce_max_scale=128.0) ** 2))(t)

    sizes = _lower_for_gpu(loss, table, x, mask, valid)
    assert len(sizes) == 3  # forward, backward of the pre-reduced coarse levels, backward of the fine levels
    assert 4 * sizes[0] < encoder_sizes["forward"][0], (sizes, encoder_sizes)
    assert 2 * sum(sizes[1:]) < sum(encoder_sizes["reduced"]), (sizes, encoder_sizes)


def test_density_mlp_kernel_lowers():
    table, x, mask, valid = _points()
    w_hidden = jax.ShapeDtypeStruct((SPEC.n_levels * SPEC.n_features_per_level, 64), jnp.float32)
    w_out = jax.ShapeDtypeStruct((64, 1), jnp.float32)
    sizes = _lower_for_gpu(lambda t, x, m, v, a, b: dk.density_mlp_pallas(t, x, SPEC, m, v, a, b, interpret=False),
                           table, x, mask, valid, w_hidden, w_out)
    assert len(sizes) == 1


@pytest.mark.parametrize("k_out,columns", [(1, False), (3, False), (1, True), (3, True)],
                         ids=["scalar", "albedo", "scalar_columns", "albedo_columns"])
def test_field_mlp_kernels_lower(k_out, columns):
    """kernels.mlp: forward and backward (tt.dot with both operand layouts) lower for the GPU, scalar and 3-output,
    features as rows or (``columns``) transposed."""
    from dreamcraft_jax.kernels import mlp as mlpk

    d = SPEC.n_levels * SPEC.n_features_per_level
    enc = jax.ShapeDtypeStruct((d, N) if columns else (N, d), jnp.float32)
    w_hidden = jax.ShapeDtypeStruct((d, 64), jnp.float32)
    w_out = jax.ShapeDtypeStruct((64, k_out), jnp.float32)

    def forward_backward(e, a, b):
        return jax.value_and_grad(lambda *args: jnp.sum(jnp.sin(mlpk.mlp_pallas(*args, interpret=False,
                                                                                 columns=columns))),
                                  argnums=(0, 1, 2))(e, a, b)

    assert len(_lower_for_gpu(forward_backward, enc, w_hidden, w_out)) == 2


@pytest.mark.parametrize("shape", [(8, 64, 64, 320), (4, 128, 128, 512)], ids=["unet64", "vae128"])
def test_groupnorm_kernels_lower(shape):
    """kernels.groupnorm: forward and backward (row loops, masked lane loads and stores) lower for the GPU at the
    UNet's 64 px and the VAE encoder's 128 px shapes, bf16 activations."""
    from dreamcraft_jax.kernels import groupnorm as gk

    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    vec = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)

    def forward_backward(x, scale, bias):
        return jax.value_and_grad(lambda *a: jnp.sum(gk.group_norm_act_pallas(
            *a, 32, 1e-6, True, interpret=False).astype(jnp.float32) ** 2), argnums=(0, 1, 2))(x, scale, bias)

    assert len(_lower_for_gpu(forward_backward, x, vec, vec)) == 2


def test_groupnorm_kernels_lower_inside_shard_map():
    """As the priors run in a sharded step: x split along the mesh, scale / bias replicated, parameter gradients
    psum'd. The kernels' outputs carry the varying mesh axes (``check_vma``). Interpret mode cannot run this on
    the CPU (its gathers mix varying and unvarying operands)."""
    from jax.sharding import PartitionSpec as P

    from dreamcraft_jax.kernels import groupnorm as gk

    x = jax.ShapeDtypeStruct((8, 64, 64, 320), jnp.bfloat16)
    vec = jax.ShapeDtypeStruct((320,), jnp.float32)

    def loss(x, scale, bias):
        return jnp.sum(gk.group_norm_act_pallas(x, scale, bias, 32, 1e-6, True, interpret=False)
                       .astype(jnp.float32) ** 2)

    def per_shard(x, scale, bias):
        return jnp.stack(jax.grad(lambda s, b: jax.lax.psum(loss(x, s, b), "lowering"), argnums=(0, 1))(
            scale, bias))

    sharded = jax.shard_map(per_shard, in_specs=(P("lowering"), P(), P()), out_specs=P())
    assert len(_lower_for_gpu(sharded, x, vec, vec)) == 2


@pytest.mark.parametrize("shape", [(8, 16, 16, 1280), (4, 512, 512, 128)], ids=["unet16", "vae512"])
def test_channel_sums_kernels_lower(shape):
    """kernels.channel_sums: the GroupNorm forward moments and backward dz sums (split rows, masked tiles) lower
    for the GPU at a UNet 16 px and the VAE encoder's 512 px shape, bf16 activations, also inside shard_map."""
    from jax.sharding import PartitionSpec as P

    from dreamcraft_jax.kernels import channel_sums as cs

    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    per_channel = jax.ShapeDtypeStruct((shape[0], 1, 1, shape[-1]), jnp.float32)
    vec = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)

    def both(x, dy, mean_c, rstd_c, scale, bias, **kw):
        return (cs.shifted_channel_sums(x, interpret=False, **kw),
                cs.backward_channel_sums(x, dy, mean_c, rstd_c, scale, bias, True, interpret=False, **kw))

    assert len(_lower_for_gpu(both, x, x, per_channel, per_channel, vec, vec)) == 2
    folded = functools.partial(both, fold=True, chunk=128, num_warps=8)  # the row-folding variant, large tiles
    assert len(_lower_for_gpu(folded, x, x, per_channel, per_channel, vec, vec)) == 2
    sharded = jax.shard_map(both, in_specs=(P("lowering"),) * 4 + (P(), P()), out_specs=P("lowering"))
    assert len(_lower_for_gpu(sharded, x, x, per_channel, per_channel, vec, vec)) == 2


def test_march_and_composite_kernels_lower():
    spec = RenderSpec(grid_resolution=32)
    n_rays, budget = 1024, 1024 * 16
    cells = spec.grid_resolution ** 3
    grid = OccupancyGrid(occs=jax.ShapeDtypeStruct((cells,), jnp.float32),
                         binary=jax.ShapeDtypeStruct((cells,), jnp.bool_))
    rays = jax.ShapeDtypeStruct((n_rays, 3), jnp.float32)
    key = jax.random.key(0)

    def march(o, d, g):
        return mk.march_pallas(o, d, g, key, spec, budget, interpret=False)

    assert len(_lower_for_gpu(march, rays, rays, grid)) >= 1

    m = budget
    f32 = jax.ShapeDtypeStruct((m,), jnp.float32)
    color = jax.ShapeDtypeStruct((m, 3), jnp.float32)
    ray_idx = jax.ShapeDtypeStruct((m,), jnp.int32)
    valid = jax.ShapeDtypeStruct((m,), jnp.bool_)

    def composite(sigma, color, t0, t1, ray_idx, valid):
        def loss(sigma, color):
            weights, rgb, opacity, depth = ck.composite_pallas(sigma, color, t0, t1, ray_idx, valid, n_rays,
                                                               interpret=False)
            return jnp.sum(rgb ** 2) + jnp.sum(opacity) + jnp.sum(depth) + jnp.sum(weights)
        return jax.grad(loss, argnums=(0, 1))(sigma, color)

    assert len(_lower_for_gpu(composite, f32, color, f32, f32, ray_idx, valid)) == 2


@pytest.mark.parametrize("fd_columns", [False, True], ids=["rows", "columns"])
def test_the_fields_gpu_path_needs_no_separate_encoder_kernel(monkeypatch, fd_columns):
    """With the GPU defaults (finite-difference kernel, fused MLPs), a pass with normals and the perturbed normals
    (the stage-1 training passes) lower to the finite-difference encode kernels and the MLP kernels only: the
    samples' own encodings come from the finite-difference call (CENTER), not from the plain encoder. With
    ``kernels.fd_columns`` the MLP kernels take the column layout as it is: no transpose of an encoding (or of
    its cotangent) in the program."""
    from dreamcraft_jax.config import base_config
    from dreamcraft_jax.fields import nerf
    from dreamcraft_jax.kernels.spec import KernelSpec

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the kernels pick Triton, not interpret mode
    cfg = base_config()
    kernels = KernelSpec.from_config(cfg.kernels).replace(fd_columns=fd_columns)  # "auto" resolves to "pallas"
    assert (kernels.backend, kernels.hashgrid_backward, kernels.fused_finite_difference, kernels.fused_mlp) == (
        "pallas", "reduced", True, True)
    spec = nerf.NerfFieldSpec.from_config(cfg.field, kernels)
    params = jax.eval_shape(lambda: nerf.init_field(jax.random.PRNGKey(0), spec))
    x = jax.ShapeDtypeStruct((4096, 3), jnp.float32)
    valid = jax.ShapeDtypeStruct((4096,), jnp.bool_)

    def loss(p, x, v):
        sigma, albedo, normal = nerf.density_albedo_and_normals(p, x, spec, None, v)
        return jnp.sum(sigma) + jnp.sum(albedo) + jnp.sum(normal * nerf.normals(p, x + 0.01, spec, None, v))

    text = lowered_for_gpu(jax.grad(loss), params, x, valid)
    names = set(re.findall(r'ir = ".*?", name = "(\w+)"', text))
    assert names == {"hashgrid_fd_encode_fwd", "hashgrid_fd_encode_bwd", "mlp1_fwd", "mlp1_bwd"}, names
    transposes = re.findall(r"stablehlo.transpose .*", text)
    encoding_shapes = ("tensor<32x4096xf32>", "tensor<4096x32xf32>")  # L*F = 32 features of 4096 points
    assert not any(shape in t for t in transposes for shape in encoding_shapes) or not fd_columns, transposes


@pytest.mark.parametrize("tile", [8, 16, 32])
def test_raster_zbuffer_kernel_lowers_at_1024_px(tile):
    """kernels.raster: one program per tile of a 1024 x 1024 view (a loop of traced length over the tile's list,
    broadcast gathers of the setup rows) lowers for the GPU; a 150k-face mesh's setup rows as input."""
    from dreamcraft_jax.kernels import raster as rk

    n_tiles = (1024 // tile) ** 2
    setup = jax.ShapeDtypeStruct((150_000, rk.SETUP_WIDTH), jnp.float32)
    per_tile = jax.ShapeDtypeStruct((n_tiles,), jnp.int32)
    sizes = _lower_for_gpu(lambda s, a, c: rk.tile_zbuffer_pallas(s, a, c, 1024, 1024, tile, interpret=False),
                           setup, per_tile, per_tile)
    assert len(sizes) == 1


def test_the_geometry_stages_gpu_render_lowers_to_the_raster_and_hash_grid_kernels(monkeypatch):
    """Stage 2's render (mesh extraction, rasterise, interpolate, texture, antialias) differentiated w.r.t. every
    parameter, built as on a GPU: the z-buffer is the Pallas kernel and the texture lookup the hash-grid kernels
    with their first-order input gradient; no other kernel, and the program lowers for the GPU."""
    from conftest import make_stage, tiny_config
    from dreamcraft_jax import parallel

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the kernels pick Triton, not interpret mode
    stage = make_stage(tiny_config(), parallel.make_mesh(1, 1), "geometry")
    assert stage.zbuffer == "pallas"
    params = stage.param_shapes()
    box = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    camera = stage.eval_cameras()["side"]

    def loss(p, box, grid):
        out = stage.render_view(p, stage.surface(p, box, grid), camera, 64, 64, 0.1, 1000.0)
        return sum(jnp.sum(out[k]) for k in ("rgb", "normal", "opacity"))

    text = lowered_for_gpu(jax.grad(loss), params, box, stage.device_grid)
    names = sorted(re.findall(r'ir = ".*?", name = "(\w+)"', text))
    assert names == ["hashgrid_encode_bwd", "hashgrid_encode_fwd", "raster_tile_zbuffer"], names
