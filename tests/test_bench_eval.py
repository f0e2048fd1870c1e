"""`bench eval`: evaluation-render time per sample budget against the largest budget."""

import json

from dreamcraft_jax.bench import cli
from dreamcraft_jax.config_file import ROOT


def test_eval_bench_compares_each_budget_with_the_largest(tmp_path, monkeypatch):
    """`bench eval`: the largest budget is its own reference (PSNR at the 120 dB cap, no opacity change); a budget
    of 1 sample per ray cannot draw the fitted scene the same way."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--config", "configs/demo.py", "--stages", "coarse_nerf", "--budgets", "24", "1",
                     "--fit_steps", "3", "--repeats", "1", "--set", "eval.height=24", "--set", "eval.width=24",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    largest, one = report["results"]["coarse_nerf_budget24"], report["results"]["coarse_nerf_budget1"]
    assert largest["vs_largest_budget"] == {"rgb_psnr": 120.0, "normal_psnr": 120.0, "opacity_max_abs": 0.0}
    assert one["vs_largest_budget"]["rgb_psnr"] < 60.0 and (one["height"], one["width"]) == (24, 24)
    # each case rendered at its own budget (the timing itself has no independent value to check)
    assert (largest["samples_per_ray"], one["samples_per_ray"]) == (24.0, 1.0) and "ms" in one
