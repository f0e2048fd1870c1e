"""Real architecture configs (diffusers ``config.json`` contents) of the priors, for random-weight benchmarks and
the LDM converter. Plain dicts: no weights, no imports."""

SD21_BASE_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "use_linear_projection": True, "norm_num_groups": 32, "flip_sin_to_cos": True,
    "freq_shift": 0}
# Zero123 / Stable Zero123: the SD 1.x UNet with 8 input channels (noisy latent + conditioning latent).
ZERO123_UNET = dict(SD21_BASE_UNET, sample_size=32, in_channels=8, attention_head_dim=8, cross_attention_dim=768,
                    use_linear_projection=False)
SD_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
    "sample_size": 512, "scaling_factor": 0.18215}
