"""Extractive question answering data: questions (from ``squad.py``) encoded with their contexts.

A question and its context are encoded as one pair; a context too long for ``max_length`` is cut
into overlapping windows (``stride`` tokens shared between neighbours). The fast tokenizer's
offsets turn the answer's characters into the positions of its first and last token; a window
that does not hold the whole answer points at position 0 ([CLS]).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch
from tokenizers import Encoding, Tokenizer
from torch.utils.data import Dataset

from lmforge.data.examples import ExampleDataModule, ExampleRows, as_table
from lmforge.data.sources import map_columns
from lmforge.data.tokenizers import cached_tokenizer, pad_token_id, tokenizer_fingerprint
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)


@dataclass
class AnswerWindow:
    """One window of a question and (part of) its context.

    ``ids``, ``type_ids`` (0 question, 1 context) and ``offsets`` have one entry per token; ``offsets``
    is the token's (start, end) characters in the context, (-1, -1) for the question and special
    tokens. ``start``/``end`` are the positions of the first gold answer's first and last token, 0 and 0
    when the window does not hold all of it.
    """

    ids: np.ndarray
    type_ids: np.ndarray
    offsets: np.ndarray
    start: int
    end: int


@dataclass
class QuestionWindows:
    """A question (its index in the split) with the windows it is read through.

    Validation and test batches take whole questions, so that the best span is chosen across all
    of a question's windows; training takes one window per item.
    """

    index: int
    windows: list[AnswerWindow]


def answer_token_span(offsets: np.ndarray, first: int, last: int) -> tuple[int, int]:
    """Token positions of the characters ``[first, last)`` among the context tokens ((T, 2) offsets,
    -1 outside the context); (0, 0) when the window's context does not cover both ends."""
    inside = np.flatnonzero(offsets[:, 0] >= 0)
    if not len(inside) or offsets[inside[0], 0] > first or offsets[inside[-1], 1] < last:
        return 0, 0
    start = inside[offsets[inside, 1] > first][0]
    end = inside[offsets[inside, 0] < last][-1]
    return int(start), int(end)


def _window(encoding: Encoding, answer: tuple[int, int] | None) -> AnswerWindow:
    context = np.array([sid == 1 for sid in encoding.sequence_ids])
    offsets = np.where(context[:, None], np.array(encoding.offsets, dtype=np.int32).reshape(-1, 2), -1)
    start, end = answer_token_span(offsets, *answer) if answer else (0, 0)
    # The pair template's segment ids (BERT's: 1 from the context to the last [SEP]); a tokenizer without
    # one (GPT-2's) gives none, so they come from the sequence ids.
    type_ids = np.array(encoding.type_ids, dtype=np.int8) if any(encoding.type_ids) else context.astype(np.int8)
    return AnswerWindow(np.array(encoding.ids, dtype=np.int32), type_ids, offsets, start, end)


def encode_questions(
    tokenizer: Tokenizer,
    questions: list[str],
    contexts: list[str],
    answers: list[tuple[int, int] | None],
    max_length: int,
    stride: int,
    max_question_length: int = 64,
) -> list[list[AnswerWindow]]:
    """Encode (question, context) pairs into windows of at most ``max_length`` tokens.

    Args:
        tokenizer: the run's tokenizer (left as it is; truncation is set on a copy).
        answers: the (first, last + 1) characters of each question's answer in its context, or None.
        stride: tokens of context that neighbouring windows share.
        max_question_length: questions longer than this many tokens are cut (so a context token always fits).
    Returns:
        the windows of each question, in order.
    """
    if stride >= max_length - max_question_length - 3:
        raise LmforgeError(
            f"task.data.stride={stride} leaves no new context per window of max_length={max_length} "
            f"(with questions up to {max_question_length} tokens); lower the stride."
        )
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    tokenizer.no_truncation()
    tokenizer.no_padding()
    cut = []
    for question, encoding in zip(questions, tokenizer.encode_batch(questions, add_special_tokens=False)):
        cut.append(
            question[: encoding.offsets[max_question_length - 1][1]]
            if len(encoding) > max_question_length
            else question
        )
    tokenizer.enable_truncation(max_length, stride=stride, strategy="only_second")
    encodings = tokenizer.encode_batch(list(zip(cut, contexts)))
    return [
        [_window(e, answer) for e in (encoding, *encoding.overflowing)] for encoding, answer in zip(encodings, answers)
    ]


