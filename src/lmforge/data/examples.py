"""The base of the DataModules whose splits are encoded examples (classification, seq2seq, token
classification, question answering): `datasets` tables memory-mapped from the cache, read a batch at a time."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lmforge.data.sampling import resumable_sampler


def as_table(data):
    """A `datasets` table for a split given as one, or as a dict of columns (tests, a user's own lists)."""
    if isinstance(data, dict):
        from datasets import Dataset as ArrowDataset

        return ArrowDataset.from_dict(data)
    return data


class ExampleRows(Dataset):
    """Encoded examples in an Arrow table (memory-mapped from the datasets cache), read a row or a
    batch at a time as tuples of ``columns``: what a list of tuples gave, without the list."""

    def __init__(self, table, columns: tuple[str, ...]):
        self.table = table
        self.columns = columns
        self._rows = table.select_columns(list(columns))  # once, not per batch

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int | slice):
        if isinstance(i, slice):
            return self.__getitems__(range(*i.indices(len(self))))
        row = self._rows[int(i)]
        return tuple(row[c] for c in self.columns)

    def __getitems__(self, indices) -> list[tuple]:
        rows = self._rows[list(indices)]
        return list(zip(*(rows[c] for c in self.columns)))

    def column(self, name: str) -> np.ndarray:
        """One column of every row as an array (lengths for bucketing)."""
        return self.table.select_columns([name]).with_format("numpy")[:][name]


class ExampleDataModule(pl.LightningDataModule):
    """Base of the DataModules whose splits are lists of encoded examples, padded per batch by ``collate``.

    The training order is a seeded permutation per epoch that a resumed run continues exactly;
    validation and test keep file order.

    Args:
        batch_size: examples per training batch.
        eval_batch_size: examples per validation and test batch (None: ``batch_size``); larger ones
            let ``trainer.limit_val_batches`` cover a whole validation split.
        seed: seed of the training order.
        num_workers: DataLoader worker processes.
    """

    size_unit = "examples"

    def __init__(self, batch_size: int, eval_batch_size: int | None = None, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.examples: dict[str, list] = {}  # split -> encoded examples, filled by the subclass
        self.texts: dict = {}  # split -> its raw table (text, label...), kept by the subclass for example_texts

    def example_texts(self, split: str, indices: list[int]) -> list[dict]:
        """The raw rows (text, label...) of some examples of a split, as the source gave them: what a
        prediction file shows of each example (empty dicts when the split's table is not kept)."""
        if split not in self.texts:
            return [{} for _ in indices]
        columns = self.texts[split][list(indices)]
        return [dict(zip(columns, values)) for values in zip(*columns.values())]

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of examples in each split."""
        return {split: len(examples) for split, examples in self.examples.items()}

    @property
    def has_test_split(self) -> bool:
        """Whether labelled test data exists."""
        return "test" in self.examples

    def collate(self, batch: list) -> dict[str, torch.Tensor]:
        """Pad a list of examples into a batch of tensors."""
        raise NotImplementedError

    def collate_for(self, split: str):
        """The collate function of one split's loader (the same for every split unless a subclass says otherwise)."""
        return self.collate

    def training_lengths(self) -> np.ndarray | list[int] | None:
        """Length of each training example when batches should group similar lengths; None shuffles freely."""
        return None

    def _loader(self, split: str, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            self.examples[split],
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate_for(split),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training examples; after a resume, the epoch continues where the checkpoint left it."""
        sampler = resumable_sampler(
            len(self.examples["train"]), self.seed, self.batch_size, self.trainer, self.training_lengths()
        )
        return self._loader("train", self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        """Validation examples in file order."""
        return self._loader("validation", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test examples in file order."""
        return self._loader("test", self.eval_batch_size)
