"""Masked language modelling (BERT's pretraining objective) on windows of a text corpus."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from torchmetrics import MeanMetric

from lmforge.errors import LmforgeError
from lmforge.tasks.base import TaskModule
from lmforge.tasks.optim import OptimizerFactory, SchedulerFactory

IGNORE = -100  # label of positions that are not predicted (cross_entropy's ignore_index)


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

    def __init__(self, word_embeddings: nn.Embedding):
        super().__init__()
        vocab_size, hidden = word_embeddings.weight.shape
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.decoder = nn.Linear(hidden, vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT

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
        backbone: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        tokenizer: Tokenizer | None = None,
        mask_probability: float = 0.15,
        chars_per_token: dict[str, float] | None = None,
    ):
        super().__init__(optimizer, scheduler)
        self.check_backbone(getattr(backbone, "kind", None), type(backbone).__name__)
        specials = {t: tokenizer.token_to_id(t) if tokenizer else None for t in ("[MASK]", "[CLS]", "[SEP]")}
        if None in specials.values():
            raise LmforgeError(
                "Masked language modelling needs a tokenizer with [MASK], [CLS] and [SEP] (tokenizer=wordpiece)."
            )
        self.mask_id, self.cls_id, self.sep_id = specials.values()
        self.vocab_size = tokenizer.get_vocab_size()
        self.mask_probability = mask_probability
        self.backbone = backbone
        if hasattr(backbone, "pooler"):  # BERT's pooler serves classification only; DDP fails on unused parameters
            backbone.pooler.requires_grad_(False)
        self.head = MaskedLMHead(backbone.word_embeddings)
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()

    def _masked_batch(
        self, window: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Wrap (B, T) windows as ``[CLS] window [SEP]`` and mask them."""
        B = window.shape[0]
        ids = torch.cat([window.new_full((B, 1), self.cls_id), window, window.new_full((B, 1), self.sep_id)], dim=1)
        maskable = torch.ones_like(ids, dtype=torch.bool)
        maskable[:, [0, -1]] = False
        return mask_tokens(ids, maskable, self.mask_id, self.vocab_size, self.mask_probability, generator)

    def _loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and accuracy over the chosen positions only (the head runs on those alone)."""
        hidden = self.backbone.hidden_states(inputs)
        chosen = labels != IGNORE
        logits = self.head(hidden[chosen])
        targets = labels[chosen]
        return F.cross_entropy(logits, targets), (logits.argmax(-1) == targets).float().mean()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Mask a fresh 15% of the windows and predict them."""
        loss, _ = self._loss(*self._masked_batch(batch[0], None))
        self.log_train(loss)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        """Loss and accuracy on masks drawn from a seed per batch, the same at every validation."""
        generator = torch.Generator(device=batch[0].device).manual_seed(batch_idx)
        inputs, labels = self._masked_batch(batch[0], generator)
        loss, acc = self._loss(inputs, labels)
        n = int((labels != IGNORE).sum())
        self.val_loss.update(loss, weight=n)
        self.val_acc.update(acc, weight=n)

    def on_validation_epoch_end(self) -> None:
        """Log masked-token loss, perplexity and accuracy."""
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss) if loss < 50 else torch.tensor(math.inf))
        self.log("val/acc", self.val_acc.compute(), prog_bar=True)
        self.val_loss.reset()
        self.val_acc.reset()
