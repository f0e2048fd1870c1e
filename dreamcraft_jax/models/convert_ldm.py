"""Convert an original zero123 / stable-zero123 LDM ``.ckpt`` into a diffusers-format folder.

    pip install "dreamcraft-jax[convert]"     # torch + diffusers are needed for this one-off step only
    python -m dreamcraft_jax.models.convert_ldm --ckpt stable_zero123.ckpt --out stable-zero123-diffusers \
        [--image-encoder path/to/clip-vit-large-patch14] [--no-ema]

Writes ``unet/`` (in_channels 8, SD1-style), ``vae/``, ``cc_projection/`` (keys ``projection.*``, in 772 -> 768),
``image_encoder/`` (CLIP ViT-L/14 with projection, converted from the checkpoint's OpenAI-CLIP
``cond_stage_model`` when present, else copied from ``--image-encoder``), ``scheduler/`` (scaled-linear
0.00085-0.012, 1000 steps, epsilon), ``model_index.json`` and ``conversion.json`` (the source checkpoint's name
and which UNet weights were used). The result loads with ``dreamcraft_jax.models`` (``load_unet``, ``load_vae``,
``load_clip_vision``, ``load_camera_projection``).

UNet weights: the official Zero123 / Stable Zero123 guidance loads the checkpoint and then runs
``model.model_ema.copy_to(model.model)``, i.e. it samples with the EMA weights. LitEma keeps the EMA of parameter
``diffusion_model.<path>`` of the LDM's ``model`` as the buffer ``model_ema.<path without dots>`` (next to
``model_ema.decay`` and ``model_ema.num_updates``), so ``model.diffusion_model.input_blocks.0.0.weight`` has its EMA
in ``model_ema.diffusion_modelinput_blocks00weight``. The converter uses those when the checkpoint has them
(:func:`select_unet_weights`); ``--no-ema`` keeps the raw ``model.diffusion_model.*`` weights. Only the UNet has an
EMA in these checkpoints (the VAE, CLIP encoder and ``cc_projection`` are used as stored).

The UNet and VAE key renames are diffusers' own (``diffusers.loaders.single_file_utils``); each converted part is
loaded strictly into the diffusers module before it is saved, so a mismatch fails here, not at training time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from dreamcraft_jax.models.reference_configs import SD_VAE, ZERO123_UNET  # noqa: E402

SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon", "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}
CLIP_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")  # LitEma buffers that are not weights


class EmaWeightsError(ValueError):
    """The checkpoint's ``model_ema.*`` set does not cover its UNet: says what is wrong and what to do."""


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def ema_key(unet_key: str) -> str:
    """LitEma's buffer name of a UNet parameter.

    ``model.diffusion_model.input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``: LitEma
    wraps the LDM's ``model`` (so names start at ``diffusion_model.``) and drops the dots, which buffer names
    cannot hold.
    """
    if not unet_key.startswith(UNET_PREFIX):
        raise ValueError(f"{unet_key!r} is not a UNet key (expected the prefix {UNET_PREFIX!r})")
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


class UnetWeights(NamedTuple):
    state_dict: dict  # the input mapping, ``model.diffusion_model.*`` replaced by the chosen weights
    source: str  # "ema" or "raw"
    unet_tensors: int  # number of ``model.diffusion_model.*`` tensors
    ema_tensors: int  # number of ``model_ema.*`` weight tensors in the checkpoint (bookkeeping buffers excluded)
    unused_ema: tuple  # ``model_ema.*`` weight keys that match no UNet parameter (ignored, as by LitEma.copy_to)


