"""The config schema: defaults shared by every config file in ``configs/``, and validation.

A config file in ``configs/`` defines ``get_config()`` returning :func:`base_config` with its own values set.
The returned ConfigDict is locked: overriding a key that does not exist (``--config.render.smaples=1``) fails.
:func:`validate` checks values before any compute and raises :class:`ConfigError` with one readable line.

Schedules: a loss weight (or other scheduled value) is a number, or ``(a, v0, v1, b)``: linear from v0 at step a
to v1 at step b, constant outside (threestudio's convention).
"""

from __future__ import annotations

import numbers

import ml_collections

from dreamcraft_jax.fields.nerf import DENSITY_ACTIVATIONS, DENSITY_BIASES, HASHGRID_BACKWARDS, NORMAL_TYPES
from dreamcraft_jax.render.volume import SHADING_MODES
from dreamcraft_jax.xla_flags import DEFAULT_XLA_FLAGS, flag_names

TRAIN_MODES = ("alternate", "accumulate", "reference_only")
KERNEL_BACKENDS = ("auto", "pallas", "xla")
STAGES = ("coarse_nerf", "coarse_neus")
LOSS_NAMES = ("rgb", "mask", "depth_rel", "normal_smooth", "3d_normal_smooth", "orient", "sparsity", "opaque",
              "sd", "3d_sd", "eikonal")
