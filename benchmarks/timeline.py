"""A callback for timing runs from outside: writes when the first step ended and each validation's loss.

``benchmarks/shakespeare_char.py`` adds it to the runs it starts (``PYTHONPATH=benchmarks``,
``+callbacks.timeline._target_=timeline.Timeline +callbacks.timeline.path=<file>``); each line of the
file is JSON with the wall-clock time (``time.time()``), which the script compares with the moment it
started the command.
"""

from __future__ import annotations

import json
import time

import pytorch_lightning as pl


class Timeline(pl.Callback):
    """Append ``{"event": "first_step"|"val", "t": ..., "step": ..., "loss": ...}`` lines to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.first_step_done = False

    def _write(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, "t": time.time()}) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """The first optimizer step is done: start-up is over."""
        if not self.first_step_done:
            self.first_step_done = True
            self._write(event="first_step", step=trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        """A validation finished: its loss and when."""
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self._write(event="val", step=trainer.global_step, loss=float(trainer.callback_metrics["val/loss"]))
