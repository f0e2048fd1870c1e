"""LDM -> diffusers converter: the UNet's EMA weights (what the official guidance samples with) are the ones converted.

The weight choice (:func:`select_unet_weights`) is tested torch-free on numpy dicts; the end-to-end test builds a
tiny LDM-format ``.ckpt`` (torch + diffusers, skipped without them) and loads the converted folder with the JAX
loaders.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from dreamcraft_jax.models import convert_ldm
from dreamcraft_jax.models.convert_ldm import EmaWeightsError, ema_key, select_unet_weights

FIXTURES = Path(__file__).parent / "fixtures"
UNET_SHAPES = {"input_blocks.0.0.weight": (8, 8, 3, 3), "input_blocks.0.0.bias": (8,),
               "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 8), "out.2.weight": (4, 8, 3, 3),
               "time_embed.0.weight": (32, 8)}


def fake_ldm(raw: bool = True, ema: bool = True, seed: int = 0) -> dict:
    """A tiny LDM state dict of numpy arrays: raw UNet weights, their LitEma copies (other values), the LitEma
    bookkeeping buffers and two non-UNet tensors."""
    rng = np.random.default_rng(seed)
    sd = {"first_stage_model.encoder.conv_in.weight": rng.normal(size=(8, 3, 3, 3)),
          "cc_projection.weight": rng.normal(size=(8, 12))}
    for k, shape in UNET_SHAPES.items():
        if raw:
            sd["model.diffusion_model." + k] = rng.normal(size=shape)
        if ema:
            sd[ema_key("model.diffusion_model." + k)] = rng.normal(size=shape) + 10.0  # apart from any raw value
    if ema:
        sd["model_ema.decay"], sd["model_ema.num_updates"] = np.float32(0.9999), np.int32(1000)
    return sd


def test_ema_key_is_litemas_buffer_name():
    # LitEma wraps the LDM's `model` (a DiffusionWrapper) and removes the dots of each parameter name.
    assert ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    assert (ema_key("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight")
            == "model_ema.diffusion_modeloutput_blocks111transformer_blocks0attn2to_kweight")
    with pytest.raises(ValueError, match="not a UNet key"):
        ema_key("cc_projection.weight")


def test_ema_weights_replace_the_raw_unet_weights():
    sd = fake_ldm()
    got = select_unet_weights(sd)
    assert got.source == "ema" and got.unet_tensors == len(UNET_SHAPES) and got.ema_tensors == len(UNET_SHAPES)
    assert got.unused_ema == ()
    for k in UNET_SHAPES:
        key = "model.diffusion_model." + k
        np.testing.assert_array_equal(got.state_dict[key], sd[ema_key(key)])
        assert not np.array_equal(got.state_dict[key], sd[key])
    for k in ("first_stage_model.encoder.conv_in.weight", "cc_projection.weight", "model_ema.decay"):
        assert got.state_dict[k] is sd[k]  # everything else passes through
    assert set(got.state_dict) == set(sd)
    assert sd["model.diffusion_model.out.2.weight"].mean() < 5  # the input mapping is not modified
    assert "EMA (model_ema.*, 5 tensors)" in convert_ldm.describe(got, use_ema=True)


def test_without_ema_weights_the_raw_ones_are_used():
    sd = fake_ldm(ema=False)
    got = select_unet_weights(sd)
    assert got.source == "raw" and got.ema_tensors == 0 and got.state_dict == sd
    assert "no model_ema.* weights" in convert_ldm.describe(got, use_ema=True)
    # The LitEma bookkeeping buffers alone are not EMA weights.
    sd.update({"model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int32(0)})
    assert select_unet_weights(sd).source == "raw"


def test_no_ema_flag_keeps_the_raw_weights():
    sd = fake_ldm()
    got = select_unet_weights(sd, use_ema=False)
    assert got.source == "raw" and got.ema_tensors == len(UNET_SHAPES)
    for k in UNET_SHAPES:
        assert got.state_dict["model.diffusion_model." + k] is sd["model.diffusion_model." + k]
    assert "--no-ema" in convert_ldm.describe(got, use_ema=False)
    args = convert_ldm.parser().parse_args(["--ckpt", "a.ckpt", "--out", "o", "--no-ema"])
    assert args.no_ema is True
    assert convert_ldm.parser().parse_args(["--ckpt", "a.ckpt", "--out", "o"]).no_ema is False


def test_partial_or_misshaped_ema_is_one_clear_error():
    sd = fake_ldm()
    del sd[ema_key("model.diffusion_model.out.2.weight")]
    with pytest.raises(EmaWeightsError) as e:
        select_unet_weights(sd)
    msg = str(e.value)
    assert "1 of the 5 UNet parameters have no EMA copy" in msg
    assert "model.diffusion_model.out.2.weight" in msg and "model_ema.diffusion_modelout2weight" in msg
    assert "--no-ema" in msg
    assert select_unet_weights(sd, use_ema=False).source == "raw"  # the way out the message names

    sd = fake_ldm()
    sd[ema_key("model.diffusion_model.input_blocks.0.0.bias")] = np.zeros(9)
    with pytest.raises(EmaWeightsError, match=r"1 EMA copies differ in shape .*\(8,\) vs .*\(9,\)"):
        select_unet_weights(sd)


def test_ema_tensors_of_no_unet_parameter_are_ignored_and_reported():
    sd = fake_ldm()
    sd["model_ema.diffusion_modelsomething_elseweight"] = np.zeros(3)
    got = select_unet_weights(sd)
    assert got.source == "ema" and got.unused_ema == ("model_ema.diffusion_modelsomething_elseweight",)


# ------------------------------------------------------------------------------------------ end to end (torch)

# Tiny Zero123-like UNet and SD-like VAE (the layouts of tests/fixtures/make_unet_vae_fixtures.py).
TINY_UNET = dict(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, cross_attention_dim=32)
TINY_VAE = dict(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                sample_size=16, scaling_factor=0.18215)
_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_unet_key(key: str, config: dict) -> str:
    """A diffusers UNet2DConditionModel key -> the LDM (openaimodel.UNetModel) key that diffusers'
    ``convert_ldm_unet_checkpoint`` reads it from (SD1 layout, no class embedding)."""
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    module, _, leaf = key.rpartition(".")
    if module in top:
        return f"{top[module]}.{leaf}"
    n = config["layers_per_block"]
    parts = key.split(".")

    def resnet(rest: str) -> str:
        for a, b in _RESNET_TO_LDM:
            rest = rest.replace(a, b)
        return rest

    if parts[0] == "down_blocks":
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        base = 1 + b * (n + 1)
        if kind == "resnets":
            return f"input_blocks.{base + j}.0.{resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{base + j}.1.{rest}"
        return f"input_blocks.{base + n}.0.op.{parts[-1]}"  # downsamplers.0.conv.*
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * j}.{resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        base = b * (n + 1)
        if kind == "resnets":
            return f"output_blocks.{base + j}.0.{resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{base + j}.1.{rest}"
        has_attention = config["up_block_types"][b].startswith("CrossAttn")
        return f"output_blocks.{base + n}.{2 if has_attention else 1}.conv.{parts[-1]}"  # upsamplers.0.conv.*
    raise KeyError(key)


def ldm_vae_key(key: str, config: dict) -> str:
    """A diffusers AutoencoderKL key -> the LDM (``first_stage_model``) key ``convert_ldm_vae_checkpoint`` reads."""
    n = len(config["up_block_types"])
    key = key.replace("conv_norm_out", "norm_out")
    parts = key.split(".")
    if parts[1] == "down_blocks":  # encoder.down_blocks.i.{resnets.j, downsamplers.0.conv}.*
        i, rest = parts[2], ".".join(parts[4:])
        if parts[3] == "downsamplers":
            return f"encoder.down.{i}.downsample.{'.'.join(parts[5:])}"
        return f"encoder.down.{i}.block.{rest}".replace("conv_shortcut", "nin_shortcut")
    if parts[1] == "up_blocks":  # decoder.up_blocks.i -> decoder.up.(n - 1 - i): LDM counts from the bottom
        i = n - 1 - int(parts[2])
        if parts[3] == "upsamplers":
            return f"decoder.up.{i}.upsample.{'.'.join(parts[5:])}"
        return f"decoder.up.{i}.block.{'.'.join(parts[4:])}".replace("conv_shortcut", "nin_shortcut")
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}".replace(
                "conv_shortcut", "nin_shortcut")
        module, leaf = ".".join(parts[4:-1]), parts[-1]
        return f"{parts[0]}.mid.attn_1.{_VAE_ATTN_TO_LDM[module]}.{leaf}"
    return key


def build_tiny_ldm_checkpoint(path: Path) -> tuple[dict, dict]:
    """Write a tiny LDM-format ``.ckpt`` ({"state_dict": ...}) with raw and EMA UNet weights (different random
    values), a VAE, ``cc_projection`` and LitEma's bookkeeping buffers. Returns the diffusers-keyed
    (raw, ema) UNet weights as numpy arrays."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet, vae = UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE)
    g = torch.Generator().manual_seed(0)
    raw, ema, sd = {}, {}, {}
    for k, t in unet.state_dict().items():
        raw[k] = torch.randn(t.shape, generator=g)
        ema[k] = torch.randn(t.shape, generator=g) + 3.0
        ldm = "model.diffusion_model." + ldm_unet_key(k, TINY_UNET)
        sd[ldm], sd[ema_key(ldm)] = raw[k], ema[k]
    for k, t in vae.state_dict().items():
        value = torch.randn(t.shape, generator=g)
        if ".mid_block.attentions." in k and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        sd["first_stage_model." + ldm_vae_key(k, TINY_VAE)] = value
    sd["cc_projection.weight"], sd["cc_projection.bias"] = torch.randn(32, 36, generator=g), torch.zeros(32)
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1234, dtype=torch.int)
    torch.save({"state_dict": sd, "global_step": 1234}, path)
    return ({k: v.numpy() for k, v in raw.items()}, {k: v.numpy() for k, v in ema.items()})


