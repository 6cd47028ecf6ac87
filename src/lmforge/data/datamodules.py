"""Lightning DataModules: windows of a token stream (language modelling), and the base of the
DataModules whose splits are lists of encoded examples (classification, tagging)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from lmforge.data.tokenizers import encode_text, tokenizer_fingerprint

log = logging.getLogger(__name__)


class TokenWindows(Dataset):
    """Windows of ``block_size + 1`` consecutive tokens taken every ``stride`` tokens.

    Item ``i`` is ``(input_ids, labels)``: the window without its last token and
    the window shifted by one. A stride of 1 makes every position a start, which
    with shuffling is nanoGPT's random-offset sampling without replacement.
    """

    def __init__(self, ids: np.ndarray, block_size: int, stride: int):
        if len(ids) <= block_size:
            raise ValueError(f"{len(ids)} tokens are too few for windows of {block_size}")
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return (len(self.ids) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        window = self.ids[start : start + self.block_size + 1]
        return window[:-1], window[1:]


class ResumableShuffleSampler(DistributedSampler):
    """A fresh permutation every epoch, drawn from ``(seed, epoch)`` alone, that can start part-way.

    Because the order depends only on the seed and the epoch, a resumed run can skip the
    batches it already trained on and see exactly the windows an uninterrupted run would.

    With ``lengths``, each run of ``batch_size`` consecutive indices holds examples of similar
    length (sorted within random pools of 50 batches, the batches then shuffled): far less
    padding, the same examples per epoch.

    Under DDP each of ``num_replicas`` ranks takes every ``num_replicas``-th index of the
    permutation (padded to a multiple of them), as Lightning's own distributed sampler would. It is
    a ``DistributedSampler`` so that Lightning does not wrap it: the wrapper expects a sampler to
    yield ``len(sampler)`` indices, which a resumed one does not.
    """

    POOL_BATCHES = 50

    def __init__(
        self,
        length: int,
        seed: int,
        lengths: list[int] | None = None,
        batch_size: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.length = length
        self.seed = seed
        self.lengths = lengths
        self.batch_size = batch_size
        self.skip = 0  # indices of this rank that the checkpointed epoch already trained on

    def __iter__(self):  # DistributedSampler.set_epoch, which Lightning calls every epoch, sets self.epoch
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        if self.lengths is not None:
            order = self._bucketed(order, generator)
        if self.num_replicas > 1:
            order += order[: self.total_size - self.length]  # every rank gets as many batches
            order = order[self.rank :: self.num_replicas]
        order = order[self.skip :]
        self.skip = 0  # only the first epoch after a resume starts part-way
        return iter(order)

    def _bucketed(self, order: list[int], generator: torch.Generator) -> list[int]:
        pool = self.batch_size * self.POOL_BATCHES
        batches = []
        for start in range(0, len(order), pool):
            ranked = sorted(order[start : start + pool], key=self.lengths.__getitem__)
            batches += [ranked[i : i + self.batch_size] for i in range(0, len(ranked), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [index for b in shuffled for index in batches[b]]


def resumable_sampler(
    length: int, seed: int, batch_size: int, trainer: pl.Trainer | None, lengths: list[int] | None = None
) -> ResumableShuffleSampler:
    """The training sampler (this rank's share under DDP); after a resume it skips what the
    checkpointed epoch already trained on.

    Call it from ``train_dataloader``, which Lightning calls after restoring its loop counters.
    ``lengths`` (one per example) makes batches of similar lengths.
    """
    if trainer is None:
        return ResumableShuffleSampler(length, seed, lengths, batch_size)
    sampler = ResumableShuffleSampler(length, seed, lengths, batch_size, trainer.world_size, trainer.global_rank)
    # "processed": a checkpoint written in on_train_batch_end has not counted that batch as completed yet.
    sampler.skip = trainer.fit_loop.epoch_loop.batch_progress.current.processed * batch_size
    return sampler


class LanguageModelingDataModule(pl.LightningDataModule):
    """Causal language modelling on one long token stream per split.

    Args:
        texts: split name -> raw text (from :class:`lmforge.data.sources.TextCorpus`).
        tokenizer: the run's tokenizer.
        block_size: tokens per training window.
        batch_size: windows per batch.
        train_stride: distance between training window starts; None means
            ``block_size`` (non-overlapping), 1 means every offset.
        seed: seed of the training order (a permutation per epoch).
        eval_seed: seed of the fixed order in which validation windows are read, so that
            ``limit_val_batches`` sees windows from the whole split.
        cache_dir: where token ids are cached, keyed by text and tokenizer.
        num_workers: DataLoader worker processes.
    """

    size_unit = "tokens"

    def __init__(
        self,
        texts: dict[str, str],
        tokenizer: Tokenizer,
        block_size: int = 256,
        batch_size: int = 32,
        train_stride: int | None = None,
        seed: int = 0,
        eval_seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.batch_size = batch_size
        self.train_stride = train_stride or block_size
        self.seed = seed
        self.eval_seed = eval_seed
        self.num_workers = num_workers
        fingerprint = tokenizer_fingerprint(tokenizer)
        self.ids = {split: self._encode(text, fingerprint, cache_dir) for split, text in texts.items()}
        self.chars_per_token = {s: len(texts[s]) / max(len(self.ids[s]), 1) for s in texts}

    def _encode(self, text: str, fingerprint: str, cache_dir: str | None) -> np.ndarray:
        """Token ids of one split, read from the cache when the same text and tokenizer were seen."""
        dtype = np.uint16 if self.tokenizer.get_vocab_size() < 2**16 else np.int32
        path = None
        if cache_dir:
            key = hashlib.sha256(fingerprint.encode() + b"\0" + text.encode()).hexdigest()[:32]
            path = Path(cache_dir).expanduser() / "tokens" / f"{key}.npy"
            if path.is_file():
                return np.load(path)
        ids = np.asarray(encode_text(self.tokenizer, text), dtype=dtype)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{np.random.randint(1 << 30)}.tmp.npy")
            np.save(tmp, ids)
            tmp.replace(path)  # atomic: concurrent runs never read a half-written file
        return ids

    def task_arguments(self) -> dict:
        """What the task needs to know about the data: characters per token, for bits per character."""
        return {"chars_per_token": self.chars_per_token}

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of tokens in each split."""
        return {split: len(ids) for split, ids in self.ids.items()}

    def _windows(self, split: str, stride: int) -> TokenWindows:
        return TokenWindows(self.ids[split], self.block_size, stride)

    def _eval_loader(self, split: str) -> DataLoader:
        windows = self._windows(split, self.block_size)
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(self.eval_seed)).tolist()
        subset = torch.utils.data.Subset(windows, order)
        return DataLoader(
            subset, batch_size=self.batch_size, num_workers=self.num_workers, generator=self._loader_generator()
        )

    def _loader_generator(self) -> torch.Generator:
        # A loader without its own generator draws its worker seed from the global one, which would
        # shift every later dropout mask depending on when loaders are created (resume, validation).
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training windows; after a resume, the epoch continues where the checkpoint left it."""
        windows = self._windows("train", self.train_stride)
        return DataLoader(
            windows,
            batch_size=self.batch_size,
            sampler=resumable_sampler(len(windows), self.seed, self.batch_size, self.trainer),
            drop_last=True,
            num_workers=self.num_workers,
            generator=self._loader_generator(),
            persistent_workers=self.num_workers > 0,
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
        return "test" in self.ids


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

    def training_lengths(self) -> list[int] | None:
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
