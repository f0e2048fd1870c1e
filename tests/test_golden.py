"""Refactors move no number: 20 demo steps of stage 1a and 20 of stage 1b (one CPU device, seed 0, tiny random
priors) reproduce the recorded losses and parameter checksums (tests/fixtures/stage1_golden.json, written by
tests/fixtures/make_stage1_golden.py; last re-recorded for issue [8]'s intended changes)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from fixtures.make_stage1_golden import STEPS, run

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "stage1_golden.json"


@pytest.mark.slow  # ~3 min on CI's 2 cores (compiling 1a / 1b with both priors): `make test-all` runs it
def test_stage1_demo_steps_match_the_recorded_losses_and_params(tmp_path):
    """With the jax the fixture was recorded with (the lock's), every number at rtol 1e-5: same programs, same
    order of operations, a few ulps per step compounding over 20 Adam steps. Another jax (another XLA) sums in
    another order, and a sample that crosses a pruning threshold moves later steps: measured on jax 0.11.2, losses
    within 2.1e-3 and sums of squares within 9.4e-4 after 20 steps (the plain sums of the hash tables, which
    cancel, are then not compared); stage 1a's first two losses, from a fresh init before the orders can compound,
    still at 1e-5 (1b starts from 1a's final state, already apart)."""
    expected = json.loads(FIXTURE.read_text())
    got = run(tmp_path / "run", tmp_path / "demo_priors")
    same_jax = jax.__version__ == expected["jax"]
    rtol = 1e-5 if same_jax else 5e-3
    for stage in ("coarse_nerf", "coarse_neus"):
        assert len(got[stage]["loss"]) == STEPS
        if stage == "coarse_nerf":
            np.testing.assert_allclose(got[stage]["loss"][:2], expected[stage]["loss"][:2], rtol=1e-5)
        np.testing.assert_allclose(got[stage]["loss"], expected[stage]["loss"], rtol=rtol, err_msg=stage)
        psnr_got = [np.nan if v is None else v for v in got[stage]["ref_psnr"]]
        psnr_exp = [np.nan if v is None else v for v in expected[stage]["ref_psnr"]]
        np.testing.assert_allclose(psnr_got, psnr_exp, rtol=rtol, err_msg=stage)
        assert got[stage]["params"].keys() == expected[stage]["params"].keys()
        for group, (total, squares) in expected[stage]["params"].items():
            got_total, got_squares = got[stage]["params"][group]
            np.testing.assert_allclose(got_squares, squares, rtol=rtol, err_msg=f"{stage} {group}")
            if same_jax:
                np.testing.assert_allclose(got_total, total, rtol=1e-5, err_msg=f"{stage} {group}")
