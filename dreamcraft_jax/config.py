"""The config schema: defaults shared by every config file in ``configs/``, and their validation.

A config file in ``configs/`` defines ``get_config(arg=None)`` returning :func:`base_config` with its own values
set; load one with :func:`dreamcraft_jax.config_file.load_config` (train.py, the benches and the tests all do).
The ConfigDict is locked: overriding a key that does not exist (``--config.render.smaples=1``) fails.
:func:`validate` checks values before any compute and raises :class:`ConfigError` with one readable line.

The config is built section by section below; each section's defaults sit next to the checks of its values.

Stages: the top-level values are stage 1a's (coarse NeRF). ``overrides.<stage>`` holds only what differs in a
later stage (a partial mirror of this config), applied by :func:`stage_config`. One ConfigDict thus describes a
whole ``stage=all`` run, and ``--config.overrides.coarse_neus.loss.lambda_orient=5`` changes one stage's value
from the command line.

Schedules: a loss weight (or other scheduled value) is a number, or ``(a, v0, v1, b)``: linear from v0 at step a
to v1 at step b, constant outside (threestudio's convention).
"""

from __future__ import annotations

import numbers

import ml_collections

from dreamcraft_jax.fields.nerf import DENSITY_ACTIVATIONS, DENSITY_BIASES, NORMAL_TYPES
from dreamcraft_jax.kernels.spec import BACKENDS, KernelConfigError, KernelSpec
from dreamcraft_jax.parallel import DEFAULT_RULES, check_rules
from dreamcraft_jax.render.volume import SHADING_MODES
from dreamcraft_jax.xla_flags import DEFAULT_XLA_FLAGS, flag_names

STAGES = ("coarse_nerf", "coarse_neus", "geometry")  # every stage, in the order stage="all" runs them
TRAIN_MODES = ("alternate", "accumulate", "reference_only")
LOSS_NAMES = ("rgb", "mask", "depth_rel", "normal_smooth", "3d_normal_smooth", "orient", "sparsity", "opaque",
              "sd", "3d_sd", "eikonal", "normal_consistency")
