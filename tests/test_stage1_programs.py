"""``train.separate_guidance``: the random-view step as three programs equals the one-program step.

(A file of its own so that ``pytest --dist loadfile`` can run it beside the other stage-1 tests.)"""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from dreamcraft_jax import parallel
from dreamcraft_jax.data.reference import example_image_path, load_reference
from dreamcraft_jax.stages.coarse_nerf import RANDOM, CoarseNerf, targets_from_reference

N_DEV = 8


@pytest.mark.skipif(len(jax.devices()) < N_DEV, reason="needs 8 (simulated) devices")
def test_three_program_step_equals_the_one_program_step(demo_priors):
    """``train.separate_guidance``: render forward, priors, backward + Adam as three programs give the state
    and metrics of the one-program step (same views, same prior samples) on 8 devices (data 4 x fsdp 2, priors
    FSDP-split); the priors' program is shared by two render resolutions (compiled once)."""
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
        stage = CoarseNerf.from_config(cfg, mesh, priors.configured(cfg), params)
        placed = stage.place_prior_params(params)
        step = stage.step_fn(RANDOM, 16, 16)
        state, metrics = step(stage.init_state(), targets, placed)
        state, metrics = step(state, targets, placed)  # a second step: the state the first one left
        finals.append((jax.device_get(state), jax.device_get(metrics)))
        if separate:
            assert not hasattr(step, "lower")  # three programs, not one
            stage.step_fn(RANDOM, 24, 24)(stage.init_state(), targets, placed)
            assert stage._guidance_program._cache_size() == 1  # 16 and 24 px renders share the priors' program
    (s1, m1), (s3, m3) = finals
    assert set(m1) == set(m3)
    for name in ("loss", "random/loss", "random/sd", "random/3d_sd", "random/sd_t", "grad_norm"):
        np.testing.assert_allclose(float(m3[name]), float(m1[name]), rtol=1e-4, err_msg=name)
    # Adam moves each entry by about lr * m / sqrt(v): for hash entries whose gradient is ulps from zero that
    # amplifies summation-order differences between the programs, so the state is checked to 1% of one Adam step
    # (lr 0.01); the second step's loss above already agrees to 1e-4.
    for a, b in zip(jax.tree.leaves(s3), jax.tree.leaves(s1)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-4, atol=1e-4)