SDS_WEIGHTINGS = ("sds", "uniform", "fantasia3d")
PRECISIONS = ("auto", "bf16", "fp32")
ZERO123_VARIANTS = ("zero123", "stable_zero123")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and what is allowed."""


def schedule(value) -> ml_collections.FieldReference:
    """A config field that holds a number or an (a, v0, v1, b) schedule (either may override the other)."""
    return ml_collections.FieldReference(value, field_type=object)


def base_config() -> ml_collections.ConfigDict:
    """Defaults: the official coarse-NeRF (stage 1a) settings, see configs/coarse_nerf.py.

    ``stage`` names the stage to run, or "all" for every stage of ``stages`` in order, each from the previous
    stage's last checkpoint. ``overrides.<stage>`` holds the values that differ in that stage (a partial mirror
    of this config, applied by :func:`stage_config`); NeuS-only settings live in ``neus``.
    """
    c = ml_collections.ConfigDict()
    c.stage = "coarse_nerf"
    c.stages = ("coarse_nerf", "coarse_neus")  # what stage="all" runs
    c.init_from = ""  # a run folder (or stage folder) whose last checkpoint initialises a single later stage
    c.seed = 0
    c.image = ""  # reference RGBA image; "" = the bundled example
    c.prompt = ""  # used by the diffusion priors (issues [2], [4])
    c.workdir = ""  # run folder; "" = <output_root>/<name>-<timestamp>
    c.output_root = "outputs"
    c.name = "coarse_nerf"
    c.resume = ""  # a run folder (or a checkpoint step folder inside it) to continue from
    # XLA's persistent compilation cache: a later run with the same shapes and settings (a resumed run, another
    # seed or loss weight of a sweep) loads each compiled step instead of compiling it again. "" = off.
    c.compilation_cache_dir = "~/.cache/dreamcraft_jax/xla"
    # Added to XLA_FLAGS when a run starts (before JAX starts its backend; a flag already in XLA_FLAGS wins).
    # Default: cuDNN convolutions inside XLA's CUDA graphs too, which took the pipelined 1-view Zero123 SDS step
    # from 11.8 to 6.0 ms on an H200 (dreamcraft_jax/xla_flags.py). "" = XLA's own defaults.
    c.xla_flags = DEFAULT_XLA_FLAGS

    c.data = ml_collections.ConfigDict()
    c.data.heights = (128, 384)  # training resolution per phase; phases switch at resolution_milestones
    c.data.widths = (128, 384)
    c.data.resolution_milestones = (3000,)
    c.data.recenter = True
    c.data.border_ratio = 0.2
    c.data.background = "alpha"  # "alpha": the image's alpha is the mask; "flat": remove a flat background
    c.data.depth = ""  # optional depth map for the depth_rel loss; "example" = the bundled one
    c.data.depth_is_disparity = True  # True: larger = nearer (MiDaS/DPT-like); False: larger = farther

    c.camera = ml_collections.ConfigDict()
    c.camera.elevation_deg = 0.0  # reference view
    c.camera.azimuth_deg = 0.0
    c.camera.distance = 3.8
    c.camera.fovy_deg = 20.0
    c.camera.ray_jitter = 2e-3
    c.camera.elevation_range = (-10.0, 45.0)  # random views
    c.camera.azimuth_range = (-180.0, 180.0)
    c.camera.distance_range = (3.8, 3.8)
    c.camera.fovy_range = (20.0, 20.0)
    c.camera.progressive_until = 200

    c.field = ml_collections.ConfigDict()
    c.field.radius = 2.0
    c.field.hashgrid = ml_collections.ConfigDict(dict(
        n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16,
        per_level_scale=1.447269237440378))
    c.field.progressive = ml_collections.ConfigDict(dict(start_level=8, start_step=2000, update_steps=500))
    c.field.mlp_width = 64
    c.field.mlp_hidden_layers = 1
    c.field.n_feature_dims = 3
    c.field.density_activation = "softplus"
    c.field.density_bias = "blob_magic3d"
    c.field.density_blob_scale = 10.0
    c.field.density_blob_std = 0.5
    # threestudio's names: "finite_difference" = forward differences against the sample's own density (3 more
    # field evaluations, the official setting), "finite_difference_laplacian" = central (6 more), "analytic".
    c.field.normal_type = "finite_difference"
    c.field.finite_difference_eps = 0.01
    c.field.remat_encoding = True  # recompute the hash-grid gather in the backward pass (memory for time)

    c.render = ml_collections.ConfigDict()
    c.render.num_samples_per_ray = 512
    # Budgets (average slots per ray, static shapes): measured on a fitted object at 512 steps per ray,
    # ~40 occupied candidates and ~11 kept samples per ray; overflow is counted in the metrics.
    c.render.candidate_samples_per_ray = 64.0
    c.render.samples_per_ray = 24.0
    # Budget for validation / video renders (no gradient). H200, 512 px (`bench eval`): 32 gives the same NeRF
    # image as 64 and a NeuS image within 59 dB (rgb) / 44 dB (normal) of it, in 44-50 ms instead of 91-100.
    c.render.eval_samples_per_ray = 32.0
    c.render.alpha_threshold = 0.01
    c.render.early_stop_eps = 1e-4
    c.render.stratified = True
    c.render.near_plane = 0.0
    c.render.background = (1.0, 1.0, 1.0)
    c.render.normal_perturb_std = 0.01
    c.render.ambient = 0.1
    c.render.diffuse = 0.9
    c.render.shading = "albedo"
    c.render.grid = ml_collections.ConfigDict(dict(
        resolution=32, prune=True, update_every=16, warmup_steps=256, ema_decay=0.95, threshold=0.01))

    c.loss = ml_collections.ConfigDict()
    c.loss.lambda_rgb = schedule(1000.0)
    c.loss.lambda_mask = schedule(100.0)
    c.loss.lambda_depth_rel = schedule(0.05)
    c.loss.lambda_normal_smooth = schedule(1.0)
    c.loss.lambda_3d_normal_smooth = schedule((2000, 5.0, 1.0, 2001))
    c.loss.lambda_orient = schedule((2000, 1.0, 10.0, 2001))
    c.loss.lambda_sparsity = schedule((2000, 0.1, 10.0, 2001))
    c.loss.lambda_opaque = schedule((2000, 0.1, 10.0, 2001))
    c.loss.lambda_sd = schedule(0.1)  # 2D prior SDS (random-view steps)
    c.loss.lambda_3d_sd = schedule(0.1)  # Zero123 SDS (random-view steps)
    c.loss.lambda_eikonal = schedule(0.0)  # NeuS only

    c.guidance = ml_collections.ConfigDict()
    # The 2D prior. The official 1a/1b use DeepFloyd IF (CFG 20, Perp-Neg); SD 2.1-base takes its place here with
    # the same CFG, Perp-Neg and timestep ranges.
    c.guidance.sd = ml_collections.ConfigDict(dict(
        pretrained="stabilityai/stable-diffusion-2-1-base", variant="", precision="auto", remat=False,
        guidance_scale=20.0, perp_neg=True, view_dependent=True, negative_prompt="", weighting="sds",
        min_step_percent=schedule((0, 0.7, 0.2, 200)), max_step_percent=schedule((0, 0.85, 0.5, 200)),
        grad_clip=schedule(None), resolution=512, front_threshold=45.0, back_threshold=45.0,
        overhead_threshold=60.0))
    # The 3D prior: a diffusers-format Zero123 / Stable Zero123 folder (see models/convert_ldm.py).
    c.guidance.zero123 = ml_collections.ConfigDict(dict(
        pretrained="", variant="stable_zero123", precision="auto", remat=False, guidance_scale=5.0,
        weighting="sds", min_step_percent=schedule((0, 0.7, 0.2, 200)),
        max_step_percent=schedule((0, 0.85, 0.5, 200)), grad_clip=schedule(None), resolution=256))
    c.guidance.demo_priors = ""  # a folder: write tiny RANDOM priors there and use them (CPU demo and tests)
    # Real SD 2.1-base / Zero123 architectures with RANDOM weights, made in memory: a run that times the real-size
    # computation (compilation, steps, evaluation) where no weights are at hand. Its guidance is noise.
    c.guidance.random_real_size = False

    # progressive_band: the official NeuS geometry's encoding is a plain HashGrid (its start_level / start_step
    # keys are ignored there), so every level is on from step 0; True applies stage 1a's progressive band.
    c.neus = ml_collections.ConfigDict(dict(
        sphere_radius=0.5, variance_init=0.3, cos_anneal_end_steps=5000, normal_type="finite_difference",
        progressive_band=False, lr_encoding=0.01, lr_sdf=1e-3, lr_feature=1e-3, lr_variance=1e-3))

    c.optimizer = ml_collections.ConfigDict(dict(lr=0.01, b1=0.9, b2=0.99, eps=1e-8))

    c.train = ml_collections.ConfigDict()
    c.train.max_steps = 5000
    c.train.mode = "alternate"  # even steps reference losses, odd steps random views (guidance in [4])
    c.train.ref_views_per_device = 1
    c.train.random_views_per_device = 1
    # Recompute each view's render in the backward pass instead of keeping its residuals: device memory of one
    # view's render instead of all of them (several views per device at 384 px need ~25 GiB each), for about
    # one more render forward per view.
    c.train.remat_views = False
    # Random-view steps as three compiled programs (render forward, priors, backward + Adam) instead of one: the
    # priors then compile once for all resolutions and stages. Same gradient. Off: on an H200 its steps ran 5-11%
    # slower and stage 1a's first calls took as long (benchmarks/separate_guidance_h200.json).
    c.train.separate_guidance = False
    c.train.log_every = 10
    c.train.val_every = 200
    c.train.save_every = 1000
    c.train.keep_checkpoints = 3
    # After each stage, time render / guidance / update of one random-view step (timing.json): compiles the step
    # without priors once more (a render's compile, 30-45 s on an H200) and the update alone (seconds).
    c.train.time_split = True
    # > 0: compile every step a stage will run (each kind at each resolution) and its evaluation render at the
    # stage's start, this many at once in threads, instead of each at its first call (0). Off by default: on an
    # H200 host, 4 at once had not finished stage 1a's 5 programs after 7.5 min, where one after another they take
    # about 4.5 min (XLA's GPU autotuning runs on the one GPU; the compiles do not overlap usefully there).
    c.train.compile_workers = 0

    c.eval = ml_collections.ConfigDict()
    c.eval.height = 512
    c.eval.width = 512
    c.eval.n_video_views = 120
    c.eval.elevation_deg = 0.0
    c.eval.fps = 30
    c.eval.video = True
    # Rays per chunk of an evaluation render (the chunks run one after another): large enough that a 512 px view
    # is a few launches, not 64 (a 4096-ray chunk made the H200's eval render launch-bound), small enough to bound
    # memory (no gradient is kept).
    c.eval.chunk_rays = 65536

    c.parallel = ml_collections.ConfigDict()
    c.parallel.data = -1  # devices on the `data` axis; -1 = all devices / fsdp
    c.parallel.fsdp = 1  # devices that split each large frozen prior weight (FSDP); views use data x fsdp devices
    c.parallel.fsdp_min_size = 1 << 16  # leaves smaller than this stay replicated
    c.parallel.distributed = False  # call jax.distributed.initialize() (multi-host)

    c.kernels = ml_collections.ConfigDict()
    c.kernels.backend = "auto"  # auto: Pallas on GPU, XLA elsewhere
    # Pallas hash-grid backward: "xla" (XLA's scatter-add), "atomic" (the kernel's float atomics) or "reduced"
    # (atomics, the coarse levels pre-reduced per block of packed samples first). H200, 384 px: "reduced" 18.7 ms
    # rgb (2.0x XLA) and closer to a float64 accumulation than XLA's scatter (6.5e-5 vs 2.2e-4 of the largest
    # entry; with normals plain atomics 1.5e-4 vs 2.2e-3 on the coarse levels): kernels/README.md.
    c.kernels.hashgrid_backward = "reduced"
    # Pallas backend: the renderer's no-grad pruning density as one fused hash-grid + density-MLP kernel.
    c.kernels.fused_density = True
    # Pallas backend: the six finite-difference neighbours of a sample encoded in one kernel (corners they share
    # with the sample's own cell gathered and scattered once). H200, 384 px rgb + normals: 98-102 ms with the
    # reduced backward, 110.5 ms with XLA's, against 126-128 ms unfused and 185 ms for XLA (kernels/README.md).
    c.kernels.fused_finite_difference = True
    # Pallas backend: the density / SDF and albedo MLPs (one hidden layer) forward and backward as one kernel
    # each, the hidden layer in registers (kernels/mlp.py), instead of ~28 small memory-bound XLA GEMMs. H200,
    # 384 px rgb + normals render forward + backward: 52.5 ms against 118.2 through XLA, with both nets and the
    # samples' mask (benchmarks/render384_mlp_skip_f64_h200.json). Both take TF32 matmuls (XLA's default for
    # float32 on the GPU; the official tiny-cuda-nn MLP runs in float16).
    c.kernels.fused_mlp = True
    # Their matmuls' input precision on the GPU: "tf32" (one tensor-core pass, as XLA's float32 default), "tf32x3"
    # (three passes, about float32) or "ieee" (float32 FMAs). H200: 55.6 / 64.6 / 79.5 ms; against a float64
    # render the tf32 kernel's table gradient is at least as close as XLA's on every level (kernels/README.md).
    c.kernels.fused_mlp_precision = "tf32"
    # The finite-difference kernel's encodings in the transposed (L*F, N) layout: a level's program writes (and its
    # backward reads) B contiguous values per feature instead of 2 every 128 bytes. The fused MLP kernels read the
    # layout as it is (mlp_pallas(columns=True)); other consumers transpose. H200: 384 px rgb + normals render
    # fwd + bwd 36.0 ms against 52.6 with rows (benchmarks/render384_fd_columns_h200.json); stage pairs NeRF 384
    # 55.5 against 71.4 ms, NeuS 256 26.4-27.1 against 29.8 (benchmarks/stage_*_fd_columns.json).
    c.kernels.fd_columns = True
    # Pallas backend with an atomic hash-grid backward: the encoder with one level per program
    # (kernels/hashgrid_levels.py), a 16x smaller Triton program than the unrolled one (its forward and backward
    # are the largest programs of a step: lowering and kernel compile time). Off until timed on a GPU.
    c.kernels.encoder_per_level = False
    # The diffusion priors' small GroupNorm (+ SiLU) layers (<= 128 x 128 positions: the UNet's, the VAE
    # encoder's 64 / 128 px levels) as one Pallas kernel per pass (kernels/groupnorm.py) instead of XLA's chain
    # of ~5-9 launch-bound fusions. Off: slower than XLA in every SDS case on an H200 (SD 1 view 16.9 -> 20.4 ms;
    # too few programs, one per batch element and group), though its SDS steps compile in half the time.
    c.kernels.fused_groupnorm = False
    # The per-channel sums of every GroupNorm with at most this many positions per batch element (forward
    # moments, backward dz sums) as split-row Pallas kernels (kernels/channel_sums.py); 0: XLA's column
    # reductions, whose B x C-way parallelism leaves most of a large GPU idle. The elementwise passes stay XLA
    # fusions. H200, SD SDS 4 views 43.3 -> 39.9 ms pipelined, 1 view 14.4 -> 13.4 (the kernels on every level,
    # 512 px included, beat them on the <= 128 px ones only: benchmarks/explore_sums_views4_h200.json).
    c.kernels.groupnorm_sums_max_rows = 1 << 20

    # Stage 1b (dreamcraft3d-coarse-neus): what differs from the values above.
    c.overrides = ml_collections.ConfigDict()
    c.overrides.coarse_nerf = ml_collections.ConfigDict()
    n = c.overrides.coarse_neus = ml_collections.ConfigDict()
    n.name = "coarse_neus"
    n.data = ml_collections.ConfigDict(dict(heights=(256,), widths=(256,), resolution_milestones=()))
    # Stage 1a's values, spelled out so each stays overridable for 1b alone: the official NeuS renderer also
    # prunes its occupancy-grid samples by alpha (0.01, the isotropic NeuS alpha of the SDF at the sample) and
    # transmittance (nerfacc's 1e-4), and its grid keeps nerfacc's occupancy threshold 0.01.
    # None = the shared train.max_steps (so --config.train.max_steps=N shortens both stages); set it to give 1b
    # its own length.
    n.train = ml_collections.ConfigDict(dict(max_steps=ml_collections.config_dict.placeholder(int)))
    n.render = ml_collections.ConfigDict(dict(alpha_threshold=0.01, early_stop_eps=1e-4, samples_per_ray=24.0,
                                              candidate_samples_per_ray=64.0))
    n.render.grid = ml_collections.ConfigDict(dict(threshold=0.01))
    n.loss = ml_collections.ConfigDict(dict(
        lambda_normal_smooth=schedule(0.0), lambda_3d_normal_smooth=schedule(0.0), lambda_orient=schedule(10.0),
        lambda_sparsity=schedule(0.1), lambda_opaque=schedule(0.1), lambda_eikonal=schedule(0.0)))
    n.guidance = ml_collections.ConfigDict()
    n.guidance.sd = ml_collections.ConfigDict(dict(min_step_percent=schedule(0.2), max_step_percent=schedule(0.5)))
    n.guidance.zero123 = ml_collections.ConfigDict(dict(min_step_percent=schedule(0.2),
                                                        max_step_percent=schedule(0.5)))
    n.optimizer = ml_collections.ConfigDict(dict(eps=1e-15))
    n.eval = ml_collections.ConfigDict(dict(height=512, width=512))
    c.lock()
    return c


def _leaves(node, prefix=()):
    for key in node.keys():
        value = node[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def stage_config(cfg, stage: str) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with ``overrides.<stage>`` applied and ``stage`` set: the config one stage runs with."""
    out = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
    for path, value in _leaves(cfg.overrides[stage]):
        if value is None:  # an unset placeholder: the shared value stands
            continue
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    out.stage = stage
    out.lock()
    return out


