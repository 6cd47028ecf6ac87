"""Language-modelling corpora of any size from files: a user's text (``task=text``) and the Python
sources installed on the machine (``task=code``).

Nothing is read here but file names and sizes: each split is a :class:`FileText` that the token
store streams once. A document is a file (plain text, source code) or a row (.jsonl, .parquet,
.csv, .tsv); the validation and test splits hold out documents chosen by a fixed seed.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.sources import require_splits
from lmforge.data.streaming import StreamedText
from lmforge.data.text_splits import ROW_SUFFIXES, FilePiece, FileText, RowHoldout, TextSplit, file_suffix
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text", *ROW_SUFFIXES)


@dataclass
class TextFileCorpus:
    """Causal-LM text from files, folders and globs (``task.source.files='corpus/**/*.txt'``).

    Args:
        name: the corpus's name, in messages.
        files: paths, folders (searched recursively for ``suffixes``) or glob patterns, relative to
            the working directory; one string or a list.
        validation_files, test_files: explicit split files (same forms); without them the splits
            are held out from ``files``.
        text_column: the field that holds the text in .jsonl, .parquet, .csv and .tsv files.
        holdout_fraction: share of documents held out for validation (test: ``test_fraction``). Files
            are drawn with a fixed seed, at least one each when there are several; rows by a seeded
            hash; a corpus of a single text file gives the end of its text instead.
        test_fraction: share of documents held out for a test split (0: no test split).
        suffixes: file types taken from folders.
        split_seed: seed of the held-out choice.
        skip_unreadable: leave out files that are not UTF-8 text (with a warning) instead of stopping.
        streaming: tokenize the training files as they are read (through `datasets`' streaming
            builders) instead of into a token store; held-out splits are still stored.
    """

    name: str = "text"
    files: list[str] | str | None = None
    validation_files: list[str] | str | None = None
    test_files: list[str] | str | None = None
    text_column: str = "text"
    holdout_fraction: float = 0.01
    test_fraction: float = 0.0
    suffixes: list[str] = field(default_factory=lambda: list(TEXT_SUFFIXES))
    split_seed: int = 0
    skip_unreadable: bool = False
    streaming: bool = False

    def load(self, data_dir: str | None, required: tuple[str, ...] = ("train", "validation")) -> dict[str, TextSplit]:
        """The splits as file streams (no text is read yet).

        Args:
            data_dir: unused (the files are the user's); present so that every source has the same call.
            required: splits the run needs.
        """
        files = self._expand(self.roots(), "files")
        if self.validation_files or self.test_files:
            splits = {"train": self._split_of(files)}
            for split, spec, key in (
                ("validation", self.validation_files, "validation_files"),
                ("test", self.test_files, "test_files"),
            ):
                if spec:
                    splits[split] = self._split_of(self._expand(_as_list(spec), key))
        else:
            splits = self._held_out(files)
        require_splits(
            splits,
            required,
            f"Corpus '{self.name}'",
            "set task.source.holdout_fraction or task.source.validation_files",
        )
        if self.streaming:
            splits["train"] = self._streamed(splits["train"])
        log.info("data: %s (%s)", self.name, ", ".join(f"{k} {v.describe()}" for k, v in splits.items()))
        return splits

    def training_text(self, splits: dict) -> TextSplit:
        """The text a tokenizer is trained on (a bounded sample of it): the training split."""
        return splits["train"]

    def data_arguments(self) -> dict:
        """Nothing beyond the text."""
        return {}

    def roots(self) -> list[str]:
        """What ``files`` names (overridden by corpora with a default)."""
        return _as_list(self.files)

    def _expand(self, entries: list[str], key: str) -> list[str]:
        """Every file that ``entries`` (the value of ``task.source.<key>``) names, sorted, each once."""
        if not entries:
            raise LmforgeError(f"Corpus '{self.name}' names no files; set task.source.{key}=<file, folder or glob>.")
        found: dict[str, None] = {}
        for entry in entries:
            matches = self._matches(str(Path(entry).expanduser()))
            if not matches:
                raise LmforgeError(
                    f"task.source.{key}: '{entry}' matches no {'/'.join(self.suffixes)} file (relative to {Path.cwd()})."
                )
            found.update(dict.fromkeys(matches))
        return list(found)

    def _matches(self, entry: str) -> list[str]:
        if os.path.isfile(entry):
            return [entry]
        if os.path.isdir(entry):
            suffixes = tuple(self.suffixes)
            return sorted(
                os.path.join(folder, name)
                for folder, _, names in os.walk(entry)
                for name in names
                if name.lower().endswith(suffixes)
            )
        return sorted(p for p in glob.iglob(entry, recursive=True) if os.path.isfile(p))

    def _piece(self, path: str, **kwargs) -> FilePiece:
        row_file = file_suffix(path) in ROW_SUFFIXES
        return FilePiece(
            path, column=self.text_column if row_file else None, skip_unreadable=self.skip_unreadable, **kwargs
        )

    def _split_of(self, files: list[str]) -> FileText:
        return FileText([self._piece(p) for p in files])

    def _streamed(self, split: FileText) -> StreamedText:
        """The training files as a `datasets` stream: a row per line of text files (joined back as
        they were), a row per document of row files."""
        from datasets import load_dataset

        if split.rows is not None or any((p.start, p.stop) != (0.0, 1.0) for p in split.pieces):
            raise LmforgeError(
                "task.source.streaming=true streams whole files, but this corpus holds out part of a file or rows "
                "of row files; name the held-out files with task.source.validation_files."
            )
        builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
        kinds = {builders.get(file_suffix(p.path), "text") for p in split.pieces}
        if len(kinds) > 1:
            raise LmforgeError(
                f"task.source.streaming=true needs training files of one kind; these are {sorted(kinds)}."
            )
        kind = kinds.pop()
        options = {}
        if kind == "text":
            options = {"sample_by": "line", "keep_linebreaks": True}
        elif file_suffix(split.pieces[0].path) == ".tsv":
            options = {"delimiter": "\t"}
        files = [p.path for p in split.pieces]
        stream = load_dataset(kind, data_files=files, split="train", streaming=True, **options)
        column = "text" if kind == "text" else self.text_column
        return StreamedText(stream, column, f"{len(files)} {kind} files", joiner="" if kind == "text" else None)

    def _held_out(self, files: list[str]) -> dict[str, FileText]:
        """Train, validation (and test) drawn from one list of files by the fixed seed."""
        whole = [p for p in files if file_suffix(p) not in ROW_SUFFIXES]
        rows = [p for p in files if file_suffix(p) in ROW_SUFFIXES]
        fractions = {"validation": self.holdout_fraction, "test": self.test_fraction}
        fractions = {split: f for split, f in fractions.items() if f > 0}
        # Each split's share of [0, 1): train first, then validation, then test.
        bounds, low = {}, 1 - sum(fractions.values())
        bounds["train"] = (0.0, low)
        for split, fraction in fractions.items():
            bounds[split] = (low, min(1.0, low + fraction))
            low += fraction
        if len(whole) == 1 and not rows:  # one text: its end, as Tiny Shakespeare is split
            return {split: FileText([self._piece(whole[0], start=a, stop=b)]) for split, (a, b) in bounds.items()}
        # Whole files are drawn by the seed, at least one per held-out split when there are enough.
        order = random.Random(self.split_seed).sample(whole, len(whole))
        chosen = {}
        for split, fraction in fractions.items():
            count = max(1, round(len(whole) * fraction)) if len(whole) > len(fractions) else 0
            chosen[split], order = order[:count], order[count:]
        chosen["train"] = order
        out = {}
        for split, (a, b) in bounds.items():
            pieces = [self._piece(p) for p in sorted(chosen[split])] + [self._piece(p) for p in rows]
            if pieces:
                out[split] = FileText(pieces, rows=RowHoldout(self.split_seed, a, b) if rows else None)
        return out


def _as_list(spec: list[str] | str | None) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec or [])


@dataclass
class PythonSources(TextFileCorpus):
    """The Python source files of this machine (``task=code``): the running interpreter's standard
    library and site-packages, or the folders given in ``files``; a file is a document, split by file.

    Every machine with Python has hundreds of MB of it, so a real corpus is always at hand. Files
    that are not UTF-8 are left out (a few test files of the standard library, on purpose).
    """

    name: str = "code"
    suffixes: list[str] = field(default_factory=lambda: [".py"])
    holdout_fraction: float = 0.005
    test_fraction: float = 0.005
    skip_unreadable: bool = True

    def roots(self) -> list[str]:
        """``files`` when given, else the interpreter's library folders (each once, nested ones dropped)."""
        if self.files:
            return super().roots()
        paths = sysconfig.get_paths()
        folders = sorted({Path(paths[key]).resolve() for key in ("stdlib", "purelib", "platlib") if key in paths})
        return [str(f) for f in folders if not any(f != o and f.is_relative_to(o) for o in folders)]
