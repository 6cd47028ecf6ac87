"""Text classification data: labelled texts from CSV/TSV/JSON lines or the hub (``LabeledTexts``), tokenized,
padded per batch, with their labels."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.data.examples import ExampleDataModule, ExampleRows, as_table
from lmforge.data.sources import SPLITS, TextCorpus, first_lines, map_columns, natural_order, require_columns
from lmforge.data.text_splits import ArrowText, TextSplit
from lmforge.data.tokenizers import cached_tokenizer, pad_token_id, tokenizer_fingerprint
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)


class ClassificationDataModule(ExampleDataModule):
    """Batches of ``input_ids``, ``attention_mask`` (1 = token, 0 = padding) and ``labels``.

    Args:
        texts: split -> an Arrow table of ``text`` and ``label`` (from :class:`lmforge.data.classification.LabeledTexts`);
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


@dataclass
class LabeledTexts(TextCorpus):
    """A text-classification dataset: per split, a list of texts and a list of integer labels.

    Local files are CSV, TSV or JSON lines (read with `datasets`' csv or json builder); the
    hub dataset is read by id. A split whose labels are all negative (GLUE's hidden test
    labels) is dropped.

    Args (beyond :class:`TextCorpus`):
        label_column: column holding the label: integers, or strings (mapped to integers in sorted order).
        delimiter: field separator of CSV/TSV files; None picks it from the extension.
        label_names: names of the classes in label order (integer labels), or the label values
            to expect (string labels); None discovers them from the data.
        path: a user's own data, read before the mirror and the hub: one file (split into
            train/validation by ``holdout_fraction``, seeded), or a folder holding
            ``train``, ``validation`` (or ``valid``/``dev``) and optionally ``test`` files.
        seed: seed of the hold-out split.
    """

    label_column: str = "label"
    delimiter: str | None = None
    label_names: list[str] | None = None
    path: str | None = None
    seed: int = 0

    SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
    EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")

    def training_text(self, splits: dict) -> TextSplit:
        """The training sentences, one per line (read from the Arrow table as the tokenizer needs them)."""
        return ArrowText(splits["train"], "text", joiner="\n")

    @staticmethod
    def _size(split) -> str:
        return f"{len(split):,} examples"

    def data_arguments(self) -> dict:
        """The class names, known once the data is loaded."""
        return {"label_names": self.label_names}

    def _locate(self, data_dir: str | None) -> tuple[dict, str]:
        if not self.path:
            return super()._locate(data_dir)
        path = Path(self.path).expanduser()
        if path.is_file():
            return self._read({"unsplit": str(path)}), str(path)
        if path.is_dir():
            files = self._split_files(path)
            if "train" not in files:
                raise LmforgeError(
                    f"Folder {path} has no training file: name it train.csv, train.tsv, train.json or train.jsonl."
                )
            if "validation" not in files:
                files = {"unsplit": files.pop("train"), **files}
            return self._read(files), str(path)
        raise LmforgeError(f"Data path {path} does not exist (task.data.path, relative to {Path.cwd()}).")

    def _split_files(self, folder: Path) -> dict[str, str]:
        found = {}
        for split, stems in self.SPLIT_STEMS.items():
            for stem in stems:
                for ext in self.EXTENSIONS:
                    if (folder / f"{stem}{ext}").is_file() and split not in found:
                        found[split] = str(folder / f"{stem}{ext}")
        return found

    def _from_folder(self, folder: Path) -> dict:
        files = {split: str(folder / f) for split, f in self.local_files.items() if (folder / f).is_file()}
        if not files:
            raise LmforgeError(
                f"Dataset folder {folder} holds none of the expected files: {', '.join(self.local_files.values())}."
            )
        return self._read(files)

    def _read(self, files: dict[str, str]) -> dict:
        from datasets import load_dataset
        from datasets.exceptions import DatasetGenerationError

        first = next(iter(files.values()))
        for path in files.values():
            if Path(path).stat().st_size == 0:
                raise LmforgeError(f"Data file {path} is empty; give it a header line and one example per line.")
            header = 0 if path.endswith((".json", ".jsonl")) else 1
            if len(first_lines(path, header + 1)) <= header:
                raise LmforgeError(f"Data file {path} holds no examples (a header only); give it one example per line.")
        if not first.endswith((".json", ".jsonl", ".csv", ".tsv", ".txt")):
            raise LmforgeError(f"Cannot read {first}: labelled data must be .csv, .tsv, .json or .jsonl.")
        try:
            # Arrow files in the datasets cache, memory-mapped: examples never become Python lists.
            if first.endswith((".json", ".jsonl")):
                return self._columns(load_dataset("json", data_files=files))
            delimiter = self.delimiter or ("\t" if first.endswith(".tsv") else ",")
            return self._columns(load_dataset("csv", data_files=files, delimiter=delimiter))
        except DatasetGenerationError as err:  # a malformed file; the cause names the line
            cause = str(err.__cause__ or err).splitlines()[0]
            raise LmforgeError(f"Cannot read {', '.join(files.values())}: {cause}.") from err

    def _from_hub(self) -> dict:
        from datasets import load_dataset

        return self._columns(load_dataset(self.hub_id, self.hub_config))

    def _columns(self, ds) -> dict:
        """Each split as an Arrow table of ``text`` (str) and ``label`` (the class index)."""
        tables, values = {}, set()
        for split in ds:
            if split not in (*SPLITS, "unsplit"):
                continue
            require_columns(
                ds[split], (self.text_column, self.label_column), f"Dataset '{self.name}' split {split}",
                "set task.data.text_column / task.data.label_column",
            )  # fmt: skip
            labels = ds[split].unique(self.label_column)
            if all(isinstance(x, int) and x < 0 for x in labels):
                continue  # hidden test labels
            tables[split] = ds[split]
            values.update(labels)
        values = sorted(values, key=lambda x: natural_order(str(x)))
        index = None  # integer labels with given names: the integers are the class indices
        if self.label_names and all(isinstance(x, int) for x in values):
            if values[0] < 0 or values[-1] >= len(self.label_names):
                raise LmforgeError(
                    f"Dataset '{self.name}' has labels {values[0]}..{values[-1]} but {len(self.label_names)} label_names."
                )
        else:
            names = list(self.label_names) if self.label_names else [str(x) for x in values]
            index = {name: i for i, name in enumerate(names)}
            unknown = sorted({str(x) for x in values} - set(index))
            if unknown:
                raise LmforgeError(f"Dataset '{self.name}' has labels not in label_names: {', '.join(unknown[:5])}.")
            self.label_names = names
        columns = {"text_column": self.text_column, "label_column": self.label_column, "index": index}
        types = {"text": "string", "label": "int64"}
        return {split: map_columns(table, _text_and_label, columns, types=types) for split, table in tables.items()}

    def _split_holdout(self, texts: dict) -> dict:
        if "unsplit" not in texts:
            return texts
        data = texts.pop("unsplit")
        n = len(data)
        order = np.random.default_rng(self.seed).permutation(n)
        cut = max(1, int(n * self.holdout_fraction))
        log.info("data: no validation split; holding out %d of %d examples (holdout_fraction)", cut, n)
        return {"train": data.select(np.sort(order[cut:])), "validation": data.select(np.sort(order[:cut])), **texts}


def _text_and_label(batch: dict, text_column: str, label_column: str, index: dict | None) -> dict:
    labels = batch[label_column]
    return {
        "text": [str(t) for t in batch[text_column]],
        "label": [int(x) for x in labels] if index is None else [index[str(x)] for x in labels],
    }