def schedule_value(value, step):
    """A number, or (a, v0, v1, b) -> v0 + (v1 - v0) * clip((step - a) / (b - a), 0, 1). Works on traced steps.
    A scalar array passes through unchanged: a schedule already evaluated, e.g. a program's input."""
    if isinstance(value, numbers.Number):
        return float(value)
    if getattr(value, "ndim", None) == 0:
        return value
    a, v0, v1, b = (float(v) for v in value)
    import jax.numpy as jnp  # local: keep this module importable without touching jax at config time

    frac = jnp.clip((jnp.asarray(step, jnp.float32) - a) / max(b - a, 1e-9), 0.0, 1.0)
    return v0 + (v1 - v0) * frac


def schedule_is_zero(value) -> bool:
    """True when a schedule is zero at every step (the term is then skipped at trace time)."""
    if isinstance(value, numbers.Number):
        return float(value) == 0.0
    return float(value[1]) == 0.0 and float(value[2]) == 0.0


def resolution_at(cfg, step: int) -> tuple[int, int]:
    """(height, width) of the training renders at ``step`` (host-side int)."""
    phase = sum(int(step) >= int(m) for m in cfg.data.resolution_milestones)
    return int(cfg.data.heights[phase]), int(cfg.data.widths[phase])


def _fail(key: str, value, expected: str):
    raise ConfigError(f"invalid config value {key}={value!r}: expected {expected}")


