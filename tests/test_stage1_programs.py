"""``train.separate_guidance``: the random-view step as three programs equals the one-program step.

(A file of its own so that ``pytest --dist loadfile`` can run it beside the other stage-1 tests.)"""

import jax
import numpy as np
import pytest

from conftest import make_stage, tiny_config
from dreamcraft_jax import parallel
from dreamcraft_jax.data.reference import example_image_path, load_reference
from dreamcraft_jax.stages.volume_stage import RANDOM, targets_from_reference

N_DEV = 8


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < N_DEV, reason="needs 8 (simulated) devices")
def test_three_program_step_equals_the_one_program_step(demo_priors):
    """``train.separate_guidance``: render forward, priors, backward + Adam as three programs give the state
    and metrics of the one-program step (same views, same prior samples) on 8 devices (data 4 x fsdp 2, priors
    FSDP-split). (The priors' program takes inputs of the priors' sizes, so every resolution shares it; that 1a
    and 1b share it is tested below.)"""
    cfg0, (priors, params) = demo_priors
    data, fsdp = 4, 2
    mesh = parallel.make_mesh(data, fsdp, devices=jax.devices()[:data * fsdp])
    ref = load_reference(example_image_path(), 16, 16)
    targets = parallel.replicate(targets_from_reference(ref), mesh)
    finals = []
    for separate in (False, True):
        cfg = tiny_config(**{"train.random_views_per_device": 2, "loss.lambda_sd": 0.1, "loss.lambda_3d_sd": 0.1,
                             "guidance.sd.resolution": 32, "guidance.zero123.resolution": 32,
                             "parallel.fsdp_min_size": 256, "train.separate_guidance": separate})
        stage = make_stage(cfg, mesh, "coarse_nerf", priors, params)
        placed = stage.prior_params
        step = stage.step_fn((RANDOM, (16, 16)))
        state, metrics = step(stage.init_state(), targets, placed)
        state, metrics = step(state, targets, placed)  # a second step: the state the first one left
        finals.append((jax.device_get(state), jax.device_get(metrics)))
        if separate:
            assert not hasattr(step, "lower")  # three programs, not one
    (s1, m1), (s3, m3) = finals
    assert set(m1) == set(m3)
    for name in ("loss", "random/loss", "random/sd", "random/3d_sd", "random/sd_t", "grad_norm"):
        np.testing.assert_allclose(float(m3[name]), float(m1[name]), rtol=1e-4, err_msg=name)
    # Adam moves each entry by about lr * m / sqrt(v): for hash entries whose gradient is ulps from zero that
    # amplifies summation-order differences between the programs, so the state is checked to 1% of one Adam step
    # (lr 0.01); the second step's loss above already agrees to 1e-4.
    for a, b in zip(jax.tree.leaves(s3), jax.tree.leaves(s1)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-4, atol=1e-4)


def test_stages_share_the_priors_program(demo_priors):
    """With ``train.separate_guidance`` the stage's schedules (timestep ranges, loss weights) are inputs of the
    priors' program: 1a and 1b (other timestep ranges, other lambda_sd here) lower it to the same HLO, so 1b loads
    1a's compiled program from the persistent cache, and each stage feeds it its own schedules."""
    from dreamcraft_jax.config import stage_config
    from dreamcraft_jax.train_step import guidance_program

    cfg0, (priors, params) = demo_priors
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    cfg = tiny_config(**{"loss.lambda_sd": 0.1, "loss.lambda_3d_sd": 0.1, "guidance.sd.resolution": 32,
                         "guidance.zero123.resolution": 32, "train.separate_guidance": True})
    with cfg.unlocked():
        cfg.overrides.coarse_neus.loss.lambda_sd = 0.3  # 1b also weighs SD otherwise
    texts, stages = [], []
    for name in ("coarse_nerf", "coarse_neus"):
        stage = make_stage(stage_config(cfg, name), mesh, name, priors, params)
        step = jax.numpy.int32(100)
        views = stage.view_batches(stage.init_state(), RANDOM)[1]
        images = stage.priors.resized(jax.numpy.zeros((1, 16, 16, 3)))
        guide = {"step": step, "schedules": stage.guidance_schedules(step)}
        program = guidance_program(stage.step_def(RANDOM, 16, 16), mesh)
        texts.append(program.lower(images, views, guide, stage.prior_params).as_text())
        stages.append(stage)
    assert texts[0] == texts[1]

    # The numbers 1b feeds that shared program are its own: fixed range 0.2-0.5 (1a: 0.45-0.675 at step 100,
    # annealed), lambda_sd 0.3. (That the program uses what it is fed: the equality test above, on 1a's.)
    for stage, (lo, hi, w_sd) in zip(stages, ((0.45, 0.675, 0.1), (0.2, 0.5, 0.3))):
        schedules = jax.device_get(stage.guidance_schedules(jax.numpy.int32(100)))
        assert float(schedules["weights"]["sd"]) == np.float32(w_sd)
        for name in ("sd", "3d_sd"):
            np.testing.assert_allclose(float(schedules["priors"][name]["min_step_percent"]), lo, rtol=1e-6)
            np.testing.assert_allclose(float(schedules["priors"][name]["max_step_percent"]), hi, rtol=1e-6)


def test_priors_trace_once_per_stage(demo_priors, monkeypatch):
    """The one-program random-view step scores renders pre-resized to the priors' input sizes through each
    prior's jitted loss, so a stage's steps at two resolutions trace each prior's loss once, not twice."""
    from dreamcraft_jax.guidance import priors as priors_mod

    cfg0, (priors, params) = demo_priors
    calls = {}
    for cls in (priors_mod.StableDiffusionPrior, priors_mod.Zero123Prior):
        original = cls.loss

        def counted(self, *args, _original=original, **kwargs):
            calls[self.name] = calls.get(self.name, 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "loss", counted)
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    cfg = tiny_config(**{"loss.lambda_sd": 0.1, "loss.lambda_3d_sd": 0.1, "guidance.sd.resolution": 32,
                         "guidance.zero123.resolution": 32})
    stage = make_stage(cfg, mesh, "coarse_nerf", priors, params)
    placed = stage.prior_params
    for res in (16, 24):
        targets = parallel.replicate(targets_from_reference(load_reference(example_image_path(), res, res)), mesh)
        stage.step_fn((RANDOM, (res, res))).trace(stage.init_state(), targets, placed)
    assert calls == {"sd": 1, "zero123": 1}
