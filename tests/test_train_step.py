"""The one sharded step builder (dreamcraft_jax.train_step) on a toy least-squares stage with a closed form:
gradient mean over every view whatever the device layout, Adam's first step, the NaN/Inf guard, FSDP-split frozen
inputs gathered inside the step, and the three-program variant equal to the one-program step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dreamcraft_jax import parallel
from dreamcraft_jax.train_step import StepDef, build_step, init_train_state

N_VIEWS, LR, EPS = 8, 0.1, 1e-8


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(N_VIEWS, 3)).astype(np.float32), "y": rng.normal(size=(N_VIEWS,)).astype(np.float32),
            "scale": rng.uniform(0.5, 1.5, size=(16, 3)).astype(np.float32)}


def _step_def(with_guidance: bool, frozen_specs) -> StepDef:
    """Per-view loss (w . x_v - y_v)^2 (+ guidance sum(a_col * (w * x_v)^2) on the "images" w * x_v, with
    a_col = column sums of the frozen (16, 3) array, FSDP-split along its rows)."""

    def prepare(state, data):
        extras = {"calls": state.extras["calls"] + 1}
        return extras, (data["x"], data["y"]), None, ({"unused": jnp.zeros(())} if with_guidance else None)

    def render(params, batch, shared):
        x, y = batch
        r = x @ params["w"] - y
        return jnp.mean(r * r), {"residual": jnp.mean(r)}, x * params["w"]

    def guidance(frozen, images, views, guide):
        a = jnp.sum(frozen["scale"], axis=0)
        return jnp.mean(jnp.sum(a * images * images, axis=-1)), {"guided": jnp.mean(images)}

    return StepDef(prepare=prepare, render=render, guidance=guidance if with_guidance else None,
                   guide_views=lambda batch: batch[0], summary=lambda s, e: {"calls": e["calls"].astype(jnp.float32)},
                   frozen_specs=frozen_specs)


def _expected(data, w, with_guidance):
    """(loss, gradient, params after Adam's first step) in float64 numpy."""
    x, y = data["x"].astype(np.float64), data["y"].astype(np.float64)
    r = x @ w - y
    loss, grad = np.mean(r ** 2), 2.0 * x.T @ r / len(r)
    if with_guidance:
        a = data["scale"].astype(np.float64).sum(0)
        loss += np.mean(np.sum(a * (x * w) ** 2, axis=-1))
        grad += np.mean(2.0 * a * x * x * w, axis=0)
    # Adam, step 1: m_hat = g, v_hat = g^2 -> update = -lr g / (|g| + eps).
    return loss, grad, w - LR * grad / (np.abs(grad) + EPS)


def _run(data, mesh, with_guidance=False, separate=False, fsdp_min=1):
    w0 = np.asarray([0.3, -0.2, 0.5], np.float32)
    opt = optax.adam(LR, eps=EPS)
    state = init_train_state({"w": jnp.asarray(w0)}, opt, {"calls": jnp.zeros((), jnp.int32)},
                             jax.random.PRNGKey(0), mesh)
    frozen, specs = parallel.place({"scale": data["scale"]}, "priors", mesh, min_size=fsdp_min)
    step = build_step(_step_def(with_guidance, specs), opt, mesh, separate_guidance=separate)
    placed = parallel.replicate({k: data[k] for k in ("x", "y")}, mesh)
    new, metrics = step(state, placed, frozen)
    return w0, jax.device_get(new), jax.device_get(metrics), specs


@pytest.mark.parametrize("layout", [(1, 1), (4, 2), (8, 1)])
def test_gradient_is_the_mean_over_every_view_and_adam_takes_its_first_step(layout):
    data = _data()
    mesh = parallel.make_mesh(*layout, devices=jax.devices()[:layout[0] * layout[1]])
    w0, new, metrics, _ = _run(data, mesh)
    loss, grad, w1 = _expected(data, w0.astype(np.float64), False)
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), np.linalg.norm(grad), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new.params["w"]), w1, rtol=1e-5, atol=1e-6)
    assert int(new.step) == 1 and int(new.nonfinite_skips) == 0 and float(metrics["calls"]) == 1.0
    assert int(new.extras["calls"]) == 1