# kernels.fused_mlp_precision: the input precision of the fused MLP kernels' matmuls (kernels/mlp.py PRECISIONS).
FUSED_MLP_PRECISIONS = ("tf32", "tf32x3", "ieee")


def _check_choice(cfg, key: str, choices):
    value = _get(cfg, key)
    if value not in choices:
        _fail(key, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_number(cfg, key: str, *, low=None, high=None, integer=False, low_open=False):
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        _fail(key, value, "an integer" if integer else "a number")
    if integer and not float(value).is_integer():
        _fail(key, value, "an integer")
    if low is not None and (value <= low if low_open else value < low):
        _fail(key, value, f"a number {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        _fail(key, value, f"a number <= {high}")


def _check_schedule(cfg, key: str):
    value = _get(cfg, key)
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        if value < 0:
            _fail(key, value, "a weight >= 0")
        return
    if (isinstance(value, (tuple, list)) and len(value) == 4
            and all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in value)):
        if value[3] < value[0]:
            _fail(key, value, "(start_step, start_value, end_value, end_step) with end_step >= start_step")
        return
    _fail(key, value, "a number or a schedule (start_step, start_value, end_value, end_step)")


def _check_pair(cfg, key: str):
    value = _get(cfg, key)
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, numbers.Number) for v in value) and value[0] <= value[1]):
        _fail(key, value, "a pair (low, high) with low <= high")


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _check_percent_schedule(cfg, key: str):
    _check_schedule(cfg, key)
    value = _get(cfg, key)
    values = [value] if isinstance(value, numbers.Number) else [value[1], value[2]]
    if not all(0.0 <= v <= 1.0 for v in values):
        _fail(key, value, "a fraction of the training timesteps in [0, 1] (or a schedule of such)")


