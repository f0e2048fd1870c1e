"""Runner: Ctrl-C stops after the step in flight and checkpoints it; steps can be compiled up front."""

import json

import jax
import numpy as np
import pytest

from conftest import final_state as _final_state
from conftest import make_stage, tiny_config
from dreamcraft_jax.runner import train


def test_ctrl_c_writes_a_last_checkpoint_and_the_wall_time_so_far(tmp_path, monkeypatch):
    """Ctrl-C in the loop (here raised by the metrics writer at step 2): the state of step 2 is checkpointed
    even though save_every is far off, and wall_time.json says where the run stopped."""
    from dreamcraft_jax import runner

    original = runner.MetricsWriter.write

    def write_then_interrupt(self, record):
        original(self, record)
        if record.get("step") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.MetricsWriter, "write", write_then_interrupt)
    cfg = tiny_config(**{"train.max_steps": 6, "train.save_every": 1000, "parallel.data": 1,
                         "workdir": str(tmp_path / "run")})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    stage_dir = tmp_path / "run" / "coarse_nerf"
    assert int(_final_state(cfg, tmp_path / "run").step) == 2
    wall = json.loads((stage_dir / "wall_time.json").read_text())
    assert wall["interrupted_at_step"] == 2 and wall["steps_run"] == 2
    assert not (stage_dir / "DONE").exists()


def test_real_sigint_stops_after_the_step_in_flight(tmp_path, monkeypatch):
    """A real SIGINT (here sent by the metrics writer at step 2) stops the loop after the step in flight: the step
    has donated its input, so the handler only asks, and the loop checkpoints the finished step."""
    import os
    import signal

    from dreamcraft_jax import runner

    original = runner.MetricsWriter.write

    def write_then_sigint(self, record):
        original(self, record)
        if record.get("step") == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(runner.MetricsWriter, "write", write_then_sigint)
    cfg = tiny_config(**{"train.max_steps": 6, "train.save_every": 1000, "parallel.data": 1,
                         "workdir": str(tmp_path / "run")})
    # Python's default handler, or SIG_IGN when the test process was started in the background with SIGINT
    # ignored (a shell's `make test &`): either way the loop's own handler must be gone again afterwards.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    assert int(_final_state(cfg, tmp_path / "run").step) == 2
    assert signal.getsignal(signal.SIGINT) is before


def test_step_keys_list_each_kind_at_each_resolution_once():
    """The stage's step keys from a start step, in first-use order."""
    from dreamcraft_jax import parallel

    cfg = tiny_config(**{"train.max_steps": 10, "train.mode": "alternate"})
    with cfg.unlocked():
        cfg.data.heights, cfg.data.widths, cfg.data.resolution_milestones = (16, 32), (16, 32), (5,)
    stage = make_stage(cfg, parallel.make_mesh(1, 1, devices=jax.devices()[:1]))
    assert stage.step_keys(0) == [("ref", (16, 16)), ("random", (16, 16)), ("random", (32, 32)),
                                  ("ref", (32, 32))]
    assert stage.step_keys(7) == [("random", (32, 32)), ("ref", (32, 32))]
    assert stage.step_keys(9) == [("random", (32, 32))]
    assert stage.step_keys(10) == []


@pytest.mark.slow
def test_precompiled_steps_match_steps_compiled_at_first_call(tmp_path, caplog):
    """Steps compiled up front, in threads, on the 8-device mesh: the same final state as compiling each at its
    first call, the precompiled programs take the loop's arguments (no fallback), and wall_time.json says when
    each finished compiling."""
    common = {"train.mode": "alternate", "train.max_steps": 2}
    eager = tiny_config(**common, **{"train.compile_workers": 0, "workdir": str(tmp_path / "eager")})
    ahead = tiny_config(**common, **{"train.compile_workers": 3, "workdir": str(tmp_path / "ahead")})
    train(eager, progress=False)
    with caplog.at_level("WARNING", logger="dreamcraft_jax"):
        train(ahead, progress=False)
    assert not [r for r in caplog.records if "precompiled" in r.getMessage()]
    a = _final_state(eager, tmp_path / "eager")
    b = _final_state(ahead, tmp_path / "ahead")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    wall = json.loads((tmp_path / "ahead" / "coarse_nerf" / "wall_time.json").read_text())
    assert set(wall["compiled_by_s"]) == {"ref_16x16", "random_16x16", "eval_render"}
    assert wall["compile_s"] >= max(wall["compiled_by_s"].values()) * (1 - 1e-9)
    assert "compiled_by_s" not in json.loads((tmp_path / "eager" / "coarse_nerf" / "wall_time.json").read_text())
