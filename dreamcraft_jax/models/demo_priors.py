"""Tiny RANDOM-WEIGHT stand-ins for Stable Diffusion and Zero123, for the CPU demo and tests.

They have the real architectures at toy widths and are written as ordinary diffusers-format folders, so the demo
runs the same loading, guidance and training code as a real run. Their guidance is noise, not knowledge: every
folder carries ``RANDOM_WEIGHTS.txt`` and ``"dreamcraft_random_demo": true`` in ``model_index.json``, and
:func:`is_random_demo` lets callers say so loudly in logs and outputs.

    python -m dreamcraft_jax.models.demo_priors outputs/demo_priors    # writes demo-sd/ and demo-zero123/
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.models.loading import save_component

MARKER = "RANDOM_WEIGHTS.txt"
WARNING = ("RANDOM WEIGHTS: this is a tiny randomly initialised stand-in for a diffusion prior, made by "
           "dreamcraft_jax.models.demo_priors for CPU demos and tests. Its guidance carries no knowledge.")

SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon", "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}
TEXT_WIDTH = 32
UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "layers_per_block": 1, "block_out_channels": [32, 64], "attention_head_dim": [2, 4],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": TEXT_WIDTH,
        "use_linear_projection": True, "norm_num_groups": 8, "flip_sin_to_cos": True, "freq_shift": 0}
VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
       "layers_per_block": 1, "block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "scaling_factor": 0.18215}
VISION = {"architectures": ["CLIPVisionModelWithProjection"], "hidden_size": 32, "intermediate_size": 64,
          "num_attention_heads": 4, "num_hidden_layers": 2, "image_size": 32, "patch_size": 8,
          "projection_dim": TEXT_WIDTH, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3}


def _tokenizer_files(folder: Path) -> int:
    """A character-level CLIP BPE vocabulary (no merges); returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [c for c in string.ascii_lowercase + string.digits + ",.!?'-"]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}, indent=2))
    return len(vocab)


def _random(module, *inputs, seed: int):
    """Random params of ``module`` for ``inputs``: kernels / embeddings ~ N(0, 1 / fan_in) (Flax's LeCun scale),
    norm scales 1, plus N(0, 0.02^2) on every leaf so that no path (zero-init biases) is trivially silent.

    Shapes from ``jax.eval_shape`` (tracing only): running ``module.init`` eagerly compiles every op of the
    forward on its own, ~30 s per tiny UNet or VAE on a CPU, in every test process.
    """
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(seed), *inputs)["params"]
    paths, tree = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)  # NumPy: one JAX program per leaf shape would cost compiles again
    leaves = []
    for path, leaf in paths:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("kernel", "embedding") and len(leaf.shape) >= 2:
            # fan-in: all but the output axis, which is last for Dense (in, out) and first for conv (out, kh, kw, in)
            fan_in = np.prod(leaf.shape[1:]) if len(leaf.shape) == 4 else np.prod(leaf.shape[:-1])
            value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        elif name == "scale":
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        leaves.append((value + 0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype))
    return jax.tree.unflatten(tree, leaves)


def _mark(folder: Path, components: dict) -> None:
    (folder / MARKER).write_text(WARNING + "\n")
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DreamcraftRandomDemo", "dreamcraft_random_demo": True, **components}, indent=2))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))


def _unet_and_vae(folder: Path, unet_config: dict, seed: int) -> None:
    from dreamcraft_jax.models.unet import UNet2DConditionModel
    from dreamcraft_jax.models.vae import AutoencoderKL

    unet = UNet2DConditionModel.from_config(unet_config)
    save_component(folder / "unet", unet_config, _random(unet, *unet.dummy_inputs(), seed=seed))
    vae = AutoencoderKL.from_config(VAE)
    save_component(folder / "vae", VAE, _random(vae, jnp.zeros((1, 16, 16, 3)), seed=seed + 1))


def make_demo_sd(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random SD-like pipeline folder (unet, vae, text_encoder, tokenizer, scheduler)."""
    from dreamcraft_jax.models.clip import CLIPTextModel

    folder = Path(folder)
    vocab = _tokenizer_files(folder / "tokenizer")
    text_config = {"architectures": ["CLIPTextModel"], "hidden_size": TEXT_WIDTH, "intermediate_size": 64,
                   "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 77,
                   "vocab_size": vocab, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                   "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1}
    text = CLIPTextModel.from_config(text_config)
    save_component(folder / "text_encoder", text_config,
                   _random(text, jnp.zeros((1, 77), jnp.int32), seed=seed + 2), weights_name="model")
    _unet_and_vae(folder, UNET, seed)
    _mark(folder, {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]})
    return folder


def make_demo_zero123(folder: str | Path, seed: int = 10) -> Path:
    """A tiny random Zero123-like folder (8-channel unet, vae, image_encoder, cc_projection, scheduler)."""
    from dreamcraft_jax.models.clip import CLIPVisionModelWithProjection, Zero123CameraProjection

    folder = Path(folder)
    _unet_and_vae(folder, dict(UNET, in_channels=8, use_linear_projection=False, attention_head_dim=2), seed)
    vision = CLIPVisionModelWithProjection.from_config(VISION)
    save_component(folder / "image_encoder", VISION,
                   _random(vision, jnp.zeros((1, 32, 32, 3)), seed=seed + 2), weights_name="model")
    proj = Zero123CameraProjection(in_features=TEXT_WIDTH + 4, out_features=TEXT_WIDTH)
    proj_params = _random(proj, jnp.zeros((1, TEXT_WIDTH + 4)), seed=seed + 3)
    state = {"projection.weight": np.asarray(proj_params["proj"]["kernel"]).T.copy(),
             "projection.bias": np.asarray(proj_params["proj"]["bias"])}
    (folder / "cc_projection").mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file(state, str(folder / "cc_projection" / "diffusion_pytorch_model.safetensors"))
    (folder / "cc_projection" / "config.json").write_text(json.dumps(
        {"in_channels": TEXT_WIDTH + 4, "out_channels": TEXT_WIDTH}))
    _mark(folder, {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                   "cc_projection": ["dreamcraft_jax", "CCProjection"]})
    return folder


def is_random_demo(path: str | Path) -> bool:
    """True for folders written by this module (checked before anything trusts a prior's guidance)."""
    p = Path(path)
    return (p / MARKER).is_file() or (p.parent / MARKER).is_file()


def ensure_demo_priors(root: str | Path) -> tuple[Path, Path]:
    """(sd folder, zero123 folder) under ``root``, written once and reused afterwards."""
    root = Path(root)
    sd, z123 = root / "demo-sd", root / "demo-zero123"
    if not (sd / MARKER).is_file():
        make_demo_sd(sd)
    if not (z123 / MARKER).is_file():
        make_demo_zero123(z123)
    return sd, z123


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m dreamcraft_jax.models.demo_priors OUTPUT_FOLDER", file=sys.stderr)
        sys.exit(2)
    for path in ensure_demo_priors(sys.argv[1]):
        print(f"{path}  ({WARNING})")