def select_unet_weights(sd: Mapping[str, Any], use_ema: bool = True) -> UnetWeights:
    """Pick the UNet weights of an LDM state dict the way the official guidance does (torch-free).

    ``sd``: key -> array (numpy arrays or torch tensors; only ``.shape`` is read). When ``use_ema`` and ``sd`` holds
    ``model_ema.*`` weights, every ``model.diffusion_model.K`` is replaced by ``sd[ema_key(K)]`` (source "ema"),
    otherwise nothing changes (source "raw"). Other keys, the ``model_ema.*`` ones included, pass through.

    Raises EmaWeightsError when EMA weights exist but some UNet parameter has none, or one of another shape:
    a half-EMA UNet would be neither model, so it is refused rather than mixed.
    """
    unet_keys = [k for k in sd if k.startswith(UNET_PREFIX)]
    ema_keys = [k for k in sd if k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING]
    if not use_ema or not ema_keys:
        return UnetWeights(dict(sd), "raw", len(unet_keys), len(ema_keys), ())
    names = {k: ema_key(k) for k in unet_keys}
    missing = [k for k in unet_keys if names[k] not in sd]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {names[k]} {tuple(sd[names[k]].shape)}"
                  for k in unet_keys if names[k] in sd and tuple(sd[k].shape) != tuple(sd[names[k]].shape)]
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of the {len(unet_keys)} UNet parameters have no EMA copy (first: "
                            f"{missing[0]}, expected as {names[missing[0]]})")
        if mismatched:
            problems.append(f"{len(mismatched)} EMA copies differ in shape (first: {mismatched[0]})")
        raise EmaWeightsError(
            f"the checkpoint has {len(ema_keys)} EMA tensors (model_ema.*) but they do not match its UNet: "
            f"{'; '.join(problems)}. The official guidance would load the EMA weights, so the checkpoint looks "
            f"damaged or comes from another model; re-download it, or pass --no-ema to convert the raw "
            f"model.diffusion_model.* weights")
    used = set(names.values())
    out = dict(sd)
    for k in unet_keys:
        out[k] = sd[names[k]]
    return UnetWeights(out, "ema", len(unet_keys), len(ema_keys), tuple(k for k in ema_keys if k not in used))


def describe(weights: UnetWeights, use_ema: bool) -> str:
    """One line for the console, e.g. ``UNet weights: EMA (model_ema.*, 686 tensors)``."""
    if weights.source == "ema":
        return f"UNet weights: EMA (model_ema.*, {weights.unet_tensors} tensors)"
    why = "--no-ema" if weights.ema_tensors and not use_ema else "the checkpoint has no model_ema.* weights"
    return f"UNet weights: raw (model.diffusion_model.*, {weights.unet_tensors} tensors; {why})"


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


def convert(ckpt_path: Path, out: Path, image_encoder: Path | None, *, use_ema: bool = True,
            unet_config: Mapping[str, Any] = ZERO123_UNET, vae_config: Mapping[str, Any] = SD_VAE) -> UnetWeights:
    """Convert ``ckpt_path`` into the diffusers folder ``out``; returns the UNet weight choice.

    ``unet_config`` / ``vae_config``: diffusers configs of the checkpoint's UNet (``in_channels`` is taken from
    the checkpoint) and VAE; the defaults are the released models' (tests pass tiny ones).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import save_file

    sd = load_checkpoint(ckpt_path)
    if "model.diffusion_model.input_blocks.0.0.weight" not in sd:
        _fail(f"{ckpt_path} is not an LDM checkpoint (no model.diffusion_model.* keys)")
    try:
        weights = select_unet_weights(sd, use_ema)
    except EmaWeightsError as e:
        _fail(str(e))
    print(describe(weights, use_ema))
    if weights.unused_ema:
        print(f"warning: ignored {len(weights.unused_ema)} model_ema.* tensors that match no UNet parameter "
              f"(first: {weights.unused_ema[0]})", file=sys.stderr)
    sd = weights.state_dict
    in_channels = int(sd["model.diffusion_model.input_blocks.0.0.weight"].shape[1])
    unet_cfg = dict({k: v for k, v in unet_config.items() if not k.startswith('_')}, in_channels=in_channels)
    unet = UNet2DConditionModel(**unet_cfg)
    # extract_ema stays False: the EMA choice is made above (diffusers' own switch would silently fall back).
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet.config), strict=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae = AutoencoderKL(**{k: v for k, v in vae_config.items() if not k.startswith('_')})
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
    # Our own record (unet/config.json belongs to diffusers): which weights this folder holds.
    (out / "conversion.json").write_text(json.dumps({
        "source_checkpoint": ckpt_path.name, "unet_weights": weights.source,
        "unet_weights_keys": "model_ema.*" if weights.source == "ema" else "model.diffusion_model.*",
        "unet_tensors": weights.unet_tensors, "ema_tensors_in_checkpoint": weights.ema_tensors,
        "no_ema_flag": not use_ema}, indent=2))
    return weights


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamcraft_jax.models.convert_ldm", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--image-encoder", type=Path, default=None)
    p.add_argument("--no-ema", action="store_true",
                   help="convert the raw model.diffusion_model.* UNet weights instead of the EMA ones (model_ema.*) "
                        "that the official guidance uses")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        _fail('the converter needs torch and diffusers: pip install "dreamcraft-jax[convert]"')
    if not args.ckpt.is_file():
        _fail(f"checkpoint {args.ckpt} not found")
    if args.out.exists() and any(args.out.iterdir()):
        _fail(f"output folder {args.out} exists and is not empty: choose a new one")
    convert(args.ckpt, args.out, args.image_encoder, use_ema=not args.no_ema)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
