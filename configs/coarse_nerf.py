"""Stage 1a, coarse NeRF, with the official DreamCraft3D numbers (dreamcraft3d-coarse-nerf).

Hash grid L16 F2 T2^19 base 16 scale 1.4473 with a progressive band (8 levels, +1 every 500 steps from 2000);
64-wide MLPs; softplus density with the blob_magic3d bias; finite-difference normals (eps 0.01); 512 steps per
ray through a 32^3 occupancy grid (alpha threshold 0.01); 128 px until step 3000, then 384; alternate reference /
guidance steps (SD 2.1-base SDS with Perp-Neg, CFG 20 + Stable Zero123 SDS, CFG 5, timestep ranges annealed
over 200 steps); Adam lr 0.01 betas (0.9, 0.99). All of these are the defaults of dreamcraft_jax.config.
Stage 1a only; configs/dreamcraft3d.py runs 1a then 1b.
"""

from dreamcraft_jax.config import base_config


def get_config():
    config = base_config()
    config.name = "coarse_nerf"
    return config
