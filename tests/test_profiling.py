"""The op profile names where the time of a jitted call goes, and points at the source line that made each op."""

import inspect

import jax
import jax.numpy as jnp
import pytest

from dreamcraft_jax import profiling


def test_union_of_intervals():
    # [0,10) u [5,12) u [20,25) = 12 + 5; nested and touching intervals count once.
    assert profiling._union_ns([(0, 10), (5, 12), (20, 25)]) == 17
    assert profiling._union_ns([(0, 10), (2, 3), (10, 11)]) == 11
    assert profiling._union_ns([]) == 0


def _heavy_and_light(a, b):
    big = jnp.tanh(a @ b @ b @ b)  # the dominant op (3 matmuls of 512^3)
    return big + jnp.sum(b[:4])


@pytest.mark.optimized  # the op shares it checks are those of XLA's optimized program
def test_op_profile_finds_the_dominant_op_and_its_line():
    a = jax.random.normal(jax.random.PRNGKey(0), (512, 512))
    b = jax.random.normal(jax.random.PRNGKey(1), (512, 512)) / 512
    compiled = jax.jit(_heavy_and_light).lower(a, b).compile()
    table = profiling.op_profile(compiled, a, b, repeats=3, top=5)
    line = inspect.getsourcelines(_heavy_and_light)[1] + 1
    assert table["kernels"] >= 1
    # The profiler's clock against the wall clock timed around the same calls: the device-busy union fits in it
    # (a unit slip, ns vs us vs ms, would not).
    assert table["busy_ms"] <= table["wall_ms"] and table["busy_ms"] <= table["kernel_ms"] + 1e-6
    # Every op's time is counted once per source line: the lines add up to the kernel sum.
    assert sum(r["ms"] for r in table["by_source_line"]) == pytest.approx(table["kernel_ms"], rel=1e-9)
    top = table["ops"][0]
    assert f"test_profiling.py:{line}" in top["source"], table["ops"]
    # Three 512^3 matmuls (one or several ops, all from that line) dwarf a 4x512 sum.
    assert table["by_source_line"][0]["line"] == f"test_profiling.py:{line}"
    assert table["by_source_line"][0]["share"] > 0.8


def test_hlo_sources_parses_stack_tables():
    text = jax.jit(_heavy_and_light).lower(jnp.ones((8, 8)), jnp.ones((8, 8))).compile().as_text()
    sources = profiling.hlo_sources(text)
    line = inspect.getsourcelines(_heavy_and_light)[1] + 1
    assert any(s.startswith(f"test_profiling.py:{line} ") for s in sources.values()), sources


def test_module_of_names_the_outermost_flax_module():
    assert profiling.module_of("jit(loss)/jit(loss)/jvp(AutoencoderKL.encode)/encoder/down_blocks_0/conv") == \
        "AutoencoderKL.encode"
    assert profiling.module_of("jit(loss)/transpose(jvp(AutoencoderKL.encode))/encoder/down_blocks_0/conv") == \
        "AutoencoderKL.encode (backward)"
    assert profiling.module_of("jit(loss)/jvp(UNet2DConditionModel)/mid_block/attentions_0/jvp(MLP)/x") == \
        "UNet2DConditionModel"
    assert profiling.module_of("jit(loss)/jvp(jit(_randint))/while") == "(other)"
    assert profiling.module_of("") == "(other)"


@pytest.mark.slow
@pytest.mark.optimized
def test_op_profile_splits_the_sds_step_by_module():
    """A tiny SD SDS gradient (VAE encoder forward and backward, UNet): every op of the compiled step is
    attributed to one of them or to "(other)", the parts add up to the kernel time, and the three model parts
    are there."""
    from dreamcraft_jax.bench.sds import sds_case

    fn, args = sds_case("sd", 1, True, None, jnp.float32)
    compiled = jax.jit(fn).lower(*args).compile()
    table = profiling.op_profile(compiled, *args, repeats=2)
    modules = {r["module"]: r["ms"] for r in table["by_module"]}
    assert {"AutoencoderKL.encode", "AutoencoderKL.encode (backward)", "UNet2DConditionModel"} <= set(modules)
    assert abs(sum(modules.values()) - table["kernel_ms"]) <= 1e-6 * max(table["kernel_ms"], 1.0)
