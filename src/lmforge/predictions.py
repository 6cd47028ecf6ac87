"""Predictions on disk: one JSON line per example of an evaluated split, in the run dir.

Every task writes through one :class:`PredictionWriter`, which :class:`lmforge.tasks.base.TaskModule`
opens when the test epoch starts (``predictions.jsonl``), or validation's when ``lmforge-evaluate
split=validation`` asks for it (``eval-<split>-predictions.jsonl``), and finishes when it ends. The
``*_rows`` functions below say what a line holds for each task; every line starts with ``index``,
the example's row in its split (a window's number for language models).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from lmforge.tasks.text_metrics import text_scores

log = logging.getLogger(__name__)

TABLE_ROWS = 100  # lines sent to W&B as a table


class PredictionWriter:
    """Streams the lines of one evaluation epoch to ``<run dir>/<name>``.

    Each process appends each batch's lines to a part file of its own (``<name>.rank<r>.partial``)
    and flushes it, so memory never holds more than a batch. At the end rank zero merges the parts
    in the loader's order and renames the result into place: ``<name>`` exists only complete, and a
    crash leaves ``.partial`` files behind. A W&B logger, if any, gets a table of the first lines.

    Args:
        trainer: the Lightning trainer running the epoch (run dir, ranks, the split's loader and data).
        split: ``test`` or ``validation``.
        name: the file's name in ``trainer.default_root_dir``.
    """

    def __init__(self, trainer, split: str, name: str):
        from lmforge.data.sampling import PermutedDataset

        self.trainer, self.split = trainer, split
        self.path = Path(trainer.default_root_dir) / name
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        loader = trainer.test_dataloaders if split == "test" else trainer.val_dataloaders
        self.size = len(loader.dataset)
        # The loader's batches of dataset positions, walked in step with the batches the task sees: an
        # evaluation order is fixed, so this iterator repeats the loader's own (its DDP share included).
        self._batches = iter(loader.batch_sampler)
        self._next_batch, self._positions = 0, []
        self._order = loader.dataset.order if isinstance(loader.dataset, PermutedDataset) else None
        self._texts = getattr(trainer.datamodule, "example_texts", None)
        if self.rank == 0:
            self.path.unlink(missing_ok=True)  # an older file must not pass for this epoch's
        self._file = open(self._part(self.rank), "w", encoding="utf-8")  # noqa: SIM115 (open for the epoch)

    def _part(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.name}.rank{rank}.partial")

    def examples(self, batch_idx: int) -> list[dict[str, Any]]:
        """``{"index": row in the split, **its raw columns (text, label...)}`` for each example of a batch."""
        while self._next_batch <= batch_idx:  # batches the task wrote nothing for are skipped
            self._positions = next(self._batches)
            self._next_batch += 1
        indices = [int(self._order[p]) if self._order is not None else int(p) for p in self._positions]
        raw = self._texts(self.split, indices) if self._texts else [{} for _ in indices]
        return [{"index": i, **row} for i, row in zip(indices, raw, strict=True)]

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append one batch's lines and flush them."""
        self._file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        self._file.flush()

    def close(self) -> Path | None:
        """Finish the file once every process has written its part; returns its path on rank zero."""
        self._file.close()
        self.trainer.strategy.barrier("predictions")
        if self.rank != 0:
            return None
        parts = [self._part(r) for r in range(self.world_size)]
        missing = [str(p) for p in parts if not p.is_file()]
        if missing:  # a run dir that the nodes do not share
            log.warning("%s not written: rank zero cannot see %s", self.path, ", ".join(missing))
            return None
        merged = self.path.with_name(f"{self.path.name}.partial")
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(merged, "w", encoding="utf-8"))
            files = [stack.enter_context(open(p, encoding="utf-8")) for p in parts]
            # A DDP sampler deals the loader's order out in turn (rank r: positions r, r + W, ...), so a
            # line from each part in turn restores it; past the split's size come the repeats it pads with.
            lines = (line for group in itertools.zip_longest(*files) for line in group if line is not None)
            out.writelines(itertools.islice(lines, self.size))
            out.flush()
            os.fsync(out.fileno())  # on disk before the name says it is complete
        os.replace(merged, self.path)
        for part in parts:
            part.unlink()
        log.info("predictions: %s", self.path)
        self._log_table()
        return self.path

    def _log_table(self) -> None:
        loggers = [lg for lg in self.trainer.loggers if hasattr(lg, "log_table")]  # W&B, without importing it
        if not loggers:
            return
        with open(self.path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in itertools.islice(f, TABLE_ROWS)]
        if not rows:
            return
        columns = list(rows[0])
        data = [[_cell(row.get(c)) for c in columns] for row in rows]
        for logger in loggers:
            logger.log_table(key=f"{self.split}/predictions", columns=columns, data=data)