def test_a_nonfinite_loss_skips_the_update_and_counts_it():
    data = _data()
    data["y"][3] = np.nan
    mesh = parallel.make_mesh(4, 2, devices=jax.devices()[:8])
    w0, new, metrics, _ = _run(data, mesh)
    np.testing.assert_array_equal(np.asarray(new.params["w"]), w0)  # params (and Adam's moments) kept
    assert all(float(np.abs(m).sum()) == 0.0 for m in jax.tree.leaves(new.opt_state) if np.ndim(m))
    assert int(new.nonfinite_skips) == 1 and float(metrics["skipped_nonfinite"]) == 1.0 and int(new.step) == 1


@pytest.mark.parametrize("separate", [False, True])
def test_guidance_with_fsdp_split_frozen_inputs_matches_the_closed_form(separate):
    """The frozen (16, 3) array is split 8 ways along its rows (fsdp = 8); the step gathers it before use, so
    its column sums, and thus the gradient, are the whole array's. One and three programs give the same step."""
    data = _data(1)
    mesh = parallel.make_mesh(1, 8, devices=jax.devices()[:8])
    w0, new, metrics, specs = _run(data, mesh, with_guidance=True, separate=separate)
    assert specs["scale"] == jax.sharding.PartitionSpec(parallel.FSDP, None)
    loss, grad, w1 = _expected(data, w0.astype(np.float64), True)
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new.params["w"]), w1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), np.linalg.norm(grad), rtol=1e-5)
    assert "guided" in metrics and "residual" in metrics


@pytest.mark.parametrize("separate", [False, True])
def test_a_trainable_param_split_along_fsdp_stays_split_and_gets_the_mean_gradient(separate):
    """A rule FSDP-splits the trainable (8,) param u (loss term mean_v u . c_v, c_v = x_v[0] * (1..8)): the step
    gathers it, reduce-scatters its gradient, and each device keeps its slice of the Adam-updated u."""
    data = _data(2)
    mesh = parallel.make_mesh(2, 4, devices=jax.devices()[:8])
    rules = ((r"^(params|opt_state)/.*u$", "fsdp"), (r".*", "replicated"))
    c = data["x"][:, :1].astype(np.float64) * np.arange(1, 9)  # (V, 8)
    opt = optax.adam(LR, eps=EPS)
    w0, u0 = np.asarray([0.3, -0.2, 0.5], np.float32), np.linspace(-1, 1, 8).astype(np.float32)
    params = {"w": jnp.asarray(w0), "u": jnp.asarray(u0)}
    state = init_train_state(params, opt, {"calls": jnp.zeros((), jnp.int32)}, jax.random.PRNGKey(0), mesh,
                             rules, min_size=1)
    param_specs = parallel.rule_specs(params, "params", mesh, rules, min_size=1)
    assert param_specs["u"] == jax.sharding.PartitionSpec(parallel.FSDP) and param_specs["w"] == parallel.REPLICATED
    base = _step_def(True, parallel.REPLICATED)

    def render(p, batch, shared):
        loss, metrics, images = base.render(p, batch, shared)
        return loss + jnp.mean(batch[0][:, :1] * jnp.arange(1, 9) @ p["u"]), metrics, images

    import dataclasses

    sd = dataclasses.replace(base, render=render, param_specs=param_specs)
    frozen = parallel.replicate({"scale": data["scale"]}, mesh)
    new, metrics = build_step(sd, opt, mesh, separate_guidance=separate)(
        state, parallel.replicate({k: data[k] for k in ("x", "y")}, mesh), frozen)
    assert new.params["u"].sharding.spec == jax.sharding.PartitionSpec(parallel.FSDP)
    assert new.params["u"].addressable_shards[0].data.shape == (2,)
    g_u = c.mean(0)
    np.testing.assert_allclose(np.asarray(new.params["u"]), u0 - LR * g_u / (np.abs(g_u) + EPS), rtol=1e-5,
                               atol=1e-6)
    _, g_w, w1 = _expected(data, w0.astype(np.float64), True)
    np.testing.assert_allclose(np.asarray(new.params["w"]), w1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), np.sqrt(np.sum(g_w ** 2) + np.sum(g_u ** 2)), rtol=1e-5)
