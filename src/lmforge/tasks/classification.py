"""Sequence classification on any backbone: encoders pool [CLS] or the mean, decoders their last token,
RNNs the max over time or their final states."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from lmforge.data.tokenizers import pad_token_id
from lmforge.errors import LmforgeError
from lmforge.models.backbone import Backbone
from lmforge.predictions import classification_rows
from lmforge.tasks.base import TaskModule
from lmforge.tasks.optim import OptimizerFactory, SchedulerFactory

log = logging.getLogger(__name__)

# The first of each is the default (pooling=auto).
POOLINGS = {"encoder": ("cls", "mean", "max"), "decoder": ("last", "mean", "max"), "rnn": ("max", "final", "mean")}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """Summarise (B, T, C) hidden states as (B, C).

    ``cls``: the first position; ``mean`` and ``max``: over real tokens; ``last``: the last real
    token, found from the mask, so left and right padding give the same result.
    """
    if how == "cls":
        return hidden[:, 0]
    if how == "max":
        return hidden.masked_fill(~attention_mask.bool()[..., None], torch.finfo(hidden.dtype).min).max(1).values
    mask = attention_mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    # Index of the last 1 in each row: the highest position whose mask is 1.
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.bool() * positions).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class ClassificationTask(TaskModule):
    """A linear head on a pooled backbone, trained with cross-entropy.

    At test time the confusion matrix is saved as ``confusion_matrix.png`` in the run dir (and sent to W&B).

    Args:
        backbone: an encoder, decoder or RNN with ``hidden_states(input_ids, attention_mask)`` and ``hidden_size``.
        num_classes: number of labels (from the data).
        optimizer: partial optimizer, called with the parameter groups.
        scheduler: partial schedule, or None.
        pooling: ``auto`` (encoder: cls, decoder: last, RNN: max), ``cls`` (through BERT's pooler),
            ``mean``, ``max``, ``last``, or ``final`` (an RNN's final states).
        dropout: dropout before the head.
        label_names: class names, for reports.
        tokenizer: unused; accepted so every task is built alike.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        pooling: str = "auto",
        dropout: float = 0.1,
        label_names: list[str] | None = None,
        tokenizer=None,
    ):
        super().__init__(optimizer, scheduler)
        kind = self.checked_kind(backbone)
        self.pooling = POOLINGS[kind][0] if pooling == "auto" else pooling
        if self.pooling not in POOLINGS[kind]:
            raise LmforgeError(f"pooling={pooling} does not suit a {kind}; use one of: {', '.join(POOLINGS[kind])}.")
        # BERT classifies [CLS] through its pooler (tanh(dense([CLS]))), as it was pretrained to.
        self.use_pooler = self.pooling == "cls" and backbone.pooler is not None
        self.attach_backbone(backbone, uses_pooler=self.use_pooler)
        self.dropout = nn.Dropout(dropout)
        # A decoder's head has no bias, as in GPT-2's sequence classifier, so that the run exports to it.
        self.head = nn.Linear(backbone.hidden_size, num_classes, bias=kind != "decoder")
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
        self.confusion = MulticlassConfusionMatrix(num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, num_classes) logits."""
        hidden = self.backbone.hidden_states(input_ids, attention_mask)
        if self.pooling == "final":
            pooled = self.backbone.final_states(hidden, attention_mask)
        elif self.use_pooler:
            pooled = self.backbone.pooler(hidden)
        else:
            pooled = pool(hidden, attention_mask, self.pooling)
        return self.head(self.dropout(pooled))

    @torch.no_grad()
    def predict_texts(self, texts: list[str], tokenizer: Tokenizer, max_length: int = 512) -> list[dict]:
        """Label raw texts: for each, the label, its probability and every class's probability."""
        encodings = tokenizer.encode_batch(texts)
        longest = min(max(len(e.ids) for e in encodings), max_length)
        input_ids = torch.full((len(texts), longest), pad_token_id(tokenizer), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, encoding in enumerate(encodings):
            ids = encoding.ids[:longest]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        device = self.head.weight.device
        probabilities = self(input_ids.to(device), mask.to(device)).softmax(-1).cpu()
        names = self.label_names or [str(i) for i in range(probabilities.shape[1])]
        results = []
        for text, row in zip(texts, probabilities.tolist(), strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            results.append(
                {
                    "text": text,
                    "label": names[best],
                    "probability": round(row[best], 4),
                    "probabilities": {name: round(p, 4) for name, p in zip(names, row, strict=True)},
                }
            )
        return results

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Cross-entropy of one batch, to be averaged over the examples of the whole optimizer step."""
        logits = self(batch["input_ids"], batch["attention_mask"])
        return self.training_loss(F.cross_entropy(logits, batch["labels"], reduction="sum"), len(batch["labels"]))

    def _evaluate(self, batch: dict, batch_idx: int, metrics: MetricCollection, loss: MeanMetric) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss.update(F.cross_entropy(logits, batch["labels"]), weight=len(batch["labels"]))
        metrics.update(logits, batch["labels"])
        if (writer := self.prediction_writer) is not None:
            writer.write(classification_rows(writer.examples(batch_idx), logits, batch["labels"], self.label_names))
        return logits

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate loss, accuracy and macro F1 (and write predictions for ``lmforge-evaluate split=validation``)."""
        self._evaluate(batch, batch_idx, self.val_metrics, self.val_loss)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate loss, accuracy, macro F1 and the confusion matrix; write each sentence's prediction."""
        self.confusion.update(self._evaluate(batch, batch_idx, self.test_metrics, self.test_loss), batch["labels"])

    def on_validation_epoch_end(self) -> None:
        """Log validation loss, accuracy and macro F1."""
        self.log_epoch_scores("val", self.val_loss, self.val_metrics)

    def on_test_epoch_end(self) -> None:
        """Log test loss, accuracy and macro F1; save the confusion matrix."""
        self.log_epoch_scores("test", self.test_loss, self.test_metrics)
        matrix = self.confusion.compute()  # on every rank: it gathers across processes
        if self.trainer.is_global_zero:
            self._save_confusion_matrix(matrix, Path(self.trainer.default_root_dir) / "confusion_matrix.png")
        self.confusion.reset()

    def _save_confusion_matrix(self, matrix: torch.Tensor, png: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = self.confusion.plot(val=matrix, labels=self.label_names)
        ax.set_title("test confusion matrix (rows: true, columns: predicted)")
        fig.savefig(png, dpi=100, bbox_inches="tight")
        plt.close(fig)
        log.info("confusion matrix: %s", png)
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("test/confusion_matrix", [str(png)])
