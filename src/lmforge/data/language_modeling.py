"""Language-modelling data: windows of a memory-mapped token stream, shuffled lazily and resumable."""

from __future__ import annotations

import logging
import tempfile

import numpy as np
import pytorch_lightning as pl
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from lmforge.data.packing import SeparatorCollate
from lmforge.data.sampling import PermutedDataset, resumable_sampler
from lmforge.data.streaming import StreamedText, StreamedWindows
from lmforge.data.text_splits import TextSplit, as_text_split
from lmforge.data.token_store import TokenStore, open_or_build
from lmforge.data.tokenizers import END_OF_SEQUENCE
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)


class TokenWindows(Dataset):
    """Windows of ``block_size + 1`` consecutive tokens taken every ``stride`` tokens.

    Item ``i`` is ``(input_ids, labels)``: the window without its last token and
    the window shifted by one. A stride of 1 makes every position a start, which
    with shuffling is nanoGPT's random-offset sampling without replacement.

    Args:
        ids: a :class:`TokenStore` (memory-mapped) or any array of token ids.
    """

    def __init__(self, ids: TokenStore | np.ndarray, block_size: int, stride: int):
        if len(ids) <= block_size:
            raise ValueError(f"{len(ids)} tokens are too few for windows of {block_size}")
        self.ids = ids
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return (len(self.ids) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        window = torch.from_numpy(self.ids[start : start + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]


def packing_separator(tokenizer: Tokenizer) -> str:
    """The special token that joins documents when windows are packed (``task.data.packing=true``)."""
    for token in END_OF_SEQUENCE:
        if tokenizer.token_to_id(token) is not None:
            return token
    raise LmforgeError(
        f"task.data.packing=true needs a token to put between documents ({', '.join(END_OF_SEQUENCE)}), "
        f"and the tokenizer has none; use tokenizer=bpe or tokenizer=gpt2."
    )


class LanguageModelingDataModule(pl.LightningDataModule):
    """Causal language modelling on one long token stream per split, memory-mapped from a token store.

    Each split is tokenized once into ``<cache_dir>/tokens/`` (see :mod:`lmforge.data.token_store`)
    and read from there: memory does not grow with the corpus.

    Args:
        texts: split name -> its text (a :class:`TextSplit` from the task's source, or a string).
        tokenizer: the run's tokenizer.
        block_size: tokens per training window.
        batch_size: windows per batch.
        train_stride: distance between training window starts; None means
            ``block_size`` (non-overlapping), 1 means every offset.
        seed: seed of the training order (a permutation per epoch).
        eval_seed: seed of the fixed order in which validation windows are read, so that
            ``limit_val_batches`` sees windows from the whole split.
        cache_dir: where token stores are kept, keyed by text and tokenizer (None: a temporary folder).
        num_workers: DataLoader worker processes.
        token_dtype: id type on disk: ``auto`` (uint16 when the vocabulary fits, else uint32), ``uint16``, ``uint32``.
        packing: keep the documents of a window apart: they are joined by the tokenizer's end-of-text token
            (``<|endoftext|>``, ``</s>`` or ``[SEP]``), and batches become ``(input_ids, labels, document_ids)``
            (:class:`~lmforge.data.packing.SeparatorCollate`), so that a token attends only to its own
            document and positions restart at each one.
    """

    size_unit = "tokens"

    def __init__(
        self,
        texts: dict[str, str | TextSplit],
        tokenizer: Tokenizer,
        block_size: int = 256,
        batch_size: int = 32,
        train_stride: int | None = None,
        seed: int = 0,
        eval_seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
        token_dtype: str = "auto",
        packing: bool = False,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.batch_size = batch_size
        self.train_stride = train_stride or block_size
        self.seed = seed
        self.eval_seed = eval_seed
        self.num_workers = num_workers
        self.separator = packing_separator(tokenizer) if packing else None
        self.collate = SeparatorCollate(tokenizer.token_to_id(self.separator)) if packing else None
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lmforge-tokens-")
            cache_dir = self._tmp.name
        # A streamed training split is tokenized as it is read; every other split goes to a store.
        self.stream = texts.get("train") if isinstance(texts.get("train"), StreamedText) else None
        self._stream_windows: StreamedWindows | None = None
        self._stream_state: dict = {}
        self.stores = {
            split: open_or_build(as_text_split(text), tokenizer, cache_dir, split, token_dtype, self.separator)
            for split, text in texts.items()
            if text is not self.stream
        }
        self.chars_per_token = {s: store.num_chars / max(len(store), 1) for s, store in self.stores.items()}

    def task_arguments(self) -> dict:
        """What the task needs to know about the data: characters per token, for bits per character."""
        return {"chars_per_token": self.chars_per_token}

    @property
    def split_sizes(self) -> dict[str, int | str]:
        """Number of tokens in each split ("streamed" for a streamed training split)."""
        return {**({"train": "streamed"} if self.stream else {}), **{s: len(store) for s, store in self.stores.items()}}

    def state_dict(self) -> dict:
        """The stream's position (saved in checkpoints): nothing unless the training split is streamed."""
        if self._stream_windows is None:
            return {}
        return {"stream_snapshots": list(self._stream_windows.snapshots)}

    def load_state_dict(self, state: dict) -> None:
        """Keep a checkpoint's stream position for the next training loader."""
        self._stream_state = state

    def _windows(self, split: str, stride: int) -> TokenWindows:
        store = self.stores[split]
        if len(store) <= self.block_size:
            raise LmforgeError(
                f"The {split} split holds {len(store):,} tokens, too few for one window of "
                f"task.data.block_size={self.block_size}; give it more text or lower task.data.block_size."
            )
        return TokenWindows(store, self.block_size, stride)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            PermutedDataset(self._windows(split, self.block_size), self.eval_seed),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            generator=self._loader_generator(),
            collate_fn=self.collate,
        )

    def _loader_generator(self) -> torch.Generator:
        # A loader without its own generator draws its worker seed from the global one, which would
        # shift every later dropout mask depending on when loaders are created (resume, validation).
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training windows; after a resume, the epoch continues where the checkpoint left it."""
        if self.stream is not None:
            return self._stream_loader()
        windows = self._windows("train", self.train_stride)
        return DataLoader(
            windows,
            batch_size=self.batch_size,
            sampler=resumable_sampler(len(windows), self.seed, self.batch_size, self.trainer),
            drop_last=True,
            num_workers=self.num_workers,
            generator=self._loader_generator(),
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate,
        )

    def _stream_loader(self) -> DataLoader:
        """Windows packed from the stream in its order; after a resume, from the checkpointed position."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self._stream_windows = StreamedWindows(
            self.stream, self.tokenizer, self.block_size, rank, world, separator=self.separator
        )
        if self._stream_state.get("stream_snapshots") and self.trainer is not None:
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed * self.batch_size
            self._stream_windows.resume_at(self._stream_state["stream_snapshots"], done * world)
        # One process reads the stream (a worker each would read it all again); encoding runs on every core anyway.
        return DataLoader(
            self._stream_windows,
            batch_size=self.batch_size,
            drop_last=True,
            generator=self._loader_generator(),
            collate_fn=self.collate,
        )

    def val_dataloader(self) -> DataLoader:
        """Non-overlapping validation windows in a fixed shuffled order."""
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        """Non-overlapping test windows in a fixed shuffled order."""
        return self._eval_loader("test")

    @property
    def has_test_split(self) -> bool:
        """Whether the corpus has a test split."""
        return "test" in self.stores
