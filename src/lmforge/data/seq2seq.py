"""Seq2seq data: tokenized source/target pairs, padded per batch, with the raw references kept for BLEU and ROUGE."""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.data.examples import ExampleDataModule, ExampleRows, as_table
from lmforge.data.labels import IGNORE
from lmforge.data.sources import map_columns
from lmforge.data.tokenizers import cached_tokenizer, eos_token_id, pad_token_id, tokenizer_fingerprint


class Seq2SeqDataModule(ExampleDataModule):
    """Batches of ``input_ids`` / ``attention_mask`` (the source, ending with EOS), ``decoder_input_ids``
    (EOS, then the target: teacher forcing), ``labels`` (the target, then EOS; -100 on padding)
    and ``target_text`` (the untokenized references).

    Args:
        texts: split -> an Arrow table of ``source`` and ``target`` texts (from :class:`lmforge.data.parallel.ParallelTexts`);
            the encoded pairs go into the datasets cache beside it, memory-mapped.
        tokenizer: the run's tokenizer; it must have an end-of-sequence token.
        max_source_length: longest source in tokens (EOS included); longer ones are cut.
        max_target_length: longest target in tokens (EOS included); longer ones are cut.
        source_prefix: text put before every source (T5's "summarize: ").
        batch_size: pairs per training batch.
        eval_batch_size: pairs per validation and test batch (None: ``batch_size``).
        bucket_by_length: batch pairs of similar lengths together (less padding: faster steps).
        seed: seed of the training order.
        num_workers: DataLoader worker processes.
        cache_dir: unused; accepted so every DataModule is built alike.
    """

    size_unit = "pairs"
    # Targets end with an end-of-sequence token: a tokenizer built for this data gets one if it has none.
    needs_end_of_sequence = True

    def __init__(
        self,
        texts: dict[str, dict[str, list[str]]],
        tokenizer: Tokenizer,
        max_source_length: int = 256,
        max_target_length: int = 128,
        source_prefix: str = "",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        bucket_by_length: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, seed, num_workers)
        self.eos_id = eos_token_id(tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self.block_size = max(max_source_length, max_target_length)
        self.joined_length = max_source_length + max_target_length  # what a decoder reads: source, then target
        self.bucket_by_length = bucket_by_length
        settings = {
            "tokenizer": tokenizer_fingerprint(tokenizer), "eos_id": self.eos_id, "source_prefix": source_prefix,
            "max_source_length": max_source_length, "max_target_length": max_target_length,
        }  # fmt: skip
        self.texts = {split: as_table(pairs) for split, pairs in texts.items()}  # raw rows, for prediction files
        self.examples = {
            split: ExampleRows(map_columns(table, _encode_pairs, settings, keep=("target",)), self.COLUMNS)
            for split, table in self.texts.items()
        }

    COLUMNS = ("source_ids", "target_ids", "target")

    def training_lengths(self) -> np.ndarray | None:
        """Source plus target length of each training pair, when bucketing."""
        if not self.bucket_by_length:
            return None
        return self.examples["train"].column("length")

    def task_arguments(self) -> dict:
        """Nothing beyond the tokenizer, which the task gets anyway."""
        return {}

    def collate(self, batch: list[tuple[list[int], list[int], str]]) -> dict:
        """Pad a list of (source ids, target ids, target text) to the longest of the batch, on the right."""
        n = len(batch)
        longest_source = max(len(source) for source, _, _ in batch)
        longest_target = max(len(target) for _, target, _ in batch)
        input_ids = torch.full((n, longest_source), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, longest_source), dtype=torch.long)
        decoder_input_ids = torch.full((n, longest_target), self.pad_id, dtype=torch.long)
        labels = torch.full((n, longest_target), IGNORE, dtype=torch.long)
        for i, (source, target, _) in enumerate(batch):
            input_ids[i, : len(source)] = torch.tensor(source)
            attention_mask[i, : len(source)] = 1
            decoder_input_ids[i, : len(target)] = torch.tensor([self.eos_id] + target[:-1])
            labels[i, : len(target)] = torch.tensor(target)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
            "target_text": [text for _, _, text in batch],
        }


def _encode_pairs(
    batch: dict, tokenizer: str, eos_id: int, source_prefix: str, max_source_length: int, max_target_length: int
) -> dict:
    """Token ids of each source and target, cut to the longest allowed less one, then EOS."""
    tok = cached_tokenizer(tokenizer)

    def encode(texts: list[str], max_length: int) -> list[list[int]]:
        return [e.ids[: max_length - 1] + [eos_id] for e in tok.encode_batch(texts, add_special_tokens=False)]

    sources = encode([source_prefix + s for s in batch["source"]], max_source_length)
    targets = encode(batch["target"], max_target_length)
    return {"source_ids": sources, "target_ids": targets, "length": [len(s) + len(t) for s, t in zip(sources, targets)]}
