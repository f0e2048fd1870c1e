"""Export the mesh of a finished (or interrupted) geometry stage: ``python -m dreamcraft_jax.export RUN``.

RUN is a run folder (its ``geometry/`` stage folder is used) or a geometry stage folder. The stage is rebuilt from
the config it ran with, its last checkpoint restored, and the mesh written as ``<out>/mesh/model.glb`` and
``model.obj`` (per-vertex albedo and normals; components below ``geometry.min_component_fraction`` of the largest
removed), as the stage writes it when it ends. ``--out`` defaults to the stage folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamcraft_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder or geometry stage folder")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the stage folder)")
    args = parser.parse_args(argv)

    from dreamcraft_jax.checkpoints import restore_latest
    from dreamcraft_jax.config import ConfigError
    from dreamcraft_jax.config_file import load_stage_config
    from dreamcraft_jax.run_folder import RunFolderError, stage_dir

    try:
        folder = stage_dir(args.run, "geometry")
        cfg = load_stage_config(folder)
        if cfg.stage != "geometry":
            raise ConfigError(f"{folder} is a {cfg.stage} stage folder; the mesh comes from a geometry stage")
    except (RunFolderError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from dreamcraft_jax import parallel
    from dreamcraft_jax.stages.base import build_stage

    stage = build_stage("geometry", cfg, parallel.make_mesh(1, 1))
    state = restore_latest(folder / "checkpoints", stage.init_state())
    written = stage.finish(state, args.out or folder)
    for kind, path in (written or {}).items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
