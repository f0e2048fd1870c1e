"""Tests of models/schedules.py and models/sampling.py against diffusers fixtures and closed forms.

Fixtures: tests/fixtures/make_schedule_fixtures.py (diffusers DDIMScheduler, run once with torch).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.models import schedules
from dreamcraft_jax.models.sampling import ddim_sample, ddim_step, ddim_timesteps, sdedit, sdedit_start_index
from dreamcraft_jax.models.schedules import NoiseSchedule

FIXTURES = Path(__file__).parent / "fixtures"
META = json.loads((FIXTURES / "schedule_cases.json").read_text())
ALPHAS = np.load(FIXTURES / "schedule_alphas.npz")
DDIM = np.load(FIXTURES / "schedule_ddim.npz")


def _schedule(name: str) -> NoiseSchedule:
    return NoiseSchedule.from_config(META["configs"][name])


def _fake_model(guidance_scale):
    """The fixture's model: cond = A x + C t, uncond = A_U x + C_U t (float32), in the schedule's output type."""
    m = META["model"]

    def eps_fn(x, t):
        tf = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        cond = m["A"] * x + m["C"] * tf
        if guidance_scale is None:
            return cond
        return cond, m["A_U"] * x + m["C_U"] * tf

    return eps_fn


def _assert_trajectory_close(got, ref):
    # Per step, errors relative to that step's scale: float32 rounding is amplified along a trajectory whose
    # values grow ~50x under CFG 7.5, so elementwise rtol alone would test cancellation noise near zero.
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape
    scale = np.abs(ref).reshape(len(ref), -1).max(axis=1)
    err = np.abs(got - ref).reshape(len(ref), -1).max(axis=1)
    assert np.all(err <= 1e-5 * scale), (err / scale).max()


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(kind):
    config = {"beta_schedule": kind}
    if kind == "scaled_linear":
        config.update(beta_start=0.00085, beta_end=0.012)
    s = NoiseSchedule.from_config(config)
    np.testing.assert_allclose(np.asarray(s.betas), ALPHAS[f"betas_{kind}"], rtol=1e-6, atol=1e-9)
    # float64-then-cast (ours, as LDM) vs float32 cumprod (diffusers): ~1e-6 relative apart
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ALPHAS[f"alphas_cumprod_{kind}"], rtol=1e-5,
                               atol=1e-6)
    assert s.alphas_cumprod.dtype == jnp.float32 and s.alphas_cumprod.shape == (1000,)


def test_default_schedule_hand_values():
    s = schedules.default_schedule()
    # scaled linear: beta_0 = 0.00085, beta_999 = 0.012; alphabar_0 = 1 - beta_0; no final alpha of one
    assert float(s.betas[0]) == pytest.approx(0.00085, rel=1e-6)
    assert float(s.betas[-1]) == pytest.approx(0.012, rel=1e-6)
    assert float(s.alphas_cumprod[0]) == pytest.approx(1 - 0.00085, rel=1e-7)
    assert float(s.final_alpha_cumprod) == pytest.approx(1 - 0.00085, rel=1e-7)
    expected = np.prod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(expected, rel=1e-5)
    assert (s.num_train_timesteps, s.prediction_type, s.steps_offset, s.clip_sample) == (1000, "epsilon", 1, False)


def test_load_schedule_from_pipeline_folder(tmp_path):
    # SD 2.1-base ships a PNDM scheduler config: extra keys are ignored, missing ones take DDIM defaults
    config = dict(_class_name="PNDMScheduler", beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                  clip_sample=False, num_train_timesteps=1000, prediction_type="epsilon", set_alpha_to_one=False,
                  skip_prk_steps=True, steps_offset=1, trained_betas=None)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "config.json").write_text(json.dumps(config))
    s = schedules.load_schedule(tmp_path)
    ref = schedules.default_schedule()
    np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), np.asarray(ref.alphas_cumprod))
    assert (s.steps_offset, s.timestep_spacing, s.clip_sample) == (1, "leading", False)


def test_from_config_rejects_unsupported():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="thresholding"):
        NoiseSchedule.from_config({"thresholding": True})


def test_rescale_zero_terminal_snr():
    s = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                   "rescale_betas_zero_snr": True})
    plain = schedules.default_schedule()
    assert float(s.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(s.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-6)


def test_add_noise_closed_form():
    s = schedules.default_schedule()
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(3, 2, 2, 4))
    t = np.array([0, 499, 999])
    ab = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)[t][:, None, None, None]
    expected = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    got = schedules.add_noise(s, jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_round_trips(prediction_type):
    s = NoiseSchedule.from_config(dict(schedules.SD_SCHEDULER_CONFIG, prediction_type=prediction_type))
    rng = np.random.default_rng(1)
    x0, noise = rng.normal(size=(3, 4, 4, 2)), rng.normal(size=(3, 4, 4, 2))
    t = np.array([10, 400, 950])
    ab = np.asarray(s.alphas_cumprod, np.float64)[t][:, None, None, None]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    # what a perfect model outputs, written independently from the definitions
    out = {"epsilon": noise, "v_prediction": np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0, "sample": x0}[
        prediction_type]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    np.testing.assert_allclose(np.asarray(schedules.predict_eps(s, f32(out), f32(x_t), t)), noise, atol=2e-4)
    np.testing.assert_allclose(np.asarray(schedules.predict_x0(s, f32(out), f32(x_t), t)), x0, atol=2e-4)
    np.testing.assert_allclose(np.asarray(schedules.training_target(s, f32(x0), f32(noise), t)), out, atol=1e-5)


# ---------------------------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("name,num_steps", [tuple(x) for x in META["timestep_lists"]])
def test_ddim_timesteps_match_diffusers(name, num_steps):
    got = ddim_timesteps(_schedule(name), num_steps)
    np.testing.assert_array_equal(got, DDIM[f"timesteps_{name}_{num_steps}"])


def test_ddim_timesteps_hand_case():
    # SD (leading, offset 1), 25 steps: ratio 40 -> 961, 921, ..., 41, 1
    np.testing.assert_array_equal(ddim_timesteps(schedules.default_schedule(), 25), np.arange(961, 0, -40))


@pytest.mark.parametrize("case", ["sd_cfg", "v_trailing", "sample_linspace_clip"])
def test_ddim_trajectory_matches_diffusers(case):
    spec = META["cases"][case]
    s = _schedule(spec["config"])
    x_T = jnp.asarray(DDIM[f"{case}_x_T"])
    x0, trajectory = jax.jit(lambda x: ddim_sample(_fake_model(spec["guidance_scale"]), s, x, spec["num_steps"],
                                                   guidance_scale=spec["guidance_scale"],
                                                   return_trajectory=True))(x_T)
    _assert_trajectory_close(trajectory, DDIM[f"{case}_trajectory"])
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(trajectory[-1]))


def test_ddim_eta_steps_match_diffusers():
    spec = META["cases"]["sd_eta"]
    s = _schedule(spec["config"])
    n = spec["num_steps"]
    eps_fn = _fake_model(None)
    x = jnp.asarray(DDIM["sd_eta_x_T"])
    got = []
    for i, t in enumerate(ddim_timesteps(s, n)):
        x, _ = ddim_step(s, eps_fn(x, jnp.full((x.shape[0],), t)), x, t, t - 1000 // n, eta=spec["eta"],
                         noise=jnp.asarray(DDIM["sd_eta_noise"][i]))
        got.append(x)
    _assert_trajectory_close(jnp.stack(got), DDIM["sd_eta_trajectory"])


def test_ddim_sample_eta_draws_noise_from_folded_key():
    s = schedules.default_schedule()
    key = jax.random.PRNGKey(3)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 4))
    eps_fn = _fake_model(None)
    got = ddim_sample(eps_fn, s, x_T, 5, eta=0.7, key=key)
    x = x_T
    for i, t in enumerate(ddim_timesteps(s, 5)):
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape)
        x, _ = ddim_step(s, eps_fn(x, jnp.full((2,), t)), x, t, t - 200, eta=0.7, noise=z)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-6, atol=1e-6)


def test_ddim_traced_start_step_equals_static():
    s = schedules.default_schedule()
    x_T = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 4))
    eps_fn = _fake_model(3.0)
    static = ddim_sample(eps_fn, s, x_T, 10, guidance_scale=3.0, start_step=4)
    traced = jax.jit(lambda k: ddim_sample(eps_fn, s, x_T, 10, guidance_scale=3.0, start_step=k))(4)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(static), rtol=1e-6, atol=1e-6)
    none_left = ddim_sample(eps_fn, s, x_T, 10, guidance_scale=3.0, start_step=10)
    np.testing.assert_array_equal(np.asarray(none_left), np.asarray(x_T))


def test_guidance_contract_errors():
    s = schedules.default_schedule()
    x = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="guidance_scale is None"):
        ddim_sample(_fake_model(2.0), s, x, 2)
    with pytest.raises(ValueError, match="guidance_scale=None"):
        ddim_sample(_fake_model(None), s, x, 2, guidance_scale=2.0)


# ---------------------------------------------------------------------------------------------- SDEdit


def test_sdedit_start_index_hand_values():
    # init = clip(floor(N * t / T), 1, N); start = N - init
    assert sdedit_start_index(25, 500) == 13
    assert sdedit_start_index(25, 1000) == 0
    assert sdedit_start_index(25, 10) == 24
    assert sdedit_start_index(25, 200) == 20
    assert int(jax.jit(lambda t: sdedit_start_index(25, t))(500)) == 13


def test_sdedit_no_remaining_steps_returns_noised_input():
    s = schedules.default_schedule()
    key = jax.random.PRNGKey(7)
    x0 = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 4))
    calls = []
    got = sdedit(lambda x, t: calls.append(1) or x, s, x0, key, num_steps=25, start_index=25)
    assert not calls
    z = jax.random.normal(jax.random.split(key)[0], x0.shape)
    a = 1 - 0.00085  # SD: the final alphabar is alphabar_0 (set_alpha_to_one false)
    np.testing.assert_allclose(np.asarray(got), np.sqrt(a) * np.asarray(x0) + np.sqrt(1 - a) * np.asarray(z),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("traced", [False, True])
def test_sdedit_with_perfect_noise_oracle_recovers_x0(traced):
    s = NoiseSchedule.from_config(dict(schedules.SD_SCHEDULER_CONFIG, set_alpha_to_one=True))
    key = jax.random.PRNGKey(11)
    x0 = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4, 4))
    z = jax.random.normal(jax.random.split(key)[0], x0.shape)

    def oracle(x, t):  # the exact noise: every DDIM step then predicts x0 exactly
        return z, z

    run = lambda t_start: sdedit(oracle, s, x0, key, num_steps=25, t_start=t_start, guidance_scale=7.5)  # noqa
    got = jax.jit(run)(jnp.int32(600)) if traced else run(600)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x0), atol=2e-4)
