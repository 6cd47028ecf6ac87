"""Sequence-to-sequence: translation and summarization with encoder-decoders, or with a decoder as a prefix LM.

Training is teacher forcing with a padding-aware (optionally label-smoothed) cross-entropy.
Validation and test also generate: sacreBLEU and chrF (through the ``sacrebleu`` library,
on detokenized text) or ROUGE-1/2/L (torchmetrics) against the untokenized references.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.nn.utils.rnn import pad_sequence
from torchmetrics import MeanMetric

from lmforge.data.labels import IGNORE
from lmforge.data.tokenizers import eos_token_id, pad_token_id
from lmforge.errors import LmforgeError
from lmforge.generation import generate
from lmforge.models.backbone import Backbone
from lmforge.predictions import seq2seq_rows
from lmforge.tasks.base import TaskModule
from lmforge.tasks.optim import OptimizerFactory, SchedulerFactory
from lmforge.tasks.text_metrics import text_scores

log = logging.getLogger(__name__)

METRICS = ("bleu", "chrf", "rouge")


class Seq2SeqTask(TaskModule):
    """Generate a target text from a source text.

    An encoder-decoder reads the source and decodes the target. A decoder reads
    ``source EOS target EOS`` as one sequence (a prefix LM), with the loss on the target only,
    and generates after the source's EOS.

    Args:
        backbone: an encoder-decoder (``kind = "seq2seq"``) or a decoder.
        optimizer: partial optimizer, called with the parameter groups.
        scheduler: partial schedule, or None.
        tokenizer: the run's tokenizer (to turn generated ids back into text).
        label_smoothing: share of the target probability spread over the vocabulary (training loss only).
        metrics: any of ``bleu``, ``chrf`` (translation) and ``rouge`` (summarization).
        num_beams: beams at test time and in :meth:`generate_texts` (validation decodes greedily, which is faster).
        length_penalty: beam search ranks finished texts by log-probability / length ** length_penalty.
        max_new_tokens: longest generated text in tokens.
        min_new_tokens: shortest generated text in tokens (the end token is ruled out before).
        repetition_penalty: above 1 discourages repeated tokens (1 = off).
        no_repeat_ngram_size: no n-gram of this size occurs twice in a generated text (0 = off).
        val_generate_limit: pairs of each validation run that are generated and scored (None: all).
        show_examples: generated texts printed after each validation, beside their references.
    """

    backbone_kinds = ("seq2seq", "decoder")

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        tokenizer: Tokenizer | None = None,
        label_smoothing: float = 0.0,
        metrics: tuple[str, ...] | list[str] = ("bleu", "chrf"),
        num_beams: int = 1,
        length_penalty: float = 1.0,
        max_new_tokens: int = 128,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        val_generate_limit: int | None = None,
        show_examples: int = 2,
    ):
        super().__init__(optimizer, scheduler)
        kind = self.checked_kind(backbone)
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise LmforgeError(
                f"Unknown seq2seq metric {', '.join(sorted(unknown))}; choose from {', '.join(METRICS)}."
            )
        if tokenizer is None:
            raise LmforgeError("Seq2SeqTask needs the run's tokenizer to turn generated ids into text.")
        self.attach_backbone(backbone)
        self.prefix_lm = kind == "decoder"
        self.tokenizer = tokenizer
        self.eos_id = eos_token_id(tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self.label_smoothing = label_smoothing
        self.metrics = tuple(metrics)
        self.generation = dict(
            length_penalty=length_penalty,
            min_new_tokens=min_new_tokens,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.val_generate_limit = val_generate_limit
        self.show_examples = show_examples
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._generated: list[tuple[str, str]] = []  # (hypothesis, reference) of the current evaluation

    # -- teacher forcing ---------------------------------------------------------------------------

    def _prefix_lm_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``source EOS target`` as decoder input, the target (and EOS) as labels, right-padded."""
        sources = [ids[:n] for ids, n in zip(batch["input_ids"], batch["attention_mask"].sum(1).tolist())]
        targets = [labels[labels != IGNORE] for labels in batch["labels"]]
        inputs = [torch.cat([s, t[:-1]]) for s, t in zip(sources, targets, strict=True)]
        labels = [torch.cat([s.new_full((len(s) - 1,), IGNORE), t]) for s, t in zip(sources, targets, strict=True)]
        input_ids = pad_sequence(inputs, batch_first=True, padding_value=self.pad_id)
        mask = pad_sequence([torch.ones_like(x) for x in inputs], batch_first=True, padding_value=0)
        return input_ids, mask, pad_sequence(labels, batch_first=True, padding_value=IGNORE)

    def logits_and_labels(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced (B, T, V) logits and the (B, T) labels they predict."""
        if self.prefix_lm:
            input_ids, mask, labels = self._prefix_lm_batch(batch)
            return self.backbone(input_ids, attention_mask=mask), labels
        logits = self.backbone(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        return logits, batch["labels"]

    def _loss(self, batch: dict, label_smoothing: float = 0.0, reduction: str = "mean") -> tuple[torch.Tensor, int]:
        logits, labels = self.logits_and_labels(batch)
        # The smoothing term is summed (or averaged) over the target tokens alike, so sum = mean * tokens.
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                               label_smoothing=label_smoothing, reduction=reduction)  # fmt: skip
        return loss, int((labels != IGNORE).sum())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Label-smoothed cross-entropy, averaged over the target tokens of the whole optimizer step."""
        return self.training_loss(*self._loss(batch, self.label_smoothing, reduction="sum"))

    # -- generation --------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **options) -> list[list[int]]:
        """Generated token ids for a right-padded batch of sources, each cut before its first EOS.

        Args:
            options: overrides of :func:`lmforge.generation.generate`'s arguments (``num_beams``,
                ``temperature``, ``top_k``, ``max_new_tokens``...); the default is greedy decoding.
        """
        settings = {"temperature": 0.0, "num_beams": 1, "max_new_tokens": self.max_new_tokens, **self.generation,
                    **options}  # fmt: skip
        if self.prefix_lm:
            # Left-pad the prompts so that every row continues from the same (last) position.
            lengths = attention_mask.sum(1)
            shift = (attention_mask.shape[1] - lengths)[:, None]
            positions = (
                torch.arange(attention_mask.shape[1], device=input_ids.device)[None] - shift
            ) % attention_mask.shape[1]
            prompts = input_ids.gather(1, positions).masked_fill(positions >= lengths[:, None], self.pad_id)
            mask = attention_mask.gather(1, positions)
            room = self.backbone.n_positions - prompts.shape[1]
            settings["max_new_tokens"] = max(1, min(settings["max_new_tokens"], room))
            out = generate(self.backbone, prompts, attention_mask=mask, eos_token_id=self.eos_id,
                           pad_token_id=self.pad_id, **settings)[:, prompts.shape[1]:]  # fmt: skip
        else:
            out = generate(self.backbone, input_ids, attention_mask=attention_mask, eos_token_id=self.eos_id,
                           pad_token_id=self.pad_id, decoder_start_token_id=self.eos_id, **settings)  # fmt: skip
        texts = []
        for row in out.tolist():
            texts.append(row[: row.index(self.eos_id)] if self.eos_id in row else row)
        return texts

    @torch.no_grad()
    def generate_texts(self, sources: list[str], source_prefix: str = "", **options) -> list[str]:
        """Translate or summarise raw texts (``num_beams`` from the config unless given)."""
        options.setdefault("num_beams", self.num_beams)
        encodings = self.tokenizer.encode_batch([source_prefix + s for s in sources], add_special_tokens=False)
        rows = [e.ids + [self.eos_id] for e in encodings]
        device = next(self.parameters()).device
        input_ids = torch.full((len(rows), max(map(len, rows))), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        return self.decode(self.generate_ids(input_ids.to(device), mask.to(device), **options))

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Token ids to text, special tokens dropped."""
        return [text.strip() for text in self.tokenizer.decode_batch(ids, skip_special_tokens=True)]

    # -- evaluation --------------------------------------------------------------------------------

    def _evaluate(
        self, batch: dict, batch_idx: int, loss_metric: MeanMetric, num_beams: int, limit: int | None
    ) -> None:
        loss, n_tokens = self._loss(batch)
        loss_metric.update(loss, weight=n_tokens)
        if limit is not None and len(self._generated) >= limit:
            return
        hypotheses = self.decode(self.generate_ids(batch["input_ids"], batch["attention_mask"], num_beams=num_beams))
        self._generated.extend(zip(hypotheses, batch["target_text"], strict=True))
        if (writer := self.prediction_writer) is not None:  # the pairs scored, each with its sentence scores
            writer.write(seq2seq_rows(writer.examples(batch_idx), hypotheses, batch["target_text"], self.metrics))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate the loss; generate greedily (up to ``val_generate_limit`` pairs)."""
        self._evaluate(batch, batch_idx, self.val_loss, 1, self.val_generate_limit)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate the loss; generate with ``num_beams`` beams; write each pair's prediction."""
        self._evaluate(batch, batch_idx, self.test_loss, self.num_beams, None)

    def _log_scores(self, prefix: str, loss_metric: MeanMetric) -> None:
        self.log_epoch_scores(prefix, loss_metric)
        generated, self._generated = self._generated, []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, generated)
            generated = [pair for part in gathered for pair in part]
        if not generated:
            return
        hypotheses, references = (list(side) for side in zip(*generated, strict=True))
        scores = text_scores(hypotheses, references, self.metrics)
        # Every rank holds the same gathered texts, hence the same scores: no further sync.
        self.log_dict({f"{prefix}/{k}": v for k, v in scores.items()}, prog_bar=prefix == "val", rank_zero_only=False)
        if self.trainer.is_global_zero:
            for hypothesis, reference in generated[: self.show_examples]:
                log.info("%s example:\n  generated: %s\n  reference: %s", prefix, hypothesis, reference)

    def on_validation_epoch_end(self) -> None:
        """Log validation loss and the scores of the generated texts."""
        self._log_scores("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        """Log test loss and the scores of the generated texts."""
        self._log_scores("test", self.test_loss)
