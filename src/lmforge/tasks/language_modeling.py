"""Causal language modelling: next-token cross-entropy, perplexity, bits per character, samples."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchmetrics import MeanMetric

from lmforge.data.labels import IGNORE
from lmforge.generation import generate
from lmforge.models.backbone import Backbone
from lmforge.models.documents import document_keywords
from lmforge.predictions import window_rows
from lmforge.tasks.base import TaskModule
from lmforge.tasks.optim import OptimizerFactory, SchedulerFactory

sample_log = logging.getLogger("lmforge.samples")


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``labels`` (IGNORE positions left out),
    ``chunk_size`` positions at a time.

    The full (positions x vocabulary) logits never exist at once: each chunk's logits are made, scored and
    dropped, and made again in the backward pass. With GPT-2's 50,257 tokens the logits and their
    gradient are what dominates a step's memory once activation checkpointing has shrunk the rest.

    Args:
        hidden: (..., C) final hidden states.
        head: the output layer, (..., C) -> (..., V).
        labels: target ids, ``hidden``'s shape without its last dim.
        chunk_size: positions scored together.
    """
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(hidden.split(chunk_size), labels.split(chunk_size)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_summed_cross_entropy, head, h, y, use_reentrant=False)
        else:
            total = total + _summed_cross_entropy(head, h, y)
    return total / (labels != IGNORE).sum().clamp(min=1)


