"""Where a task's text comes from: a local mirror folder, the HF hub, or the copy shipped in the package.

Text is read through `datasets` (its ``text`` builder for local files, the hub id
otherwise). The local mirror is the folder named by ``paths.data_dir``, which
defaults to the environment variable ``LMFORGE_DATA``; its layout is the one of
``shared/data`` (one sub-folder per dataset).
"""

from __future__ import annotations

import hashlib
import logging
import marshal
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from lmforge.data.streaming import StreamedText
from lmforge.data.text_splits import ArrowText, FilePiece, FileText, TextSplit
from lmforge.errors import LmforgeError
from lmforge.hub.network import hub_reachable

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass
class TextCorpus:
    """A language-modelling corpus: one stream of text per split.

    Args:
        name: the dataset's name, used in messages.
        local_dir: sub-folder of the data mirror that holds the files.
        local_files: split name -> file name inside ``local_dir``. A single split
            named ``unsplit`` is cut into train/validation by ``holdout_fraction``.
        hub_id: dataset id on the HF hub, used when online and not found locally.
        hub_config: the hub dataset's configuration name, if it has several.
        text_column: column that holds the text in the hub dataset.
        holdout_fraction: share of the text (by character position, from the end)
            kept for validation when the source has no validation split.
        builtin: name of a text file shipped inside ``lmforge.data.builtin``, used
            when neither the mirror nor the hub has the data.
        streaming: read the hub dataset as a stream (never downloaded whole); the training split is
            tokenized as it is read, the others once into token stores.
    """

    name: str
    local_dir: str | None = None
    local_files: dict[str, str] = field(default_factory=dict)
    hub_id: str | None = None
    hub_config: str | None = None
    text_column: str = "text"
    holdout_fraction: float = 0.1
    builtin: str | None = None
    streaming: bool = False

    def load(self, data_dir: str | None, required: tuple[str, ...] = ("train", "validation")) -> dict[str, TextSplit]:
        """Find every available split, looking in the mirror, then the hub, then the package.

        Args:
            data_dir: root of the local data mirror (may be None).
            required: splits the run needs; a source that lacks one is an error.
        Returns:
            split name -> its text, a stream read when the token store is built (never whole).
        """
        texts, where = self._locate(data_dir)
        texts = self._split_holdout(texts)
        missing = [s for s in required if s not in texts]
        if missing:
            raise LmforgeError(
                f"Dataset '{self.name}' in {where} has no {' or '.join(missing)} split "
                f"(it has: {', '.join(sorted(texts))})"
                + (f"; online, the hub id {self.hub_id} provides it." if self.hub_id else ".")
            )
        log.info("data: %s from %s (%s)", self.name, where, ", ".join(f"{k} {self._size(v)}" for k, v in texts.items()))
        return texts

    def data_arguments(self) -> dict:
        """What the DataModule needs to know about this source beyond its text (nothing, for a corpus)."""
        return {}

    def _locate(self, data_dir: str | None) -> tuple[dict, str]:
        """Read the splits from the first place that has them; return them and where that was."""
        folder = Path(data_dir).expanduser() / self.local_dir if data_dir and self.local_dir else None
        if folder is not None and folder.is_dir():
            return self._from_folder(folder), str(folder)
        if self.hub_id and hub_reachable():
            return self._from_hub(), f"the hub ({self.hub_id})"
        if self.builtin:
            return self._from_builtin(), "the copy shipped with lmforge"
        looked = str(folder) if folder is not None else "no folder (paths.data_dir is not set)"
        hub = f"the hub id {self.hub_id} is unreachable or offline" if self.hub_id else "it has no hub id"
        raise LmforgeError(
            f"Dataset '{self.name}' not found: looked in {looked} and {hub}; "
            f"set LMFORGE_DATA (or paths.data_dir) to the folder that holds '{self.local_dir}/'."
        )

    def training_text(self, splits: dict) -> TextSplit | str:
        """The text a tokenizer is trained on (a bounded sample of it): the training split."""
        return splits["train"]

    @staticmethod
    def _size(split) -> str:
        return split.describe() if isinstance(split, TextSplit) else f"{len(split):,} chars"

    def _from_folder(self, folder: Path) -> dict[str, TextSplit]:
        files = {split: folder / f for split, f in self.local_files.items() if (folder / f).is_file()}
        if not files:
            raise LmforgeError(
                f"Dataset folder {folder} holds none of the expected files: {', '.join(self.local_files.values())}."
            )
        return {split: FileText([FilePiece(str(path))]) for split, path in files.items()}

    def _from_hub(self) -> dict[str, TextSplit]:
        from datasets import load_dataset

        if self.streaming:
            ds = load_dataset(self.hub_id, self.hub_config, streaming=True)
            where = f"{self.hub_id}/{self.hub_config or 'default'}"
            return {s: StreamedText(ds[s], self.text_column, f"{where}/{s}", joiner="") for s in ds if s in SPLITS}
        ds = load_dataset(self.hub_id, self.hub_config)  # memory-mapped Arrow in the datasets cache
        return {split: ArrowText(ds[split], self.text_column) for split in ds if split in SPLITS}

    def _from_builtin(self) -> dict[str, TextSplit]:
        path = resources.files("lmforge.data.builtin").joinpath(f"{self.builtin}.txt")
        return {"unsplit": FileText([FilePiece(str(path))])}

    def _split_holdout(self, texts: dict) -> dict:
        """An ``unsplit`` text becomes train (its first characters) and validation (the last ``holdout_fraction``)."""
        if set(texts) != {"unsplit"}:
            return texts
        text = texts["unsplit"]
        keep = 1 - self.holdout_fraction
        if isinstance(text, FileText):
            train, validation = text.cut(keep)
            return {"train": train, "validation": validation}
        cut = int(len(text) * keep)
        return {"train": text[:cut], "validation": text[cut:]}


