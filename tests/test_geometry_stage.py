"""Stage 2 (DMTet geometry): init from a NeuS sphere, what each prior sees, 8 devices vs 1, the mesh export.
Tiny sizes (tet grid 12 cubes per side, 24 px views; tests/conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import final_state, make_stage, tiny_config
from dreamcraft_jax import parallel
from dreamcraft_jax.export.mesh import load_mesh
from dreamcraft_jax.fields import dmtet, neus
from dreamcraft_jax.render import raster
from dreamcraft_jax.stages import geometry
from dreamcraft_jax.train_step import TrainState


def _neus_sphere_state(cfg, stage) -> TrainState:
    """A coarse-NeuS state whose SDF is exactly |x| - 0.5 (SDF MLP zeroed: the sphere bias alone)."""
    params = neus.init_field(jax.random.PRNGKey(1), stage.neus_spec)
    params["sdf_net"] = jax.tree.map(jnp.zeros_like, params["sdf_net"])
    zero = jnp.zeros((), jnp.int32)
    return TrainState(params=params, opt_state=(), extras={}, step=zero, rng=jax.random.PRNGKey(0),
                      nonfinite_skips=zero)


@pytest.fixture(scope="module")
def one_device():
    cfg = tiny_config()
    return cfg, make_stage(cfg, parallel.make_mesh(1, 1), "geometry")


def test_init_from_a_neus_sphere_gives_that_sphere(one_device):
    cfg, stage = one_device
    previous = _neus_sphere_state(cfg, stage)
    state = stage.init_state(previous)
    r = 0.5
    # Official box: the sphere's mesh box (extent ~2r, vertices inside the sphere) padded by 10 % of it per side.
    box = np.asarray(state.extras["box"])
    h = 2 * cfg.field.radius / cfg.geometry.tet_resolution  # first-pass cell size
    extent = box[1] - box[0]
    np.testing.assert_allclose(box[0], -box[1], atol=1e-6)  # symmetric
    assert np.all(extent <= 1.2 * 2 * r + 1e-5) and np.all(extent >= 1.2 * 2 * (r - h)), extent
    # Per-vertex SDF = the NeuS SDF at the tight box's grid vertices, not clamped.
    grid = stage.grid
    points = box[0] + grid.vertices * extent
    np.testing.assert_allclose(np.asarray(state.params["sdf"]), np.linalg.norm(points, axis=-1) - r, atol=1e-5)
    assert np.asarray(state.params["sdf"]).max() > 0.05  # corners of the box: outside, unclamped
    np.testing.assert_array_equal(np.asarray(state.params["deformation"]), 0.0)
    # The texture is inherited.
    np.testing.assert_array_equal(np.asarray(state.params["encoding"]), np.asarray(previous.params["encoding"]))
    # Its surface is that sphere: every vertex within the chord error of radius r, area ~ 4 pi r^2.
    surf = jax.jit(stage.surface)(state.params, state.extras["box"], stage.device_grid)
    vertices, faces = dmtet.compact_mesh(jax.device_get(surf["mesh"]))
    radii = np.linalg.norm(vertices, axis=-1)
    cell = extent.max() / cfg.geometry.tet_resolution
    assert np.abs(radii - r).max() < 0.5 * cell
    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1).sum()
    assert area == pytest.approx(4 * math.pi * r**2, rel=0.08)


def test_each_prior_sees_what_the_official_system_gives_it(one_device):
    """rgb steps: the 2D prior scores the rgb renders; normal steps: the normal renders; Zero123 always rgb."""
    cfg, stage = one_device

    @dataclasses.dataclass(frozen=True)
    class FakePrior:
        resolution: int = 24

    class FakePriors:
        priors = {"sd": FakePrior(), "3d_sd": FakePrior()}

    with_priors = dataclasses.replace(stage, priors=FakePriors())
    state = stage.init_state()
    hw = (24, 24)
    g = cfg.geometry

    @jax.jit
    def everything(state):
        batch = with_priors.view_batches(state)
        shared = ((stage.targets[hw], stage.device_grid), state.step, state.extras["box"])
        surf = stage.surface(state.params, state.extras["box"], stage.device_grid)
        want = stage.render_view(state.params, surf, jax.tree.map(lambda a: a[0], batch[1][0]), *hw,
                                 g.near_random, g.far_random)
        outs = {kind: with_priors.render_loss(state.params, batch, shared, kind, *hw)
                for kind in (geometry.RGB, geometry.NORMAL)}
        return want, {kind: (m, images) for kind, (_, m, images) in outs.items()}

    want, outs = everything(state)
    assert float(jnp.mean(want["opacity"])) > 0.05  # the sphere is in view
    for kind, sd_sees in ((geometry.RGB, "rgb"), (geometry.NORMAL, "normal")):
        images = outs[kind][1]
        np.testing.assert_allclose(np.asarray(images["sd"][0]), np.asarray(want[sd_sees]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(images["3d_sd"][0]), np.asarray(want["rgb"]), atol=1e-6)
    # The reference losses apply on rgb steps only; normal consistency (x2) on both.
    m_rgb, m_normal = outs[geometry.RGB][0], outs[geometry.NORMAL][0]
    assert "ref/rgb" in m_rgb and "ref/mask" in m_rgb and "ref/rgb" not in m_normal
    assert float(m_rgb["normal_consistency"]) > 0


def test_normal_consistency_is_the_edge_mean_of_one_minus_cos():
    # A tetrahedron's four faces; vertex normals chosen by hand, so every edge's 1 - cos is known.
    faces = jnp.asarray([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]], jnp.int32)
    normals = jnp.asarray([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    edges = {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}
    n = np.asarray(normals)
    want = np.mean([1 - n[a] @ n[b] for a, b in edges])  # 1, 1, 0, 1, 1, 1 -> 5/6
    got = geometry.normal_consistency(normals, faces, jnp.ones((4,), bool))
    assert float(got) == pytest.approx(want, abs=1e-6) and want == pytest.approx(5 / 6)


def test_every_rendered_map_has_a_finite_gradient(one_device):
    """d(sum of each map)/d(params) is finite and reaches the SDF and the deformation. The normal map's
    normalisation at background pixels (interpolated normal 0) once gave NaN, which a zero cotangent does not
    cancel: every step whose loss saw the normal map was skipped by the finite guard."""
    cfg, stage = one_device
    state = stage.init_state(_neus_sphere_state(cfg, stage))
    camera = stage.eval_cameras()["side"]
    box, grid = state.extras["box"], stage.device_grid
    outputs = ("rgb", "normal", "opacity")

    def total(params, output):
        out = stage.render_view(params, stage.surface(params, box, grid), camera, 24, 24, 0.1, 1000.0)
        return jnp.sum(out[output])

    all_grads = jax.jit(lambda p: [jax.grad(total)(p, k) for k in outputs])(state.params)  # one compile
    for output, grads in zip(outputs, all_grads):
        for name, g in grads.items():
            assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(g)), (output, name)
        assert np.abs(np.asarray(grads["deformation"])).max() > 0 and np.abs(np.asarray(grads["sdf"])).max() > 0


def test_rgb_gradient_reaches_the_vertices_through_the_texture(one_device):
    """The albedo is looked up at the interpolated surface points with their gradient kept (the official tcnn grid
    passes d/dx back): inside the silhouette, where coverage does not move, d(rgb)/d(deformation) along a random
    direction equals the central finite difference of the render. Under a stop_gradient it would be 0."""
    cfg, stage = one_device
    state = stage.init_state(_neus_sphere_state(cfg, stage))
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    params = dict(state.params)  # a texture that varies at the grid's scale (the init's table is ~1e-4)
    params["encoding"] = jax.random.normal(k1, params["encoding"].shape, jnp.float32)
    h = w = 24
    camera = stage.eval_cameras()["reference"]
    box, grid = state.extras["box"], stage.device_grid
    base = jax.jit(lambda p: stage.render_view(p, stage.surface(p, box, grid), camera, h, w, 0.1, 1000.0))(params)
    cover = np.asarray(base["opacity"]) > 0.999
    inner = cover.copy()  # pixels whose 4-neighbours are covered too: no silhouette pair touches them
    inner[1:-1, 1:-1] &= cover[:-2, 1:-1] & cover[2:, 1:-1] & cover[1:-1, :-2] & cover[1:-1, 2:]
    inner[[0, -1], :] = inner[:, [0, -1]] = False
    assert inner.sum() > 50
    weights = jax.random.normal(k2, (h, w, 3)) * jnp.asarray(inner)[..., None]
    direction = jax.random.normal(k3, params["deformation"].shape)

    def f(deformation):
        p = {**params, "deformation": deformation}
        out = stage.render_view(p, stage.surface(p, box, grid), camera, h, w, 0.1, 1000.0)
        return jnp.sum(out["rgb"] * weights)

    d0 = params["deformation"]
    grad = jax.jit(jax.grad(f))(d0)
    analytic = float(jnp.sum(grad * direction))
    eps = 1e-3  # float32 renders: smaller steps are rounding noise, larger ones see the texture's curvature
    fd = (float(jax.jit(f)(d0 + eps * direction)) - float(jax.jit(f)(d0 - eps * direction))) / (2 * eps)
    assert abs(fd) > 0.1  # the texture does move with the surface here
    assert analytic == pytest.approx(fd, rel=0.05)


def _small_geometry_config():
    cfg = tiny_config()
    cfg.geometry.tet_resolution = 8
    cfg.overrides.geometry.data.heights = cfg.overrides.geometry.data.widths = (16,)
    return cfg


def test_step_on_8_devices_equals_the_1_device_step():
    """8 devices (a reference view each) give the 1-device step's loss and gradients, finite (a NaN would make
    the finite guard skip the step). Parameters after the step are not compared: Adam with the official eps
    1e-15 turns any gradient element, even one at rounding level whose sign the reduction order decides, into a
    full +-lr step."""
    from dreamcraft_jax.train_step import build_grads

    cfg = _small_geometry_config()
    cfg.train.ref_views_per_device = 8
    one = make_stage(cfg, parallel.make_mesh(1, 1), "geometry")
    eight = make_stage(_small_geometry_config(), parallel.make_mesh(8, 1), "geometry")
    key = one.step_key(0)
    kind, (h, w) = key
    g1, m1 = build_grads(one.step_def(kind, h, w), one.mesh)(one.init_state(), *one.step_inputs(key))
    g8, m8 = build_grads(eight.step_def(kind, h, w), eight.mesh)(eight.init_state(), *eight.step_inputs(key))
    assert float(m1["loss"]) == pytest.approx(float(m8["loss"]), rel=1e-5)
    for name in ("sdf", "deformation", "encoding"):
        a, b = np.asarray(g1[name]), np.asarray(g8[name])
        assert np.isfinite(a).all() and np.isfinite(b).all() and np.abs(a).max() > 0, name
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max(), err_msg=name)


def test_exported_mesh_loads_back_and_renders_as_the_stage(one_device, tmp_path):
    cfg, stage = one_device
    state = stage.init_state(_neus_sphere_state(cfg, stage))
    paths = stage.finish(state, tmp_path)
    camera = stage.eval_cameras()["side"]
    h = w = 24
    near, far = cfg.geometry.near_random, cfg.geometry.far_random
    own = stage.eval_render(h, w)(stage.eval_inputs(state), camera)
    surf = stage.surface_fn(state.params, state.extras["box"], stage.device_grid)
    n_faces = int(surf["mesh"].n_faces)  # one sphere: no component is removed

    @jax.jit
    def render_file(v, f):
        valid = jnp.ones((f.shape[0],), bool)
        clip = raster.clip_positions(v, camera, h, w, near, far)
        rast = raster.rasterize(clip, f, valid, h, w)
        cover = (rast.tri_id >= 0).astype(jnp.float32)[..., None]
        n = raster.interpolate(raster.vertex_normals(v, f, valid), rast, f, clip)
        n = raster.safe_normalize(n)
        topo = raster.edge_topology(f, valid)
        return raster.antialias(cover, rast, clip, f, topo)[..., 0], raster.antialias((n + 1) * 0.5 * cover, rast,
                                                                                     clip, f, topo)

    shapes = []
    for kind in ("glb", "obj"):
        loaded = load_mesh(paths[kind])
        shapes.append((loaded.vertices.shape, loaded.faces.shape))
        assert loaded.faces.shape == (n_faces, 3)
        assert len(np.unique(loaded.faces)) == len(loaded.vertices)  # compact: every vertex used
        # The file's mesh through the rasteriser: same coverage and normals as the stage's render.
        opacity, normal = render_file(jnp.asarray(loaded.vertices, jnp.float32), jnp.asarray(loaded.faces, jnp.int32))
        np.testing.assert_allclose(np.asarray(opacity), np.asarray(own["opacity"]), atol=1e-4)
        np.testing.assert_allclose(np.asarray(normal), np.asarray(own["normal"]), atol=2e-3)
    assert shapes[0] == shapes[1]


def _geometry_run(tmp_path, full: bool):
    from dreamcraft_jax.runner import train

    cfg = tiny_config()
    cfg.workdir = str(tmp_path / "run")
    cfg.parallel.data = 1
    cfg.train.max_steps = 2
    cfg.train.save_every = 2
    cfg.geometry.n_rgb = 1  # one step kind: one compile
    cfg.eval.video, cfg.eval.n_video_views = True, 3
    if full:
        cfg.stage = "all"
        cfg.stages = ("coarse_nerf", "coarse_neus", "geometry")
    else:
        cfg.stage = "geometry"
        cfg.init_from = _neus_stand_in(cfg, tmp_path)
    return train(cfg, progress=False)


def _neus_stand_in(cfg, tmp_path) -> str:
    """A stand-in NeuS run folder: its initial state (a sphere-biased SDF) saved as its last checkpoint."""
    from dreamcraft_jax.checkpoints import Checkpointer

    checkpointer = Checkpointer(tmp_path / "neus_run" / "coarse_neus" / "checkpoints", 1)
    checkpointer.save(make_stage(cfg, parallel.make_mesh(1, 1), "coarse_neus").init_state(), force=True)
    checkpointer.wait()
    checkpointer.close()
    return str(tmp_path / "neus_run")


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_geometry_run_ends_in_a_mesh_and_the_export_command_rewrites_it(tmp_path, capsys, monkeypatch, full):
    """A geometry run from a NeuS checkpoint (``--config.init_from``; slow variant: stage=all, 1a -> 1b -> geometry,
    two tiny steps each, no priors) writes its mesh, and ``python -m dreamcraft_jax.export RUN`` rebuilds the
    stage from its folder and writes the same mesh."""
    from dreamcraft_jax.export.__main__ import main as export_main

    extractions = []  # the evaluation's mesh extractions: one per state, not one per rendered view
    own_inputs = geometry.GeometryStage.eval_inputs
    monkeypatch.setattr(geometry.GeometryStage, "eval_inputs",
                        lambda self, state: extractions.append(int(state.step)) or own_inputs(self, state))
    workdir = _geometry_run(tmp_path, full)
    folder = workdir / "geometry"
    assert (folder / "DONE").exists()
    assert (folder / "video" / "turntable.mp4").exists()
    assert extractions == [2, 2]  # the last step's validation (2 views), the turntable (3 frames)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(r["n_faces"] > 0 and r["mesh_overflow"] == 0 for r in records if "loss" in r)
    first = load_mesh(folder / "mesh" / "model.glb")
    assert export_main([str(workdir), "--out", str(tmp_path / "again")]) == 0
    assert "wrote glb" in capsys.readouterr().out
    again = load_mesh(tmp_path / "again" / "mesh" / "model.glb")
    assert again.faces.shape == first.faces.shape and again.vertices.shape == first.vertices.shape
    np.testing.assert_allclose(again.vertices, first.vertices, atol=1e-6)
    # A folder that is not a geometry stage: one error line, no traceback.
    assert export_main([str(workdir / "coarse_nerf")]) == 2
    assert "geometry" in capsys.readouterr().err


def test_reference_steps_pull_the_sphere_towards_the_reference_mask():
    """Stage 2 trains: 40 reference steps (no priors) from the sphere lower the mask and rgb errors against the
    example and skip no step (a NaN gradient would skip every one and leave both unchanged). The sphere is far
    from the example: the silhouette moves by a fraction of a pixel per step (at 24 px: mask 0.256 -> 0.245,
    rgb 0.114 -> 0.052 with jax 0.12.1 and 0.11.2 alike when this was written). Adam's eps is 1e-8 here, not
    the official 1e-15, which turns rounding-level gradients into full steps and makes 40 steps depend on the
    jax version's reduction order."""
    cfg = tiny_config()
    cfg.overrides.geometry.optimizer.eps = 1e-8
    stage = make_stage(cfg, parallel.make_mesh(1, 1), "geometry")
    state = stage.init_state()
    key = stage.step_key(0)  # an rgb step: the reference rgb and mask losses apply
    step, inputs = stage.step_fn(key), stage.step_inputs(key)
    first = None
    for _ in range(40):
        state, metrics = step(state, *inputs)
        first = first or {k: float(metrics[f"ref/{k}"]) for k in ("mask", "rgb")}
    assert int(state.nonfinite_skips) == 0
    last = {k: float(metrics[f"ref/{k}"]) for k in ("mask", "rgb")}
    assert last["mask"] < 0.97 * first["mask"] and last["rgb"] < 0.6 * first["rgb"], (first, last)


def test_geometry_resume_equals_uninterrupted_run(tmp_path):
    """A geometry run stopped at step 3 and resumed to 6 ends in the state of a run straight to 6 (both step
    kinds, rgb and normal, in each part)."""
    from dreamcraft_jax.runner import train

    common = {"stage": "geometry", "train.save_every": 3, "parallel.data": 1, "geometry.n_rgb": 2,
              "eval.video": False}
    common["init_from"] = _neus_stand_in(tiny_config(**common), tmp_path)
    straight = tiny_config(**common, **{"train.max_steps": 6, "workdir": str(tmp_path / "a")})
    train(straight, progress=False)
    train(tiny_config(**common, **{"train.max_steps": 3, "workdir": str(tmp_path / "b")}), progress=False)
    resumed = tiny_config(**common, **{"train.max_steps": 6, "resume": str(tmp_path / "b")})
    train(resumed, progress=False)
    a = final_state(straight, tmp_path / "a", "geometry")
    b = final_state(resumed, tmp_path / "b", "geometry")
    assert int(a.step) == int(b.step) == 6 and int(b.nonfinite_skips) == 0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert (tmp_path / "b" / "geometry" / "mesh" / "model.glb").exists()
