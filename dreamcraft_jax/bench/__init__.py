"""Benchmarks with JSON output: ``python -m dreamcraft_jax.bench [--xla_flags FLAGS] <bench> [options]``.

One module per bench, each with ``add_parser(subparsers)`` and ``run(args) -> dict`` (its report, the JSON
``--out`` writes):

    render    coarse-stage render forward+backward per backend variant, split into its parts
    sds       SD / Zero123 SDS steps (real shapes, random weights): ms, views/s, TFLOP/s
    stage     full coarse NeRF / NeuS steps with real-size random priors, and the projected run time
    eval      evaluation renders per sample budget, and what a smaller budget loses
    hashgrid  hash-grid encoding, XLA vs the Pallas kernel's backwards
    gn_sums   GroupNorm per-channel sums, XLA vs the split-row kernels' launch plans
    fd        the finite-difference hash-grid kernel over launch shapes
    project   the official run's wall time from `bench stage` / `bench eval` files
    scaling   weak / strong scaling over the devices of one host (+ plot with the ``plots`` extra)
    profile   per-op device time from a profiler trace
    compile   a step's first call (trace + lower, XLA compile) per XLA flag set, each in a fresh process

Shared pieces: :mod:`~dreamcraft_jax.bench.harness` (timing, JSON headers), :mod:`~dreamcraft_jax.bench.scenes`
(the fitted scene and stage-step set-ups), :mod:`~dreamcraft_jax.bench.report` (tables, plot),
:mod:`~dreamcraft_jax.bench.cli` (the command line).
"""

from __future__ import annotations


def main(argv=None) -> int:
    """:func:`dreamcraft_jax.bench.cli.main` (imported on call: importing the package loads no bench)."""
    from dreamcraft_jax.bench.cli import main as cli_main

    return cli_main(argv)
