"""The one config loader: a config file (``configs/*.py`` with ``get_config()``) plus ``key=value`` overrides.

train.py, the benches, the scripts and the tests all load configs through :func:`load_config`, so an override
means the same everywhere. Parsing and typing of the overrides is ml_collections' own (``config_flags``, as
``--config.key=value`` on a command line): a value is parsed as the type of the key it replaces (a tuple from
``"(1, 2)"``, a schedule from ``"(0, 0.7, 0.2, 200)"``, a bool from ``true`` / ``false``). Problems come back as
one :class:`~dreamcraft_jax.config.ConfigError` line naming the key.

    cfg = load_config("configs/demo.py", ["train.max_steps=20", "loss.lambda_sd=0.0"])
    cfg = load_config("configs/dreamcraft3d.py:stage=coarse_neus")   # get_config("stage=coarse_neus")
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

from dreamcraft_jax.config import ConfigError, validate

ROOT = Path(__file__).resolve().parent.parent


def _unknown_key_message(error: Exception, overrides: Sequence[str]) -> str:
    message = str(error).replace("\\", "")
    found = re.search(r"'([^'\s]+)'", message)
    key = found.group(1) if found else message.strip("\"'")
    suggestion = re.search(r'Did you mean "([^"]+)"', message)
    culprit = next((o for o in overrides if key in o.split("=")[0].split(".")), None)
    where = f" in --config.{culprit.split('=')[0]}" if culprit else ""
    hint = f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
    return (f"unknown config key {key!r}{where}: no such field in the config{hint} "
            "(defaults and their meaning: dreamcraft_jax/config.py)")


def resolve_path(spec: str) -> str:
    """``path[:arg]`` with a relative path tried from the working directory, then from the checkout."""
    path, sep, arg = spec.partition(":")
    if not Path(path).is_file() and (ROOT / path).is_file():
        path = str(ROOT / path)
    if not Path(path).is_file():
        raise ConfigError(f"config file {path!r} not found (pass --config=configs/<name>.py)")
    return path + sep + arg


def load_config(spec: str, overrides: Sequence[str] = (), check: bool = True):
    """The locked, validated ConfigDict of ``spec`` (``path`` or ``path:arg``) with ``overrides`` applied.

    ``overrides``: ``"key=value"`` strings (``"train.max_steps=20"``), or ``"key"`` alone for a bool set to True.
    ``check=False`` skips :func:`~dreamcraft_jax.config.validate` (tests that then set invalid values on purpose).
    """
    from absl import flags
    from ml_collections import config_flags

    spec = resolve_path(spec)
    argv = ["dreamcraft_jax", f"--config={spec}", *(f"--config.{o}" for o in overrides)]
    fv = flags.FlagValues()
    saved = sys.argv
    sys.argv = argv  # ml_collections registers the override flags it finds in sys.argv when the flag is defined
    try:
        config_flags.DEFINE_config_file("config", spec, flag_values=fv, lock_config=True)
        fv(argv)
        cfg = fv.config
    except (AttributeError, KeyError) as e:
        raise ConfigError(_unknown_key_message(e, overrides)) from None
    except flags.Error as e:
        raise ConfigError(" ".join(str(e).split())) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad config override: {' '.join(str(e).split())}") from None
    except (OSError, ImportError, SyntaxError) as e:
        raise ConfigError("cannot load the config file: " + " ".join(str(e).split())) from None
    finally:
        sys.argv = saved
    if check:
        validate(cfg)
    return cfg


def load_stage_config(stage_folder: str | Path):
    """The resolved config a finished stage ran with, from ``<stage folder>/config.json`` (the last
    ``config.resume-<step>.json`` when it was resumed): today's defaults with every value the file holds laid over
    them (lists back to tuples where the default is one), so a key added since still has its default."""
    import json

    from dreamcraft_jax.config import base_config, stage_config

    folder = Path(stage_folder)
    files = sorted(folder.glob("config.resume-*.json"), key=lambda p: int(p.stem.split("-")[-1]))
    path = files[-1] if files else folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no config.json: not a stage folder of a run (e.g. <run>/geometry)")
    saved = json.loads(path.read_text())
    cfg = stage_config(base_config(), saved.get("stage", "coarse_nerf")).unlock()

    def overlay(node, values, prefix=""):
        for key, value in values.items():
            if key not in node:
                continue  # a key this version no longer has
            current = node[key]
            if hasattr(current, "keys") and isinstance(value, dict):
                overlay(current, value, f"{prefix}{key}.")
            else:
                node[key] = tuple(value) if isinstance(value, list) else value

    overlay(cfg, saved)
    cfg.lock()
    return cfg