@dataclass
class TextFiles(TextCorpus):
    """Several text files joined into one corpus, e.g. pretraining text gathered from the data mirror.

    Each file (or column of a file, its rows a line each) is a document; the last ``holdout_fraction``
    of each (by characters) is the validation split. Read as a stream, like every corpus.

    Args (beyond :class:`TextCorpus`):
        files: paths relative to ``paths.data_dir`` (or absolute). ``file.tsv:sentence`` takes one
            column of a CSV/TSV file, ``file.jsonl:dialogue`` one field of a JSON-lines file; any
            other file is read whole.
    """

    files: list[str] = field(default_factory=list)

    def _locate(self, data_dir: str | None) -> tuple[dict, str]:
        root = Path(data_dir).expanduser() if data_dir else Path.cwd()
        specs = [(root / spec.split(":")[0], spec.split(":")[1] if ":" in spec else None) for spec in self.files]
        missing = [str(path) for path, _ in specs if not path.is_file()]
        if missing:
            raise LmforgeError(
                f"Corpus '{self.name}' is missing {', '.join(missing)}; set LMFORGE_DATA (or paths.data_dir) "
                f"to the data mirror."
            )
        files = FileText([FilePiece(str(path), column, rows_are_documents=False) for path, column in specs])
        train, validation = files.cut(1 - self.holdout_fraction)
        return {"train": train, "validation": validation}, f"{len(specs)} files in {root}"


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
            if len(_first_lines(path, header + 1)) <= header:
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
        values = sorted(values, key=lambda x: _natural(str(x)))
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


def _first_lines(path: str, n: int) -> list[str]:
    """Up to ``n`` non-blank lines from the start of a text file (read no further)."""
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line)
                if len(lines) == n:
                    break
    return lines


def map_columns(
    table, function, arguments: dict, keep: tuple[str, ...] = (), types: dict[str, str] | None = None,
    with_indices: bool = False,
):  # fmt: skip
    """``table.map(function)`` over batches: its columns (but ``keep``) replaced by what ``function``
    returns, written beside the table in the datasets cache under a key of the table, the function's
    code and its arguments (plain values), so a second run with the same data reads it back.

    Args:
        types: column name -> `datasets` value type of every output column (needed where an output
            column has an input column's name but another type, which datasets would keep).
        with_indices: pass ``function`` the row numbers of the batch too (after the batch).
    """
    from datasets import Features, Value

    digest = hashlib.sha256(f"{table._fingerprint}|{function.__module__}.{function.__name__}".encode())
    digest.update(marshal.dumps(function.__code__))
    for key, value in sorted(arguments.items()):
        digest.update(f"|{key}={value}".encode())
    features = Features({name: Value(kind) for name, kind in types.items()}) if types else None
    return table.map(
        function, batched=True, fn_kwargs=arguments, new_fingerprint=digest.hexdigest()[:32], with_indices=with_indices,
        remove_columns=[c for c in table.column_names if c not in keep], features=features,
    )  # fmt: skip


def rows_table(generator, arguments: dict, features, empty: str):
    """A `datasets` table of the rows that ``generator(**arguments)`` yields, written to the datasets
    cache a batch at a time (keyed by the arguments) and memory-mapped back.

    Args:
        features: the `datasets` features of a row.
        empty: the sentence to fail with when the generator yields nothing.
    """
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    if next(iter(generator(**arguments)), None) is None:  # datasets' own words for it would be "no data!"
        raise LmforgeError(empty)
    try:
        return Dataset.from_generator(generator, gen_kwargs=arguments, features=features)
    except DatasetGenerationError as e:  # a bad line found by the generator: its own sentence
        if isinstance(e.__cause__, LmforgeError):
            raise e.__cause__ from None
        raise


def _text_and_label(batch: dict, text_column: str, label_column: str, index: dict | None) -> dict:
    labels = batch[label_column]
    return {
        "text": [str(t) for t in batch[text_column]],
        "label": [int(x) for x in labels] if index is None else [index[str(x)] for x in labels],
    }


def require_columns(dataset, columns: tuple[str, ...], what: str, hint: str) -> None:
    """Fail in one sentence when a `datasets` table lacks one of ``columns`` (``what`` names it, ``hint`` says what to set)."""
    for column in columns:
        if column not in dataset.column_names:
            raise LmforgeError(f"{what} has no column '{column}' (it has: {', '.join(dataset.column_names)}); {hint}.")


def _natural(name: str):
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)
