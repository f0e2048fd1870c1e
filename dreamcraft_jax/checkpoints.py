"""Checkpoints of a stage's whole TrainState (orbax), kept in ``<stage folder>/checkpoints/<step>/``."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper over an orbax CheckpointManager for one stage's TrainState."""

    def __init__(self, directory: Path, keep: int | None, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(read_only=True) if read_only else ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

    def save(self, state, force: bool = False) -> None:
        step = int(state.step)
        if self.manager.latest_step() == step:
            return
        self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def latest_step(self):
        return self.manager.latest_step()

    def restore(self, like, step: int | None = None):
        """The checkpoint at ``step`` (default: the latest) with the tree, shapes and shardings of ``like``."""
        step = self.manager.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_latest(directory: Path, like):
    """The latest checkpoint in ``directory`` read into the structure of ``like`` (read-only)."""
    ckpt = Checkpointer(directory, None, read_only=True)
    try:
        return ckpt.restore(like)
    finally:
        ckpt.close()
