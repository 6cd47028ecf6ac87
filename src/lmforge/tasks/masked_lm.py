"""Masked language modelling (BERT's pretraining objective) on windows of a text corpus."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from torchmetrics import MeanMetric

from lmforge.data.labels import IGNORE
from lmforge.errors import LmforgeError
from lmforge.models.backbone import Backbone
from lmforge.models.documents import document_keywords
from lmforge.predictions import window_rows
from lmforge.tasks.base import TaskModule
from lmforge.tasks.optim import OptimizerFactory, SchedulerFactory


def mask_tokens(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption of a batch of token ids.

    Each maskable position is chosen with ``probability``; a chosen position becomes
    ``[MASK]`` 80% of the time, a random token 10% and stays itself 10%.

    Args:
        ids: (B, T) token ids.
        maskable: (B, T) bool, False for special tokens and padding.
        generator: random source (a seeded one gives the same masks every validation).
    Returns:
        (inputs, labels): the corrupted ids, and the original ids at chosen positions, -100 elsewhere.
    """

    def draw() -> torch.Tensor:
        return torch.rand(ids.shape, generator=generator, device=generator.device if generator else ids.device)

    chosen = (draw() < probability) & maskable
    action = draw()
    inputs = ids.clone()
    inputs[chosen & (action < 0.8)] = mask_id
    randomised = chosen & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=ids.device)
    inputs[randomised] = random_ids[randomised]
    labels = torch.where(chosen, ids, IGNORE)
    return inputs, labels


