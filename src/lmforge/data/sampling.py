"""Training and evaluation orders that never materialize a list of indices.

A seeded pseudo-random permutation of ``range(n)`` is computed index by index (a small Feistel
cipher with cycle walking), so a corpus of a billion window starts costs no more memory to
shuffle than one of a thousand, and a resumed run can start at any position of an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import Dataset, DistributedSampler

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit avalanche hash (splitmix64's finaliser), element-wise and wrapping."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class SeededPermutation:
    """A permutation of ``range(n)`` drawn from ``seed``, evaluated lazily: ``perm[i]`` or ``perm.take(array)``.

    Four Feistel rounds permute the integers below the smallest even power of two that holds
    ``n``; values that land at ``n`` or above are permuted again until they fall inside (cycle
    walking), which keeps it a bijection of ``range(n)``. O(1) memory whatever ``n`` is.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("a permutation needs at least one element")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.half_mask = np.uint64((1 << (bits // 2)) - 1)
        keys = np.random.default_rng(np.random.SeedSequence(seed & (2**63 - 1))).integers(
            0, 2**63, size=self.ROUNDS, dtype=np.uint64
        )
        self.keys = [np.uint64(k) for k in keys]

    def __len__(self) -> int:
        return self.n

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.half_mask
        with np.errstate(over="ignore"):
            for key in self.keys:
                left, right = right, left ^ (_mix(right ^ key) & self.half_mask)
        return (left << self.half) | right

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The permuted values at ``positions`` (an integer array), as int64."""
        y = self._encrypt(np.asarray(positions, dtype=np.uint64))
        outside = y >= self.n
        while outside.any():
            y[outside] = self._encrypt(y[outside])
            outside = y >= self.n
        return y.astype(np.int64)

    def __getitem__(self, position: int) -> int:
        return int(self.take(np.array([position]))[0])


class PermutedDataset(Dataset):
    """A dataset read in a fixed seeded order: item ``i`` is ``dataset[perm[i]]``."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.order = SeededPermutation(len(dataset), seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[self.order[i]]


class ResumableShuffleSampler(DistributedSampler):
    """A fresh permutation every epoch, drawn from ``(seed, epoch)`` alone, that can start part-way.

    Because the order depends only on the seed and the epoch, a resumed run can skip the
    batches it already trained on and see exactly the windows an uninterrupted run would.
    Indices are computed a block at a time: memory does not grow with the dataset.

    With ``lengths`` (an array, one per example), each run of ``batch_size`` consecutive indices
    holds examples of similar length: the permutation is cut into pools of 50 batches, each pool
    sorted by length, cut into batches and its batches shuffled. Far less padding, the same
    examples per epoch.

    Under DDP each of ``num_replicas`` ranks takes every ``num_replicas``-th index of the
    order (padded to a multiple of them by wrapping round), as Lightning's own distributed sampler
    would. It is a ``DistributedSampler`` so that Lightning does not wrap it: the wrapper expects a
    sampler to yield ``len(sampler)`` indices, which a resumed one does not.
    """

    POOL_BATCHES = 50
    BLOCK = 4096

    def __init__(
        self,
        length: int,
        seed: int,
        lengths: np.ndarray | None = None,
        batch_size: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.length = length
        self.seed = seed
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.batch_size = batch_size
        self.skip = 0  # indices of this rank that the checkpointed epoch already trained on

    def __iter__(
        self,
    ) -> Iterator[int]:  # DistributedSampler.set_epoch, called by Lightning every epoch, sets self.epoch
        skip, self.skip = self.skip, 0  # only the first epoch after a resume starts part-way
        return self._indices(skip)

    def _indices(self, skip: int) -> Iterator[int]:
        perm = SeededPermutation(self.length, self.seed * 100_003 + self.epoch)
        pool = self.batch_size * self.POOL_BATCHES
        cached_pool, cached_order = -1, None
        for start in range(skip, self.num_samples, self.BLOCK):
            # Position in the whole epoch's order of this rank's j-th index; past the end wraps round.
            j = np.arange(start, min(start + self.BLOCK, self.num_samples), dtype=np.int64)
            positions = (self.rank + j * self.num_replicas) % self.length
            if self.lengths is None:
                yield from perm.take(positions).tolist()
                continue
            for q in positions.tolist():
                if q // pool != cached_pool:
                    cached_pool, cached_order = q // pool, self._bucketed_pool(perm, q // pool, pool)
                yield int(cached_order[q % pool])

    def _bucketed_pool(self, perm: SeededPermutation, index: int, pool: int) -> np.ndarray:
        """Pool ``index`` of the epoch: its examples sorted by length, cut into batches, batches shuffled."""
        members = perm.take(np.arange(index * pool, min((index + 1) * pool, self.length)))
        members = members[np.argsort(self.lengths[members], kind="stable")]
        batches = [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return np.concatenate([batches[b] for b in rng.permutation(len(batches))])


def resumable_sampler(
    length: int, seed: int, batch_size: int, trainer: pl.Trainer | None, lengths: np.ndarray | None = None
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
