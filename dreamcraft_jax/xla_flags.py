"""XLA flags the project runs with: process-wide, read once when JAX starts its backend (first device use).

``DEFAULT_XLA_FLAGS`` (``cfg.xla_flags``) puts XLA's cuDNN convolutions into its CUDA graphs (command buffers)
as well. Without them every convolution splits the step's graph, so a 1-view SDS step launches ~190 graph
pieces and convolutions one by one. H200, jax 0.11.2, one call, the same host
(`benchmarks/sds/sds_jax_h200_views1_*_round3.json`):

| case | XLA's default list | with +CONVOLUTION | no command buffers |
|---|---|---|---|
| Zero123 SDS 256 px, 1 view: waited-for / pipelined | 8.60 / 11.81 ms | 8.34 / 6.04 ms | 12.11 / 11.51 ms |
| SD SDS 512 px, 1 view: waited-for / pipelined | 15.84 / 12.30 ms | 15.10 / 12.24 ms | 15.24 / 12.50 ms |

The flags only act on GPUs; other backends parse and ignore them.
"""

from __future__ import annotations

import logging
import os
import shlex

log = logging.getLogger(__name__)

DEFAULT_XLA_FLAGS = "--xla_gpu_enable_command_buffer=+CONVOLUTION"


def flag_names(flags: str) -> list[str]:
    """"--a=1 --b" -> ["--a", "--b"]; ValueError for a token that is not a ``--name[=value]`` flag."""
    names = []
    for token in shlex.split(flags):
        name = token.split("=", 1)[0]
        if not name.startswith("--") or len(name) <= 2:
            raise ValueError(f"{token!r} is not an XLA flag: expected --name=value tokens separated by spaces")
        names.append(name)
    return names


def apply_xla_flags(flags: str, environ=None) -> str:
    """Add ``flags`` ("--name=value ...") to ``XLA_FLAGS`` for this process; returns what was added.

    A flag whose name ``XLA_FLAGS`` already sets is left as the user set it. Once JAX's backend has started,
    XLA has read its flags: nothing is changed then, with a warning when the flags are not the defaults (with
    the defaults, e.g. when a library caller has already computed something, a debug line only).
    """
    environ = os.environ if environ is None else environ
    names = flag_names(flags)  # a malformed token stops here, before anything changes
    current = environ.get("XLA_FLAGS", "")
    taken = {token.split("=", 1)[0] for token in current.split()}
    added = [token for token, name in zip(shlex.split(flags), names) if name not in taken]
    if not added:
        return ""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        level = logging.DEBUG if flags == DEFAULT_XLA_FLAGS else logging.WARNING
        log.log(level, "XLA flags %s not applied: JAX's backend has already started in this process (set "
                "XLA_FLAGS before the first JAX computation, or run through train.py)", " ".join(added))
        return ""
    environ["XLA_FLAGS"] = " ".join(filter(None, [current.strip(), *added]))
    return " ".join(added)
