"""Train DreamCraft3D stages from an ml_collections config.

    python train.py --config configs/demo.py
    python train.py --config configs/dreamcraft3d.py --config.image=my_rgba.png --config.prompt="a ..." \
        --config.guidance.zero123.pretrained=path/to/zero123-diffusers
    python train.py --config configs/dreamcraft3d.py:stage=coarse_neus --config.init_from=outputs/<run>
    python train.py --config configs/demo.py --config.resume=outputs/demo-20260101-120000

Overrides are ``--config.a.b=value`` (or ``--config.a.b value``); ``--noprogress`` hides the progress bar. An
unknown key or an invalid value stops with one error line (exit code 2) before anything is computed or written.
The config is loaded by :func:`dreamcraft_jax.config_file.load_config`, as the benches and the tests load it.
"""

from __future__ import annotations

import logging
import sys
import warnings

USAGE = ("usage: python train.py [--config=configs/<name>.py[:arg]] [--config.<key>=<value> ...] [--noprogress]\n"
         "config keys, their defaults and meaning: dreamcraft_jax/config.py")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str]) -> tuple[str, list[str], bool]:
    """(config file spec, ["key=value", ...], progress) from the command line; exits with one error line for
    anything it does not know."""
    spec, overrides, progress = "configs/demo.py", [], True
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name in ("-h", "--help", "-help"):
            print(__doc__ + "\n" + USAGE)
            sys.exit(0)
        if name in ("--progress", "--noprogress") and not eq:
            progress = name == "--progress"
        elif name == "--config":
            if not eq:
                if not args:
                    _fail("--config needs a config file: --config=configs/<name>.py")
                value = args.pop(0)
            spec = value
        elif name.startswith("--config."):
            if not eq:
                if not args or args[0].startswith("--"):
                    _fail(f"{name} needs a value: {name}=<value>")
                value = args.pop(0)
            overrides.append(f"{name[len('--config.'):]}={value}")
        else:
            _fail(f"unknown argument {arg!r}\n{USAGE}")
    return spec, overrides, progress


def main(argv: list[str]) -> None:
    spec, overrides, progress = parse_args(argv)
    # Orbax logs every checkpoint step at INFO, and a read-only restore of the previous stage with three WARNINGs,
    # through absl; keep the console for our own messages.
    logging.basicConfig(format="%(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("dreamcraft_jax").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")  # imageio-ffmpeg's encoder process
    from dreamcraft_jax.config import ConfigError
    from dreamcraft_jax.config_file import load_config
    from dreamcraft_jax.data.reference import ReferenceImageError
    from dreamcraft_jax.guidance.priors import PriorUnavailableError
    from dreamcraft_jax.runner import RunFolderError, train

    try:
        cfg = load_config(spec, overrides)
        workdir = train(cfg, progress=progress)
    except (ConfigError, ReferenceImageError, RunFolderError, PriorUnavailableError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted: a last checkpoint was written; continue with --config.resume=<run folder>",
              file=sys.stderr)
        sys.exit(130)
    print(f"done: {workdir}")


if __name__ == "__main__":
    main(sys.argv[1:])
