"""A stage's metrics: one JSON object per logged step in ``metrics.jsonl``, and the same numbers as TensorBoard
scalars (``events.out.tfevents.*`` beside it, written with tensorboardX: no TensorFlow needed). Only process 0
writes."""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import jax

from dreamcraft_jax.run_folder import is_writer


def scalars(metrics: dict) -> dict:
    """Device metrics -> {name: float} on the host."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


class MetricsWriter:
    """Appends records to ``<folder>/metrics.jsonl`` and logs their numbers to TensorBoard under their names
    (``step`` is the x axis; records without a ``step`` go to the JSON file only)."""

    def __init__(self, folder: Path, tensorboard: bool = True):
        self.path = Path(folder) / "metrics.jsonl"
        self._tb = None
        self._tb_folder = Path(folder) if tensorboard else None

    def _board(self):
        if self._tb is None and self._tb_folder is not None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(self._tb_folder), flush_secs=30)
        return self._tb

    def write(self, record: dict) -> None:
        if not is_writer():
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        board = self._board()
        if board is not None and "step" in record:
            for name, value in record.items():
                if name != "step" and isinstance(value, numbers.Number) and not isinstance(value, bool):
                    board.add_scalar(name, float(value), global_step=int(record["step"]))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
