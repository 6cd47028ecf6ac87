"""Extractive question answering (SQuAD): start and end scores over the context tokens of any backbone.

An encoder reads question and context together; a decoder reads the question first, so each context
token sees the question but nothing after itself. The answer of a question is the best valid span
(inside the context, end not before start, at most ``max_answer_length`` tokens) over all its windows,
mapped back to the context's characters through the tokenizer's offsets.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import SQuAD

from lmforge.data.question_answering import QuestionWindows, collate_questions, encode_questions
from lmforge.data.tokenizers import pad_token_id
from lmforge.errors import LmforgeError
from lmforge.models.backbone import Backbone
from lmforge.predictions import question_answering_rows
from lmforge.tasks.base import TaskModule
from lmforge.tasks.optim import OptimizerFactory, SchedulerFactory

log = logging.getLogger(__name__)


def top_spans(
    start_scores: torch.Tensor, end_scores: torch.Tensor, context: torch.Tensor, max_answer_length: int, n_best: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``n_best`` highest-scoring valid spans of each window.

    Args:
        start_scores, end_scores: (W, T) scores of each position as the first / last answer token.
        context: (W, T) bool, True at context tokens (the only places an answer may start or end).
    Returns:
        (W, n) span scores (start + end; -inf where a window has fewer valid spans), first and last positions.
    """
    W, T = start_scores.shape
    pos = torch.arange(T, device=start_scores.device)
    length = pos[None, :] - pos[:, None]  # [s, e] -> e - s
    valid = (length >= 0) & (length < max_answer_length)
    valid = valid[None] & context[:, :, None] & context[:, None, :]
    scores = (start_scores[:, :, None] + end_scores[:, None, :]).masked_fill(~valid, float("-inf"))
    best = scores.flatten(1).topk(min(n_best, T * T), dim=1)
    return best.values, best.indices // T, best.indices % T


def best_answers(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    batch: dict,
    max_answer_length: int = 30,
    n_best: int = 20,
) -> list[list[dict]]:
    """The ``n_best`` answers of each question of a batch, best first, across its windows.

    Scores are log-probabilities (log-softmax over each window's positions, start plus end), so a
    window whose scores favour [CLS] ("not in this window") ranks its spans lower.

    Returns:
        per question: [{"text", "start", "end" (characters in the context), "score"}]; [] when no window
        has a valid span.
    """
    mask = batch["attention_mask"].bool()
    start = F.log_softmax(start_logits.float().masked_fill(~mask, float("-inf")), dim=-1)
    end = F.log_softmax(end_logits.float().masked_fill(~mask, float("-inf")), dim=-1)
    offsets = batch["offsets"]
    scores, firsts, lasts = top_spans(start, end, offsets[..., 0] >= 0, max_answer_length, n_best)
    candidates: list[list[tuple]] = [[] for _ in batch["context"]]
    rows = batch["question"].tolist()
    for w, (row, s_row, f_row, l_row) in enumerate(zip(rows, scores.tolist(), firsts.tolist(), lasts.tolist())):
        for score, first, last in zip(s_row, f_row, l_row):
            if score == float("-inf"):
                break
            candidates[row].append((score, int(offsets[w, first, 0]), int(offsets[w, last, 1])))
    answers = []
    for row, found in enumerate(candidates):
        seen, ranked = set(), []
        for score, a, b in sorted(found, reverse=True):
            if (a, b) not in seen:  # overlapping windows propose the same span twice
                seen.add((a, b))
                ranked.append({"text": batch["context"][row][a:b], "start": a, "end": b, "score": score})
        answers.append(ranked[:n_best])
    return answers


