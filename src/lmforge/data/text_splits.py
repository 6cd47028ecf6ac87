"""The text of a corpus split as a stream: documents read a line at a time, never the whole text at once.

A :class:`TextSplit` is re-readable (the tokenizer's sample and the token store each read it) and
has a cheap ``fingerprint`` (file names, sizes and modification times, not their contents), so
that a warm run knows its token store is current without reading the corpus again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 16  # text encoded (and sampled) in pieces of whole lines of about this size
MAX_LINE_CHARS = 1 << 20  # a longer line (minified or binary data) is read in pieces of this size
ROW_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")  # files whose rows are documents


class TextSplit:
    """One split of a corpus: a re-readable stream of documents, each a stream of text pieces."""

    def documents(self) -> Iterator[Iterator[str]]:
        """Yield each document as an iterator of its text pieces (lines or line fragments)."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """A string that changes when the split's text may have changed."""
        raise NotImplementedError

    @property
    def num_bytes(self) -> int | None:
        """Size of the underlying files in bytes, when known (for progress bars)."""
        return None

    def describe(self) -> str:
        """A few words for the start-up line: how much text and where."""
        return "text"

    def text(self) -> str:
        """The whole split as one string, documents joined by newlines: for small splits and tests only."""
        return "\n".join("".join(doc) for doc in self.documents())

    def chunks(self, size: int = CHUNK_CHARS) -> Iterator[str]:
        """The split's text in pieces of whole lines of about ``size`` characters, documents joined by newlines."""
        for i, doc in enumerate(self.documents()):
            yield from line_chunks(doc if i == 0 else _prefixed("\n", doc), size)


class InMemoryText(TextSplit):
    """A split given as a string (a small built-in text, a test's text, an example-based source's sentences)."""

    def __init__(self, text: str):
        self._text = text

    def documents(self) -> Iterator[Iterator[str]]:
        yield iter(io.StringIO(self._text))

    @property
    def fingerprint(self) -> str:
        return "text:" + hashlib.sha256(self._text.encode("utf-8", "surrogatepass")).hexdigest()

    def describe(self) -> str:
        return f"{len(self._text):,} chars"

    def text(self) -> str:
        return self._text


def as_text_split(text: str | TextSplit) -> TextSplit:
    """A TextSplit for a string or a TextSplit."""
    return text if isinstance(text, TextSplit) else InMemoryText(text)


@dataclass
class FilePiece:
    """One file of a split, or part of it.

    Args:
        path: the file (a string: corpora of many thousand files are listed faster without ``Path`` objects).
        column: field of a row file (.jsonl, .parquet, .csv, .tsv) whose values are the text; None
            reads the file as plain text.
        rows_are_documents: each row is a document (True) or the rows of the file form one
            document, a line each (False).
        start, stop: the part of the document's characters this piece holds, as fractions
            (character ``int(n * start)`` up to ``int(n * stop)``); 0 and 1 take all of it.
        skip_unreadable: a file that is not UTF-8 text is left out with a warning instead of stopping the run.
    """

    path: str
    column: str | None = None
    rows_are_documents: bool = True
    start: float = 0.0
    stop: float = 1.0
    skip_unreadable: bool = False

    def stat(self) -> os.stat_result:
        """The file's size and modification time (what the fingerprint hashes)."""
        try:
            return os.stat(self.path)
        except OSError as err:
            raise LmforgeError(f"Cannot read {self.path}: {err.strerror}.") from err


@dataclass
class RowHoldout:
    """Which rows of row files a split keeps: those whose seeded hash of file name and row number,
    a number in [0, 1), falls in ``[low, high)``. Splits with disjoint ranges share no row, and each
    decides without reading the others."""

    seed: int
    low: float
    high: float

    def keeps(self, file: str, row: int) -> bool:
        """Whether row ``row`` of ``file`` belongs to this split."""
        digest = hashlib.blake2b(f"{self.seed}|{os.path.basename(file)}|{row}".encode(), digest_size=8).digest()
        return self.low <= int.from_bytes(digest, "little") / 2**64 < self.high


