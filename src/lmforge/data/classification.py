"""Text classification data: tokenized sentences, padded per batch, with their labels."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from lmforge.data.datamodules import resumable_sampler
from lmforge.data.tokenizers import pad_token_id


class ClassificationDataModule(pl.LightningDataModule):
    """Batches of ``input_ids``, ``attention_mask`` (1 = token, 0 = padding) and ``labels``.

    Args:
        texts: split -> {"text": [...], "label": [...]} (from :class:`lmforge.data.sources.LabeledTexts`).
        tokenizer: the run's tokenizer; its post-processor adds [CLS]/[SEP] where it has them.
        max_length: longest tokenized sentence; longer ones are cut.
        batch_size: sentences per batch.
        padding_side: "right", or "left" (decoders read the last position either way).
        seed: seed of the training order.
        num_workers: DataLoader worker processes.
        label_names: class names; None takes ``0..n-1`` from the labels.
    """

    def __init__(
        self,
        texts: dict[str, dict[str, list]],
        tokenizer: Tokenizer,
        max_length: int = 128,
        batch_size: int = 32,
        padding_side: str = "right",
        seed: int = 0,
        num_workers: int = 0,
        label_names: list[str] | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.block_size = max_length
        self.padding_side = padding_side
        self.seed = seed
        self.num_workers = num_workers
        self.pad_id = pad_token_id(tokenizer)
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: truncation is set on it
        tokenizer.enable_truncation(max_length)
        self.examples = {
            split: list(zip([e.ids for e in tokenizer.encode_batch(data["text"])], data["label"], strict=True))
            for split, data in texts.items()
        }
        n = 1 + max(label for data in texts.values() for label in data["label"])
        self.label_names = list(label_names) if label_names else [str(i) for i in range(n)]

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of examples in each split."""
        return {split: len(examples) for split, examples in self.examples.items()}

    @property
    def has_test_split(self) -> bool:
        """Whether labelled test data exists."""
        return "test" in self.examples

    def task_arguments(self) -> dict:
        """What the task needs to know about the data: the classes."""
        return {"num_classes": len(self.label_names), "label_names": self.label_names}

    def collate(self, batch: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        """Pad a list of (ids, label) to the longest in the batch."""
        longest = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, (ids, _) in enumerate(batch):
            span = slice(longest - len(ids), longest) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids)
            mask[i, span] = 1
        labels = torch.tensor([label for _, label in batch])
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def _loader(self, split: str, sampler=None) -> DataLoader:
        return DataLoader(
            self.examples[split],
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training examples; after a resume, the epoch continues where the checkpoint left it."""
        sampler = resumable_sampler(len(self.examples["train"]), self.seed, self.batch_size, self.trainer)
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        """Validation examples in file order."""
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        """Test examples in file order."""
        return self._loader("test")