def _check_guidance(cfg):
    for prior in ("sd", "zero123"):
        g = f"guidance.{prior}"
        _check_choice(cfg, f"{g}.weighting", SDS_WEIGHTINGS)
        _check_choice(cfg, f"{g}.precision", PRECISIONS)
        _check_number(cfg, f"{g}.guidance_scale", low=0)
        _check_number(cfg, f"{g}.resolution", low=8, integer=True)
        if _get(cfg, f"{g}.resolution") % 8:
            _fail(f"{g}.resolution", _get(cfg, f"{g}.resolution"), "a multiple of 8 (the VAE downsampling)")
        _check_percent_schedule(cfg, f"{g}.min_step_percent")
        _check_percent_schedule(cfg, f"{g}.max_step_percent")
        if _get(cfg, f"{g}.grad_clip") is not None:
            _check_schedule(cfg, f"{g}.grad_clip")
    _check_choice(cfg, "guidance.zero123.variant", ZERO123_VARIANTS)
    for key in ("guidance.sd.front_threshold", "guidance.sd.back_threshold"):
        _check_number(cfg, key, low=0, high=180)
    _check_number(cfg, "guidance.sd.overhead_threshold", low=-90, high=90)
    _check_choice(cfg, "neus.normal_type", NORMAL_TYPES)
    for key in ("neus.sphere_radius", "neus.lr_encoding", "neus.lr_sdf", "neus.lr_feature", "neus.lr_variance"):
        _check_number(cfg, key, low=0, low_open=True)
    _check_number(cfg, "neus.cos_anneal_end_steps", low=0, integer=True)
    _check_number(cfg, "neus.variance_init")


