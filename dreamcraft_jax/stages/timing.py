"""Step timings shared by the stages' ``timing_split`` and the benches: the latency of a donating step, and one
step's split into render, guidance and update.

Not in the hot path: each function times compiled steps from the host and waits for every call.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp


def step_latency_ms(step, state, *inputs, repeats: int = 5) -> float:
    """Median ms of ``repeats`` calls of a donating step (after one warm-up), each on a fresh copy of ``state``
    made and finished before its clock starts, so the copy is not counted as the step's time."""

    def once():
        fresh = jax.block_until_ready(jax.tree.map(lambda x: x.copy(), state))
        t0 = time.perf_counter()
        jax.block_until_ready(step(fresh, *inputs))
        return 1000.0 * (time.perf_counter() - t0)

    once()
    return statistics.median(once() for _ in range(repeats))


def split_step_ms(stage, state, key, compiled_steps: dict | None = None, repeats: int = 5) -> dict:
    """ms of the step ``key`` of ``stage`` split into render (fwd+bwd of the render and the per-view losses),
    guidance (the priors' share) and update (the optimiser and the step's bookkeeping), medians of ``repeats``:

        update   = the update alone on zero gradients (``stage.update_fn(key)``)
        render   = max(step without priors - update, 0)
        guidance = max(full step - step without priors, 0)

    ``stage`` is a dataclass with ``priors`` / ``prior_specs`` / ``prior_params`` fields and ``step_fn``,
    ``step_inputs``, ``update_fn``; ``compiled_steps``: the caller's compiled steps by key, the timed key's reused
    instead of compiling it again. The caller's ``state`` stays alive (each timed call gets a copy)."""
    no_priors = dataclasses.replace(stage, priors=None, prior_specs=None, prior_params={})
    state = jax.tree.map(lambda x: x.copy(), state)
    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    data = stage.step_inputs(key)[0]
    update_ms = step_latency_ms(stage.update_fn(key), state, zero_grads, data, repeats=repeats)
    plain_ms = step_latency_ms(no_priors.step_fn(key), state, *no_priors.step_inputs(key), repeats=repeats)
    full_step = (compiled_steps or {}).get(key) or stage.step_fn(key)
    full_ms = step_latency_ms(full_step, state, *stage.step_inputs(key), repeats=repeats)
    return {"step_ms": full_ms, "render_ms": max(plain_ms - update_ms, 0.0),
            "guidance_ms": max(full_ms - plain_ms, 0.0), "update_ms": update_ms}
