"""Sequence packing: several examples per row instead of one example and its padding (``task.data.packing``).

Two kinds of data get packed:

- examples (SFT conversations, sentences): :func:`pack_examples` places whole examples into rows of a fixed
  length by best-fit decreasing and :func:`collate_packed` batches the rows; :func:`collate_padded` is the
  one-example-per-row alternative in the same batch format;
- windows of a token stream (language modelling on documents): the windows are full already, and
  :class:`SeparatorCollate` names the documents in them from the separator token between documents.

Either way a batch is an :class:`LMBatch` ``(input_ids, labels, document_ids)``, whose ``document_ids``
(B, T) the backbones read (``takes_document_ids``, :mod:`lmforge.models.documents`): attention stays
inside each document and positions restart at each one. As in the language-modelling windows, an example
of n tokens takes n - 1 positions: its tokens but the last as inputs, and as labels the next token's
label (``labels[t]`` is what position ``t`` predicts), so one loss serves packed, padded and windowed batches.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from lmforge.data.labels import IGNORE

PAD_DOCUMENT = -1  # the document id of padding


class LMBatch(NamedTuple):
    """A language-modelling batch, a tuple that the tasks also read as ``(input_ids, labels[, document_ids])``.

    Attributes:
        input_ids: (B, T) token ids.
        labels: (B, T) next-token targets, IGNORE where a position has no loss (padding, a prompt).
        document_ids: (B, T) each token's document in a packed row, -1 on padding; None when unpacked.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    document_ids: torch.Tensor | None = None


def _positions(ids: Sequence[int], labels: Sequence[int], shift: bool) -> tuple[Sequence[int], Sequence[int]]:
    """One example's inputs and targets: shifted, its tokens but the last and the labels but the first."""
    return (ids[:-1], labels[1:]) if shift else (ids, labels)


@dataclass
class PackedRows(Dataset):
    """Rows of packed examples, a torch Dataset whose items are dicts of (T,) tensors for :func:`collate_packed`.

    Attributes:
        input_ids: (N, T) token ids, padded with the pad id.
        labels: (N, T) targets (next-token ones when packed with ``shift_labels``), IGNORE on padding.
        document_ids: (N, T) the example's number within its row (0, 1, ...), -1 on padding.
        examples: for each row, the indices of the examples it holds, in the row's order.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    document_ids: np.ndarray
    examples: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.from_numpy(self.input_ids[i]),
            "labels": torch.from_numpy(self.labels[i]),
            "document_ids": torch.from_numpy(self.document_ids[i]),
        }

    @property
    def padding_share(self) -> float:
        """Share of the rows' positions that are padding."""
        return float((self.document_ids == PAD_DOCUMENT).mean()) if self.document_ids.size else 0.0


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of at most ``capacity`` for items of the given lengths: the longest item first, each into the
    fullest bin it fits (a new bin when none does). Returns each bin's item indices, ascending; bins in
    the order of their first item.

    Best-fit decreasing stays within about 11/9 of the fewest possible bins, which is what keeps the
    padding small; first-fit in the data's order can leave a long example's bin half empty when only
    long ones follow it. The bins are the same on every run (no randomness); the loader shuffles them.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free space, bin), sorted: the first that fits is the fullest
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            bins.append([i])
            free, b = capacity - lengths[i], len(bins) - 1
        else:
            free, b = room.pop(at)
            bins[b].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, b))
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def pack_examples(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]] | None,
    row_length: int,
    pad_id: int = 0,
    shift_labels: bool = True,
) -> PackedRows:
    """Pack examples into rows of ``row_length`` positions (best-fit decreasing, :func:`best_fit_decreasing`).

    Args:
        input_ids: each example's token ids.
        labels: each example's per-token labels, as long as its ids (the token itself, or IGNORE for a token
            without loss, such as a prompt's); None trains on every token.
        row_length: positions per row. An example that needs more is an error: truncate it first.
        pad_id: the id that fills the rest of a row.
        shift_labels: causal LM: an example of n tokens takes n - 1 positions, its tokens but the last, each
            with the next token's label (so n = row_length + 1 fits, as in the windows of language
            modelling). False: n positions, each with its own label (masked LM).
    Returns:
        the rows; every example is in exactly one row, whole, with the examples of a row in their given order.
    """
    labels = input_ids if labels is None else labels
    lengths = _positions_needed(input_ids, labels, shift_labels, row_length)
    bins = best_fit_decreasing(lengths, row_length)
    shape = (len(bins), row_length)
    rows = PackedRows(
        np.full(shape, pad_id, dtype=np.int64), np.full(shape, IGNORE, dtype=np.int64),
        np.full(shape, PAD_DOCUMENT, dtype=np.int64), bins,
    )  # fmt: skip
    for r, members in enumerate(bins):
        at = 0
        for d, i in enumerate(members):
            end = at + lengths[i]
            rows.input_ids[r, at:end], rows.labels[r, at:end] = _positions(input_ids[i], labels[i], shift_labels)
            rows.document_ids[r, at:end] = d
            at = end
    return rows