SDS_WEIGHTINGS = ("sds", "uniform", "fantasia3d")
PRECISIONS = ("auto", "bf16", "fp32")
ZERO123_VARIANTS = ("zero123", "stable_zero123")
PRIOR_SOURCES = ("pretrained", "demo", "random_real_size")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and what is allowed."""


def schedule(value) -> ml_collections.FieldReference:
    """A config field that holds a number or an (a, v0, v1, b) schedule (either may override the other)."""
    return ml_collections.FieldReference(value, field_type=object)


def _section(**values) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(values)


# ---------------------------------------------------------------------------------------------------- checks


def _fail(key: str, value, expected: str):
    raise ConfigError(f"invalid config value {key}={value!r}: expected {expected}")


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


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


def _check_percent_schedule(cfg, key: str):
    _check_schedule(cfg, key)
    value = _get(cfg, key)
    values = [value] if isinstance(value, numbers.Number) else [value[1], value[2]]
    if not all(0.0 <= v <= 1.0 for v in values):
        _fail(key, value, "a fraction of the training timesteps in [0, 1] (or a schedule of such)")


def _check_pair(cfg, key: str):
    value = _get(cfg, key)
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, numbers.Number) for v in value) and value[0] <= value[1]):
        _fail(key, value, "a pair (low, high) with low <= high")


# ---------------------------------------------------------------------------------------------------- run


def _run(c) -> None:
    c.stage = "coarse_nerf"  # the stage to run, or "all": every stage of ``stages`` in order
    c.stages = STAGES  # what stage="all" runs
    c.init_from = ""  # a run folder (or stage folder) whose last checkpoint initialises a single later stage
    c.seed = 0
    c.image = ""  # reference RGBA image; "" = the bundled example
    c.prompt = ""  # the text prompt of the 2D prior
    c.workdir = ""  # run folder; "" = <output_root>/<name>-<timestamp>
    c.output_root = "outputs"
    c.name = "coarse_nerf"
    c.resume = ""  # a run folder (or a checkpoint step folder inside it) to continue from
    # XLA's persistent compilation cache: a later run with the same shapes and settings (a resumed run, another
    # seed or loss weight of a sweep) loads each compiled step instead of compiling it again. "" = off.
    c.compilation_cache_dir = "~/.cache/dreamcraft_jax/xla"
    # XLA flags added to XLA_FLAGS when a run starts (a flag already in XLA_FLAGS wins); the default puts cuDNN
    # convolutions into XLA's CUDA graphs (dreamcraft_jax/xla_flags.py says why). "" = XLA's own defaults.
    c.xla_flags = DEFAULT_XLA_FLAGS


def _check_run(cfg) -> None:
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
    _check_number(cfg, "seed", low=0, integer=True)


# ---------------------------------------------------------------------------------------------------- data, camera


def _data(c) -> None:
    c.data = _section(
        heights=(128, 384), widths=(128, 384),  # training resolution per phase
        resolution_milestones=(3000,),  # the steps where the next phase starts
        # False: the image is already framed (python -m dreamcraft_jax.preprocess, or the official
        # preprocess_image.py --recenter) and is loaded as is; True: frame it at load time, official formula.
        recenter=False, border_ratio=0.1,  # border 0.1: the object's longer side is 90 % of the frame
        background="alpha",  # "alpha": the image's alpha is the mask; "flat": remove a flat background
        # Depth map for the depth_rel loss: "auto" = <name>_depth.png beside <name>_rgba.png if it exists,
        # "" = none, or a path.
        depth="auto",
        depth_convention="depth",  # "depth": larger = farther (official, Omnidata); "disparity": larger = nearer
        soft_mask=False)  # False: mask = alpha > 0.5 (official) for rgb compositing, mask loss, depth selection
    c.camera = _section(
        elevation_deg=0.0, azimuth_deg=0.0, distance=3.8, fovy_deg=20.0,  # the reference view
        ray_jitter=2e-3,  # std of the one fixed offset of the reference rays (origins and directions)
        elevation_range=(-10.0, 45.0), azimuth_range=(-180.0, 180.0),  # random views
        distance_range=(3.8, 3.8), fovy_range=(20.0, 20.0),
        progressive_until=200)  # random views widen from the reference azimuth to the full range by this step


def _check_data(cfg) -> None:
    _check_choice(cfg, "data.background", ("alpha", "flat"))
    _check_number(cfg, "data.border_ratio", low=0, high=0.99)
    _check_choice(cfg, "data.depth_convention", ("depth", "disparity"))
    n_phases = len(cfg.data.resolution_milestones) + 1
    for key in ("data.heights", "data.widths"):
        value = _get(cfg, key)
        if not (isinstance(value, (tuple, list)) and len(value) == n_phases
                and all(isinstance(v, int) and v >= 8 for v in value)):
            _fail(key, value, f"{n_phases} integers >= 8 (one per phase of data.resolution_milestones)")
    if list(cfg.data.resolution_milestones) != sorted(cfg.data.resolution_milestones):
        _fail("data.resolution_milestones", cfg.data.resolution_milestones, "increasing steps")
    for key in ("camera.distance", "camera.fovy_deg"):
        _check_number(cfg, key, low=0, low_open=True)
    _check_number(cfg, "camera.fovy_deg", low=0, high=179, low_open=True)
    _check_number(cfg, "camera.ray_jitter", low=0)
    _check_number(cfg, "camera.progressive_until", low=0, integer=True)
    for key in ("camera.elevation_range", "camera.azimuth_range", "camera.distance_range", "camera.fovy_range"):
        _check_pair(cfg, key)


# ---------------------------------------------------------------------------------------------------- field


def _field(c) -> None:
    c.field = _section(
        radius=2.0,  # the scene box is [-radius, radius]^3
        hashgrid=_section(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16,
                          per_level_scale=1.447269237440378),
        # Levels switched on progressively: start_level levels at first, one more every update_steps from
        # start_step.
        progressive=_section(start_level=8, start_step=2000, update_steps=500),
        mlp_width=64, mlp_hidden_layers=1, n_feature_dims=3,
        density_activation="softplus", density_bias="blob_magic3d", density_blob_scale=10.0, density_blob_std=0.5,
        # threestudio's names: "finite_difference" = forward differences against the sample's own density (3 more
        # field evaluations, the official setting), "finite_difference_laplacian" = central (6 more), "analytic".
        normal_type="finite_difference", finite_difference_eps=0.01,
        remat_encoding=True)  # recompute the hash-grid gather in the backward pass (memory for time)
    # Stage 1b's SDF field. progressive_band: the official NeuS encoding is a plain HashGrid (every level on from
    # step 0); True applies stage 1a's progressive band.
    c.neus = _section(
        sphere_radius=0.5, variance_init=0.3, cos_anneal_end_steps=5000, normal_type="finite_difference",
        progressive_band=False, lr_encoding=0.01, lr_sdf=1e-3, lr_feature=1e-3, lr_variance=1e-3)


def _check_field(cfg) -> None:
    _check_choice(cfg, "field.density_activation", DENSITY_ACTIVATIONS)
    _check_choice(cfg, "field.density_bias", DENSITY_BIASES)
    _check_choice(cfg, "field.normal_type", NORMAL_TYPES)
    for key in ("field.mlp_width", "field.hashgrid.n_levels", "field.hashgrid.n_features_per_level",
                "field.hashgrid.base_resolution"):
        _check_number(cfg, key, low=1, integer=True)
    _check_number(cfg, "field.mlp_hidden_layers", low=0, integer=True)
    _check_number(cfg, "field.progressive.start_step", low=0, integer=True)
    _check_number(cfg, "field.hashgrid.log2_hashmap_size", low=4, high=30, integer=True)
    _check_number(cfg, "field.progressive.update_steps", low=1, integer=True)
    _check_number(cfg, "field.progressive.start_level", low=1, high=cfg.field.hashgrid.n_levels, integer=True)
    _check_number(cfg, "field.hashgrid.per_level_scale", low=1.0)
    for key in ("field.radius", "field.finite_difference_eps"):
        _check_number(cfg, key, low=0, low_open=True)
    _check_choice(cfg, "neus.normal_type", NORMAL_TYPES)
    for key in ("neus.sphere_radius", "neus.lr_encoding", "neus.lr_sdf", "neus.lr_feature", "neus.lr_variance"):
        _check_number(cfg, key, low=0, low_open=True)
    _check_number(cfg, "neus.cos_anneal_end_steps", low=0, integer=True)
    _check_number(cfg, "neus.variance_init")


# ---------------------------------------------------------------------------------------------------- render


def _render(c) -> None:
    c.render = _section(
        num_samples_per_ray=512,  # marching steps across the scene box
        # Budgets, in average slots per ray (static shapes): candidates kept by the occupancy grid, and samples
        # kept after the alpha / transmittance pruning. What does not fit is dropped and counted ("overflow" in
        # the metrics); benchmarks/README.md has the occupancy of fitted objects these were sized for.
        candidate_samples_per_ray=64.0, samples_per_ray=24.0,
        eval_samples_per_ray=32.0,  # the kept-sample budget of validation and video renders (no gradient)
        alpha_threshold=0.01,  # samples with alpha below this are pruned
        early_stop_eps=1e-4,  # samples past this transmittance are pruned
        stratified=True, near_plane=0.0, background=(1.0, 1.0, 1.0),
        normal_perturb_std=0.01,  # the offset of the perturbed normals of the 3D normal-smoothness loss
        ambient=0.1, diffuse=0.9, shading="albedo",
        grid=_section(resolution=32, prune=True, update_every=16, warmup_steps=256, ema_decay=0.95,
                      threshold=0.01))


def _check_render(cfg) -> None:
    _check_choice(cfg, "render.shading", SHADING_MODES)
    for key in ("render.num_samples_per_ray", "render.grid.resolution", "render.grid.update_every"):
        _check_number(cfg, key, low=1, integer=True)
    _check_number(cfg, "render.grid.warmup_steps", low=0, integer=True)
    for key in ("render.candidate_samples_per_ray", "render.samples_per_ray", "render.eval_samples_per_ray"):
        _check_number(cfg, key, low=0, low_open=True)
    _check_number(cfg, "render.grid.ema_decay", low=0, high=1)
    for key in ("render.alpha_threshold", "render.early_stop_eps", "render.normal_perturb_std",
                "render.grid.threshold"):
        _check_number(cfg, key, low=0)
    if cfg.render.samples_per_ray > cfg.render.candidate_samples_per_ray:
        _fail("render.samples_per_ray", cfg.render.samples_per_ray,
              f"<= render.candidate_samples_per_ray ({cfg.render.candidate_samples_per_ray})")


# ---------------------------------------------------------------------------------------------------- loss


def _loss(c) -> None:
    c.loss = _section(
        lambda_rgb=schedule(1000.0), lambda_mask=schedule(100.0), lambda_depth_rel=schedule(0.05),
        lambda_normal_smooth=schedule(1.0), lambda_3d_normal_smooth=schedule((2000, 5.0, 1.0, 2001)),
        lambda_orient=schedule((2000, 1.0, 10.0, 2001)), lambda_sparsity=schedule((2000, 0.1, 10.0, 2001)),
        lambda_opaque=schedule((2000, 0.1, 10.0, 2001)),
        lambda_sd=schedule(0.1),  # the 2D prior's SDS (random-view steps)
        lambda_3d_sd=schedule(0.1),  # Zero123's SDS (random-view steps)
        lambda_eikonal=schedule(0.0),  # NeuS only
        lambda_normal_consistency=schedule(0.0))  # DMTet only: mean over the mesh edges of 1 - cos(n_a, n_b)


def _check_loss(cfg) -> None:
    for name in LOSS_NAMES:
        _check_schedule(cfg, f"loss.lambda_{name}")


# ---------------------------------------------------------------------------------------------------- guidance


def _guidance(c) -> None:
    c.guidance = ml_collections.ConfigDict()
    # The 2D prior. The official 1a/1b use DeepFloyd IF (CFG 20, Perp-Neg); SD 2.1-base takes its place here with
    # the same CFG, Perp-Neg and timestep ranges.
    c.guidance.sd = _section(
        pretrained="stabilityai/stable-diffusion-2-1-base", variant="", precision="auto", remat=False,
        guidance_scale=20.0, perp_neg=True, view_dependent=True, negative_prompt="", weighting="sds",
        min_step_percent=schedule((0, 0.7, 0.2, 200)), max_step_percent=schedule((0, 0.85, 0.5, 200)),
        grad_clip=schedule(None), resolution=512, front_threshold=45.0, back_threshold=45.0,
        overhead_threshold=60.0)
    # The 3D prior: a diffusers-format Zero123 / Stable Zero123 folder (see models/convert_ldm.py).
    c.guidance.zero123 = _section(
        pretrained="", variant="stable_zero123", precision="auto", remat=False, guidance_scale=5.0,
        weighting="sds", min_step_percent=schedule((0, 0.7, 0.2, 200)),
        max_step_percent=schedule((0, 0.85, 0.5, 200)), grad_clip=schedule(None), resolution=256)
    # Where the priors' weights come from:
    #   "pretrained": the folders / hub ids in guidance.sd.pretrained and guidance.zero123.pretrained;
    #   "demo": tiny stand-ins with RANDOM weights, written once to guidance.demo_dir (CPU demo and tests);
    #   "random_real_size": the real SD 2.1-base / Zero123 architectures with RANDOM weights, made in memory (times
    #   the real-size computation where no weights are at hand).
    # With "demo" and "random_real_size" the guidance is noise; the logs and the run folder say so.
    c.guidance.priors = "pretrained"
    c.guidance.demo_dir = "outputs/demo_priors"  # the folder "demo" priors are written to and read from


def _check_guidance(cfg) -> None:
    _check_choice(cfg, "guidance.priors", PRIOR_SOURCES)
    if not (isinstance(cfg.guidance.demo_dir, str) and cfg.guidance.demo_dir):
        _fail("guidance.demo_dir", cfg.guidance.demo_dir, "a folder for the demo priors")
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


# ---------------------------------------------------------------------------------------------------- training


def _geometry(c) -> None:
    # Stage 2 (DMTet). The tet grid: tet_resolution cubes per side, (r + 1)^3 vertices (64: 274,625, about the
    # official 128_tets.npz), cached as .npz in tet_cache_dir ("" = $XDG_CACHE_HOME/dreamcraft_jax/tets).
    c.geometry = _section(
        tet_resolution=64, tet_cache_dir="",
        # Static budgets of the extracted surface (marching tets): faces / vertices beyond them are dropped and
        # reported (metrics mesh_overflow), never silently wrong. A sphere filling the tight box needs ~80k faces.
        max_faces=200_000, max_vertices=100_000,
        n_rgb=4,  # every n_rgb-th step the 2D prior sees the rgb render and the reference losses apply
        near_ref=0.01, far_ref=100.0, near_random=0.1, far_random=1000.0,  # the official projections' planes
        lr=0.005,  # Adam on every parameter (sdf, deformation, hash grid, feature MLP)
        # Silhouette pixel pairs blended (and differentiated) per view by the antialias; past it, pairs are left
        # unblended and counted in the views' raster_overflow. 0: 16 (H + W), ~4x an outline filling the frame.
        antialias_budget=0,
        min_component_fraction=0.01)  # at export: components with fewer faces than this x the largest go


def _check_geometry(cfg) -> None:
    for key in ("geometry.tet_resolution", "geometry.max_faces", "geometry.max_vertices", "geometry.n_rgb"):
        _check_number(cfg, key, low=1, integer=True)
    for key in ("geometry.near_ref", "geometry.near_random", "geometry.lr"):
        _check_number(cfg, key, low=0, low_open=True)
    if not cfg.geometry.near_ref < cfg.geometry.far_ref or not cfg.geometry.near_random < cfg.geometry.far_random:
        _fail("geometry.far_ref / far_random", (cfg.geometry.far_ref, cfg.geometry.far_random),
              "far planes beyond their near planes")
    _check_number(cfg, "geometry.min_component_fraction", low=0, high=1)
    _check_number(cfg, "geometry.antialias_budget", low=0, integer=True)


def _train(c) -> None:
    c.optimizer = _section(lr=0.01, b1=0.9, b2=0.99, eps=1e-8)  # Adam
    c.train = _section(
        max_steps=5000,
        mode="alternate",  # "alternate": reference view on even steps, random views on odd; "accumulate": both
        ref_views_per_device=1, random_views_per_device=1,
        # Recompute each view's render in the backward pass instead of keeping its residuals: device memory of
        # one view's render instead of all of them, for about one more render forward per view.
        remat_views=False,
        # Random-view steps as three compiled programs (render forward, priors, backward + Adam) instead of one:
        # the priors then compile once for all resolutions and stages. Same gradient; slower steps
        # (benchmarks/README.md).
        separate_guidance=False,
        log_every=10, val_every=200, save_every=1000, keep_checkpoints=3,
        # After each stage, time render / guidance / update of one random-view step (timing.json); compiles the
        # step without priors and the update alone once more.
        time_split=True,
        # > 0: compile every step of the stage (each kind at each resolution) and its evaluation render at the
        # stage's start, this many at once in threads, instead of each at its first call (0).
        compile_workers=0)
    c.eval = _section(
        height=512, width=512, n_video_views=120, elevation_deg=0.0, fps=30, video=True,
        # Rays per chunk of an evaluation render (chunks run one after another): bounds the render's memory.
        chunk_rays=65536)


def _check_train(cfg) -> None:
    _check_choice(cfg, "train.mode", TRAIN_MODES)
    for key in ("train.max_steps", "train.log_every", "train.val_every", "train.save_every",
                "train.keep_checkpoints", "eval.height", "eval.width", "eval.fps", "eval.chunk_rays"):
        _check_number(cfg, key, low=1, integer=True)
    for key in ("train.ref_views_per_device", "train.random_views_per_device", "eval.n_video_views",
                "train.compile_workers"):
        _check_number(cfg, key, low=0, integer=True)
    _check_number(cfg, "optimizer.lr", low=0, low_open=True)
    _check_number(cfg, "optimizer.eps", low=0)
    for key in ("optimizer.b1", "optimizer.b2"):
        _check_number(cfg, key, low=0, high=1)
    if cfg.train.mode == "reference_only" and cfg.train.ref_views_per_device < 1:
        _fail("train.ref_views_per_device", cfg.train.ref_views_per_device, ">= 1 in reference_only mode")
    if cfg.train.mode != "reference_only" and cfg.train.random_views_per_device < 1:
        _fail("train.random_views_per_device", cfg.train.random_views_per_device,
              f">= 1 in {cfg.train.mode} mode (or train.mode='reference_only')")
    if cfg.train.mode == "accumulate" and cfg.train.ref_views_per_device < 1:
        _fail("train.ref_views_per_device", cfg.train.ref_views_per_device, ">= 1 in accumulate mode")


# ---------------------------------------------------------------------------------------------------- devices


def _parallel(c) -> None:
    c.parallel = _section(
        data=-1,  # devices on the `data` axis; -1 = all devices / fsdp
        fsdp=1,  # devices that split each large frozen prior weight (FSDP); views use data x fsdp devices
        fsdp_min_size=1 << 16,  # leaves smaller than this stay replicated under an "fsdp" rule
        # Where each parameter leaf lives: (regex over its path, rule) pairs, first match wins; rules
        # "replicated", "fsdp" (largest axis divisible by parallel.fsdp) or an explicit spec per axis
        # ("fsdp,None"). Paths: params/..., opt_state/..., extras/..., priors/<sd|3d_sd>/...
        # (dreamcraft_jax/parallel.py).
        rules=DEFAULT_RULES,
        distributed=False)  # call jax.distributed.initialize() (multi-host)


def _check_parallel(cfg) -> None:
    if cfg.parallel.data != -1:
        _check_number(cfg, "parallel.data", low=1, integer=True)
    _check_number(cfg, "parallel.fsdp", low=1, integer=True)
    _check_number(cfg, "parallel.fsdp_min_size", low=1, integer=True)
    try:
        check_rules(cfg.parallel.rules)
    except ValueError as e:
        raise ConfigError(f"parallel.rules: {e}") from None


def _kernels(c) -> None:
    # Which kernels a run takes (checked by dreamcraft_jax.kernels.spec.KernelSpec.from_config; each kernel's
    # speed and accuracy against its reference: kernels/README.md and benchmarks/README.md).
    c.kernels = _section(
        backend="auto",  # "auto": Pallas on GPU, XLA elsewhere; "pallas"; "xla"
        # Pallas hash-grid backward: "xla" (XLA's scatter-add), "atomic" (float atomics) or "reduced" (atomics,
        # the coarse levels pre-reduced per block of packed samples first).
        hashgrid_backward="reduced",
        fused_density=True,  # the renderer's no-grad pruning density as one hash-grid + density-MLP kernel
        # The six finite-difference neighbours of a sample encoded in one kernel (corners shared with the
        # sample's own cell gathered and scattered once).
        fused_finite_difference=True,
        # The density / SDF and albedo MLPs (one hidden layer) forward and backward as one kernel each, the hidden
        # layer in registers, instead of many small XLA matmuls.
        fused_mlp=True,
        # The fused MLPs' matmul input precision on a GPU: "tf32" (one tensor-core pass, XLA's float32 default),
        # "tf32x3" (three passes, about float32) or "ieee" (float32 FMAs).
        fused_mlp_precision="tf32",
        # The finite-difference kernel's encodings in the transposed (L*F, N) layout, read as they are by the
        # fused MLPs (other consumers transpose).
        fd_columns=True,
        # With an atomic hash-grid backward: the encoder with one level per program (a 16x smaller Triton
        # program than the unrolled one). Not yet timed on a GPU.
        encoder_per_level=False,
        # The rasteriser's per-tile z-buffer (geometry stage) as one Pallas program per screen tile, each running
        # its own face list (the XLA reference advances all tiles in lockstep).
        raster_zbuffer=True,
        # The priors' small GroupNorm (+ SiLU) layers (<= 128 x 128 positions) as one Pallas kernel per pass.
        fused_groupnorm=False,
        # The per-channel sums of every prior GroupNorm with at most this many positions per batch element as
        # split-row Pallas kernels (the elementwise passes stay XLA fusions); 0: XLA's column reductions.
        groupnorm_sums_max_rows=1 << 20)


def _check_kernels(cfg) -> None:
    # "auto" is checked, not resolved: resolving asks JAX for its backend, which must wait for the XLA flags.
    _check_choice(cfg, "kernels.backend", BACKENDS)
    try:
        KernelSpec.from_config({**cfg.kernels.to_dict(), "backend": "xla"})
    except KernelConfigError as e:
        raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------------------------------- stages


def _stage_overrides(c) -> None:
    c.overrides = ml_collections.ConfigDict()
    c.overrides.coarse_nerf = ml_collections.ConfigDict()  # stage 1a: the top-level values
    # Stage 1b (dreamcraft3d-coarse-neus): what differs from stage 1a.
    n = c.overrides.coarse_neus = ml_collections.ConfigDict()
    n.name = "coarse_neus"
    n.data = _section(heights=(256,), widths=(256,), resolution_milestones=())
    n.camera = _section(progressive_until=0)  # random views span the full ranges from the first step
    # None = the shared train.max_steps (so --config.train.max_steps=N shortens both stages); set it to give 1b
    # its own length.
    n.train = _section(max_steps=ml_collections.config_dict.placeholder(int))
    # Stage 1a's values, spelled out so each stays overridable for 1b alone: the official NeuS renderer also
    # prunes its occupancy-grid samples by alpha (0.01, the isotropic NeuS alpha of the SDF at the sample) and
    # transmittance (1e-4), and its grid keeps the occupancy threshold 0.01.
    n.render = _section(alpha_threshold=0.01, early_stop_eps=1e-4, samples_per_ray=24.0,
                        candidate_samples_per_ray=64.0)
    n.render.grid = _section(threshold=0.01)
    n.loss = _section(
        lambda_normal_smooth=schedule(0.0), lambda_3d_normal_smooth=schedule(0.0), lambda_orient=schedule(10.0),
        lambda_sparsity=schedule(0.1), lambda_opaque=schedule(0.1), lambda_eikonal=schedule(0.0))
    n.guidance = ml_collections.ConfigDict()
    n.guidance.sd = _section(min_step_percent=schedule(0.2), max_step_percent=schedule(0.5))
    n.guidance.zero123 = _section(min_step_percent=schedule(0.2), max_step_percent=schedule(0.5))
    n.optimizer = _section(eps=1e-15)
    n.eval = _section(height=512, width=512)
    # Stage 2 (dreamcraft3d-geometry): what differs from stage 1a.
    g = c.overrides.geometry = ml_collections.ConfigDict()
    g.name = "geometry"
    g.data = _section(heights=(1024,), widths=(1024,), resolution_milestones=())
    g.camera = _section(progressive_until=0)
    g.train = _section(max_steps=ml_collections.config_dict.placeholder(int), mode="accumulate")
    g.loss = _section(
        lambda_depth_rel=schedule(0.0), lambda_normal_smooth=schedule(0.0), lambda_3d_normal_smooth=schedule(0.0),
        lambda_orient=schedule(0.0), lambda_sparsity=schedule(0.0), lambda_opaque=schedule(0.0),
        lambda_normal_consistency=schedule((1000, 10.0, 1.0, 2000)))
    g.guidance = ml_collections.ConfigDict()
    g.guidance.sd = _section(min_step_percent=schedule(0.02), max_step_percent=schedule(0.5))
    g.guidance.zero123 = _section(min_step_percent=schedule(0.2), max_step_percent=schedule(0.5))
    g.optimizer = _section(eps=1e-15)
    g.eval = _section(height=1024, width=1024)


def base_config() -> ml_collections.ConfigDict:
    """Defaults: the official coarse-NeRF (stage 1a) settings at the top level, later stages' differences in
    ``overrides.<stage>`` (see configs/dreamcraft3d.py)."""
    c = ml_collections.ConfigDict()
    for section in (_run, _data, _field, _render, _loss, _guidance, _geometry, _train, _parallel, _kernels,
                    _stage_overrides):
        section(c)
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


_STAGE_CHECKS = (_check_data, _check_field, _check_render, _check_loss, _check_guidance, _check_geometry,
                 _check_train, _check_parallel, _check_kernels)


def validate(cfg) -> None:
    """Check every value the code relies on (every stage's config); raise ConfigError naming the first bad key."""
    _check_run(cfg)
    for stage in tuple(cfg.stages) if cfg.stage == "all" else (cfg.stage,):
        try:
            resolved = stage_config(cfg, stage)
        except (KeyError, AttributeError) as e:
            raise ConfigError(f"overrides.{stage} names a key that the config does not have: {e}") from None
        try:
            for check in _STAGE_CHECKS:
                check(resolved)
        except ConfigError as e:
            if stage == "coarse_nerf":
                raise
            raise ConfigError(f"(in stage {stage}, after overrides.{stage}) {e}") from None