def first_answer(answers: dict) -> tuple[int, int] | None:
    """The character span of a question's first gold answer (the one trained on), or None."""
    if not answers["text"]:
        return None
    start = answers["answer_start"][0]
    return start, start + len(answers["text"][0])


def collate_questions(
    batch: list[QuestionWindows], columns: dict[str, list], pad_id: int
) -> dict[str, torch.Tensor | list]:
    """Pad the windows of a batch of questions (right padding) to the longest.

    Returns:
        tensors (one row per window): ``input_ids``, ``attention_mask``, ``token_type_ids``, ``offsets``
        (B, T, 2; -1 outside the context), ``start_positions``, ``end_positions`` and ``question`` (B,),
        the row of each window's question in the lists; lists (one entry per question): ``id``,
        ``context``, ``answers`` (the gold texts).
    """
    windows = [(row, w) for row, item in enumerate(batch) for w in item.windows]
    B, T = len(windows), max(len(w.ids) for _, w in windows)
    out: dict = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((B, T), dtype=torch.long),
        "token_type_ids": torch.zeros((B, T), dtype=torch.long),
        "offsets": torch.full((B, T, 2), -1, dtype=torch.long),
        "start_positions": torch.tensor([w.start for _, w in windows]),
        "end_positions": torch.tensor([w.end for _, w in windows]),
        "question": torch.tensor([row for row, _ in windows]),
    }
    for i, (_, w) in enumerate(windows):
        n = len(w.ids)
        out["input_ids"][i, :n] = torch.from_numpy(w.ids)
        out["attention_mask"][i, :n] = 1
        out["token_type_ids"][i, :n] = torch.from_numpy(w.type_ids)
        out["offsets"][i, :n] = torch.from_numpy(w.offsets)
    for name in ("id", "context"):
        out[name] = [columns[name][item.index] for item in batch]
    out["answers"] = [columns["answers"][item.index]["text"] for item in batch]
    return out


def _encode_windows(batch: dict, indices: list[int], tokenizer: str, window: dict) -> dict:
    """A `datasets.map` batch of questions encoded into window rows (one per window, with its question's row)."""
    questions = encode_questions(
        cached_tokenizer(tokenizer), batch["question"], batch["context"], [first_answer(a) for a in batch["answers"]],
        **window,
    )  # fmt: skip
    rows = [(index, w) for index, windows in zip(indices, questions, strict=True) for w in windows]
    return {
        "question": [index for index, _ in rows],
        "ids": [w.ids for _, w in rows],
        "type_ids": [w.type_ids for _, w in rows],
        "offsets": [w.offsets.reshape(-1) for _, w in rows],  # (T, 2) flattened: one list per window
        "start": [w.start for _, w in rows],
        "end": [w.end for _, w in rows],
    }


WINDOW_COLUMNS = ("question", "ids", "type_ids", "offsets", "start", "end")


def _question_windows(rows: list[tuple]) -> list[QuestionWindows]:
    """Window rows (of :data:`WINDOW_COLUMNS`, one question's windows consecutive) grouped by question."""
    out: list[QuestionWindows] = []
    for question, ids, type_ids, offsets, start, end in rows:
        window = AnswerWindow(np.asarray(ids, dtype=np.int32), np.asarray(type_ids, dtype=np.int8),
                              np.asarray(offsets, dtype=np.int32).reshape(-1, 2), start, end)  # fmt: skip
        if out and out[-1].index == question:
            out[-1].windows.append(window)
        else:
            out.append(QuestionWindows(question, [window]))
    return out


