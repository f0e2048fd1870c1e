"""Stage 1b alone, coarse NeuS, from a finished coarse-NeRF run (official dreamcraft3d-coarse-neus settings).

    python train.py --config configs/coarse_neus.py --config.init_from=outputs/dreamcraft3d-<stamp> \
        --config.image=my_rgba.png --config.prompt="a ..." --config.guidance.zero123.pretrained=...

The stage's values are ``overrides.coarse_neus`` of dreamcraft_jax/config.py applied on top of the shared ones.
"""

from dreamcraft_jax.config import base_config


def get_config():
    config = base_config()
    config.name = "coarse_neus"
    config.stage = "coarse_neus"
    return config
