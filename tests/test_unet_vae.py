"""Flax UNet / VAE against PyTorch diffusers on tiny random fixtures (tests/fixtures/make_unet_vae_fixtures.py).

CPU, float32. Parity bound: relative L2 error ||jax - torch|| / ||torch|| <= 2e-5 (reached: 6e-7 to 9e-7 for
the SD2 / SD1 / Zero123 UNets and the VAE, 2.4e-6 for the deeper camera UNet); a mis-set epsilon or a wrong head
split shows up far above that. bfloat16 compute against the float32 reference: 1.7e-2 to 3.6e-2 for the UNets,
1.2e-2 to 1.6e-2 for the VAE (tested: <= 3e-2 on the SD2 UNet, <= 2e-2 on the VAE decoder).
"""

from __future__ import annotations

import re
import shutil
from functools import cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.models.layers import (
    Conv2d,
    Transformer2DModel,
    nearest_resize,
    resolve_attention_impl,
    timestep_embedding,
)
from dreamcraft_jax.models.loading import WeightLoadingError, convert_state_dict, to_state_dict
from dreamcraft_jax.models.unet import UNet2DConditionModel, load_unet
from dreamcraft_jax.models.vae import AutoencoderKL, load_vae

FIXTURES = Path(__file__).resolve().parent / "fixtures"
UNETS = ("unet_sd2", "unet_sd1", "unet_zero123", "unet_sd2_camera")
TOL = 2e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@cache
def data(name: str) -> dict:
    with np.load(FIXTURES / name / "inputs_outputs.npz") as f:
        return dict(f)


@cache
def unet(name: str, **kw):
    return load_unet(FIXTURES / name, **kw)


@cache
def jitted(module, method: str = "__call__"):
    """One compiled apply per module configuration (jit beats eager op-by-op dispatch on first calls)."""
    return jax.jit(partial(module.apply, method=method))


def run_unet(module, params, d: dict, prefix: str = ""):
    return jitted(module)({"params": params}, d[prefix + "sample"], d[prefix + "timesteps"],
                          d[prefix + "encoder_hidden_states"], d.get(prefix + "class_labels"))


def leaves_with_paths(tree) -> dict:
    return {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", UNETS)
def test_unet_matches_diffusers(name):
    module, params = unet(name)
    d = data(name)
    out = run_unet(module, params, d)
    assert out.shape == d["out"].shape and out.dtype == jnp.float32
    assert rel_err(out, d["out"]) <= TOL


@pytest.mark.parametrize("kernel_size,stride,padding", [(3, 1, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))),
                                                        (1, 1, ((0, 0), (0, 0)))])