class QuestionRows(Dataset):
    """The questions of a split, each item all the windows of one question (window rows in Arrow)."""

    def __init__(self, windows: ExampleRows):
        self.windows = windows
        counts = np.bincount(windows.column("question"))
        self.bounds = np.concatenate([[0], np.cumsum(counts)])  # question i: window rows bounds[i]:bounds[i+1]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> QuestionWindows:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices) -> list[QuestionWindows]:
        rows = [r for i in indices for r in range(self.bounds[i], self.bounds[i + 1])]
        return _question_windows(self.windows.__getitems__(rows))


class QuestionAnsweringDataModule(ExampleDataModule):
    """Batches of (question, context) windows with the answer's token positions.

    Training items are single windows (shuffled, grouped by length); validation and test items are
    whole questions with all their windows, so that the task picks each answer across windows.
    Encoded windows go into the datasets cache beside the questions (memory-mapped), keyed by the
    data, the tokenizer and the window settings.

    Args:
        texts: split -> an Arrow table (or a dict of columns) of :data:`COLUMNS`, from :class:`SquadQuestions`.
        tokenizer: the run's tokenizer (a fast tokenizer with offsets: every ``tokenizers.Tokenizer``).
        max_length: tokens per window, question and special tokens included.
        stride: context tokens shared by neighbouring windows.
        max_question_length: questions are cut to this many tokens.
        batch_size: windows per training batch.
        eval_batch_size: questions per validation and test batch (None: ``batch_size``).
        seed: seed of the training order.
        num_workers: DataLoader worker processes.
        cache_dir: unused; accepted so every DataModule is built alike.
    """

    size_unit = "questions"

    def __init__(
        self,
        texts: dict,
        tokenizer: Tokenizer,
        max_length: int = 384,
        stride: int = 128,
        max_question_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, seed, num_workers)
        self.block_size = max_length
        self.window = {"max_length": max_length, "stride": stride, "max_question_length": max_question_length}
        if stride >= max_length - max_question_length - 3:  # before any encoding: one sentence, not a map failure
            encode_questions(tokenizer, [], [], [], **self.window)
        self.pad_id = pad_token_id(tokenizer)
        self.questions = {split: as_table(data) for split, data in texts.items()}
        self.texts = self.questions  # raw rows, for prediction files
        settings = {"tokenizer": tokenizer_fingerprint(tokenizer), "window": self.window}
        self.examples = {}
        for split, table in self.questions.items():
            windows = ExampleRows(map_columns(table, _encode_windows, settings, with_indices=True), WINDOW_COLUMNS)
            self.examples[split] = windows if split == "train" else QuestionRows(windows)
        if "train" in self.examples:
            windows = self.examples["train"]
            answered = int((windows.column("start") > 0).sum())
            log.info(
                "data: %d training windows of %d tokens (%d hold their answer)", len(windows), max_length, answered
            )

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of questions in each split (training items are windows; a question may have several)."""
        return {split: len(table) for split, table in self.questions.items()}

    def task_arguments(self) -> dict:
        """What the task needs to know of the data: the window settings, to read new questions alike."""
        return dict(self.window)

    def training_lengths(self) -> np.ndarray:
        """Window lengths: batches of similar lengths carry little padding."""
        ids = self.examples["train"].table.data.table.column("ids")
        return pc.list_value_length(ids).to_numpy()

    def collate_for(self, split: str):
        """Pad the windows of a batch of questions of ``split`` (whose texts and answers go along)."""
        return functools.partial(self._collate, self.questions[split])

    def _collate(self, questions, batch: list) -> dict:
        if batch and not isinstance(batch[0], QuestionWindows):  # training: window rows, one item each
            batch = [item for row in batch for item in _question_windows([row])]
        # The texts of this batch's questions only, renumbered in batch order.
        texts = questions.select_columns(["id", "context", "answers"])[[item.index for item in batch]]
        items = [QuestionWindows(row, item.windows) for row, item in enumerate(batch)]
        return collate_questions(items, texts, self.pad_id)
