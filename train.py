"""Train a DreamCraft3D stage from an ml_collections config.

    python train.py --config configs/demo.py
    python train.py --config configs/coarse_nerf.py --config.image=my_rgba.png --config.train.max_steps=2000
    python train.py --config configs/demo.py --config.resume=outputs/demo-20260101-120000

Overrides are ``--config.a.b=value``. An unknown key or an invalid value stops with one error line (exit code 2)
before anything is computed or written.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Path to a config file in configs/.",
                                          lock_config=True)
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl flag parsing that turns every config problem into one readable line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    except (AttributeError, KeyError) as e:
        # ml_collections raises these for a key that is not in the config.
        key = str(e).strip("\"'")
        _fail(f"unknown config key {key}: check the spelling against the config file "
              "(python train.py --config=<file> --helpfull lists none of them; read the file)")
    except (TypeError, ValueError) as e:
        _fail(f"bad config override: {e}")
    except (FileNotFoundError, ImportError, SyntaxError) as e:
        _fail(f"cannot load the config file: {e}")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dreamcraft_jax.config import ConfigError
    from dreamcraft_jax.data.reference import ReferenceImageError
    from dreamcraft_jax.runner import RunFolderError, train

    cfg = _CONFIG.value
    try:
        workdir = train(cfg, progress=flags.FLAGS.progress)
    except (ConfigError, ReferenceImageError, RunFolderError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted: a last checkpoint was written; continue with --config.resume=<run folder>",
              file=sys.stderr)
        sys.exit(130)
    print(f"done: {workdir}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
