"""Pallas kernels for the renderer (and the priors' small GroupNorms); installed as ``dreamcraft_jax.kernels``
(see kernels/README.md).

Each kernel sits beside its pure-jnp reference with the same signature, has a ``custom_vjp`` where it is
differentiated, and a CPU interpret-mode test. The renderer and the fields pick one through the config key
``kernels.backend`` = ``auto`` (Pallas on GPU, XLA on CPU and TPU: no TPU lowering exists) | ``pallas`` | ``xla``,
resolved once by :func:`resolve_backend` and stored in the static specs (``RenderSpec.backend``,
``NerfFieldSpec.backend``).

* :mod:`.march`: occupancy-grid marching into a fixed budget (count, scan, scatter; no (R, S) intermediate);
* :mod:`.hashgrid`: hash-grid encoding forward, backward by atomic scatter-add;
* :mod:`.mlp`: the density / SDF and albedo MLPs forward and backward, one kernel each (``kernels.fused_mlp``);
* :mod:`.hashgrid_levels`: the hash-grid encoding with one level per program (``kernels.encoder_per_level``);
* :mod:`.groupnorm`: the diffusion priors' small GroupNorm (+ SiLU) layers, forward and backward one kernel each
  (``kernels.fused_groupnorm``);
* :mod:`.channel_sums`: the per-channel sums of every prior GroupNorm (forward moments, backward dz sums) with
  the rows split over many programs (``kernels.groupnorm_sums_max_rows``, on by default);
* :mod:`.composite`: packed compositing forward / backward (kept on the XLA path by default: slower on H100,
  see kernels/README.md).
"""

BACKENDS = ("auto", "pallas", "xla")
AVAILABLE_KERNELS: tuple[str, ...] = ("march", "hashgrid", "hashgrid_levels", "density", "fd_hashgrid", "mlp",
                                         "groupnorm", "channel_sums", "composite")


def resolve_backend(name: str) -> str:
    """"auto" -> "pallas" on GPU, "xla" elsewhere; "pallas" / "xla" unchanged."""
    if name not in BACKENDS:
        raise ValueError(f"kernels.backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    import jax

    return "pallas" if jax.default_backend() == "gpu" else "xla"
