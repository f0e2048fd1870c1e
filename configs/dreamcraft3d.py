"""DreamCraft3D stage 1 (geometry sculpting): coarse NeRF (1a) then coarse NeuS (1b), official settings.

    python train.py --config configs/dreamcraft3d.py --config.image=my_rgba.png --config.prompt="a ..." \
        --config.guidance.zero123.pretrained=path/to/stable-zero123-diffusers

1a: hash grid L16 F2 T2^19 with a progressive band, softplus density with the blob_magic3d bias, 512 steps per ray
through a 32^3 occupancy grid, 128 px until step 3000 then 384, alternate reference / guidance steps, SD 2.1-base
(CFG 20, Perp-Neg, view-dependent prompts) + Stable Zero123 (CFG 5), both with timestep ranges annealed over 200
steps, all DreamCraft3D loss weights and schedules; 5000 steps.
1b (``overrides.coarse_neus``): NeuS from 1a's hash grid and feature MLP, 256 px, fixed timestep range 0.2-0.5,
orient 10, sparsity 0.1, opaque 0.1; per-group learning rates; 5000 steps.
One stage: ``--config=configs/dreamcraft3d.py:stage=coarse_nerf``, or ``:stage=coarse_neus`` with
``--config.init_from=<run folder of stage 1a>`` (the same as ``--config.stage=...``).
"""

from dreamcraft_jax.config import base_config


def get_config(arg: str | None = None):
    """``arg``: "" or "stage=<name>" (``configs/dreamcraft3d.py:stage=coarse_neus``)."""
    config = base_config()
    config.name = "dreamcraft3d"
    config.stage = "all"
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key != "stage":
            raise ValueError(f"configs/dreamcraft3d.py:{arg}: expected stage=<name>")
        config.stage = value
    return config
