"""Text to image with a Stable Diffusion folder (DDIM, classifier-free guidance): make a reference image.

    python -m dreamcraft_jax.models.txt2img --model path/to/stable-diffusion-2-1-base \
        --prompt "a red toy mushroom, studio photo, plain white background" --out reference.png

``--model`` is a diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a hub id
already in the local Hugging Face cache. Ask for a plain background and train with
``--config.data.background=flat`` (or cut the object out to RGBA first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dreamcraft_jax.models.clip import load_clip_text, load_tokenizer, tokenize
from dreamcraft_jax.models.loading import WeightLoadingError
from dreamcraft_jax.models.sampling import ddim_sample
from dreamcraft_jax.models.schedules import load_schedule
from dreamcraft_jax.models.unet import load_unet
from dreamcraft_jax.models.vae import AutoencoderKL, load_vae


def encode_prompts(model_path, prompts: list[str], dtype=jnp.float32) -> jax.Array:
    """Prompts -> (len(prompts), 77, D) text embeddings (last hidden state, as the diffusers pipelines)."""
    tokenizer = load_tokenizer(model_path)
    text_model, text_params = load_clip_text(model_path, dtype)
    ids = jnp.asarray(tokenize(tokenizer, prompts, max_length=min(int(tokenizer.model_max_length), 77)))
    return text_model.apply({"params": text_params}, ids).last_hidden_state


def generate(model_path, prompt: str, *, negative_prompt: str = "", height: int = 512, width: int = 512,
             num_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0, batch: int = 1,
             dtype=jnp.float32) -> np.ndarray:
    """Returns (batch, height, width, 3) float32 images in [0, 1]."""
    embeddings = encode_prompts(model_path, [prompt, negative_prompt], dtype)
    unet, unet_params = load_unet(model_path, dtype)
    vae, vae_params = load_vae(model_path, dtype)
    schedule = load_schedule(model_path)
    f = vae.downsample_factor
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f} (the VAE downsampling factor)")
    context = jnp.concatenate([jnp.repeat(embeddings[:1], batch, 0), jnp.repeat(embeddings[1:], batch, 0)])
    x_T = jax.random.normal(jax.random.PRNGKey(seed), (batch, height // f, width // f, unet.in_channels))

    @jax.jit
    def run(x_T, unet_params, vae_params, context):
        def eps_fn(x_t, t):
            out = unet.apply({"params": unet_params}, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                             context)
            return tuple(jnp.split(out, 2))

        latents = ddim_sample(eps_fn, schedule, x_T, num_steps, guidance_scale=guidance_scale)
        images = vae.apply({"params": vae_params}, latents / vae.scaling_factor, method=AutoencoderKL.decode)
        return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)

    return np.asarray(run(x_T, unet_params, vae_params, context))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreamcraft_jax.models.txt2img", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 compute (GPU/TPU)")
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists: choose another --out (nothing is overwritten)", file=sys.stderr)
        return 2
    try:
        images = generate(args.model, args.prompt, negative_prompt=args.negative_prompt, height=args.height,
                          width=args.width, num_steps=args.steps, guidance_scale=args.guidance_scale,
                          seed=args.seed, dtype=jnp.bfloat16 if args.bf16 else jnp.float32)
    except (WeightLoadingError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from dreamcraft_jax.export.media import save_image

    save_image(args.out, images[0])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