class MaskedLMHead(nn.Module):
    """BERT's prediction head: dense, GELU, LayerNorm, then the (tied) word embeddings and a bias."""

    def __init__(self, word_embeddings: nn.Embedding, eps: float = 1e-12):
        super().__init__()
        vocab_size, hidden = word_embeddings.weight.shape
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = nn.Linear(hidden, vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT

    @classmethod
    def for_backbone(cls, backbone: Backbone) -> MaskedLMHead:
        """A head tied to ``backbone``'s word embeddings, with its LayerNorm epsilon (as Hugging Face
        builds the head of a checkpoint with ``layer_norm_eps``)."""
        eps = next((m.eps for m in backbone.modules() if isinstance(m, nn.LayerNorm)), 1e-12)
        return cls(backbone.word_embeddings, eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) logits."""
        return self.decoder(self.LayerNorm(F.gelu(self.dense(hidden))))


class MaskedLanguageModelingTask(TaskModule):
    """Pretrain an encoder by predicting masked tokens of ``[CLS] window [SEP]`` sequences.

    Args:
        backbone: an encoder (``kind == "encoder"``) with ``word_embeddings``.
        optimizer, scheduler: partials, as for every task.
        tokenizer: the run's tokenizer; it must have ``[MASK]``, ``[CLS]`` and ``[SEP]``.
        mask_probability: share of tokens chosen for prediction.
        chars_per_token: unused; the language-modelling data hands it to every task.
    """

    backbone_kinds = ("encoder",)

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        tokenizer: Tokenizer | None = None,
        mask_probability: float = 0.15,
        chars_per_token: dict[str, float] | None = None,
    ):
        super().__init__(optimizer, scheduler)
        self.checked_kind(backbone)
        specials = {t: tokenizer.token_to_id(t) if tokenizer else None for t in ("[MASK]", "[CLS]", "[SEP]")}
        if None in specials.values():
            raise LmforgeError(
                "Masked language modelling needs a tokenizer with [MASK], [CLS] and [SEP] (tokenizer=wordpiece)."
            )
        self.mask_id, self.cls_id, self.sep_id = specials.values()
        self.vocab_size = tokenizer.get_vocab_size()
        self.tokenizer = tokenizer  # decodes the windows of prediction files
        self.mask_probability = mask_probability
        self.attach_backbone(backbone)
        self.head = MaskedLMHead.for_backbone(backbone)
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()
        self.test_loss = MeanMetric()
        self.test_acc = MeanMetric()

    def _masked_batch(
        self, window: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Wrap (B, T) windows as ``[CLS] window [SEP]`` and mask them."""
        B = window.shape[0]
        ids = torch.cat([window.new_full((B, 1), self.cls_id), window, window.new_full((B, 1), self.sep_id)], dim=1)
        # Special tokens are never chosen: the ends, and the [SEP]s that join packed documents.
        maskable = ids != self.sep_id
        maskable[:, 0] = False
        return mask_tokens(ids, maskable, self.mask_id, self.vocab_size, self.mask_probability, generator)

    def _documents(self, batch) -> dict:
        """The backbone's keywords for the batch's ``[CLS] window [SEP]`` rows: ``document_ids`` when the
        windows are packed (``(windows, labels, document_ids)``; [CLS] joins the first document, [SEP]
        the last), nothing otherwise."""
        documents = batch[2] if len(batch) > 2 else None
        if documents is not None:
            documents = torch.cat([documents[:, :1], documents, documents[:, -1:]], dim=1)
        return document_keywords(self.backbone, documents)

    def _loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", documents: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy (mean or sum) and accuracy over the chosen positions only (the head runs on those alone)."""
        hidden = self.backbone.hidden_states(inputs, **(documents or {}))
        chosen = labels != IGNORE
        logits = self.head(hidden[chosen])
        targets = labels[chosen]
        return F.cross_entropy(logits, targets, reduction=reduction), (logits.argmax(-1) == targets).float().mean()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Mask a fresh 15% of the windows and predict them (the loss averages over the step's masked tokens)."""
        inputs, labels = self._masked_batch(batch[0], None)
        loss_sum, _ = self._loss(inputs, labels, reduction="sum", documents=self._documents(batch))
        return self.training_loss(loss_sum, (labels != IGNORE).sum())

    def _evaluate(self, batch, batch_idx: int, loss_metric: MeanMetric, acc_metric: MeanMetric) -> None:
        """Loss and accuracy on masks drawn from a seed per batch (the same at every evaluation)."""
        generator = torch.Generator(device=batch[0].device).manual_seed(batch_idx)
        inputs, labels = self._masked_batch(batch[0], generator)
        chosen = labels != IGNORE
        logits = self.head(self.backbone.hidden_states(inputs, **self._documents(batch))[chosen])
        losses = F.cross_entropy(logits.float(), labels[chosen], reduction="none")
        right = (logits.argmax(-1) == labels[chosen]).float()
        loss_metric.update(losses.mean(), weight=len(losses))
        acc_metric.update(right.mean(), weight=len(losses))
        if (writer := self.prediction_writer) is not None:  # a line per window: its masked tokens' loss
            window = chosen.nonzero()[:, 0]  # the window of each masked token
            sums = losses.new_zeros(len(chosen)).index_add_(0, window, losses)
            correct = right.new_zeros(len(chosen)).index_add_(0, window, right)
            texts = self.tokenizer.decode_batch(batch[0].tolist())
            writer.write(window_rows(writer.examples(batch_idx), sums, chosen.sum(1), texts, correct))

    def validation_step(self, batch, batch_idx: int) -> None:
        """Loss and accuracy on masks drawn from a seed per batch, the same at every validation."""
        self._evaluate(batch, batch_idx, self.val_loss, self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        """Loss and accuracy on seeded masks of the test windows; write each window's loss."""
        self._evaluate(batch, batch_idx, self.test_loss, self.test_acc)

    def _log_scores(self, prefix: str, loss_metric: MeanMetric, acc_metric: MeanMetric) -> None:
        loss = self.log_epoch_scores(prefix, loss_metric, {"acc": acc_metric})
        self.log(f"{prefix}/ppl", torch.exp(loss) if loss < 50 else torch.tensor(math.inf))

    def on_validation_epoch_end(self) -> None:
        """Log masked-token loss, perplexity and accuracy."""
        self._log_scores("val", self.val_loss, self.val_acc)

    def on_test_epoch_end(self) -> None:
        """Log the test split's masked-token loss, perplexity and accuracy."""
        self._log_scores("test", self.test_loss, self.test_acc)
