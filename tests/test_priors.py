"""Demo priors (random, diffusers-format), Flax -> PyTorch-layout export, public loaders and txt2img."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax import models
from dreamcraft_jax.models import demo_priors, loading


@pytest.fixture(scope="module")
def priors(demo_prior_root):
    return demo_priors.ensure_demo_priors(demo_prior_root)


def test_torch_key_inverts_flax_path():
    for key in ("down_blocks.0.resnets.1.conv1.weight", "time_embedding.linear_1.weight",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.bias",
                "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj.weight",
                "text_model.encoder.layers.11.mlp.fc2.bias", "mid_block.resnets.1.norm2.weight"):
        parts = loading.flax_path(key)
        assert loading.torch_key(parts[:-1]) + "." + parts[-1] == key


def test_export_then_load_round_trips_exactly(priors):
    sd, z123 = priors
    unet, unet_params = models.load_unet(sd)
    state = loading.to_state_dict(jax.device_get(unet_params))
    # PyTorch layouts: conv OIHW, linear (out, in).
    assert state["conv_in.weight"].shape == (32, 4, 3, 3)
    assert state["time_embedding.linear_1.weight"].shape[1] == 32
    back = loading.convert_state_dict(state, unet_params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(unet_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_demo_priors_are_marked_random_and_load(priors):
    sd, z123 = priors
    assert demo_priors.is_random_demo(sd) and demo_priors.is_random_demo(z123)
    assert demo_priors.is_random_demo(sd / "unet")
    text, text_params = models.load_clip_text(sd)
    vision, vision_params = models.load_clip_vision(z123)
    proj, proj_params = models.load_camera_projection(z123)
    unet, _ = models.load_unet(z123)
    vae, _ = models.load_vae(z123)
    assert unet.in_channels == 8 and vae.downsample_factor == 8
    tok = models.load_tokenizer(sd)
    ids = models.tokenize(tok, ["a red mushroom"], max_length=77)
    hidden = text.apply({"params": text_params}, jnp.asarray(ids)).last_hidden_state
    assert hidden.shape == (1, 77, demo_priors.TEXT_WIDTH)
    emb = vision.apply({"params": vision_params}, jnp.zeros((1, 32, 32, 3))).image_embeds
    ctx = proj.apply({"params": proj_params}, jnp.concatenate([emb, jnp.zeros((1, 4))], -1))
    assert ctx.shape == (1, demo_priors.TEXT_WIDTH)
    assert models.load_schedule(sd).num_train_timesteps == 1000


def test_txt2img_is_deterministic_and_in_range(priors):
    from dreamcraft_jax.models.txt2img import generate

    sd, _ = priors
    a = generate(sd, "a red mushroom", height=32, width=32, num_steps=3, seed=1)
    b = generate(sd, "a red mushroom", height=32, width=32, num_steps=3, seed=1)
    c = generate(sd, "a red mushroom", height=32, width=32, num_steps=3, seed=2)
    assert a.shape == (1, 32, 32, 3) and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0


def test_txt2img_cli_writes_once_and_reports_missing_weights(priors, tmp_path):
    sd, _ = priors
    out = tmp_path / "ref.png"
    args = [sys.executable, "-m", "dreamcraft_jax.models.txt2img", "--model", str(sd), "--prompt", "a cat",
            "--out", str(out), "--height", "16", "--width", "16", "--steps", "2"]
    assert subprocess.run(args, capture_output=True, text=True, timeout=300).returncode == 0 and out.exists()
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr
    missing = subprocess.run(args[:4] + [str(tmp_path / "nowhere")] + args[5:8] + [str(tmp_path / "x.png")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_random_params_have_the_module_shapes_dtype_and_statistics():
    """guidance.random_priors.random_params: every leaf of the module's init tree, in the asked dtype, N(0, std)
    values (norm scales around 1), different leaves drawn at different offsets of the pool."""
    import jax.numpy as jnp

    from dreamcraft_jax.guidance.random_priors import TINY_UNET, random_params
    from dreamcraft_jax.models.unet import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(TINY_UNET, dtype=jnp.float32)
    shapes = jax.eval_shape(unet.init, jax.random.PRNGKey(0), *unet.dummy_inputs())["params"]
    params = random_params(unet, *unet.dummy_inputs(), seed=3, std=0.05, dtype=jnp.bfloat16)
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    flat = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), ref in zip(flat, jax.tree.leaves(shapes)):
        assert leaf.shape == ref.shape and leaf.dtype == jnp.bfloat16, path
    weights = np.concatenate([np.asarray(x, np.float32).ravel() for p, x in flat if "scale" not in str(p[-1])])
    scales = np.concatenate([np.asarray(x, np.float32).ravel() for p, x in flat if "scale" in str(p[-1])])
    assert abs(weights.std() - 0.05) < 0.002 and abs(weights.mean()) < 0.002
    assert abs(scales.mean() - 1.0) < 0.01
    big = [np.asarray(x, np.float32).ravel()[:64] for _, x in flat if x.size >= 64]
    assert len({b.tobytes() for b in big}) == len(big)  # no two leaves start at the same offset


def test_prior_loaders_give_every_unet_and_vae_the_runs_kernel_spec(demo_prior_root):
    """load_priors and random_priors build each UNet and VAE with the KernelSpec they are given (what the modules'
    GroupNorms read); given none, with the reference ``KernelSpec()``."""
    from conftest import tiny_config
    from dreamcraft_jax.data.reference import example_image_path, load_reference
    from dreamcraft_jax.guidance import priors as priors_mod
    from dreamcraft_jax.guidance.random_priors import random_priors
    from dreamcraft_jax.kernels.spec import KernelSpec

    cfg = tiny_config(**{"loss.lambda_sd": 0.1, "loss.lambda_3d_sd": 0.1, "guidance.sd.resolution": 32,
                         "guidance.zero123.resolution": 32})
    cfg.guidance.sd.pretrained, cfg.guidance.zero123.pretrained = priors_mod.demo_prior_paths(demo_prior_root)
    ref = load_reference(example_image_path(), 32, 32)
    spec = KernelSpec(fused_groupnorm=True, groupnorm_sums_max_rows=4096)
    cases = [(priors_mod.load_priors(cfg, priors_mod.reference_rgb_on_white(ref.rgb, ref.mask), kernels=spec)[0],
              spec),
             (random_priors(cfg, tiny=True, kernels=spec)[0], spec),
             (random_priors(cfg, tiny=True)[0], KernelSpec())]
    for loaded, want in cases:
        assert set(loaded.priors) == {"sd", "3d_sd"}
        for prior in loaded.priors.values():
            assert prior.unet.kernels == want and prior.vae.kernels == want
