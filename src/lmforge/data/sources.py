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
        hint = f"online, the hub id {self.hub_id} provides it" if self.hub_id else ""
        require_splits(texts, required, f"Dataset '{self.name}' in {where}", hint)
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


def require_splits(splits: dict, required: tuple[str, ...], what: str, hint: str = "") -> None:
    """Fail in one sentence naming the splits ``what`` lacks of ``required``, the ones it has, and ``hint``."""
    missing = [s for s in required if s not in splits]
    if missing:
        raise LmforgeError(
            f"{what} has no {' or '.join(missing)} split (it has: {', '.join(sorted(splits))})"
            + (f"; {hint}." if hint else ".")
        )


def first_lines(path: str, n: int) -> list[str]:
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


def require_columns(dataset, columns: tuple[str, ...], what: str, hint: str) -> None:
    """Fail in one sentence when a `datasets` table lacks one of ``columns`` (``what`` names it, ``hint`` says what to set)."""
    for column in columns:
        if column not in dataset.column_names:
            raise LmforgeError(f"{what} has no column '{column}' (it has: {', '.join(dataset.column_names)}); {hint}.")


def natural_order(name: str):
    """A sort key that puts numbers in numeric order, before words (labels ``2`` < ``10`` < ``neg``)."""
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)
