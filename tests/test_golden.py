"""Refactors move no number: 20 demo steps of stage 1a and 20 of stage 1b (one CPU device, seed 0, tiny random
priors) reproduce the losses and parameter checksums recorded before the stage-interface refactor
(tests/fixtures/stage1_golden.json, written by tests/fixtures/make_stage1_golden.py)."""

import json
from pathlib import Path

import numpy as np

from fixtures.make_stage1_golden import STEPS, run

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "stage1_golden.json"


def test_stage1_demo_steps_match_the_recorded_losses_and_params(tmp_path):
    expected = json.loads(FIXTURE.read_text())
    got = run(tmp_path / "run", tmp_path / "demo_priors")
    for stage in ("coarse_nerf", "coarse_neus"):
        assert len(got[stage]["loss"]) == STEPS
        # Same programs, same order of operations: equal up to float summation order (a few ulps per step,
        # compounding over 20 Adam steps).
        np.testing.assert_allclose(got[stage]["loss"], expected[stage]["loss"], rtol=1e-5, err_msg=stage)
        psnr_got = [np.nan if v is None else v for v in got[stage]["ref_psnr"]]
        psnr_exp = [np.nan if v is None else v for v in expected[stage]["ref_psnr"]]
        np.testing.assert_allclose(psnr_got, psnr_exp, rtol=1e-5, err_msg=stage)
        assert got[stage]["params"].keys() == expected[stage]["params"].keys()
        for group, sums in expected[stage]["params"].items():
            np.testing.assert_allclose(got[stage]["params"][group], sums, rtol=1e-5, err_msg=f"{stage} {group}")
