"""The stage interface: the registry holds every configured stage, the runner reaches stages through
stages.base alone, and a stage's metrics reach TensorBoard event files next to metrics.jsonl."""

import ast
import struct
from pathlib import Path

import pytest

from dreamcraft_jax.config import STAGES
from dreamcraft_jax.metrics import MetricsWriter
from dreamcraft_jax.stages.base import Stage, build_stage, registered

ROOT = Path(__file__).resolve().parent.parent


def test_registry_holds_every_stage_of_the_config_in_order():
    assert registered() == STAGES
    with pytest.raises(KeyError, match="no stage 'texture'"):
        build_stage("texture", None, None)


def test_runner_imports_no_stage_internals():
    """runner.py (and the modules it is made of) import from dreamcraft_jax.stages only the interface."""
    for name in ("runner.py", "evaluation.py", "run_folder.py", "checkpoints.py", "metrics.py", "train_step.py"):
        tree = ast.parse((ROOT / "dreamcraft_jax" / name).read_text())
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        stage_modules = {m for m in modules if m and m.startswith("dreamcraft_jax.stages")}
        assert stage_modules <= {"dreamcraft_jax.stages.base"}, (name, stage_modules)


def test_every_stage_implements_the_interface():
    import dreamcraft_jax.stages.base as base

    for name in registered():
        build = base._REGISTRY[name]
        stage_cls = build.__annotations__.get("return")
        assert stage_cls is not None, name
    assert not getattr(Stage, "__abstractmethods__", set()) - {
        "init_state", "step_key", "step_fn", "step_inputs", "eval_render", "eval_cameras"}


def _read_events(path: Path):
    """(tag, step, value) of every scalar in a TensorBoard event file (TFRecord framing: u64 length, u32 crc,
    payload, u32 crc)."""
    from tensorboardX.proto import event_pb2

    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
        i += 12 + length + 4
        for value in event.summary.value:
            out.append((value.tag, event.step, value.simple_value))
    return out


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write({"step": 10, "loss": 1.5, "ref/psnr": 20.25, "kind": "ref"})
    writer.write({"step": 20, "loss": 0.75})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"kind": "ref"' in lines[0]
    events = [e for f in tmp_path.glob("events.out.tfevents.*") for e in _read_events(f)]
    assert sorted(events) == [("loss", 10, 1.5), ("loss", 20, 0.75), ("ref/psnr", 10, 20.25)]
