"""cfg.xla_flags: added to XLA_FLAGS before JAX starts its backend, never over a flag the user set."""

import subprocess
import sys

import pytest

from dreamcraft_jax import xla_flags
from dreamcraft_jax.config_file import ROOT
from dreamcraft_jax.xla_flags import DEFAULT_XLA_FLAGS, apply_xla_flags, flag_names


@pytest.fixture
def fresh_backend(monkeypatch):
    """Pretend JAX's backend has not started (in this test process it has)."""
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)


def test_flags_are_appended_and_user_flags_win(fresh_backend):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_gpu_enable_command_buffer="}
    added = apply_xla_flags("--xla_gpu_enable_command_buffer=+CONVOLUTION --xla_gpu_autotune_level=2", env)
    assert added == "--xla_gpu_autotune_level=2"
    assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 --xla_gpu_enable_command_buffer= "
                                "--xla_gpu_autotune_level=2")
    env = {}
    assert apply_xla_flags(DEFAULT_XLA_FLAGS, env) == DEFAULT_XLA_FLAGS and env["XLA_FLAGS"] == DEFAULT_XLA_FLAGS
    assert apply_xla_flags("", env) == "" and env["XLA_FLAGS"] == DEFAULT_XLA_FLAGS


def test_malformed_flags_change_nothing(fresh_backend):
    env = {"XLA_FLAGS": "--a=1"}
    with pytest.raises(ValueError, match="'xla_b=2' is not an XLA flag"):
        apply_xla_flags("--c=3 xla_b=2", env)
    assert env == {"XLA_FLAGS": "--a=1"}
    assert flag_names("--a=1 --b '--c=x y'") == ["--a", "--b", "--c"]


def test_after_the_backend_started_nothing_changes_and_a_user_is_told(caplog):
    import jax

    jax.devices()  # the backend is up
    env = {}
    with caplog.at_level("DEBUG", logger=xla_flags.__name__):
        assert apply_xla_flags("--xla_gpu_autotune_level=2", env) == ""
        assert apply_xla_flags(DEFAULT_XLA_FLAGS, env) == ""
    assert env == {}
    levels = [(r.levelname, "already started" in r.getMessage()) for r in caplog.records]
    assert levels == [("WARNING", True), ("DEBUG", True)]


def test_a_fresh_process_starts_its_backend_with_the_flags():
    """What train.py does: the config's flags reach XLA (XLA rejects an unknown flag at backend start, so the
    default's name and value are also checked against this jaxlib here)."""
    code = ("import os, jax\n"
            "from dreamcraft_jax.xla_flags import DEFAULT_XLA_FLAGS, apply_xla_flags\n"
            "os.environ.pop('XLA_FLAGS', None)\n"
            "assert apply_xla_flags(DEFAULT_XLA_FLAGS) == DEFAULT_XLA_FLAGS\n"
            "print(float(jax.jit(lambda x: x * 2)(1.5)), os.environ['XLA_FLAGS'])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3.0", *DEFAULT_XLA_FLAGS.split()]
