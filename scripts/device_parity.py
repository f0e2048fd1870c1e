"""Per-leaf relative error between the stage-1 step on 8 simulated devices and on 1 device (same 8 views).

The setup of ``tests/test_parallel_step.py::test_eight_devices_equal_one_device_grads_and_step``: gradients of
one step, then the params after two steps (Adam + occupancy grid update). ``--x64`` runs the same comparison with
float64 params, optimiser state and targets (jax_enable_x64), which tells float summation order (the difference
shrinks by ~1e-8) from a real difference between the two programs (it does not). ``--no_pruning`` keeps every
sample (no alpha / transmittance threshold), which tells whether a sample crossing a threshold is what amplifies
float32 rounding.

    python scripts/device_parity.py [--x64] [--no_pruning]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
# isort: off
import conftest  # noqa: E402  (8 simulated CPU devices: set before jax starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
# isort: on


def relative_error(a, b) -> float:
    a, b = jax.device_get(a), jax.device_get(b)
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))
    return (num / den) ** 0.5 if den else 0.0


def setup(n_devices: int, per_device: int, x64: bool, prune: bool = True):
    from dreamcraft_jax import parallel
    from dreamcraft_jax.data.reference import example_depth_path, example_image_path, load_reference
    from dreamcraft_jax.stages.volume_stage import targets_from_reference
    from dreamcraft_jax.train_step import TrainState

    cfg = conftest.tiny_config(**{"train.ref_views_per_device": per_device,
                                  "train.random_views_per_device": per_device, "data.depth": "auto",
                                  "loss.lambda_3d_normal_smooth": 0.0, "loss.lambda_orient": 0.0,
                                  **({} if prune else {"render.alpha_threshold": 0.0, "render.early_stop_eps": 0.0})})
    mesh = parallel.make_mesh(n_devices, 1, devices=jax.devices()[:n_devices])
    stage = conftest.make_stage(cfg, mesh)
    ref = load_reference(example_image_path(), 16, 16, depth_path=example_depth_path())
    targets, state = targets_from_reference(ref), jax.device_get(stage.init_state())
    if x64:
        def wide(x):
            return jnp.asarray(x, jnp.float64) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x

        params = jax.tree.map(wide, state.params)
        state = TrainState(params=params, opt_state=stage.optimizer.init(params), extras=state.extras,
                           step=state.step, rng=state.rng, nonfinite_skips=state.nonfinite_skips)
        targets = jax.tree.map(wide, targets)
    return stage, parallel.replicate(state, mesh), parallel.replicate(targets, mesh)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--x64", action="store_true", help="float64 params, optimiser state and targets")
    parser.add_argument("--no_pruning", action="store_true",
                        help="render.alpha_threshold = early_stop_eps = 0: no sample is dropped by a threshold")
    args = parser.parse_args()
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    from dreamcraft_jax.stages.volume_stage import BOTH

    stage8, state8, targets8 = setup(8, 1, args.x64, not args.no_pruning)
    stage1, state1, targets1 = setup(1, 8, args.x64, not args.no_pruning)
    print(f"jax {jax.__version__}, {'float64' if args.x64 else 'float32'} params, "
          f"{'no threshold pruning' if args.no_pruning else 'default pruning'}")
    grads8, _ = stage8.grads_fn((BOTH, (16, 16)))(state8, targets8)
    grads1, _ = stage1.grads_fn((BOTH, (16, 16)))(state1, targets1)
    step8, step1 = stage8.step_fn((BOTH, (16, 16))), stage1.step_fn((BOTH, (16, 16)))
    for _ in range(2):
        state8, _ = step8(state8, targets8)
        state1, _ = step1(state1, targets1)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads1)]
    print(f"{'leaf':<48} {'grads (1 step)':>15} {'params (2 steps)':>17}")
    for path, g8, g1, p8, p1 in zip(paths, jax.tree.leaves(grads8), jax.tree.leaves(grads1),
                                    jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
        print(f"{path:<48} {relative_error(g8, g1):15.3e} {relative_error(p8, p1):17.3e}")
    print(f"{'all':<48} {relative_error(grads8, grads1):15.3e} {relative_error(state8.params, state1.params):17.3e}")


if __name__ == "__main__":
    main()
