"""CPU demo: stages 1a -> 1b -> 2 (coarse NeRF, coarse NeuS, DMTet geometry ending in a mesh) on the bundled
example in about 11 minutes on 2 cores.

Same code path as configs/dreamcraft3d.py, sized down: 8-level hash grid with a 2^15 table, 64 px volume renders
with 128 steps per ray, alternate reference / guidance steps; the geometry stage on a 32-cube tet grid at 128 px
for 150 steps (the official: 128 cubes, 1024 px, 5000 steps); and TINY RANDOM-WEIGHT PRIORS (written once to
guidance.demo_dir by dreamcraft_jax.models.demo_priors): their "guidance" is noise, so the unseen sides are not
meaningful and the logs, the run folder (RANDOM_PRIORS.txt) and this note say so. Real priors: set
guidance.priors=pretrained with guidance.sd.pretrained / guidance.zero123.pretrained.
"""

from dreamcraft_jax.config import base_config


def get_config():
    config = base_config()
    config.name = "demo"
    config.stage = "all"
    config.prompt = "a small toy figure"
    config.guidance.priors = "demo"  # RANDOM weights, see the module doc
    config.guidance.sd.resolution = 64
    config.guidance.zero123.resolution = 64
    config.loss.lambda_sd = 0.01  # random priors: keep their noise small next to the reference losses
    config.loss.lambda_3d_sd = 0.01
    config.field.hashgrid.n_levels = 8
    config.field.hashgrid.log2_hashmap_size = 15
    config.field.hashgrid.per_level_scale = 1.6  # 16 -> ~430 over 8 levels
    config.field.progressive.start_level = 8  # all levels from the start: the run is short
    config.data.heights = (64,)
    config.data.widths = (64,)
    config.data.resolution_milestones = ()
    config.camera.progressive_until = 50
    config.render.num_samples_per_ray = 128
    config.render.candidate_samples_per_ray = 24.0
    config.render.samples_per_ray = 12.0
    config.render.eval_samples_per_ray = 24.0
    config.render.grid.warmup_steps = 64
    config.loss.lambda_normal_smooth = 0.0  # no normals on the NeRF's random views: 4x cheaper on CPU
    config.loss.lambda_3d_normal_smooth = 0.0
    config.loss.lambda_orient = 0.0
    config.loss.lambda_sparsity = (100, 0.1, 1.0, 101)
    config.loss.lambda_opaque = (100, 0.1, 1.0, 101)
    config.train.mode = "alternate"
    config.train.max_steps = 300
    config.train.log_every = 10
    config.train.val_every = 100
    config.train.save_every = 100
    config.eval.height = 128
    config.eval.width = 128
    config.eval.n_video_views = 30
    config.eval.fps = 20
    n = config.overrides.coarse_neus
    n.data.heights = (64,)
    n.data.widths = (64,)
    n.render.samples_per_ray = 24.0
    n.render.candidate_samples_per_ray = 24.0
    n.loss.lambda_orient = 0.0
    n.train.max_steps = 100
    n.eval.height = 128
    n.eval.width = 128
    config.neus.cos_anneal_end_steps = 100
    config.geometry.tet_resolution = 32
    config.geometry.max_faces = 60_000
    config.geometry.max_vertices = 30_000
    g = config.overrides.geometry
    g.data.heights = (128,)
    g.data.widths = (128,)
    g.train.max_steps = 150
    g.eval.height = 128
    g.eval.width = 128
    return config
