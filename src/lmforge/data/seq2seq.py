"""Seq2seq data (translation, summarization): parallel texts from aligned files, CSV/JSON lines or the hub
(``ParallelTexts``), tokenized as source/target pairs, padded per batch, with the raw references kept for
BLEU and ROUGE.

Aligned plain-text files hold one sentence per line, line i of ``train.en`` translating
line i of ``train.de`` (Multi30k's layout); a local file name written ``train.{lang}`` is read
once per side. Tables (CSV, TSV, JSON lines, hub datasets) hold one pair per row, in two
columns or in a ``translation`` column of ``{lang: text}`` records (WMT on the hub).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Tokenizer

from lmforge.data.classification import LabeledTexts
from lmforge.data.examples import ExampleDataModule, ExampleRows, as_table
from lmforge.data.labels import IGNORE
from lmforge.data.sources import SPLITS, map_columns
from lmforge.data.text_splits import ArrowText, TextSplit
from lmforge.data.tokenizers import cached_tokenizer, eos_token_id, pad_token_id, tokenizer_fingerprint
from lmforge.errors import LmforgeError


@dataclass
class ParallelTexts(LabeledTexts):
    """Pairs of texts: per split, ``{"source": [...], "target": [...]}``.

    Reads like :class:`LabeledTexts` (a user's ``path``, the mirror, the hub; a seeded hold-out when
    there is no validation split), but keeps two text columns and no labels.

    Args (beyond :class:`TextCorpus`):
        source_column: column (or language code of aligned files) of the input side, e.g. ``en`` or ``dialogue``.
        target_column: column (or language code) of the output side, e.g. ``de`` or ``summary``.
        path: a user's own data: a folder with ``train.<source_column>`` / ``train.<target_column>``
            aligned files (and ``val``/``valid``/``validation``/``dev``, ``test``), a folder of split
            tables, or one table (split into train/validation by ``holdout_fraction``).
    """

    source_column: str = "source"
    target_column: str = "target"

    def training_text(self, splits: dict) -> TextSplit:
        """Both sides of the training pairs, one text per line: a joint vocabulary is trained on them."""
        return ArrowText(splits["train"], ["source", "target"], joiner="\n")

    @staticmethod
    def _size(split) -> str:
        return f"{len(split):,} pairs"

    def data_arguments(self) -> dict:
        """Nothing beyond the pairs."""
        return {}

    def _locate(self, data_dir: str | None) -> tuple[dict, str]:
        if self.path and Path(self.path).expanduser().is_dir():
            folder = Path(self.path).expanduser()
            files = self._aligned_files(folder)
            if files:
                return self._read_aligned(files), str(folder)
        return super()._locate(data_dir)

    def _aligned_files(self, folder: Path) -> dict[str, str]:
        """Split -> file-name pattern (``train.{lang}``) of the aligned files a user's folder holds."""
        found = {}
        for split, stems in self.SPLIT_STEMS.items():
            for stem in stems:
                if split not in found and (folder / f"{stem}.{self.source_column}").is_file():
                    found[split] = str(folder / f"{stem}.{{lang}}")
        return found

    def _from_folder(self, folder: Path) -> dict:
        if not any("{lang}" in name for name in self.local_files.values()):
            return super()._from_folder(folder)
        files = {split: str(folder / name) for split, name in self.local_files.items()}
        files = {split: pattern for split, pattern in files.items()
                 if Path(pattern.format(lang=self.source_column)).is_file()}  # fmt: skip
        if not files:
            raise LmforgeError(
                f"Dataset folder {folder} has no {self.source_column} files "
                f"({', '.join(name.format(lang=self.source_column) for name in self.local_files.values())})."
            )
        return self._read_aligned(files)

    def _read_aligned(self, files: dict[str, str]) -> dict:
        """Read ``{lang}`` file pairs into Arrow tables, a line at a time; the two sides must have the
        same number of lines (blank lines at the end of a file do not count)."""
        out = {}
        for split, pattern in files.items():
            paths = [Path(pattern.format(lang=lang)) for lang in (self.source_column, self.target_column)]
            for path in paths:
                if not path.is_file():
                    raise LmforgeError(f"{path} is missing: aligned files come in pairs, one per language.")
            counts = [_line_count(path) for path in paths]
            if counts[0] != counts[1]:
                raise LmforgeError(
                    f"{paths[0]} has {counts[0]:,} lines but {paths[1]} has {counts[1]:,}; "
                    f"aligned files must match line for line."
                )
            # Sizes and times in the arguments: the datasets cache key of a generator is its arguments.
            # (A string: datasets would share a list-valued argument out between shards.)
            stamps = " ".join(f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)
            arguments = {"source": str(paths[0]), "target": str(paths[1]), "lines": counts[0], "stamps": stamps}
            name = "unsplit" if split == "train" and "validation" not in files else split
            out[name] = Dataset.from_generator(_aligned_pairs, gen_kwargs=arguments)
        return out

    def _columns(self, ds) -> dict:
        """Each split as an Arrow table of ``source`` and ``target`` texts."""
        out = {}
        for split in ds:
            if split not in (*SPLITS, "unsplit"):
                continue
            table = ds[split]
            translation = "translation" in table.column_names and self.source_column not in table.column_names
            if translation:
                languages = table[0]["translation"]
                if self.source_column not in languages:
                    raise LmforgeError(
                        f"Dataset '{self.name}' has languages {', '.join(languages)}, not {self.source_column}; "
                        f"set task.source_lang / task.target_lang."
                    )
            else:
                for column in (self.source_column, self.target_column):
                    if column not in table.column_names:
                        raise LmforgeError(
                            f"Dataset '{self.name}' split {split} has no column '{column}' "
                            f"(it has: {', '.join(table.column_names)}); set task.source_column / task.target_column."
                        )
            columns = {
                "source_column": self.source_column,
                "target_column": self.target_column,
                "translation": translation,
            }
            out[split] = map_columns(table, _source_and_target, columns, types={"source": "string", "target": "string"})
        return out