def validate(cfg) -> None:
    """Check every value the code relies on (every stage's config); raise ConfigError naming the first bad key."""
    _check_choice(cfg, "stage", STAGES + ("all",))
    stages = tuple(cfg.stages)
    if not stages or any(s not in STAGES for s in stages):
        _fail("stages", cfg.stages, "a non-empty tuple of " + ", ".join(repr(s) for s in STAGES))
    if not isinstance(cfg.xla_flags, str):
        _fail("xla_flags", cfg.xla_flags, "a string of --name=value XLA flags separated by spaces")
    try:
        flag_names(cfg.xla_flags)
    except ValueError as e:
        raise ConfigError(f"xla_flags: {e}") from None
    if cfg.guidance.random_real_size and cfg.guidance.demo_priors:
        _fail("guidance.random_real_size", cfg.guidance.random_real_size,
              "False when guidance.demo_priors is set (tiny and real-size random priors exclude each other)")
    for stage in stages if cfg.stage == "all" else (cfg.stage,):
        try:
            resolved = stage_config(cfg, stage)
        except (KeyError, AttributeError) as e:
            raise ConfigError(f"overrides.{stage} names a key that the config does not have: {e}") from None
        _validate_stage(resolved, prefix="" if stage == "coarse_nerf" else f"(in stage {stage}, after "
                        f"overrides.{stage}) ")