def test_conv2d_kernel_is_out_h_w_in(kernel_size, stride, padding):
    """Conv2d stores its kernel (out, kh, kw, in) and equals Flax's nn.Conv (HWIO) with that kernel transposed;
    the torch state-dict round trip maps OIHW onto it and back."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 5))
    conv = Conv2d(7, (kernel_size, kernel_size), strides=(stride, stride), padding=padding)
    params = conv.init(jax.random.PRNGKey(1), x)["params"]
    params = {"kernel": params["kernel"], "bias": jnp.arange(7.0)}
    assert params["kernel"].shape == (7, kernel_size, kernel_size, 5)
    flax_conv = nn.Conv(7, (kernel_size, kernel_size), strides=(stride, stride), padding=padding)
    want = flax_conv.apply({"params": {"kernel": jnp.transpose(params["kernel"], (1, 2, 3, 0)),
                                       "bias": params["bias"]}}, x)
    np.testing.assert_allclose(conv.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)
    state = to_state_dict({"conv": params})
    np.testing.assert_array_equal(state["conv.weight"], np.transpose(np.asarray(params["kernel"]), (0, 3, 1, 2)))
    back = convert_state_dict(state, jax.eval_shape(lambda: {"conv": params}))
    np.testing.assert_array_equal(back["conv"]["kernel"], params["kernel"])


def test_unet_config_semantics():
    """attention_head_dim is the number of heads (per block, reversed for the up path), as in diffusers."""
    sd2, _ = unet("unet_sd2")
    assert sd2.num_heads == (2, 4) and sd2.use_linear_projection and sd2.upcast_attention
    sd1, _ = unet("unet_sd1")
    assert sd1.num_heads == (2, 2) and not sd1.use_linear_projection and sd1.layers_per_block == (2, 2)
    zero123, _ = unet("unet_zero123")
    assert zero123.in_channels == 8 and data("unet_zero123")["encoder_hidden_states"].shape[1] == 1
    camera, params = unet("unet_sd2_camera")
    assert camera.class_embed_type == "projection"
    assert params["class_embedding"]["linear_1"]["kernel"].shape == (16, 32)


def test_unet_odd_spatial_size_and_scalar_timestep():
    """7x5 latents: the up path upsamples to the skip sizes (diffusers' upsample_size); a scalar timestep
    broadcasts over the batch (the fixture used 500 for both samples)."""
    module, params = unet("unet_sd1")
    d = data("unet_sd1")
    assert np.all(d["odd_timesteps"] == 500)
    out = jitted(module)({"params": params}, d["odd_sample"], 500, d["odd_encoder_hidden_states"])
    assert out.shape == (2, 7, 5, 4)
    assert rel_err(out, d["odd_out"]) <= TOL


def test_vae_matches_diffusers():
    module, params = load_vae(FIXTURES / "vae_sd")
    d = data("vae_sd")
    mean, logvar = jitted(module, "encode")({"params": params}, d["image"])
    assert mean.shape == d["mean"].shape == (2, 4, 6, 4)
    assert rel_err(mean, d["mean"]) <= TOL and rel_err(logvar, d["logvar"]) <= TOL
    decoded = jitted(module, "decode")({"params": params}, d["latents"])
    assert decoded.shape == d["decoded"].shape == (2, 16, 24, 3)
    assert rel_err(decoded, d["decoded"]) <= TOL
    assert module.scaling_factor == pytest.approx(0.18215) and module.downsample_factor == 4


def test_vae_posterior_helpers():
    mean = jnp.full((4096, 4), 0.5)
    logvar = jnp.full((4096, 4), np.log(0.25))
    z = AutoencoderKL.sample(mean, logvar, jax.random.key(0))
    assert abs(float(z.mean()) - 0.5) < 0.02 and abs(float(z.std()) - 0.5) < 0.02
    assert AutoencoderKL.mode(mean, logvar) is mean


# ---------------------------------------------------------------------------------------------- loading


SD21_BASE = dict(
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20, 20],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], cross_attention_dim=1024,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, use_linear_projection=True)


@pytest.mark.parametrize("config, heads, count", [
    (SD21_BASE, (5, 10, 20, 20), 865_910_724),
    (dict(SD21_BASE, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False), (8,) * 4,
     859_520_964),  # SD 1.5
    (dict(SD21_BASE, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False, in_channels=8),
     (8,) * 4, 859_532_484),  # Zero123
])
def test_real_unet_configs_have_the_published_sizes(config, heads, count):
    module = UNet2DConditionModel.from_config(config)
    assert module.num_heads == heads
    abstract = jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())["params"]
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract)) == count


def test_real_vae_config_has_the_published_size():
    module = AutoencoderKL.from_config({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                                        "down_block_types": ["DownEncoderBlock2D"] * 4,
                                        "up_block_types": ["UpDecoderBlock2D"] * 4})
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract)) == 83_653_863
    assert module.downsample_factor == 8


def test_pipeline_root_and_subfolder_load_the_same():
    root_module, root_params = unet("unet_sd2")
    sub_module, sub_params = load_unet(FIXTURES / "unet_sd2" / "unet")
    assert root_module == sub_module
    root_leaves, sub_leaves = leaves_with_paths(root_params), leaves_with_paths(sub_params)
    assert root_leaves.keys() == sub_leaves.keys()
    for k in root_leaves:
        np.testing.assert_array_equal(root_leaves[k], sub_leaves[k])
    vae_root, _ = load_vae(FIXTURES / "vae_sd")
    vae_sub, _ = load_vae(FIXTURES / "vae_sd" / "vae")
    assert vae_root == vae_sub


def test_fp16_variant_loads_as_float32():
    module, params = unet("unet_sd1", variant="fp16")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    d = data("unet_sd1")
    assert rel_err(run_unet(module, params, d, "fp16_"), d["fp16_out"]) <= TOL


def test_params_replicated_over_mesh():
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    _, params = load_unet(FIXTURES / "unet_zero123", mesh=mesh)
    _, host_params = unet("unet_zero123")
    for leaf, ref in zip(jax.tree.leaves(params), jax.tree.leaves(host_params)):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == len(jax.devices())
        np.testing.assert_array_equal(leaf, ref)


def test_missing_folder(tmp_path):
    with pytest.raises(WeightLoadingError, match="does not exist"):
        load_unet(tmp_path / "nowhere")


def test_folder_without_config(tmp_path):
    with pytest.raises(WeightLoadingError, match=r"no unet/config.json under"):
        load_unet(tmp_path)
    with pytest.raises(WeightLoadingError, match=r"no vae/config.json under"):
        load_vae(tmp_path)


def test_missing_variant_names_what_exists():
    with pytest.raises(WeightLoadingError, match=r"no fp16 safetensors weights .*diffusion_pytorch_model.safetensors"):
        load_unet(FIXTURES / "unet_sd2", variant="fp16")


def _mixed_folder(folder: Path, config_from: Path, weights_from: Path) -> Path:
    """A component folder with the config of one fixture and the weights of another."""
    folder.mkdir()
    shutil.copy(config_from / "config.json", folder / "config.json")
    shutil.copy(weights_from / "diffusion_pytorch_model.safetensors", folder)
    return folder


def test_config_weight_mismatch_lists_keys(tmp_path):
    # SD2 config (1 layer per block, 24-wide context) with SD1 weights (2 layers, 20-wide context)
    folder = _mixed_folder(tmp_path / "a", FIXTURES / "unet_sd2" / "unet", FIXTURES / "unet_sd1")
    with pytest.raises(WeightLoadingError) as err:
        load_unet(folder)
    msg = str(err.value)
    assert f"cannot load UNet {folder}" in msg
    assert re.search(r"unexpected in checkpoint \(\d+\): down_blocks\.0\.attentions\.1\.", msg)
    assert "shape mismatch" in msg and "attn2.to_k.weight" in msg
    assert "check that config.json belongs to these weights" in msg
    # and the other way round: the SD1 config wants parameters the SD2 weights lack
    folder = _mixed_folder(tmp_path / "b", FIXTURES / "unet_sd1", FIXTURES / "unet_sd2" / "unet")
    with pytest.raises(WeightLoadingError, match=r"missing in checkpoint \(\d+\): .*down_blocks_0/attentions_1/norm/"):
        load_unet(folder)


def test_unsupported_config_names_the_key(tmp_path):
    config = (FIXTURES / "unet_sd1" / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"class_embed_type": null', '"class_embed_type": "timestep"'))
    shutil.copy(FIXTURES / "unet_sd1" / "diffusion_pytorch_model.safetensors", tmp_path)
    with pytest.raises(WeightLoadingError, match="'class_embed_type' = 'timestep' is not supported"):
        load_unet(tmp_path)
    with pytest.raises(ValueError, match="'addition_embed_type'"):
        UNet2DConditionModel.from_config({"addition_embed_type": "text"})
    with pytest.raises(ValueError, match="'down_block_types'"):
        UNet2DConditionModel.from_config({"block_out_channels": [32], "down_block_types": ["AttnDownBlock2D"],
                                          "up_block_types": ["UpBlock2D"]})
    with pytest.raises(ValueError, match="'up_block_types'"):
        AutoencoderKL.from_config({"block_out_channels": [32], "up_block_types": ["AttnUpDecoderBlock2D"]})


def test_class_labels_required_and_refused():
    module, params = unet("unet_sd2_camera")
    d = data("unet_sd2_camera")
    with pytest.raises(ValueError, match="pass class_labels"):
        module.apply({"params": params}, d["sample"], d["timesteps"], d["encoder_hidden_states"])
    plain, plain_params = unet("unet_sd2")
    with pytest.raises(ValueError, match="no class embedding"):
        plain.apply({"params": plain_params}, d["sample"], d["timesteps"], data("unet_sd2")["encoder_hidden_states"],
                    d["class_labels"])


# ---------------------------------------------------------------------------------------------- LoRA, remat, dtypes


def test_lora_starts_as_identity_and_trains():
    """LoRA rank 4 (with remat, which must change neither outputs nor parameter paths)."""
    base, base_params = unet("unet_sd2")
    module, params = unet("unet_sd2", lora_rank=4, remat=True)
    d = data("unet_sd2")
    leaves = leaves_with_paths(params)
    lora = {k: v for k, v in leaves.items() if "_lora/" in k}
    # 4 projections x 2 attentions x 4 transformers (down 0, mid, 2 in up 1) x (down, up)
    assert len(lora) == 4 * 2 * 4 * 2
    for k, v in lora.items():
        if k.endswith("up/kernel"):
            assert not np.any(np.asarray(v))
        else:
            assert v.shape[-1] == 4 and 0.1 < float(jnp.std(v)) < 0.5  # ~ N(0, 1/4)
    assert "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k_lora/down/kernel" in lora
    base_out = run_unet(base, base_params, d)
    assert rel_err(run_unet(module, params, d), base_out) <= 1e-6

    def perturb(path, leaf):
        name = "/".join(k.key for k in path)
        if "_lora/up" in name:
            return leaf + 0.1 * jax.random.normal(jax.random.key(len(name)), leaf.shape)
        return leaf

    moved = run_unet(module, jax.tree_util.tree_map_with_path(perturb, params), d)
    assert rel_err(moved, base_out) > 1e-3


def test_lora_gradients_through_remat_transformer():
    """LoRA down and up both get gradients (once up is non-zero) through a rematerialised transformer."""
    _, params = unet("unet_zero123", lora_rank=2)
    block = Transformer2DModel(heads=2, head_dim=4, norm_num_groups=4, lora_rank=2, remat=True)
    p = params["down_blocks_0"]["attentions_0"]
    p = jax.tree_util.tree_map_with_path(lambda k, x: x + 0.1 if "_lora" in jax.tree_util.keystr(k) else x, p)
    x = jax.random.normal(jax.random.key(0), (2, 4, 6, 8))
    context = jax.random.normal(jax.random.key(1), (2, 1, 32))
    grads = jax.jit(jax.grad(lambda q: jnp.sum(block.apply({"params": q}, x, context) ** 2)))(p)
    lora = grads["transformer_blocks_0"]["attn2"]["to_v_lora"]
    assert float(jnp.abs(lora["down"]["kernel"]).max()) > 0 and float(jnp.abs(lora["up"]["kernel"]).max()) > 0


def test_bf16_compute_close_to_fp32():
    module, params = unet("unet_sd2", dtype=jnp.bfloat16)
    assert module.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    d = data("unet_sd2")
    out = run_unet(module, params, d)
    assert out.dtype == jnp.float32 and rel_err(out, d["out"]) <= 3e-2
    vae, vae_params = load_vae(FIXTURES / "vae_sd", dtype=jnp.bfloat16)
    decoded = jitted(vae, "decode")({"params": vae_params}, data("vae_sd")["latents"])
    assert rel_err(decoded, data("vae_sd")["decoded"]) <= 2e-2


def test_param_dtype():
    _, params = unet("unet_zero123", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    _, params = load_vae(FIXTURES / "vae_sd", param_dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------- small pieces


def test_attention_impl_resolution():
    assert resolve_attention_impl(None, jnp.bfloat16, 64) is None
    assert resolve_attention_impl("xla", jnp.bfloat16, 64) is None
    on_gpu = jax.default_backend() == "gpu"
    assert resolve_attention_impl("cudnn", jnp.bfloat16, 64) == ("cudnn" if on_gpu else None)
    assert resolve_attention_impl("cudnn", jnp.float32, 64) is None  # cuDNN flash needs half precision
    assert resolve_attention_impl("cudnn", jnp.bfloat16, 512) is None  # VAE's single 512-wide head
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_attention_impl("flash", jnp.bfloat16, 64)
    # a cudnn request traces everywhere (XLA where cuDNN cannot run)
    module, params = unet("unet_sd1", attention_impl="cudnn", dtype=jnp.bfloat16)
    d = data("unet_sd1")
    out = jax.eval_shape(module.apply, {"params": params}, d["sample"], d["timesteps"], d["encoder_hidden_states"])
    assert out.shape == d["out"].shape


def test_nearest_resize_matches_torch_rule():
    x = jnp.arange(3 * 2, dtype=jnp.float32).reshape(1, 3, 2, 1)
    np.testing.assert_array_equal(nearest_resize(x, (6, 4))[0, :, :, 0],
                                  np.repeat(np.repeat(np.asarray(x[0, :, :, 0]), 2, 0), 2, 1))
    # torch: src = floor(dst * in / out); 3 -> 5 rows picks 0, 0, 1, 1, 2
    np.testing.assert_array_equal(nearest_resize(x, (5, 2))[0, :, 0, 0], [0, 0, 2, 2, 4])


def test_timestep_embedding_layout():
    emb = timestep_embedding(jnp.array([0.0]), 8, flip_sin_to_cos=True, freq_shift=0)
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)  # cos first when flipped
    emb = timestep_embedding(jnp.array([0.0]), 8, flip_sin_to_cos=False, freq_shift=1)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)


def test_fsdp_spec_rule():
    from jax.sharding import PartitionSpec as P

    from dreamcraft_jax.parallel import FSDP, fsdp_spec

    assert fsdp_spec((3, 3, 320, 640), 2) == P(None, None, None, FSDP)  # largest divisible axis
    assert fsdp_spec((1280, 1024), 4) == P(FSDP, None)
    assert fsdp_spec((320,), 2) == P()  # too small to be worth a gather
    assert fsdp_spec((333, 333), 2) == P()  # nothing divisible
    assert fsdp_spec((1280, 1024), 1) == P()  # no fsdp axis


@pytest.mark.slow
def test_fsdp_mesh_places_sharded_and_matches_unsharded():
    """On a (data=4, fsdp=2) mesh kernels are split along `fsdp`; the UNet output is unchanged."""
    from dreamcraft_jax import parallel
    from dreamcraft_jax.models import loading

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    folder = FIXTURES / "unet_sd1"
    mesh = parallel.make_mesh(4, 2)
    module, plain = load_unet(folder)
    # The tiny fixture has no leaf above the default 2^16 elements: lower the threshold to exercise the rule.
    shardings = parallel.param_shardings(plain, mesh, min_size=64)
    sharded = loading.place(jax.device_get(plain), shardings=shardings)
    n_split = 0
    for (path, leaf) in jax.tree_util.tree_leaves_with_path(sharded):
        spec = tuple(leaf.sharding.spec)
        expect = parallel.fsdp_spec(leaf.shape, 2, 64)
        assert spec == tuple(expect), jax.tree_util.keystr(path)
        if parallel.FSDP in spec:
            n_split += 1
            axis = spec.index(parallel.FSDP)
            assert leaf.addressable_shards[0].data.shape[axis] == leaf.shape[axis] // 2
    assert n_split >= 10
    data = np.load(folder / "inputs_outputs.npz")
    args = [jnp.asarray(data[k]) for k in ("sample", "timesteps", "encoder_hidden_states")]
    a = module.apply({"params": sharded}, *args)
    b = module.apply({"params": plain}, *args)
    # Sharded kernels change float32 summation orders only: agreement to rounding noise (outputs are O(1)).
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # load_unet(mesh=...) uses the same rule (default threshold: everything replicated at this size).
    _, via_loader = load_unet(folder, mesh=mesh)
    assert all(tuple(x.sharding.spec) == () for x in jax.tree.leaves(via_loader))


def _naive_group_norm(x, scale, bias, groups, eps, silu):
    """Two-pass float64 GroupNorm (+ SiLU) straight from the definition, for values and autodiff gradients."""
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    z = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias
    return z * jax.nn.sigmoid(z) if silu else z


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_group_norm_act_values_and_gradients_match_the_definition(silu, offset):
    from dreamcraft_jax.models.layers import group_norm_act
    rng = np.random.default_rng(3)
    shape, groups, eps = (2, 5, 3, 12), 4, 1e-5
    # Offset channels with a small spread: a plain one-pass E[x^2] - E[x]^2 in float32 loses the variance here.
    x = rng.normal(size=shape) * rng.uniform(0.05, 2.0, size=shape[-1]) + offset
    scale, bias = rng.normal(size=12), rng.normal(size=12)
    cotangent = rng.normal(size=shape)
    with jax.enable_x64(True):
        want, want_vjp = jax.vjp(partial(_naive_group_norm, groups=groups, eps=eps, silu=silu),
                                 *(jnp.asarray(a, jnp.float64) for a in (x, scale, bias)))
        want_grads = want_vjp(jnp.asarray(cotangent, jnp.float64))
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
    got, got_vjp = jax.vjp(lambda *a: group_norm_act(*a, groups, eps, silu), *f32)
    got_grads = got_vjp(jnp.asarray(cotangent, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
    for name, g, w in zip(("x", "scale", "bias"), got_grads, want_grads):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-3, atol=1e-3 * np.abs(w).max(), err_msg=name)


def test_group_norm_act_bf16_input_and_jit():
    from dreamcraft_jax.models.layers import group_norm_act
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 64)) * 3 + 1
    scale, bias = jnp.linspace(0.5, 1.5, 64), jnp.linspace(-1, 1, 64)
    got = jax.jit(lambda a: group_norm_act(a, scale, bias, 32, 1e-6, True))(x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    want = _naive_group_norm(x.astype(jnp.bfloat16).astype(jnp.float32), scale, bias, 32, 1e-6, True)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=3e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="do not split into 5 groups"):
        group_norm_act(x, scale, bias, 5, 1e-6, False)


def test_group_norm_act_inside_shard_map_sums_parameter_gradients():
    """Replicated scale / bias with a data-sharded x: the custom VJP's parameter cotangents come out summed over
    the shards, equal to the gradient of the unsharded call."""
    from jax.sharding import PartitionSpec as P

    from dreamcraft_jax.models.layers import group_norm_act
    n = min(len(jax.devices()), 4)
    mesh = jax.make_mesh((n,), ("data",))
    x = jax.random.normal(jax.random.PRNGKey(1), (2 * n, 4, 4, 8))
    scale, bias = jnp.linspace(0.5, 2.0, 8), jnp.linspace(-1.0, 1.0, 8)

    def loss(x, scale, bias):
        return jnp.sum(jnp.sin(group_norm_act(x, scale, bias, 2, 1e-6, True)))

    def per_shard(x, s, b):  # gradient of the summed loss w.r.t. the replicated parameters
        return jnp.stack(jax.grad(lambda s, b: jax.lax.psum(loss(x, s, b), "data"), argnums=(0, 1))(s, b))

    sharded = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=P()))
    want = jnp.stack(jax.grad(loss, argnums=(1, 2))(x, scale, bias))
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(np.asarray(sharded(x, scale, bias)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_every_groupnorm_of_the_unet_and_vae_gets_the_modules_kernel_spec(monkeypatch):
    """The ``kernels`` given to ``from_config`` reaches each GroupNorm of the UNet (resnets, transformers, the output
    norm) and the VAE (resnets, mid-block attention, output norms); without one, each gets ``KernelSpec()``. Counted
    while tracing (eval_shape): the GroupNorms are those of the diffusers configs (see the loop below)."""
    from dreamcraft_jax.guidance.random_priors import TINY_UNET, TINY_VAE
    from dreamcraft_jax.kernels.spec import KernelSpec
    from dreamcraft_jax.models import layers

    seen = []
    original = layers.group_norm_act

    def recording(x, scale, bias, num_groups, eps, silu, kernels):  # GroupNorm passes all seven
        seen.append(kernels)
        return original(x, scale, bias, num_groups, eps, silu, kernels)

    monkeypatch.setattr(layers, "group_norm_act", recording)
    spec = KernelSpec(fused_groupnorm=True, groupnorm_sums_max_rows=1 << 12, groupnorm_sums_plan={"chunk": 16})
    # Tiny UNet (2 blocks, 1 layer each): down 2 resnets (2 norms each) + 1 transformer; mid 2 resnets +
    # 1 transformer; up 2 x 2 resnets + 2 transformers; the output norm: 4 + 1 + 4 + 1 + 8 + 2 + 1 = 21.
    # Tiny VAE encoder (2 blocks, 1 layer): 2 resnets; mid 2 resnets + attention; output norm: 4 + 4 + 1 + 1 = 10.
    for kernels in (spec, None):
        kw = {} if kernels is None else {"kernels": kernels}
        want = KernelSpec() if kernels is None else kernels
        unet = UNet2DConditionModel.from_config(TINY_UNET, **kw)
        seen.clear()
        jax.eval_shape(unet.init, jax.random.PRNGKey(0), *unet.dummy_inputs())
        assert len(seen) == 21 and all(k == want for k in seen), (len(seen), set(seen))
        vae = AutoencoderKL.from_config(TINY_VAE, **kw)
        seen.clear()
        jax.eval_shape(lambda k, vae=vae: vae.init(k, jnp.zeros((1, 16, 16, 3)), method=AutoencoderKL.encode),
                       jax.random.PRNGKey(0))
        assert len(seen) == 10 and all(k == want for k in seen), (len(seen), set(seen))