def _source_and_target(batch: dict, source_column: str, target_column: str, translation: bool) -> dict:
    if translation:
        pairs = batch["translation"]
        return {"source": [p[source_column] for p in pairs], "target": [p[target_column] for p in pairs]}
    # SAMSum's dialogues break lines with \r\n or \n, as released: one convention for the tokenizer.
    return {
        "source": [str(t or "").replace("\r\n", "\n") for t in batch[source_column]],
        "target": [str(t or "").replace("\r\n", "\n") for t in batch[target_column]],
    }


def _line_count(path: Path) -> int:
    """Lines of a text file, not counting blank lines at its end."""
    count = last = 0
    with open(path, encoding="utf-8") as f:
        for count, line in enumerate(f, 1):  # noqa: B007
            if line.strip("\n"):
                last = count
    return last


def _aligned_pairs(source: str, target: str, lines: int, stamps: str) -> Iterator[dict]:
    """The first ``lines`` line pairs of two aligned files, without their line breaks."""
    with open(source, encoding="utf-8") as a, open(target, encoding="utf-8") as b:
        for left, right, _ in zip(a, b, range(lines)):
            yield {"source": left.removesuffix("\n"), "target": right.removesuffix("\n")}


class Seq2SeqDataModule(ExampleDataModule):
    """Batches of ``input_ids`` / ``attention_mask`` (the source, ending with EOS), ``decoder_input_ids``
    (EOS, then the target: teacher forcing), ``labels`` (the target, then EOS; -100 on padding)
    and ``target_text`` (the untokenized references).

    Args:
        texts: split -> an Arrow table of ``source`` and ``target`` texts (from :class:`lmforge.data.seq2seq.ParallelTexts`);
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
