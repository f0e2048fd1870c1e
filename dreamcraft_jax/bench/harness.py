"""The timing harness every bench shares: how a call is timed, and the JSON pieces each bench's report has.

What is timed (:func:`time_calls`): a jitted call's latency, each call ended with ``block_until_ready`` (median /
min / max ms over ``repeats`` calls after warm-up), and optionally its pipelined time (calls issued back to back,
one wait at the end: a training loop's step time). :func:`pipelined_steps_ms` does the same for training steps
that thread a state through. No stage, prior or config code lives here: the benches' own modules hold that.

Keys a timing dict has: ``median_ms``, ``min_ms``, ``max_ms``, ``n``; with ``pipelined=True`` also
``pipelined_ms``, ``pipelined_rounds_ms``, ``pipelined_held_ms``, ``pipelined_held_rounds_ms``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def default_rounds() -> int:
    """Pipelined batches per timing: 3 on an accelerator; 1 on the CPU, where the benches run as smoke tests of
    tiny cases (the test suite) and a batch of a compile-bound suite's steps is what costs."""
    return 1 if jax.devices()[0].platform == "cpu" else 3


def time_calls(fn, *args, repeats: int, warmup: int = 2, pipelined: bool = False, rounds: int | None = None) -> dict:
    """Median / min / max ms of ``repeats`` calls of ``fn(*args)``, each ended with ``block_until_ready``.

    Returns ``{"median_ms", "min_ms", "max_ms", "n"}`` (``n`` = ``repeats``), after ``warmup`` untimed calls.

    ``pipelined``: also ``pipelined_ms``, the time of ``repeats`` calls issued back to back with one wait at the
    end, divided by ``repeats``: the step time of a training loop, where the host enqueues step n + 1 while the
    device still runs step n (JAX dispatch is asynchronous), so host launch overhead hides behind device work.
    As in a training loop, each call's result replaces the previous one (whose buffers go back to the allocator
    once its call has run). ``pipelined_held_ms`` keeps all ``repeats`` results alive instead, as this bench
    did before: each call then writes its outputs to new addresses, which XLA's CUDA graphs must be updated for.
    Both are the median over ``rounds`` batches (``pipelined_rounds_ms`` / ``pipelined_held_rounds_ms`` list
    them; default :func:`default_rounds`): one batch is one sample.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1000.0 * (time.perf_counter() - t0))
    out = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": repeats}
    if pipelined:
        rounds = default_rounds() if rounds is None else rounds
        for key, hold in (("pipelined", False), ("pipelined_held", True)):
            batches = []
            for _ in range(max(1, rounds)):
                t0 = time.perf_counter()
                if hold:
                    result = [fn(*args) for _ in range(repeats)]
                else:
                    for _ in range(repeats):
                        result = fn(*args)
                jax.block_until_ready(result)
                batches.append(1000.0 * (time.perf_counter() - t0) / repeats)
                del result
            out[f"{key}_ms"] = statistics.median(batches)
            out[f"{key}_rounds_ms"] = batches
    return out


def pipelined_steps_ms(steps, state, targets, prior_params, repeats: int, rounds: int | None = None) -> float:
    """ms per step of ``repeats`` rounds of ``steps`` (jitted ``step(state, targets, prior_params) -> (state,
    metrics)`` fns, e.g. a (reference, random) pair) issued back to back, the state threaded through as in
    training, one wait at the end: what the training loop (which only waits to log) spends per step, with the
    host's launch work hidden behind the device's. The median of ``rounds`` such batches (one batch is one
    sample; default :func:`default_rounds`), after two warm-up rounds. ``state`` itself is copied first, so a
    step that donates its input leaves the caller's state alive."""
    state = jax.tree.map(lambda x: x.copy(), state)
    for _ in range(2):  # warm-up
        for step in steps:
            state, _ = step(state, targets, prior_params)
    jax.block_until_ready(state)
    batches = []
    for _ in range(max(1, default_rounds() if rounds is None else rounds)):
        t0 = time.perf_counter()
        for _ in range(repeats):
            for step in steps:
                state, metrics = step(state, targets, prior_params)
        jax.block_until_ready((state, metrics))
        batches.append(1000.0 * (time.perf_counter() - t0) / (len(steps) * repeats))
    return statistics.median(batches)


def device_kind() -> str:
    """The first device's kind ("NVIDIA H200", "cpu"): every report's ``device`` key."""
    return str(jax.devices()[0].device_kind)


def error_record(e: BaseException) -> dict:
    """``{"error": "<Type>: <first line of the message, 300 chars at most>"}``: a case that failed (out of device
    memory, a plan that does not compile) is recorded in the results and the bench goes on with the others."""
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def write_partial(path: str, benchmark: str, results: dict) -> None:
    """Write the results so far to ``path`` with the header a full report has (``benchmark``, ``partial: true``,
    ``device``, ``jax``, ``results``): a run cut off by its time limit keeps them, and `bench project` reads
    them."""
    Path(path).write_text(json.dumps({"benchmark": benchmark, "partial": True, "device": device_kind(),
                                      "jax": jax.__version__, "results": results}, indent=2))


def record_variant(results: dict, key: str, r: dict, out: str, benchmark: str) -> None:
    """Store one variant's result ``r`` as ``results[key]``, print its line (timing dicts as their median ms,
    other numbers as they are, or its error) and, with an ``out`` path, :func:`write_partial` the results so
    far."""
    results[key] = r
    print(f"{key}: " + ", ".join(f"{k} {v['median_ms']:.3f} ms" if isinstance(v, dict) else f"{k} {v:.3g}"
                                 for k, v in r.items() if k != "error") + r.get("error", ""), flush=True)
    if out:
        write_partial(out, benchmark, results)


def peak_memory_bytes() -> int | None:
    """The first device's ``peak_bytes_in_use`` so far in this process; None where the backend keeps no memory
    statistics (the CPU)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU backends have no memory stats
        return None
    return stats.get("peak_bytes_in_use")


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled executable by XLA's cost analysis (None where it has none, or 0). It does not count
    custom calls such as cuDNN attention: the benches quote their own analytic FLOPs next to it."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float(analysis.get("flops", 0.0)) or None


def matmul_peak_tflops(repeats: int, n: int = 8192) -> float:
    """Measured bf16 matmul throughput in TFLOP/s (the peak MFU is quoted against): ``2 n^3`` over the faster of
    the latency median and the pipelined time of an ``n x n`` matmul (at least 20 repeats).

    Timed pipelined (calls back to back, one wait): a single ~1.5 ms call waited for on its own also counts the
    dispatch and the wake-up of the host, which understated the peak by 10-20 % (632 vs 769 TFLOP/s on an
    H200 with PyTorch's event-timed matmul in the same lease), and so overstated every fraction of it.
    """
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t = time_calls(mm, a, b, repeats=max(repeats, 20), pipelined=True)
    return 2 * n ** 3 / (min(t["median_ms"], t["pipelined_ms"]) * 1e-3) / 1e12