def _positions_needed(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], shift: bool, row_length: int
) -> list[int]:
    """Each example's positions in a row; a clear error for an example that cannot be packed."""
    lengths = []
    for i, (ids, targets) in enumerate(zip(input_ids, labels, strict=True)):
        n = len(ids) - int(shift)
        if len(targets) != len(ids):
            raise ValueError(f"example {i} has {len(ids)} token ids but {len(targets)} labels")
        if n <= 0:
            raise ValueError(f"example {i} has {len(ids)} tokens, too few to learn from; leave it out before packing")
        if n > row_length:
            raise ValueError(
                f"example {i} needs {n} positions, more than a packed row's {row_length}; truncate it first"
            )
        lengths.append(n)
    return lengths


def collate_packed(rows: list[dict[str, torch.Tensor]]) -> LMBatch:
    """Stack packed rows (items of :class:`PackedRows`) into a batch of (B, T) ``input_ids``, ``labels``, ``document_ids``."""
    return LMBatch(**default_collate(rows))


def collate_padded(
    examples: list[tuple[Sequence[int], Sequence[int] | None]], pad_id: int = 0, shift_labels: bool = True
) -> LMBatch:
    """One example per row, right-padded to the batch's longest: the unpacked batch of the same examples.

    A causal model needs no attention mask for right padding: no real token comes after it, and its
    labels are IGNORE.

    Args:
        examples: (token ids, per-token labels or None) pairs, as for :func:`pack_examples`.
    Returns:
        (B, longest) ``input_ids`` and ``labels``; ``document_ids`` None.
    """
    rows = [_positions(ids, ids if labels is None else labels, shift_labels) for ids, labels in examples]
    longest = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    for row, (ids, labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        targets[row, : len(ids)] = torch.as_tensor(labels)
    return LMBatch(input_ids, targets)


def document_ids_from_separators(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """(B, T) document ids of windows cut from a token stream whose documents are joined by ``separator_id``.

    The separator opens the document after it (it plays the part of a beginning-of-text token): the last
    token of a document still predicts the separator from its own document, and the separator predicts
    the next document's first token from itself alone, so every label of the window keeps its loss
    and none is predicted across a boundary.
    """
    return (input_ids == separator_id).long().cumsum(dim=-1)


class SeparatorCollate:
    """Collate ``(input_ids, labels)`` windows as an :class:`LMBatch` with their ``document_ids`` (a
    DataLoader's ``collate_fn``; a class so that worker processes can pickle it)."""

    def __init__(self, separator_id: int):
        self.separator_id = separator_id

    def __call__(self, items: list) -> LMBatch:
        input_ids, labels = default_collate(items)
        return LMBatch(input_ids, labels, document_ids_from_separators(input_ids, self.separator_id))
