"""CPU demo: fit the bundled example from the reference view in a few minutes on 2 cores.

Same code path as configs/coarse_nerf.py, sized down: 8-level hash grid with a 2^15 table, 64 px training
renders, 128 candidate steps per ray, reference-view losses only (no diffusion priors yet), 300 steps.
"""

from dreamcraft_jax.config import base_config


def get_config():
    config = base_config()
    config.name = "demo"
    config.field.hashgrid.n_levels = 8
    config.field.hashgrid.log2_hashmap_size = 15
    config.field.hashgrid.per_level_scale = 1.6  # 16 -> ~430 over 8 levels
    config.field.progressive.start_level = 8  # all levels from the start: the run is short
    config.data.heights = (64,)
    config.data.widths = (64,)
    config.data.resolution_milestones = ()
    config.data.depth = "example"
    config.render.num_samples_per_ray = 128
    config.render.candidate_samples_per_ray = 24.0
    config.render.samples_per_ray = 12.0
    config.render.eval_samples_per_ray = 24.0
    config.render.grid.warmup_steps = 64
    config.loss.lambda_normal_smooth = 0.0
    config.loss.lambda_3d_normal_smooth = 0.0
    config.loss.lambda_orient = 0.0
    config.loss.lambda_sparsity = 0.0
    config.loss.lambda_opaque = 0.0
    config.train.mode = "reference_only"
    config.train.random_views_per_device = 0
    config.train.max_steps = 300
    config.train.log_every = 10
    config.train.val_every = 100
    config.train.save_every = 100
    config.eval.height = 128
    config.eval.width = 128
    config.eval.n_video_views = 40
    config.eval.fps = 20
    return config
