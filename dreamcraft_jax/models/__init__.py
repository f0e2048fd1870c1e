"""Flax diffusion models (UNet, VAE, CLIP) loading diffusers / transformers weights; see loading.py."""
