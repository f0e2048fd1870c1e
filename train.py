"""Train a DreamCraft3D stage from an ml_collections config.

    python train.py --config configs/demo.py
    python train.py --config configs/dreamcraft3d.py --config.image=my_rgba.png --config.prompt="a ..." \
        --config.guidance.zero123.pretrained=path/to/zero123-diffusers
    python train.py --config configs/demo.py --config.resume=outputs/demo-20260101-120000

Overrides are ``--config.a.b=value``. An unknown key or an invalid value stops with one error line (exit code 2)
before anything is computed or written.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

from absl import app, flags
from ml_collections import config_flags


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _unknown_key(error: Exception, argv) -> None:
    message = str(error).replace("\\", "")
    found = re.search(r"'([^'\s]+)'", message)
    key = found.group(1) if found else message.strip("\"'")
    suggestion = re.search(r'Did you mean "([^"]+)"', message)
    culprit = next((a for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")), None)
    where = f" in {culprit.split('=')[0]}" if culprit else ""
    hint = f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
    _fail(f"unknown config key {key!r}{where}: no such field in the config{hint} "
          "(defaults and their meaning: dreamcraft_jax/config.py)")


try:
    # ml_collections applies the --config.* overrides from sys.argv while defining the flag.
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Path to a config file in configs/.",
                                              lock_config=True)
except (AttributeError, KeyError) as _e:
    _unknown_key(_e, sys.argv)
except (TypeError, ValueError) as _e:
    _fail(f"bad config override: {_e}")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def parse_flags(argv):
    """absl flag parsing that turns every config problem into one readable line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    except (AttributeError, KeyError) as e:
        # ml_collections raises these for a key that is not in the config.
        _unknown_key(e, argv)
    except (TypeError, ValueError) as e:
        _fail(f"bad config override: {e}")
    except (OSError, ImportError, SyntaxError) as e:
        _fail("cannot load the config file: " + " ".join(str(e).split()))


def main(argv):
    del argv
    # Orbax logs every checkpoint step at INFO through absl; keep the console for our own messages.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("dreamcraft_jax").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")  # imageio-ffmpeg's encoder process
    from dreamcraft_jax.config import ConfigError
    from dreamcraft_jax.data.reference import ReferenceImageError
    from dreamcraft_jax.guidance.priors import PriorUnavailableError
    from dreamcraft_jax.runner import RunFolderError, train

    cfg = _CONFIG.value
    try:
        workdir = train(cfg, progress=flags.FLAGS.progress)
    except (ConfigError, ReferenceImageError, RunFolderError, PriorUnavailableError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted: a last checkpoint was written; continue with --config.resume=<run folder>",
              file=sys.stderr)
        sys.exit(130)
    print(f"done: {workdir}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
