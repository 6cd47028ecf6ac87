"""Sequence classification on any backbone: encoders pool [CLS] or the mean, decoders their last token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lmforge.errors import LmforgeError
from lmforge.tasks.base import TaskModule
from lmforge.tasks.optim import OptimizerFactory, SchedulerFactory

POOLINGS = {"encoder": ("cls", "mean"), "decoder": ("last", "mean")}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """Summarise (B, T, C) hidden states as (B, C).

    ``cls``: the first position; ``mean``: the mean over real tokens; ``last``: the last real
    token, found from the mask, so left and right padding give the same result.
    """
    if how == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    # Index of the last 1 in each row: the highest position whose mask is 1.
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.bool() * positions).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class ClassificationTask(TaskModule):
    """A linear head on a pooled backbone, trained with cross-entropy.

    Args:
        backbone: an encoder or decoder with ``hidden_states(input_ids, attention_mask)`` and ``hidden_size``.
        num_classes: number of labels (from the data).
        optimizer: partial optimizer, called with the parameter groups.
        scheduler: partial schedule, or None.
        pooling: ``auto`` (encoder: cls, decoder: last), ``cls``, ``mean`` or ``last``.
        dropout: dropout before the head.
        label_names: class names, for reports.
        tokenizer: unused; accepted so every task is built alike.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        pooling: str = "auto",
        dropout: float = 0.1,
        label_names: list[str] | None = None,
        tokenizer=None,
    ):
        super().__init__(optimizer, scheduler)
        kind = getattr(backbone, "kind", None)
        if kind not in POOLINGS:
            raise LmforgeError(
                f"Classification needs an encoder or decoder backbone; {type(backbone).__name__} is '{kind}'."
            )
        self.pooling = POOLINGS[kind][0] if pooling == "auto" else pooling
        if self.pooling not in POOLINGS[kind]:
            raise LmforgeError(f"pooling={pooling} does not suit a {kind}; use one of: {', '.join(POOLINGS[kind])}.")
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.hidden_size, num_classes)
        self.label_names = label_names
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, num_classes) logits."""
        hidden = self.backbone.hidden_states(input_ids, attention_mask)
        return self.head(self.dropout(pool(hidden, attention_mask, self.pooling)))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Cross-entropy of one batch."""
        loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log_train(loss)
        return loss

    def _evaluate(self, batch: dict, metrics: MetricCollection, loss: MeanMetric) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss.update(F.cross_entropy(logits, batch["labels"]), weight=len(batch["labels"]))
        metrics.update(logits, batch["labels"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate loss, accuracy and macro F1."""
        self._evaluate(batch, self.val_metrics, self.val_loss)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate loss, accuracy and macro F1."""
        self._evaluate(batch, self.test_metrics, self.test_loss)

    def _log_epoch(self, prefix: str, metrics: MetricCollection, loss: MeanMetric) -> None:
        self.log(f"{prefix}/loss", loss.compute(), prog_bar=prefix == "val")
        self.log_dict(metrics.compute(), prog_bar=prefix == "val")
        loss.reset()
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        """Log validation loss, accuracy and macro F1."""
        self._log_epoch("val", self.val_metrics, self.val_loss)

    def on_test_epoch_end(self) -> None:
        """Log test loss, accuracy and macro F1."""
        self._log_epoch("test", self.test_metrics, self.test_loss)