def _summed_cross_entropy(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


class LanguageModelingTask(TaskModule):
    """Train a decoder backbone to predict the next token.

    Args:
        backbone: a decoder (``kind == "decoder"``) mapping (B, T) ids to (B, T, V) logits.
        optimizer: partial optimizer, called with the parameter groups.
        scheduler: partial schedule, called with the optimizer and the total steps; or None.
        tokenizer: the run's tokenizer, used to decode samples; None turns samples off.
        chars_per_token: split -> characters per token, for bits per character.
        num_samples: texts sampled at the end of validation (0 turns it off).
        sample_every_n_validations: sample at every n-th validation and at the last one;
            sampling without a KV cache costs about as much as a validation pass.
        sample_prompt: text the samples start from.
        sample_tokens: tokens per sample.
        sample_temperature, sample_top_k: sampling settings for the samples.
        loss_chunk_size: score the logits this many positions at a time (:func:`chunked_cross_entropy`), so the
            whole batch's logits are never in memory at once; None scores them all together.
    """

    backbone_kinds = ("decoder",)

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        tokenizer: Tokenizer | None = None,
        chars_per_token: dict[str, float] | None = None,
        num_samples: int = 1,
        sample_every_n_validations: int = 4,
        sample_prompt: str = "\n",
        sample_tokens: int = 200,
        sample_temperature: float = 0.8,
        sample_top_k: int | None = 200,
        loss_chunk_size: int | None = None,
    ):
        super().__init__(optimizer, scheduler)
        self.checked_kind(backbone)
        self.attach_backbone(backbone)
        self.tokenizer = tokenizer
        self.chars_per_token = chars_per_token or {}
        self.num_samples = num_samples
        self.sample_every_n_validations = max(1, sample_every_n_validations)
        self._validations = 0
        self.sample_prompt = sample_prompt
        self.sample_tokens = sample_tokens
        self.sample_temperature = sample_temperature
        self.sample_top_k = sample_top_k
        self.loss_chunk_size = loss_chunk_size
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.samples: list[tuple[int, str]] = []

    def forward(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids (and, for packed rows, their (B, T) document ids) -> (B, T, V) logits."""
        return self.backbone(input_ids, **document_keywords(self.backbone, document_ids))

    @staticmethod
    def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(input_ids, labels, document_ids or None)`` of a batch ``(input_ids, labels[, document_ids])``
        (an :class:`~lmforge.data.packing.LMBatch` or a plain tuple)."""
        return batch[0], batch[1], batch[2] if len(batch) > 2 else None

    def _loss(self, batch) -> torch.Tensor:
        input_ids, labels, document_ids = self._unpack(batch)
        if self.loss_chunk_size:
            hidden = self.backbone.hidden_states(input_ids, **document_keywords(self.backbone, document_ids))
            return chunked_cross_entropy(hidden, self.backbone.lm_head, labels, self.loss_chunk_size)
        logits = self(input_ids, document_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """The next-token loss of one batch, to be averaged over the tokens of the whole optimizer step."""
        # Windows hold the same number of tokens, but an epoch's last batch may hold fewer windows, and a
        # conversation (task=sft) learns only the tokens whose label is not IGNORE.
        tokens = (batch[1] != IGNORE).sum()
        return self.training_loss(self._loss(batch) * tokens, tokens)

    def _token_losses(self, batch) -> torch.Tensor:
        """(B, T) next-token cross-entropy of every position (``loss_chunk_size`` positions of logits at a time)."""
        input_ids, labels, document_ids = self._unpack(batch)
        if self.loss_chunk_size:
            hidden = self.backbone.hidden_states(input_ids, **document_keywords(self.backbone, document_ids))
            hidden = hidden.flatten(0, 1)
            chunks = zip(hidden.split(self.loss_chunk_size), labels.flatten().split(self.loss_chunk_size))
            losses = [F.cross_entropy(self.backbone.lm_head(h).float(), y, reduction="none") for h, y in chunks]
            return torch.cat(losses).view_as(labels)
        logits = self(input_ids, document_ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)

    def _evaluate(self, batch, batch_idx: int, metric: MeanMetric) -> None:
        losses = self._token_losses(batch)  # 0 where the label is IGNORE
        counts = (batch[1] != IGNORE).sum(1)
        metric.update(losses.sum() / counts.sum().clamp(min=1), weight=counts.sum())
        if (writer := self.prediction_writer) is not None:  # a line per window
            texts = None
            if self.tokenizer is not None:  # the whole window: its inputs and the last token they predict
                ends = [[y] if y != IGNORE else [] for y in batch[1][:, -1].tolist()]  # none after padding
                windows = [ids + end for ids, end in zip(batch[0].tolist(), ends)]
                texts = self.tokenizer.decode_batch(windows, skip_special_tokens=False)
            writer.write(window_rows(writer.examples(batch_idx), losses.sum(1), counts, texts))

    def validation_step(self, batch, batch_idx: int) -> None:
        """Accumulate the token-weighted validation loss (and write predictions for ``lmforge-evaluate``)."""
        self._evaluate(batch, batch_idx, self.val_loss)

    def test_step(self, batch, batch_idx: int) -> None:
        """Accumulate the token-weighted test loss; write each window's loss."""
        self._evaluate(batch, batch_idx, self.test_loss)

    def _log_split(self, prefix: str, split: str, metric: MeanMetric) -> None:
        loss = self.log_epoch_scores(prefix, metric)
        self.log(f"{prefix}/ppl", torch.exp(loss))
        if split in self.chars_per_token:
            # nats per token -> bits per character
            self.log(f"{prefix}/bpc", loss / math.log(2) / self.chars_per_token[split])

    def on_validation_epoch_end(self) -> None:
        """Log loss, perplexity and bits per character; sample a few texts."""
        self._log_split("val", "validation", self.val_loss)
        if self.trainer.sanity_checking or self.tokenizer is None or self.num_samples == 0:
            return
        self._validations += 1
        last = 0 < self.trainer.max_steps <= self.trainer.global_step
        if last or self._validations % self.sample_every_n_validations == 0:
            self._sample()

    def on_test_epoch_end(self) -> None:
        """Log test loss, perplexity and bits per character."""
        self._log_split("test", "test", self.test_loss)

    def _sample(self) -> None:
        prompt = self.tokenizer.encode(self.sample_prompt, add_special_tokens=False).ids or [0]
        input_ids = torch.tensor([prompt] * self.num_samples, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.global_step)
        out = generate(
            self.backbone,
            input_ids,
            self.sample_tokens,
            temperature=self.sample_temperature,
            top_k=self.sample_top_k,
            generator=generator,
        )
        texts = [self.tokenizer.decode(row.tolist()) for row in out]
        if self.trainer.is_global_zero:
            for text in texts:
                self.samples.append((self.global_step, text))
                sample_log.info("sample at step %d:\n%s", self.global_step, text)
            for logger in self.loggers:
                if hasattr(logger, "log_text"):  # W&B: a table of samples
                    logger.log_text(
                        key="samples", columns=["step", "text"], data=[[self.global_step, t] for t in texts]
                    )
