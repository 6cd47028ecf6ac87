"""What every task LightningModule shares: the optimizer set-up, train-metric logging, RNG in checkpoints."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torchmetrics import Metric, MetricCollection

from lmforge.errors import LmforgeError
from lmforge.tasks.optim import OptimizerFactory, SchedulerFactory, configure_optimization
from lmforge.tasks.rng import capture_rng_state, restore_rng_state

KIND_NAMES = {"encoder": "an encoder", "decoder": "a decoder", "rnn": "an RNN", "seq2seq": "an encoder-decoder"}


class TaskModule(pl.LightningModule):
    """Base class of the tasks: holds the optimizer and schedule partials and implements the shared hooks.

    Args:
        optimizer: partial optimizer, called with the parameter groups.
        scheduler: partial schedule, called with the optimizer and the total steps; or None.
    """

    # The kinds of backbone (their ``kind`` attribute) this task can train.
    backbone_kinds: tuple[str, ...] = ("encoder", "decoder", "rnn")

    @classmethod
    def check_backbone(cls, kind: str | None, model: str) -> None:
        """Fail in one sentence when this task cannot train a backbone of this kind (before any data is read)."""
        if kind not in cls.backbone_kinds:
            wanted = " or ".join(KIND_NAMES[k] for k in cls.backbone_kinds)
            raise LmforgeError(
                f"{cls.__name__} needs {wanted} backbone; model {model} is {KIND_NAMES.get(kind, repr(kind))}."
            )

    def __init__(self, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None):
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # Set by lmforge.compose.make_task: plain values (classes, characters per token) that rebuild the task.
        self.data_arguments: dict = {}
        # Set by the training run for adapter methods: where the frozen base weights come from.
        self.base_weights: dict | None = None

    def log_train(self, loss: torch.Tensor) -> None:
        """Log the training loss and learning rate to the bar and the loggers.

        Only on the steps Lightning hands to the loggers (every ``log_every_n_steps``): logging
        every step costs a few percent of step time on small models.
        """
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0 or self.global_step == 0:
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)

    def log_epoch_scores(self, prefix: str, loss: Metric, scores: Metric | MetricCollection) -> None:
        """Log ``<prefix>/loss`` and every score under ``<prefix>/`` (on the bar for validation), then reset both."""
        self.log(f"{prefix}/loss", loss.compute(), prog_bar=prefix == "val")
        computed = {
            name if name.startswith(f"{prefix}/") else f"{prefix}/{name}": v for name, v in scores.compute().items()
        }
        self.log_dict(computed, prog_bar=prefix == "val")
        loss.reset()
        scores.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the random generators (a resumed run draws the same numbers) and what the task knows of its data.

        An adapter run (LoRA, IA3...) from a public checkpoint or another run leaves out its frozen base
        weights and names where they come from instead (``base``), so its checkpoints stay small.
        """
        checkpoint["rng_state"] = capture_rng_state()
        checkpoint["data_arguments"] = self.data_arguments
        if self.base_weights:
            checkpoint["base"] = self.base_weights
            frozen = {p.data_ptr() for p in self.parameters() if not p.requires_grad}  # tied names included
            for name, tensor in list(checkpoint["state_dict"].items()):
                if tensor.data_ptr() in frozen:
                    del checkpoint["state_dict"][name]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the random generators saved with the checkpoint."""
        if "rng_state" in checkpoint:
            restore_rng_state(checkpoint["rng_state"])

    def configure_optimizers(self):
        """Optimizer with weight decay on matrices only, and a per-step schedule."""
        return configure_optimization(self, self.optimizer_factory, self.scheduler_factory)