@dataclass
class FileText(TextSplit):
    """A split read from files (plain text, or a column of row files), in bounded memory."""

    pieces: list[FilePiece]
    rows: RowHoldout | None = None
    _stats: list[os.stat_result] | None = field(default=None, repr=False)

    def _file_stats(self) -> list[os.stat_result]:
        if self._stats is None:
            self._stats = [piece.stat() for piece in self.pieces]
        return self._stats

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(repr(self.rows).encode())
        for piece, st in zip(self.pieces, self._file_stats()):
            fields = (
                piece.path,
                st.st_size,
                st.st_mtime_ns,
                piece.column,
                piece.rows_are_documents,
                piece.start,
                piece.stop,
            )
            digest.update("|".join(map(str, fields)).encode() + b"\n")
        return "files:" + digest.hexdigest()

    @property
    def num_bytes(self) -> int:
        return int(sum(st.st_size * (p.stop - p.start) for p, st in zip(self.pieces, self._file_stats())))

    def describe(self) -> str:
        files = len({p.path for p in self.pieces})
        return f"{files:,} file{'s' * (files != 1)}, {self.num_bytes / 1e6:,.1f} MB"

    def cut(self, keep: float) -> tuple[FileText, FileText]:
        """Each file's first ``keep`` of its characters, and the rest (a validation split from the end)."""
        return FileText([replace(p, stop=keep) for p in self.pieces]), FileText(
            [replace(p, start=keep) for p in self.pieces]
        )

    def documents(self) -> Iterator[Iterator[str]]:
        for piece in self.pieces:
            if piece.column is None and piece.skip_unreadable:
                text = _utf8_text_or_none(piece.path)  # read once: checked, then split into lines
                if text is not None:
                    yield _sliced(piece, lambda t=text: iter(io.StringIO(t, newline=None)))
            elif piece.column is None:
                yield _sliced(piece, lambda p=piece: _text_lines(p.path))
            elif piece.rows_are_documents:
                for row, value in enumerate(_column_values(piece.path, piece.column)):
                    if self.rows is None or self.rows.keeps(piece.path, row):
                        yield iter((value,))
            else:
                yield _sliced(piece, lambda p=piece: _joined_rows(p.path, p.column))


@dataclass
class ArrowText(TextSplit):
    """Text columns of a `datasets` table (memory-mapped Arrow, e.g. a hub download): each column
    is one document of its rows, each followed by ``joiner``."""

    dataset: object
    columns: str | list[str]
    joiner: str = ""  # the language-modelling sources joined a hub split's rows with nothing

    @property
    def fingerprint(self) -> str:
        return f"arrow:{getattr(self.dataset, '_fingerprint', None)}:{self.columns}:{self.joiner!r}"

    def describe(self) -> str:
        return f"{len(self.dataset):,} rows"

    def documents(self) -> Iterator[Iterator[str]]:
        def rows(column: str) -> Iterator[str]:
            for batch in self.dataset.select_columns([column]).iter(batch_size=1024):
                for value in batch[column]:
                    yield str(value) + self.joiner

        for column in [self.columns] if isinstance(self.columns, str) else self.columns:
            yield rows(column)