def test_convert_end_to_end_writes_the_ema_unet(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from dreamcraft_jax.models import loading
    from dreamcraft_jax.models.unet import load_unet
    from dreamcraft_jax.models.vae import load_vae

    ckpt = tmp_path / "tiny-zero123.ckpt"
    raw, ema = build_tiny_ldm_checkpoint(ckpt)
    for use_ema, expected in ((True, ema), (False, raw)):
        out = tmp_path / f"out-{use_ema}"
        weights = convert_ldm.convert(ckpt, out, FIXTURES / "clip_vision", use_ema=use_ema,
                                      unet_config=TINY_UNET, vae_config=TINY_VAE)
        assert weights.source == ("ema" if use_ema else "raw")
        printed = capsys.readouterr().out
        assert ("UNet weights: EMA (model_ema.*, " if use_ema else "UNet weights: raw (") in printed
        record = json.loads((out / "conversion.json").read_text())
        assert record["source_checkpoint"] == "tiny-zero123.ckpt" and record["unet_weights"] == weights.source
        assert record["unet_tensors"] == len(raw) and record["ema_tensors_in_checkpoint"] == len(raw)
        assert record["no_ema_flag"] is (not use_ema)

        unet, params = load_unet(out)  # the pipeline folder, as the Zero123 prior loads it
        assert unet.in_channels == 8
        state = loading.to_state_dict(params)
        assert set(state) == set(expected)
        for k, v in expected.items():
            np.testing.assert_array_equal(state[k], v, err_msg=k)
        load_vae(out)  # the other parts load too