def _validate_stage(cfg, prefix: str) -> None:
    try:
        _validate_one(cfg)
    except ConfigError as e:
        raise ConfigError(prefix + str(e)) from None


def _validate_one(cfg) -> None:
    _check_guidance(cfg)
    _check_choice(cfg, "train.mode", TRAIN_MODES)
    _check_choice(cfg, "kernels.backend", KERNEL_BACKENDS)
    _check_choice(cfg, "kernels.hashgrid_backward", HASHGRID_BACKWARDS)
    _check_choice(cfg, "kernels.fused_mlp_precision", FUSED_MLP_PRECISIONS)
    _check_number(cfg, "kernels.groupnorm_sums_max_rows", low=0, integer=True)
    _check_choice(cfg, "data.background", ("alpha", "flat"))
    _check_choice(cfg, "field.density_activation", DENSITY_ACTIVATIONS)
    _check_choice(cfg, "field.density_bias", DENSITY_BIASES)
    _check_choice(cfg, "field.normal_type", NORMAL_TYPES)
    _check_choice(cfg, "render.shading", SHADING_MODES)
    for key in ("train.max_steps", "train.log_every", "train.val_every", "train.save_every",
                "train.keep_checkpoints", "render.num_samples_per_ray", "render.grid.resolution",
                "render.grid.update_every", "field.mlp_width", "field.hashgrid.n_levels",
                "field.hashgrid.n_features_per_level", "field.hashgrid.base_resolution", "eval.height",
                "eval.width", "eval.fps", "eval.chunk_rays"):
        _check_number(cfg, key, low=1, integer=True)
    for key in ("train.ref_views_per_device", "train.random_views_per_device", "field.mlp_hidden_layers",
                "render.grid.warmup_steps", "eval.n_video_views", "camera.progressive_until", "seed",
                "field.progressive.start_step"):
        _check_number(cfg, key, low=0, integer=True)
    _check_number(cfg, "field.hashgrid.log2_hashmap_size", low=4, high=30, integer=True)
    _check_number(cfg, "field.progressive.update_steps", low=1, integer=True)
    _check_number(cfg, "field.progressive.start_level", low=1, high=cfg.field.hashgrid.n_levels, integer=True)
    _check_number(cfg, "field.hashgrid.per_level_scale", low=1.0)
    for key in ("field.radius", "camera.distance", "camera.fovy_deg", "optimizer.lr",
                "render.candidate_samples_per_ray", "render.samples_per_ray", "render.eval_samples_per_ray",
                "field.finite_difference_eps"):
        _check_number(cfg, key, low=0, low_open=True)
    for key in ("optimizer.b1", "optimizer.b2", "render.grid.ema_decay"):
        _check_number(cfg, key, low=0, high=1)
    for key in ("render.alpha_threshold", "render.early_stop_eps", "camera.ray_jitter", "optimizer.eps",
                "render.normal_perturb_std", "render.grid.threshold"):
        _check_number(cfg, key, low=0)
    _check_number(cfg, "data.border_ratio", low=0, high=0.49)
    _check_number(cfg, "camera.fovy_deg", low=0, high=179, low_open=True)
    for key in ("camera.elevation_range", "camera.azimuth_range", "camera.distance_range", "camera.fovy_range"):
        _check_pair(cfg, key)
    for name in LOSS_NAMES:
        _check_schedule(cfg, f"loss.lambda_{name}")
    n_phases = len(cfg.data.resolution_milestones) + 1
    for key in ("data.heights", "data.widths"):
        value = _get(cfg, key)
        if not (isinstance(value, (tuple, list)) and len(value) == n_phases
                and all(isinstance(v, int) and v >= 8 for v in value)):
            _fail(key, value, f"{n_phases} integers >= 8 (one per phase of data.resolution_milestones)")
    if list(cfg.data.resolution_milestones) != sorted(cfg.data.resolution_milestones):
        _fail("data.resolution_milestones", cfg.data.resolution_milestones, "increasing steps")
    if cfg.render.samples_per_ray > cfg.render.candidate_samples_per_ray:
        _fail("render.samples_per_ray", cfg.render.samples_per_ray,
              f"<= render.candidate_samples_per_ray ({cfg.render.candidate_samples_per_ray})")
    if cfg.train.mode == "reference_only" and cfg.train.ref_views_per_device < 1:
        _fail("train.ref_views_per_device", cfg.train.ref_views_per_device, ">= 1 in reference_only mode")
    if cfg.train.mode != "reference_only" and cfg.train.random_views_per_device < 1:
        _fail("train.random_views_per_device", cfg.train.random_views_per_device,
              f">= 1 in {cfg.train.mode} mode (or train.mode='reference_only')")
    if cfg.train.mode == "accumulate" and cfg.train.ref_views_per_device < 1:
        _fail("train.ref_views_per_device", cfg.train.ref_views_per_device, ">= 1 in accumulate mode")
    if cfg.parallel.data != -1:
        _check_number(cfg, "parallel.data", low=1, integer=True)
    _check_number(cfg, "parallel.fsdp", low=1, integer=True)
    _check_number(cfg, "parallel.fsdp_min_size", low=1, integer=True)
