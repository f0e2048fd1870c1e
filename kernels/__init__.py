"""Pallas kernels for the renderer (and the priors' small GroupNorms); installed as ``dreamcraft_jax.kernels``
(see kernels/README.md).

Each kernel sits beside its pure-jnp reference with the same signature, has a ``custom_vjp`` where it is
differentiated, and a CPU interpret-mode test. Which kernels run is one static :class:`~.spec.KernelSpec`, built
from the config section ``kernels`` (``KernelSpec.from_config(cfg.kernels)``: ``backend`` = ``auto`` (Pallas on
GPU, XLA on CPU and TPU: no TPU lowering exists) | ``pallas`` | ``xla`` and the per-kernel switches) and passed
down explicitly to the field, render and prior specs and modules; there is no module-level switch.

* :mod:`.spec`: :class:`~.spec.KernelSpec` and :func:`resolve_backend` (imports no kernel);
* :mod:`.common`: the Triton / Pallas helpers and the hash-grid level geometry that several kernels share;
* :mod:`.march`: occupancy-grid marching into a fixed budget (count, scan, scatter; no (R, S) intermediate);
* :mod:`.hashgrid`: hash-grid encoding forward, backward by atomic scatter-add;
* :mod:`.density`: the pruning pass's hash-grid encoding + density MLP, forward only (``kernels.fused_density``);
* :mod:`.fd_hashgrid`: the finite-difference neighbours' encodings in one kernel (``kernels.fused_finite_difference``);
* :mod:`.mlp`: the density / SDF and albedo MLPs forward and backward, one kernel each (``kernels.fused_mlp``);
* :mod:`.hashgrid_levels`: the hash-grid encoding with one level per program (``kernels.encoder_per_level``);
* :mod:`.groupnorm`: the diffusion priors' small GroupNorm (+ SiLU) layers, forward and backward one kernel each
  (``kernels.fused_groupnorm``);
* :mod:`.channel_sums`: the per-channel sums of every prior GroupNorm (forward moments, backward dz sums) with
  the rows split over many programs (``kernels.groupnorm_sums_max_rows``, on by default);
* :mod:`.composite`: packed compositing forward / backward (kept on the XLA path by default: slower on H100,
  see kernels/README.md).
"""

from dreamcraft_jax.kernels.spec import BACKENDS, KernelConfigError, KernelSpec, resolve_backend

__all__ = ["BACKENDS", "AVAILABLE_KERNELS", "KernelConfigError", "KernelSpec", "resolve_backend"]

AVAILABLE_KERNELS: tuple[str, ...] = ("march", "hashgrid", "hashgrid_levels", "density", "fd_hashgrid", "mlp",
                                         "groupnorm", "channel_sums", "composite")
