"""Config files, command-line overrides and rejection of bad input (one error line, nothing written)."""

import subprocess
import sys
from pathlib import Path

import pytest

from dreamcraft_jax.config import ConfigError, resolution_at, schedule_value, validate
from dreamcraft_jax.config_file import ROOT, load_config


def load_config_file(path):
    return load_config(path, check=False)


def _parse(overrides, path="configs/demo.py"):
    """Parse as train.py does: ["--config.a.b=v", ...] through the shared loader."""
    return load_config(path, [o[len("--config."):] for o in overrides], check=False)


@pytest.mark.parametrize("path", ["configs/demo.py", "configs/coarse_nerf.py"])
def test_config_files_are_valid(path):
    validate(load_config_file(path))


def test_coarse_nerf_has_the_official_numbers():
    c = load_config_file("configs/coarse_nerf.py")
    g = c.field.hashgrid
    assert (g.n_levels, g.n_features_per_level, g.log2_hashmap_size, g.base_resolution) == (16, 2, 19, 16)
    assert abs(g.per_level_scale - 1.447269237440378) < 1e-12
    assert (c.field.progressive.start_level, c.field.progressive.start_step, c.field.progressive.update_steps) == (
        8, 2000, 500)
    assert c.render.num_samples_per_ray == 512 and c.render.grid.resolution == 32
    assert resolution_at(c, 2999) == (128, 128) and resolution_at(c, 3000) == (384, 384)
    assert c.loss.lambda_rgb == 1000.0 and c.loss.lambda_mask == 100.0 and c.loss.lambda_depth_rel == 0.05
    assert tuple(c.loss.lambda_orient) == (2000, 1.0, 10.0, 2001)
    assert (c.optimizer.lr, c.optimizer.b1, c.optimizer.b2, c.optimizer.eps) == (0.01, 0.9, 0.99, 1e-8)
    assert (c.camera.distance, c.camera.fovy_deg, tuple(c.camera.elevation_range)) == (3.8, 20.0, (-10.0, 45.0))
    assert c.train.mode == "alternate" and c.train.max_steps == 5000


def test_overrides_apply_including_schedules():
    c = _parse(["--config.train.max_steps=7", "--config.loss.lambda_orient=0.5",
                "--config.loss.lambda_rgb=(0, 10.0, 20.0, 100)", "--config.render.shading=lambertian"])
    assert c.train.max_steps == 7 and c.render.shading == "lambertian"
    assert c.loss.lambda_orient == 0.5
    assert float(schedule_value(c.loss.lambda_rgb, 50)) == pytest.approx(15.0)
    assert float(schedule_value(c.loss.lambda_rgb, 1000)) == pytest.approx(20.0)
    assert float(schedule_value(c.loss.lambda_rgb, -5)) == pytest.approx(10.0)
    validate(c)


def test_unknown_key_is_rejected_by_the_parser():
    with pytest.raises(ConfigError, match="unknown config key 'smaples'"):
        _parse(["--config.render.smaples=3"])


def test_one_loader_types_overrides_like_the_values_they_replace():
    """Tuples, schedules, bools and placeholders from override strings; a config file's get_config(arg)."""
    c = load_config("configs/demo.py", ["data.heights=(32,)", "data.widths=(32,)", "eval.video=false",
                                        "loss.lambda_sd=(0, 0.1, 0.2, 10)", "overrides.coarse_neus.train.max_steps=7"])
    assert c.data.heights == (32,) and c.eval.video is False and tuple(c.loss.lambda_sd) == (0, 0.1, 0.2, 10)
    assert c.overrides.coarse_neus.train.max_steps == 7
    assert load_config("configs/dreamcraft3d.py:stage=coarse_neus").stage == "coarse_neus"
    assert load_config("configs/dreamcraft3d.py").stage == "all"
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.py")


def test_no_key_is_both_a_path_and_a_switch():
    """The prior source is a choice, its folder a separate key: `priors=False` is refused, not a folder named
    "False", and the old path-or-switch key is gone."""
    with pytest.raises(ConfigError, match="guidance.priors"):
        load_config("configs/demo.py", ["guidance.priors=False"])
    with pytest.raises(ConfigError, match="unknown config key 'demo_priors'"):
        load_config("configs/demo.py", ["guidance.demo_priors=False"])
    c = load_config("configs/demo.py", ["guidance.priors=pretrained", "guidance.sd.pretrained=/weights/sd"])
    assert c.guidance.priors == "pretrained" and c.guidance.sd.pretrained == "/weights/sd"


@pytest.mark.parametrize("key, value, match", [
    ("train.mode", "sideways", "train.mode"),
    ("train.max_steps", 0, "train.max_steps"),
    ("render.shading", "phong", "render.shading"),
    ("loss.lambda_orient", (1, 2), "loss.lambda_orient"),
    ("loss.lambda_rgb", -1.0, "loss.lambda_rgb"),
    ("data.heights", (64, 128), "data.heights"),
    ("render.samples_per_ray", 500.0, "render.samples_per_ray"),
    ("data.border_ratio", 1.0, "data.border_ratio"), ("data.depth_convention", "z", "data.depth_convention"),
    ("camera.elevation_range", (45.0, -10.0), "camera.elevation_range"),
    ("optimizer.b2", 1.5, "optimizer.b2"),
    ("guidance.priors", "tiny", "guidance.priors"),
    ("guidance.demo_dir", "", "guidance.demo_dir"),
    ("kernels.backend", "cuda", "kernels.backend"),
    ("kernels.hashgrid_backward", "fast", "kernels.hashgrid_backward"),
    ("parallel.rules", ((".*", "sideways"),), "parallel.rules"),
    ("parallel.rules", (("(", "fsdp"),), "bad regex"),
    ("kernels.groupnorm_sums_max_rows", -1, "kernels.groupnorm_sums_max_rows"),
    ("xla_flags", "xla_gpu_enable_command_buffer=", "not an XLA flag"),
])
def test_invalid_values_are_rejected(key, value, match):
    c = load_config_file("configs/demo.py")
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=match):
        validate(c)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["--config.render.smaples=1"], "unknown config key 'smaples'"),
    (["--config.renderr.x=1"], "did you mean 'render'"),
    (["--config.train.mode=sideways"], "train.mode"),
    (["--config.train.max_steps=abc"], "max_steps"),
    (["--config.image=does_not_exist.png"], "not found"),
    (["--config.xla_flags=-v"], "xla_flags: '-v' is not an XLA flag"),
])
def test_cli_gives_one_error_line_and_writes_nothing(tmp_path, args, needle):
    result = _cli("--config=configs/demo.py", f"--config.output_root={tmp_path}/out", *args)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not Path(tmp_path / "out").exists()