class QuestionAnsweringTask(TaskModule):
    """A linear start/end head on every position of a backbone, trained with cross-entropy on both ends.

    Validation and test pick each question's best span over its windows and score exact match and F1
    against all its gold answers (SQuAD v1.1's official normalisation, through torchmetrics).

    Args:
        backbone: an encoder, decoder, RNN or reader (BiDAF) with ``hidden_states(input_ids, attention_mask)``
            and ``hidden_size``.
        optimizer: partial optimizer, called with the parameter groups.
        scheduler: partial schedule, or None.
        dropout: dropout before the head.
        max_answer_length: longest answer, in tokens.
        n_best: candidate spans kept per window (and answers returned by :meth:`predict_texts`).
        max_length, stride, max_question_length: the window settings of the data (kept in checkpoints,
            so that :meth:`predict_texts` reads new questions as the training data was read).
        tokenizer: unused; accepted so every task is built alike.
    """

    backbone_kinds = ("encoder", "decoder", "rnn", "reader")

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        dropout: float = 0.1,
        max_answer_length: int = 30,
        n_best: int = 20,
        max_length: int = 384,
        stride: int = 128,
        max_question_length: int = 64,
        tokenizer=None,
    ):
        super().__init__(optimizer, scheduler)
        if self.checked_kind(backbone) == "decoder":
            log.info(
                "question answering with a decoder: each context token sees only the tokens before it (left context)"
            )
        self.attach_backbone(backbone)
        self.takes_segments = backbone.takes_token_type_ids
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.hidden_size, 2)
        self.max_answer_length = max_answer_length
        self.n_best = n_best
        self.window = {"max_length": max_length, "stride": stride, "max_question_length": max_question_length}
        n_positions = backbone.n_positions
        if n_positions and max_length > n_positions:
            raise LmforgeError(
                f"task.data.max_length={max_length} is longer than the model's n_positions={n_positions}."
            )
        self.val_scores = SQuAD()
        self.test_scores = SQuAD()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids, mask and segment ids -> (B, T) start and end logits."""
        segments = {"token_type_ids": token_type_ids} if self.takes_segments else {}
        hidden = self.backbone.hidden_states(input_ids, attention_mask, **segments)
        start, end = self.head(self.dropout(hidden)).float().unbind(-1)
        return start, end

    def _logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def loss(self, start: torch.Tensor, end: torch.Tensor, batch: dict, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the gold first and last positions (padding excluded), ``mean`` or ``sum`` over windows."""
        pad = ~batch["attention_mask"].bool()
        start, end = start.masked_fill(pad, -1e4), end.masked_fill(pad, -1e4)
        starts = F.cross_entropy(start, batch["start_positions"], reduction=reduction)
        return (starts + F.cross_entropy(end, batch["end_positions"], reduction=reduction)) / 2

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The loss of one batch of windows, to be averaged over the windows of the whole optimizer step."""
        loss_sum = self.loss(*self._logits(batch), batch, reduction="sum")
        return self.training_loss(loss_sum, len(batch["input_ids"]))

    def _evaluate(self, batch: dict, batch_idx: int, scores: SQuAD, mean_loss: MeanMetric) -> None:
        start, end = self._logits(batch)
        mean_loss.update(self.loss(start, end, batch), weight=len(batch["input_ids"]))
        answers = best_answers(start, end, batch, self.max_answer_length, self.n_best)
        preds = [{"prediction_text": a[0]["text"] if a else "", "id": i} for a, i in zip(answers, batch["id"])]
        target = [{"answers": {"text": gold, "answer_start": [0] * len(gold)}, "id": i}
                  for gold, i in zip(batch["answers"], batch["id"])]  # fmt: skip
        scores.update(preds, target)
        if (writer := self.prediction_writer) is not None:
            writer.write(question_answering_rows(writer.examples(batch_idx), answers, batch))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate the loss, exact match and F1 (and write predictions for ``lmforge-evaluate split=validation``)."""
        self._evaluate(batch, batch_idx, self.val_scores, self.val_loss)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate the loss, exact match and F1; write each question's answer and scores."""
        self._evaluate(batch, batch_idx, self.test_scores, self.test_loss)

    def on_validation_epoch_end(self) -> None:
        """Log validation loss, exact match (``val/em``) and F1 (``val/f1``), in percent."""
        self.log_epoch_scores("val", self.val_loss, self.val_scores, rename={"exact_match": "em"})

    def on_test_epoch_end(self) -> None:
        """Log test loss, exact match and F1, in percent."""
        self.log_epoch_scores("test", self.test_loss, self.test_scores, rename={"exact_match": "em"})

    # lmforge-predict reads these fields of each input (question="..." context="..." or a JSON line).
    predict_fields = ("question", "context")

    @torch.no_grad()
    def predict_texts(self, inputs: list[dict], tokenizer) -> list[dict]:
        """Answer questions on their contexts (call ``eval()`` first).

        Args:
            inputs: [{"question", "context"}].
        Returns:
            for each input: its ``question``, the ``answer`` text, its ``start``/``end`` characters in the
            context, its ``score`` (probability of the start and end tokens), and the ``n_best`` alternatives.
        """
        questions = [str(x["question"]) for x in inputs]
        contexts = [str(x["context"]) for x in inputs]
        windows = encode_questions(tokenizer, questions, contexts, [None] * len(inputs), **self.window)
        columns = {"id": list(range(len(inputs))), "context": contexts, "answers": [{"text": []}] * len(inputs)}
        batch = collate_questions(
            [QuestionWindows(i, w) for i, w in enumerate(windows)], columns, pad_token_id(tokenizer)
        )
        device = self.head.weight.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        results = []
        for question, found in zip(
            questions, best_answers(*self._logits(batch), batch, self.max_answer_length, self.n_best)
        ):
            for answer in found:
                answer["score"] = round(float(torch.tensor(answer["score"]).exp()), 6)
            best = found[0] if found else {"text": "", "start": -1, "end": -1, "score": 0.0}
            results.append({"question": question, "answer": best["text"], "start": best["start"], "end": best["end"],
                            "score": best["score"], "n_best": found})  # fmt: skip
        return results
