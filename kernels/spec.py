"""Which kernels a run takes: one static, hashable :class:`KernelSpec`, passed down explicitly.

The spec mirrors the config section ``kernels`` (``dreamcraft_jax.config.base_config``) key for key, with
``backend`` resolved ("auto" -> "pallas" on a GPU, "xla" elsewhere). Build it once, outside jit, with
:meth:`KernelSpec.from_config` and hand it to the field / render specs (``NerfFieldSpec.from_config(cfg.field,
kernels)``, ``RenderSpec.from_config(cfg.render, radius, kernels)``) and to the priors' models (their GroupNorms);
nothing reads a module-level switch. ``KernelSpec()`` is the pure-jnp / XLA reference path everywhere.

This module imports no kernel and no jax, only numpy (the specs of fields and renderer import it; a kernel import
here would bring the cycle back).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["KernelSpec", "KernelConfigError", "REFERENCE_KERNELS", "resolve_backend", "BACKENDS",
           "HASHGRID_BACKWARDS", "FUSED_MLP_PRECISIONS", "SUMS_PLAN_KEYS"]

# kernels.backend: "auto" resolves to "pallas" on a GPU, "xla" on CPU and TPU (no TPU lowering exists).
BACKENDS = ("auto", "pallas", "xla")
# kernels.hashgrid_backward: XLA's scatter-add, the kernel's float atomics, or atomics with the coarse levels
# pre-reduced per block of packed samples (kernels/hashgrid.py).
HASHGRID_BACKWARDS = ("xla", "atomic", "reduced")
# kernels.fused_mlp_precision: input precision of the fused MLP kernels' matmuls on a GPU (kernels/mlp.py).
FUSED_MLP_PRECISIONS = ("tf32", "tf32x3", "ieee")
# Keywords of kernels.channel_sums.plan a spec may fix for every GroupNorm sums call (benches compare plans).
SUMS_PLAN_KEYS = ("chunk", "num_warps", "num_stages", "target_programs", "fold")

_BOOL_KEYS = ("fused_density", "fused_finite_difference", "fused_mlp", "encoder_per_level", "fd_columns",
              "fused_groupnorm", "raster_zbuffer")


class KernelConfigError(ValueError):
    """A ``kernels.*`` value is invalid; the message names the key, the value and what is allowed.

    Same message as ``dreamcraft_jax.config.ConfigError`` (which this module cannot import: config imports the
    fields, which import this module)."""


def _fail(key: str, value, expected: str):
    raise KernelConfigError(f"invalid config value kernels.{key}={value!r}: expected {expected}")


def _choices(values) -> str:
    return "one of " + ", ".join(repr(v) for v in values)


def resolve_backend(name: str) -> str:
    """"auto" -> "pallas" on a GPU default backend, "xla" elsewhere; "pallas" / "xla" unchanged."""
    if name not in BACKENDS:
        _fail("backend", name, _choices(BACKENDS))
    if name != "auto":
        return name
    import jax  # only to ask for the default backend; jax is loaded anyway by whoever resolves "auto"

    return "pallas" if jax.default_backend() == "gpu" else "xla"


def _is_bool(value) -> bool:
    # numpy bools come out of some config round trips (np.asarray, loaded arrays); they are not ``bool`` instances.
    return isinstance(value, (bool, np.bool_))


def _as_plan(plan) -> tuple[tuple[str, Any], ...]:
    """A launch plan override as a sorted tuple of (keyword, value) pairs (hashable), from pairs or a mapping."""
    items = plan.items() if isinstance(plan, Mapping) else plan
    try:
        pairs = tuple(sorted((str(k), v) for k, v in items))
    except (TypeError, ValueError):
        _fail("groupnorm_sums_plan", plan, f"(keyword, value) pairs or a mapping of keywords {SUMS_PLAN_KEYS}")
    unknown = [k for k, _ in pairs if k not in SUMS_PLAN_KEYS]
    if unknown or len({k for k, _ in pairs}) != len(pairs):
        _fail("groupnorm_sums_plan", plan, f"distinct keywords among {SUMS_PLAN_KEYS}")
    return pairs


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """The kernel choices of a run (static, hashable: a jit / custom_vjp static argument, a Flax module field).

    Renderer and fields (Pallas only where ``backend == "pallas"``): ``hashgrid_backward`` (one of
    :data:`HASHGRID_BACKWARDS`), ``fused_density`` (pruning pass: encoding + density MLP in one kernel),
    ``fused_finite_difference`` (the finite-difference neighbours' encodings in one kernel), ``fused_mlp`` (the
    density / SDF and albedo MLPs, forward and backward one kernel each) at ``fused_mlp_precision``
    (:data:`FUSED_MLP_PRECISIONS`), ``fd_columns`` (that kernel's transposed (L*F, N) layout),
    ``encoder_per_level`` (the encoder with one level per program), ``raster_zbuffer`` (the rasteriser's per-tile
    z-buffer as one program per tile, :mod:`dreamcraft_jax.kernels.raster`).

    Diffusion priors' GroupNorms (on a GPU backend, whatever ``backend`` says, as the config keys always did):
    ``fused_groupnorm`` (small GroupNorms as one kernel per pass), ``groupnorm_sums_max_rows`` (the per-channel
    sums of GroupNorms with at most this many positions per batch element through the split-row kernels; 0: none)
    and ``groupnorm_sums_plan`` (keywords of ``kernels.channel_sums.plan`` fixed for those calls, e.g.
    ``(("chunk", 16), ("num_warps", 8))``; empty: the per-shape default plan; not a config key).

    The defaults are the reference path: XLA everywhere, every kernel off.
    """

    backend: str = "xla"
    hashgrid_backward: str = "xla"
    fused_density: bool = False
    fused_finite_difference: bool = False
    fused_mlp: bool = False
    fused_mlp_precision: str = "tf32"
    fd_columns: bool = False
    encoder_per_level: bool = False
    raster_zbuffer: bool = False
    fused_groupnorm: bool = False
    groupnorm_sums_max_rows: int = 0
    groupnorm_sums_plan: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.backend not in ("pallas", "xla"):
            _fail("backend", self.backend, "'pallas' or 'xla' (KernelSpec.from_config resolves 'auto')")
        if self.hashgrid_backward not in HASHGRID_BACKWARDS:
            _fail("hashgrid_backward", self.hashgrid_backward, _choices(HASHGRID_BACKWARDS))
        if self.fused_mlp_precision not in FUSED_MLP_PRECISIONS:
            _fail("fused_mlp_precision", self.fused_mlp_precision, _choices(FUSED_MLP_PRECISIONS))
        for key in _BOOL_KEYS:
            value = getattr(self, key)
            if not _is_bool(value):
                _fail(key, value, "True or False")
            object.__setattr__(self, key, bool(value))  # numpy bool -> bool: equal specs hash equal
        rows = self.groupnorm_sums_max_rows
        if _is_bool(rows) or not isinstance(rows, numbers.Real) or not float(rows).is_integer() or rows < 0:
            _fail("groupnorm_sums_max_rows", rows, "an integer >= 0")
        object.__setattr__(self, "groupnorm_sums_max_rows", int(rows))
        object.__setattr__(self, "groupnorm_sums_plan", _as_plan(self.groupnorm_sums_plan))

    @classmethod
    def from_config(cls, kernels_cfg) -> KernelSpec:
        """The spec of a config's ``kernels`` section (a ConfigDict or any mapping with its keys), "auto" resolved.

        Raises :class:`KernelConfigError` naming ``kernels.<key>``, the value and what is allowed, for a bad value,
        a missing key or a key this spec does not know.
        """
        names = [f.name for f in dataclasses.fields(cls) if f.name != "groupnorm_sums_plan"]
        given = set(kernels_cfg.keys())
        for key in sorted(given - set(names)):
            _fail(key, kernels_cfg[key], f"no such key (known: {', '.join(names)})")
        for key in names:
            if key not in given:
                raise KernelConfigError(f"missing config value kernels.{key}")
        values = {key: kernels_cfg[key] for key in names}
        values["backend"] = resolve_backend(values["backend"])
        return cls(**values)

    @property
    def sums_plan_kw(self) -> dict:
        """:attr:`groupnorm_sums_plan` as keyword arguments of ``kernels.channel_sums`` calls."""
        return dict(self.groupnorm_sums_plan)

    def replace(self, **changes) -> KernelSpec:
        return dataclasses.replace(self, **changes)


# ``KernelSpec()``, the default argument of the functions and specs that take one: the jnp / XLA reference path.
REFERENCE_KERNELS = KernelSpec()
