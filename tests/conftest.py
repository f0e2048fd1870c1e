"""Test setup: 8 simulated CPU devices (set before jax is imported) and small shared configs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# The suite is compile-bound on CPU: XLA's cheap compilation mode makes it about a fifth faster (the programs are
# tiny, so run time barely grows). Tolerances are the same; the demo (`make run`) and benches compile normally.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same programs again (each train() call traces fresh closures, so JAX's in-memory cache
# misses; resume and interrupt tests run the same tiny stage two or three times, and files on the two pytest-xdist
# workers build the same tiny steps): a persistent cache private to this test session, shared by its workers
# (they inherit the folder's name from the process that made it, which deletes it at exit), lets the repeats load
# them. Set in-process (not through JAX's environment variable), so child processes that time compilation
# (bench compile) still compile from nothing.
_CACHE_ENV = "DREAMCRAFT_TESTS_XLA_CACHE"
if not os.environ.get(_CACHE_ENV):
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="dreamcraft-jax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def tiny_config(**overrides):
    """A config small enough for unit tests of the full step (16 px views, 4-level grid)."""
    from dreamcraft_jax.config import base_config

    c = base_config()
    c.field.hashgrid.n_levels = 4
    c.field.hashgrid.log2_hashmap_size = 12
    c.field.hashgrid.per_level_scale = 2.0
    c.field.progressive.start_level = 2
    c.field.progressive.start_step = 2
    c.field.progressive.update_steps = 1
    c.data.heights = (16,)
    c.data.widths = (16,)
    c.data.resolution_milestones = ()
    c.render.num_samples_per_ray = 64
    c.render.candidate_samples_per_ray = 24.0
    c.render.samples_per_ray = 12.0
    c.render.eval_samples_per_ray = 12.0
    c.render.grid.warmup_steps = 2
    c.render.grid.update_every = 2
    c.train.log_every = 1
    c.train.val_every = 1000
    c.eval.height = 16
    c.eval.width = 16
    c.eval.video = False
    c.train.time_split = False
    c.compilation_cache_dir = ""  # tests write nothing outside their tmp folders
    c.loss.lambda_sd = 0.0  # priors off unless a test turns them on (with guidance.demo_priors)
    c.loss.lambda_3d_sd = 0.0
    c.overrides.coarse_neus.data.heights = (16,)
    c.overrides.coarse_neus.data.widths = (16,)
    c.overrides.coarse_neus.render.samples_per_ray = 24.0
    c.overrides.coarse_neus.render.candidate_samples_per_ray = 24.0
    c.stages = ("coarse_nerf", "coarse_neus")  # stage=all runs 1a -> 1b unless a test adds the geometry stage
    c.geometry.tet_resolution = 12
    c.geometry.max_faces = 4000
    c.geometry.max_vertices = 2000
    c.geometry.tet_cache_dir = os.path.join(os.environ[_CACHE_ENV], "tets")
    c.overrides.geometry.data.heights = (24,)
    c.overrides.geometry.data.widths = (24,)
    c.overrides.geometry.eval.height = 24
    c.overrides.geometry.eval.width = 24
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end or benchmark-tool tests; `make test` skips them, "
                            "`make test-all` runs them (each file keeps fast tests of its own)")
    config.addinivalue_line("markers", "optimized: compile this test's programs with XLA's optimizations (tests "
                            "that run long programs, where the cheap compilation mode costs more than it saves)")


# The slowest files (seconds of test time on 2 CPU cores), collected first: `pytest -n 2 --dist loadfile` hands
# whole files to the two workers in collection order, so a heavy file collected last (alphabetically:
# test_stage1*.py) ran alone at the end while the other worker sat idle. The rest keep their order.
_HEAVY_FILES_FIRST = ("test_golden.py", "test_runner.py", "test_geometry_stage.py", "test_kernels_fd_hashgrid.py",
                      "test_parallel_step.py", "test_stage1.py", "test_stage1_official.py", "test_stage1_fidelity.py",
                      "test_raster.py", "test_kernels_raster.py", "test_kernels_hashgrid.py", "test_kernels_mlp.py",
                      "test_bench.py", "test_priors.py", "test_stage1_programs.py", "test_bench_eval.py",
                      "test_unet_vae.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


@pytest.fixture(autouse=True)
def _xla_optimizations(request):
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def demo_prior_root(tmp_path_factory):
    """A folder holding the tiny random demo priors (demo-sd/, demo-zero123/), written once per session."""
    from dreamcraft_jax.models.demo_priors import ensure_demo_priors

    root = tmp_path_factory.mktemp("demo_priors")
    ensure_demo_priors(root)
    return root


@pytest.fixture(scope="session")
def demo_priors(demo_prior_root):
    """(tiny config with both priors at 32 px, (Priors, params)) of the tiny random demo priors."""
    from dreamcraft_jax.data.reference import example_image_path, load_reference
    from dreamcraft_jax.guidance import priors as priors_mod

    cfg = tiny_config(**{"loss.lambda_sd": 0.1, "loss.lambda_3d_sd": 0.1, "guidance.sd.resolution": 32,
                         "guidance.zero123.resolution": 32})
    cfg.guidance.sd.pretrained, cfg.guidance.zero123.pretrained = priors_mod.demo_prior_paths(demo_prior_root)
    ref = load_reference(example_image_path(), 32, 32)
    return cfg, priors_mod.load_priors(cfg, priors_mod.reference_rgb_on_white(ref.rgb, ref.mask))


def tiny_vae_encode_case():
    """(loss, params, images, (value, grads) of jax.value_and_grad(loss, argnums=(0, 1))): a tiny VAE encoder's
    mean latent through sin and a sum, on 2 x 32 x 32 images; for checking that a GroupNorm routing changes
    neither values nor gradients."""
    import jax
    import jax.numpy as jnp

    from dreamcraft_jax.guidance.random_priors import TINY_VAE
    from dreamcraft_jax.models.vae import AutoencoderKL

    vae = AutoencoderKL.from_config(TINY_VAE)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
    params = vae.init(jax.random.PRNGKey(1), x, method=AutoencoderKL.encode)["params"]

    def loss(p, im):
        return jnp.sum(jnp.sin(vae.apply({"params": p}, im, method=AutoencoderKL.encode)[0]))

    return loss, params, x, jax.value_and_grad(loss, argnums=(0, 1))(params, x)


def lowered_for_gpu(fn, *args) -> str:
    """The text of ``jit(fn)(*args)`` lowered for CUDA as on an H200, from this CPU-only machine (an abstract GPU
    device); skips the test where this jax cannot do that. Pallas kernels called with ``interpret=False`` (or
    seeing a GPU default backend) appear as Triton calls with their IR."""
    from jax._src import mesh as mesh_lib

    if not hasattr(mesh_lib, "AbstractDevice") or not hasattr(jax.sharding, "use_abstract_mesh"):
        pytest.skip(f"jax {jax.__version__} cannot lower for an abstract GPU device")
    device = mesh_lib.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("lowering",), axis_types=(jax.sharding.AxisType.Auto,),
                                     abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def make_stage(cfg, mesh, name="coarse_nerf", priors=None, prior_params=None):
    """Stage ``name`` built as the runner builds it (``cfg``: the run's config, or one already resolved for that
    stage by ``stage_config``)."""
    from dreamcraft_jax.config import stage_config
    from dreamcraft_jax.stages.base import build_stage

    return build_stage(name, cfg if cfg.stage == name else stage_config(cfg, name), mesh, priors, prior_params)


def final_state(cfg, workdir, name="coarse_nerf"):
    """The last checkpointed TrainState of stage ``name`` in run folder ``workdir``, on the host."""
    import jax

    from dreamcraft_jax import parallel
    from dreamcraft_jax.checkpoints import restore_latest

    stage = make_stage(cfg, parallel.mesh_from_config(cfg), name)
    return jax.device_get(restore_latest(workdir / name / "checkpoints", stage.init_state()))
