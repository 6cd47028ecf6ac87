"""Text classification data: tokenized sentences, padded per batch, with their labels."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from lmforge.data.datamodules import ExampleDataModule, ExampleRows, as_table
from lmforge.data.sources import map_columns
from lmforge.data.tokenizers import cached_tokenizer, pad_token_id, tokenizer_fingerprint


class ClassificationDataModule(ExampleDataModule):
    """Batches of ``input_ids``, ``attention_mask`` (1 = token, 0 = padding) and ``labels``.

    Args:
        texts: split -> an Arrow table of ``text`` and ``label`` (from :class:`lmforge.data.sources.LabeledTexts`);
            the encoded sentences go into the datasets cache beside it, memory-mapped.
        tokenizer: the run's tokenizer; its post-processor adds [CLS]/[SEP] where it has them.
        max_length: longest tokenized sentence; longer ones are cut.
        batch_size: sentences per training batch.
        eval_batch_size: sentences per validation and test batch (None: ``batch_size``).
        padding_side: "right", or "left" (decoders read the last position either way).
        seed: seed of the training order.
        num_workers: DataLoader worker processes.
        label_names: class names; None takes ``0..n-1`` from the labels.
        cache_dir: unused; accepted so every DataModule is built alike.
    """

    def __init__(
        self,
        texts: dict[str, dict[str, list]],
        tokenizer: Tokenizer,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        padding_side: str = "right",
        seed: int = 0,
        num_workers: int = 0,
        label_names: list[str] | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, seed, num_workers)
        self.block_size = max_length
        self.padding_side = padding_side
        self.pad_id = pad_token_id(tokenizer)
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: truncation is set on it
        tokenizer.enable_truncation(max_length)
        settings = {"tokenizer": tokenizer_fingerprint(tokenizer)}
        self.texts = {split: as_table(data) for split, data in texts.items()}  # raw rows, for prediction files
        self.examples = {
            split: ExampleRows(map_columns(table, _encode_texts, settings, keep=("label",)), ("ids", "label"))
            for split, table in self.texts.items()
        }
        n = 1 + max(max(rows.table.unique("label")) for rows in self.examples.values())
        self.label_names = list(label_names) if label_names else [str(i) for i in range(n)]

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


def _encode_texts(batch: dict, tokenizer: str) -> dict:
    return {"ids": [e.ids for e in cached_tokenizer(tokenizer).encode_batch(batch["text"])]}