def line_chunks(pieces: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """Join consecutive pieces into chunks of at least ``size`` characters (the last may be shorter)."""
    buf: list[str] = []
    n = 0
    for piece in pieces:
        buf.append(piece)
        n += len(piece)
        if n >= size:
            yield "".join(buf)
            buf, n = [], 0
    if buf:
        yield "".join(buf)


def sample_chunks(split: TextSplit, max_chars: int | None, seed: int) -> Iterator[str]:
    """A seeded uniform sample of the split's line chunks totalling about ``max_chars`` characters
    (reservoir sampling: memory is the sample's, not the corpus's); all of it when it is smaller."""
    if not max_chars:
        yield from split.chunks()
        return
    capacity = max(1, max_chars // CHUNK_CHARS)
    rng = random.Random(seed)
    reservoir: list[str] = []
    for i, chunk in enumerate(split.chunks()):
        if i < capacity:
            reservoir.append(chunk)
        else:
            j = rng.randint(0, i)
            if j < capacity:
                reservoir[j] = chunk
    yield from reservoir


def file_suffix(path: str) -> str:
    """A file name's extension, lower-case (``.jsonl``)."""
    return os.path.splitext(path)[1].lower()


def _prefixed(first: str, pieces: Iterator[str]) -> Iterator[str]:
    yield first
    yield from pieces


def _utf8_text_or_none(path: str) -> str | None:
    """A whole file's text, or None (with a warning) when it is not readable UTF-8 text."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        log.warning("data: left out %s, which is not readable UTF-8 text", path)
        return None
    if "\x00" in text:
        log.warning("data: left out %s, which holds NUL bytes (binary)", path)
        return None
    return text


def _text_lines(path: str) -> Iterator[str]:
    """The lines of a UTF-8 text file (a very long line in pieces); a binary or undecodable file stops the run."""
    try:
        with open(path, encoding="utf-8") as f:
            while line := f.readline(MAX_LINE_CHARS):
                if "\x00" in line:
                    raise LmforgeError(f"{path} is not a text file (it holds NUL bytes); remove it from the corpus.")
                yield line
    except UnicodeDecodeError as err:
        raise LmforgeError(
            f"{path} is not UTF-8 text (byte {err.start} of a block cannot be decoded); convert it or remove it from the corpus."
        ) from err
    except OSError as err:
        raise LmforgeError(f"Cannot read {path}: {err.strerror}.") from err


def _column_values(path: str, column: str) -> Iterator[str]:
    """The values of one column of a row file, a row at a time."""
    suffix = file_suffix(path)
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path)
            if column not in table.schema_arrow.names:
                raise LmforgeError(
                    f"{path} has no column '{column}' (it has: {', '.join(table.schema_arrow.names)}); "
                    f"set task.source.text_column."
                )
            for batch in table.iter_batches(batch_size=1024, columns=[column]):
                yield from (str(v) for v in batch.column(0).to_pylist() if v is not None)
        elif suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise LmforgeError(f"{path} line {number} is not JSON: {err.msg}.") from err
                    if not isinstance(row, dict) or column not in row:
                        raise LmforgeError(
                            f"{path} line {number} has no field '{column}'; set task.source.text_column."
                        )
                    yield str(row[column])
        else:
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                if column not in (reader.fieldnames or []):
                    raise LmforgeError(
                        f"{path} has no column '{column}' (it has: {', '.join(reader.fieldnames or [])}); "
                        f"set task.source.text_column."
                    )
                for row in reader:
                    yield str(row[column])
    except UnicodeDecodeError as err:
        raise LmforgeError(f"{path} is not UTF-8 text; convert it or remove it from the corpus.") from err
    except OSError as err:
        raise LmforgeError(f"Cannot read {path}: {err.strerror or err}.") from err


def _joined_rows(path: str, column: str) -> Iterator[str]:
    for i, value in enumerate(_column_values(path, column)):
        yield value if i == 0 else "\n" + value


def _sliced(piece: FilePiece, read) -> Iterator[str]:
    """The text of ``read()`` from ``piece.start`` to ``piece.stop`` of its characters (counted in a first pass)."""
    if (piece.start, piece.stop) == (0.0, 1.0):
        yield from read()
        return
    n = sum(len(p) for p in read())
    first, last = int(n * piece.start), int(n * piece.stop)
    seen = 0
    for text in read():
        begin, end = seen, seen + len(text)
        seen = end
        if begin >= last:
            return
        if end > first:
            yield text[max(0, first - begin) : last - begin]