def _cell(value: Any) -> Any:
    """A table cell: lists and dicts (words, entities, answers) as JSON text."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


def _round(x: float) -> float:
    return round(float(x), 6)


def classification_rows(
    examples: list[dict], logits: torch.Tensor, labels: torch.Tensor, label_names: list[str] | None
) -> list[dict]:
    """Lines of a classification batch: ``text``, ``reference`` and ``prediction`` (label names), the
    predicted label's ``probability``, and whether it is ``correct``."""
    best = logits.float().softmax(-1).max(-1)
    names = label_names or [str(i) for i in range(logits.shape[-1])]
    return [
        {"index": ex["index"], "text": ex.get("text"), "reference": names[y], "prediction": names[p],
         "probability": _round(q), "correct": p == y}
        for ex, y, p, q in zip(examples, labels.tolist(), best.indices.tolist(), best.values.tolist(), strict=True)
    ]  # fmt: skip


def seq2seq_rows(
    examples: list[dict], hypotheses: list[str], references: list[str], metrics: tuple[str, ...]
) -> list[dict]:
    """Lines of a translation or summarization batch: ``source``, ``reference``, ``prediction`` and its
    sentence scores (``bleu``, ``chrf``, ``rouge1``...: the task's metrics, per example)."""
    return [
        {"index": ex["index"], "source": ex.get("source"), "reference": ref, "prediction": hyp,
         **{k: _round(v) for k, v in text_scores(hyp, ref, metrics).items()}}
        for ex, hyp, ref in zip(examples, hypotheses, references, strict=True)
    ]  # fmt: skip


def entities(words: list[str], tags: list[str]) -> list[dict]:
    """The entities of a tagged sentence (seqeval's reading of IOB tags): ``text``, ``type``, word ``start``, ``end``
    (exclusive)."""
    from seqeval.metrics.sequence_labeling import get_entities

    return [
        {"text": " ".join(words[start : last + 1]), "type": kind, "start": start, "end": last + 1}
        for kind, start, last in get_entities(tags)  # seqeval's spans end at their last word
    ]


def tagging_rows(
    examples: list[dict], preds: list[list[int]], target: list[list[int]], tag_names: list[str]
) -> list[dict]:
    """Lines of a tagging batch: ``words``, ``reference`` and ``prediction`` tags, and the ``entities``
    they make (``reference_entities`` for the gold ones)."""
    rows = []
    for ex, p, t in zip(examples, preds, target, strict=True):
        words = ex.get("tokens") or [""] * len(t)
        predicted, gold = [tag_names[i] for i in p], [tag_names[i] for i in t]
        rows.append({"index": ex["index"], "words": words, "reference": gold, "prediction": predicted,
                     "entities": entities(words, predicted), "reference_entities": entities(words, gold)})  # fmt: skip
    return rows


def question_answering_rows(examples: list[dict], answers: list[list[dict]], batch: dict) -> list[dict]:
    """Lines of a question answering batch: ``id``, ``question``, ``reference`` (the gold answers),
    ``prediction``, its ``probability`` (of its start and end tokens), ``exact_match`` and ``f1`` (SQuAD
    v1.1's normalisation, in percent), and last the ``context``."""
    from torchmetrics.functional.text import squad

    rows = []
    for ex, found, qid, context, gold in zip(examples, answers, batch["id"], batch["context"], batch["answers"],
                                             strict=True):  # fmt: skip
        prediction = found[0]["text"] if found else ""
        target = {"answers": {"text": list(gold), "answer_start": [0] * len(gold)}, "id": str(qid)}
        scores = squad({"prediction_text": prediction, "id": str(qid)}, target)
        rows.append({"index": ex["index"], "id": qid, "question": ex.get("question"), "reference": list(gold),
                     "prediction": prediction, "probability": _round(math.exp(found[0]["score"])) if found else 0.0,
                     "exact_match": _round(scores["exact_match"]), "f1": _round(scores["f1"]), "context": context})  # fmt: skip
    return rows


def window_rows(
    examples: list[dict], loss_sums: torch.Tensor, counts: torch.Tensor, texts: list[str] | None = None,
    correct: torch.Tensor | None = None,
) -> list[dict]:  # fmt: skip
    """Lines of a language-modelling batch, a window each: the ``tokens`` scored, their mean ``loss``
    (nats; null when none was scored), ``correct`` predictions (masked LM), and the window's ``text``.

    The split's loss is the token-weighted mean: sum(loss * tokens) / sum(tokens).
    """
    rows = []
    right = correct.tolist() if correct is not None else None
    for i, (ex, total, n) in enumerate(zip(examples, loss_sums.tolist(), counts.tolist(), strict=True)):
        row = {"index": ex["index"], "tokens": int(n), "loss": _round(total / n) if n else None}
        if right is not None:
            row["correct"] = int(right[i])
        if texts is not None:
            row["text"] = texts[i]
        rows.append(row)
    return rows
