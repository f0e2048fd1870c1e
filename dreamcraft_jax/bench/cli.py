"""The command line of the benches: ``python -m dreamcraft_jax.bench [--xla_flags FLAGS] <bench> [options]``.

Benches (one module each, ``--help`` on each lists its options): render, sds, stage, eval, hashgrid, gn_sums,
fd, project, scaling, profile, compile, raster, geometry. Each module has ``add_parser(subparsers)`` and
``run(args) -> dict`` (the report; it prints its own table); this module parses, sets the process-wide XLA
environment before the backend starts, runs the bench and writes its report as JSON to ``--out``.

Values that start with ``--`` (XLA flags) are accepted after ``--xla_flags`` in both forms:
``--xla_flags=--xla_gpu_enable_command_buffer=`` and ``--xla_flags "--xla_gpu_enable_command_buffer="``.
A config problem (unknown key, bad value, missing file) stops the bench with ``error: <message>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dreamcraft_jax.bench import compile as compile_bench
from dreamcraft_jax.bench import eval as eval_bench
from dreamcraft_jax.bench import fd, geometry, gn_sums, hashgrid, project, raster, render, scaling, sds, stage
from dreamcraft_jax.bench import profile as profile_bench
from dreamcraft_jax.config import ConfigError
from dreamcraft_jax.xla_flags import DEFAULT_XLA_FLAGS, apply_xla_flags

# In the order `--help` lists them.
BENCHES = {"render": render, "sds": sds, "stage": stage, "eval": eval_bench, "hashgrid": hashgrid,
           "gn_sums": gn_sums, "fd": fd, "project": project, "scaling": scaling, "profile": profile_bench,
           "compile": compile_bench, "raster": raster, "geometry": geometry}

# Top-level options whose value may itself start with "--" (argparse would take it for an option).
DASH_VALUE_OPTIONS = ("--xla_flags",)


def join_dash_values(argv: Sequence[str], options: Sequence[str] = DASH_VALUE_OPTIONS) -> list[str]:
    """``["--xla_flags", "--xla_x=1", "sds"]`` -> ``["--xla_flags=--xla_x=1", "sds"]``: each of ``options``
    before the bench's name is joined with the token after it, whatever that token starts with (argparse reads
    ``--opt=VALUE`` as that value, but stops at a separate ``--VALUE`` with a usage error). Tokens from the
    bench's name on are left as they are."""
    argv, out, i = list(argv), [], 0
    while i < len(argv):
        token = argv[i]
        if token in options and i + 1 < len(argv):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        if token in BENCHES or token == "--":  # the bench's own arguments follow
            return out + argv[i:]
        out.append(token)
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreamcraft_jax.bench",
                                     description="Benchmarks with JSON output (--out); see each bench's --help.")
    parser.add_argument("--xla_flags", default=DEFAULT_XLA_FLAGS,
                        help="added to XLA_FLAGS before the backend starts, as training does (cfg.xla_flags; a "
                             "flag already in XLA_FLAGS wins); '' = XLA's defaults. Goes before the benchmark's "
                             "name: python -m dreamcraft_jax.bench --xla_flags '' sds ..., or "
                             "--xla_flags='--xla_gpu_enable_command_buffer=' sds ...")
    sub = parser.add_subparsers(dest="what", required=True)
    for module in BENCHES.values():
        module.add_parser(sub)
    return parser


def write_report(path: str, report: dict) -> None:
    """The report as indented JSON at ``path`` (folders created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(join_dash_values(sys.argv[1:] if argv is None else argv))
    module = BENCHES[args.what]
    # XLA's GPU client takes 75% of device memory by default; one executable's temporaries live in one buffer
    # (the 4-view 384 px NeRF step asks for ~100 GiB of an H200's 141), so the benches take 90% unless told
    # otherwise. Read when the backend starts, at the first device use in the bench.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    prepare = getattr(module, "prepare_environment", None)
    if prepare is not None:  # environment the bench needs before the backend starts
        prepare(args)
    try:
        apply_xla_flags(args.xla_flags)
    except ValueError as e:
        raise SystemExit(f"error: --xla_flags: {e}") from None
    try:
        report = module.run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report is None:  # a child process of the compile bench: its result line is printed
        return 0
    if args.out:
        write_report(args.out, report)
        print(f"wrote {args.out}")
    return 0
