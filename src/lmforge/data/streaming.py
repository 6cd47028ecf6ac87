"""Training text streamed as it is read (``task.source.streaming=true``): a hub corpus is never
downloaded whole, and local files stream the same way through `datasets`.

The stream is tokenized a batch of documents at a time and packed into windows; the position in
the stream (the `datasets` state at a document-batch boundary, the tokens carried over, the
windows already taken) goes into every checkpoint, so that a resumed run continues where it stopped.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import IterableDataset

from lmforge.data.text_splits import TextSplit
from lmforge.data.token_store import document_separator

DOCS_PER_BATCH = 64


class StreamedText(TextSplit):
    """A split read from a `datasets` ``IterableDataset``, a row per document.

    Args:
        dataset: the stream (``load_dataset(..., streaming=True)``, one split).
        column: the field holding the text.
        identity: what names the stream in a fingerprint (hub id, configuration, split; or the files).
        joiner: None: each row is a document (the tokenizer's end-of-text token between them); a
            string: the rows are pieces of one text joined by it (a corpus stored a line per row).
    """

    def __init__(self, dataset, column: str, identity: str, joiner: str | None = None):
        self.dataset = dataset
        self.column = column
        self.identity = identity
        self.joiner = joiner

    def documents(self) -> Iterator[Iterator[str]]:
        if self.joiner is not None:
            yield (str(row[self.column]) + self.joiner for row in self.dataset)
            return
        for row in self.dataset:
            yield iter((str(row[self.column]),))

    @property
    def fingerprint(self) -> str:
        return f"stream:{self.identity}:{self.column}"

    def describe(self) -> str:
        return f"streamed from {self.identity}"


class StreamedWindows(IterableDataset):
    """Windows of ``block_size + 1`` tokens (consecutive windows share one token, as in
    :class:`TokenWindows` with ``stride=block_size``) packed from a stream as it is read.

    Each batch of documents starts with a snapshot (windows taken so far, the stream's state, the
    tokens carried over); the last few are kept, and :meth:`resume_at` restarts from the one
    before a given window count.

    Under DDP every rank reads the whole stream and takes every ``world_size``-th window (rank ``r``
    the windows ``r, r + world_size, ...``), a whole round at a time: all ranks then yield the same
    number of windows, so none runs out of data while another waits for it in a collective (a stream
    split by shard or row gives the ranks different numbers of tokens, and the run hangs at its end).
    Window counts (snapshots, :meth:`resume_at`) are counts of the whole stream's windows.

    ``separator`` is the text put between documents (None: the tokenizer's own, see
    :func:`~lmforge.data.token_store.document_separator`); a stream of rows joined by
    ``text.joiner`` is one document.
    """

    def __init__(
        self,
        text: StreamedText,
        tokenizer: Tokenizer,
        block_size: int,
        rank: int = 0,
        world_size: int = 1,
        separator: str | None = None,
    ):
        self.text = text
        self.dataset = text.dataset
        self.rank = rank
        self.world_size = world_size
        self.tokenizer = tokenizer
        self.block_size = block_size
        if text.joiner is not None:
            separator = text.joiner
        elif separator is None:  # packing names its own separator token
            separator = document_separator(tokenizer)
        self.separator = tokenizer.encode(separator, add_special_tokens=False).ids if separator else []
        self.snapshots: deque[dict] = deque(maxlen=16)
        self._start: dict | None = None  # the snapshot to start from, and windows of it to skip

    def resume_at(self, snapshots: list[dict], windows: int) -> None:
        """Start the next iteration at window ``windows`` of the stream (a multiple of ``world_size``),
        from the latest snapshot before it."""
        usable = [s for s in snapshots if s["windows"] <= windows]
        if usable:
            self._start = {**usable[-1], "skip": windows - usable[-1]["windows"]}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start, self._start = self._start, None
        self.snapshots.clear()
        if start is None:  # a fresh pass, from the beginning of the stream (None: no state to start from)
            start = {"windows": 0, "stream": None, "carry": [], "begun": False, "skip": 0}
        self.dataset.load_state_dict(start["stream"])
        windows, carry, begun, skip = start["windows"], start["carry"], start["begun"], start["skip"]
        stream = start["stream"]
        rows = iter(self.dataset)
        while True:
            snapshot = {"windows": windows, "stream": stream, "carry": list(carry), "begun": begun}
            docs = [str(row[self.text.column]) for row in itertools.islice(rows, DOCS_PER_BATCH)]
            if not docs:
                return
            self.snapshots.append(snapshot)
            stream = self.dataset.state_dict()  # just after this batch's last row: where the next batch starts
            ids = list(carry)
            for encoding in self.tokenizer.encode_batch(docs, add_special_tokens=False):
                if begun:
                    ids += self.separator
                ids += encoding.ids
                begun = True
            tokens = np.asarray(ids, dtype=np.int64)
            n = max(0, (len(tokens) - 1) // self.block_size)
            carry = tokens[n * self.block_size :].tolist()
            for i in range(n):
                index, windows = windows, windows + 1
                if skip:
                    skip -= 1
                    continue
                if index % self.world_size == self.rank:
                    mine = tokens[i * self.block_size : (i + 1) * self.block_size + 1]
                if windows % self.world_size == 0:  # a whole round: every rank has its window
                    window = torch.from_numpy(mine)
                    yield window[:-1], window[1:]
