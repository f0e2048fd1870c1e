"""Convert an original zero123 / stable-zero123 LDM ``.ckpt`` into a diffusers-format folder.

    pip install "dreamcraft-jax[convert]"     # torch + diffusers are needed for this one-off step only
    python -m dreamcraft_jax.models.convert_ldm --ckpt stable_zero123.ckpt --out stable-zero123-diffusers \
        [--image-encoder path/to/clip-vit-large-patch14]

Writes ``unet/`` (in_channels 8, SD1-style), ``vae/``, ``cc_projection/`` (keys ``projection.*``, in 772 -> 768),
``image_encoder/`` (CLIP ViT-L/14 with projection, converted from the checkpoint's OpenAI-CLIP
``cond_stage_model`` when present, else copied from ``--image-encoder``), ``scheduler/`` (scaled-linear
0.00085-0.012, 1000 steps, epsilon) and ``model_index.json``. The result loads with
``dreamcraft_jax.models`` (``load_unet``, ``load_vae``, ``load_clip_vision``, ``load_camera_projection``).

The UNet and VAE key renames are diffusers' own (``diffusers.loaders.single_file_utils``); each converted part is
loaded strictly into the diffusers module before it is saved, so a mismatch fails here, not at training time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from dreamcraft_jax.models.reference_configs import SD_VAE, ZERO123_UNET  # noqa: E402

SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon", "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}
CLIP_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_checkpoint(path: Path) -> dict:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # Lightning checkpoints pickle more than tensors; only do this for files you trust.
        print("warning: the checkpoint holds non-tensor objects; loading it with pickle (trusted files only)",
              file=sys.stderr)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt.get("state_dict", ckpt)


def openai_clip_visual_to_hf(sd: dict, prefix: str) -> dict:
    """OpenAI-CLIP ``visual.*`` tensors -> transformers CLIPVisionModelWithProjection keys."""
    out = {}
    def v(k):
        return sd[prefix + k]

    out["vision_model.embeddings.patch_embedding.weight"] = v("conv1.weight")
    out["vision_model.embeddings.class_embedding"] = v("class_embedding")
    out["vision_model.embeddings.position_embedding.weight"] = v("positional_embedding")
    out["vision_model.pre_layrnorm.weight"] = v("ln_pre.weight")
    out["vision_model.pre_layrnorm.bias"] = v("ln_pre.bias")
    out["vision_model.post_layernorm.weight"] = v("ln_post.weight")
    out["vision_model.post_layernorm.bias"] = v("ln_post.bias")
    out["visual_projection.weight"] = v("proj").T.contiguous()
    i = 0
    while f"{prefix}transformer.resblocks.{i}.ln_1.weight" in sd:
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        q, k, w = v(src + "attn.in_proj_weight").chunk(3)
        qb, kb, wb = v(src + "attn.in_proj_bias").chunk(3)
        for name, weight, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", w, wb)):
            out[dst + f"self_attn.{name}.weight"], out[dst + f"self_attn.{name}.bias"] = weight, bias
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, b in pairs.items():
            out[dst + b + ".weight"], out[dst + b + ".bias"] = v(src + a + ".weight"), v(src + a + ".bias")
        i += 1
    return out


def convert(ckpt_path: Path, out: Path, image_encoder: Path | None) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import save_file

    sd = load_checkpoint(ckpt_path)
    if "model.diffusion_model.input_blocks.0.0.weight" not in sd:
        _fail(f"{ckpt_path} is not an LDM checkpoint (no model.diffusion_model.* keys)")
    in_channels = int(sd["model.diffusion_model.input_blocks.0.0.weight"].shape[1])
    unet_cfg = dict({k: v for k, v in ZERO123_UNET.items() if not k.startswith('_')}, in_channels=in_channels)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet.config), strict=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae = AutoencoderKL(**{k: v for k, v in SD_VAE.items() if not k.startswith('_')})
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae.config), strict=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)

    if "cc_projection.weight" not in sd:
        _fail(f"{ckpt_path} has no cc_projection.* weights: not a zero123 checkpoint")
    w, b = sd["cc_projection.weight"], sd["cc_projection.bias"]
    (out / "cc_projection").mkdir(parents=True, exist_ok=True)
    save_file({"projection.weight": w.float().contiguous(), "projection.bias": b.float().contiguous()},
              str(out / "cc_projection" / "diffusion_pytorch_model.safetensors"))
    (out / "cc_projection" / "config.json").write_text(json.dumps(
        {"in_channels": int(w.shape[1]), "out_channels": int(w.shape[0])}, indent=2))

    prefix = next((p for p in ("cond_stage_model.model.visual.", "cond_stage_model.visual.")
                   if p + "conv1.weight" in sd), None)
    if prefix is not None:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION))
        state = {k: t.float() for k, t in openai_clip_visual_to_hf(sd, prefix).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if [m for m in missing if "position_ids" not in m] or unexpected:
            _fail(f"CLIP image encoder conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.save_pretrained(out / "image_encoder", safe_serialization=True)
    elif image_encoder is not None:
        src = image_encoder / "image_encoder" if (image_encoder / "image_encoder").is_dir() else image_encoder
        shutil.copytree(src, out / "image_encoder", dirs_exist_ok=True)
    else:
        _fail("the checkpoint has no CLIP image encoder: pass --image-encoder with a local "
              "CLIPVisionModelWithProjection folder (openai/clip-vit-large-patch14)")

    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (out / "scheduler" / "config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "Zero1to3StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "cc_projection": ["dreamcraft_jax", "CCProjection"], "scheduler": ["diffusers", "DDIMScheduler"]}, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreamcraft_jax.models.convert_ldm", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--image-encoder", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        _fail('the converter needs torch and diffusers: pip install "dreamcraft-jax[convert]"')
    if not args.ckpt.is_file():
        _fail(f"checkpoint {args.ckpt} not found")
    if args.out.exists() and any(args.out.iterdir()):
        _fail(f"output folder {args.out} exists and is not empty: choose a new one")
    convert(args.ckpt, args.out, args.image_encoder)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
