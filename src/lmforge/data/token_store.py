"""Token stores: a corpus split tokenized once into on-disk shards of ids, memory-mapped for training.

A store lives in ``<cache_dir>/tokens/<key>/`` where the key hashes the split's fingerprint, the
tokenizer and the store's settings: a run with the same text and tokenizer opens what an
earlier run (or ``lmforge-prepare``) built, and a change to either builds a new one.

The build reads the split a chunk of lines at a time and encodes batches of chunks with the
tokenizer's own thread pool (``encode_batch`` runs on every core), so memory holds one batch,
never the corpus. It writes into a temporary folder renamed into place at the end: a killed
build leaves nothing a later run would take as complete. One process builds while the others
wait on a file lock (every rank of a node under DDP), then open the same files; no collective
barrier, so no timeout, however long the build.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from tokenizers import Tokenizer

from lmforge.data.text_splits import TextSplit, line_chunks
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 27  # 256 MB of uint16 ids per shard file
BATCH_CHARS = 1 << 20  # characters encoded per encode_batch call: bounds the build's memory
SEPARATORS = ("<|endoftext|>", "</s>")  # put between documents when the tokenizer has one, else a newline


_progress: Callable[[str, int], Callable[[int, int], None]] | None = None  # set by progress_bar()


@contextlib.contextmanager
def progress_bar():
    """Show a rich progress bar (MB read, MB/s) for every store built inside the block (``lmforge-prepare``)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    global _progress
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()
    ) as bar:

        def start(name: str, total: int) -> Callable[[int, int], None]:
            task = bar.add_task(f"tokenizing {name}", total=total or None)
            return lambda done, _total: bar.update(task, completed=done)

        _progress = start
        try:
            yield
        finally:
            _progress = None


def document_separator(tokenizer: Tokenizer) -> str:
    """What goes between two documents: the tokenizer's end-of-text token when it has one, else a newline."""
    return next((t for t in SEPARATORS if tokenizer.token_to_id(t) is not None), "\n")


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """The id type of a store: uint16 when the vocabulary fits (``auto``), else uint32; or the one asked for."""
    limits = {"uint16": 2**16, "uint32": 2**32}
    name = requested if requested != "auto" else ("uint16" if vocab_size <= 2**16 else "uint32")
    if name not in limits:
        raise LmforgeError(f"task.data.token_dtype={requested} is not one of auto, uint16, uint32.")
    if vocab_size > limits[name]:
        raise LmforgeError(
            f"task.data.token_dtype={name} cannot hold the ids of a {vocab_size:,}-token vocabulary; "
            f"use task.data.token_dtype=auto."
        )
    return np.dtype(name)


class TokenStore:
    """The token ids of one split, memory-mapped: ``len(store)`` tokens, ``store[a:b]`` an array of ids.

    Shards are opened lazily in each process (a DataLoader worker opens its own maps), and a
    slice that spans two shards is joined.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        self.offsets = np.cumsum([0, *self.meta["shard_tokens"]])
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_chars(self) -> int:
        """Characters of text the ids were encoded from."""
        return self.meta["num_chars"]

    @property
    def num_bytes(self) -> int:
        """Size of the shards on disk."""
        return len(self) * self.dtype.itemsize

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}  # never pickle the mapped arrays themselves

    def _shards(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [
                np.memmap(self.path / f"shard_{i:05d}.bin", dtype=self.dtype, mode="r")
                for i in range(len(self.meta["shard_tokens"]))
            ]
        return self._maps

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("a token store is read in contiguous slices")
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        shard = first
        while start < stop:
            begin, end = self.offsets[shard], self.offsets[shard + 1]
            parts.append(self._shards()[shard][start - begin : min(stop, end) - begin])
            start = min(stop, end)
            shard += 1
        if not parts:
            return np.empty(0, dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def to_numpy(self) -> np.ndarray:
        """All ids in memory: for small stores and tests."""
        return np.asarray(self[:])


def store_key(split: TextSplit, tokenizer: Tokenizer, dtype: np.dtype, separator: str | None = None) -> str:
    """The folder name of a split's store: its text, the tokenizer and the settings, hashed.

    ``separator`` counts only where it differs from the tokenizer's default, so that a store built
    with the default separator named explicitly is the same store."""
    from lmforge.data.tokenizers import tokenizer_fingerprint

    digest = hashlib.sha256()
    for part in (split.fingerprint, tokenizer_fingerprint(tokenizer), dtype.name, str(FORMAT_VERSION)):
        digest.update(part.encode() + b"\0")
    if separator is not None and separator != document_separator(tokenizer):
        digest.update(b"separator\0" + separator.encode())
    return digest.hexdigest()[:32]


def open_or_build(
    split: TextSplit,
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    name: str = "train",
    requested_dtype: str = "auto",
    separator: str | None = None,
) -> TokenStore:
    """The store of ``split`` under ``cache_dir``: opened when it exists, else built (by one process at a time).

    Args:
        name: the split's name, for messages.
        requested_dtype: ``auto``, ``uint16`` or ``uint32`` (``task.data.token_dtype``).
        separator: the text put between documents (None: :func:`document_separator`); packing asks for
            a special token, which marks every boundary unambiguously.

    Inside :func:`progress_bar` the build shows a progress bar.
    """
    dtype = token_dtype(tokenizer.get_vocab_size(), requested_dtype)
    root = Path(cache_dir).expanduser() / "tokens"
    final = root / store_key(split, tokenizer, dtype, separator)
    if (final / "meta.json").is_file():
        return TokenStore(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LmforgeError(f"Cannot create the token cache {root}: {err.strerror}; set paths.cache_dir.") from err
    lock = FileLock(str(final) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("data: waiting for another process to finish the %s token store %s", name, final)
        lock.acquire()
    try:
        if not (final / "meta.json").is_file():  # another process may have built it while we waited
            _build(split, tokenizer, final, dtype, name, separator or document_separator(tokenizer))
    finally:
        lock.release()
    return TokenStore(final)


def _build(split: TextSplit, tokenizer: Tokenizer, final: Path, dtype: np.dtype, name: str, separator: str) -> None:
    for stale in final.parent.glob(final.name + ".tmp-*"):  # left by a killed build: we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    started = time.perf_counter()
    total_bytes = split.num_bytes or 0
    progress = _progress(name, total_bytes) if _progress is not None else None
    log.info("data: tokenizing the %s split (%s) into %s", name, split.describe(), final)
    try:
        writer = _ShardWriter(tmp, dtype)
        num_chars = _encode_into(split, tokenizer, writer, dtype, separator, total_bytes, progress)
        writer.close()
        if num_chars == 0 or writer.total == 0:
            raise LmforgeError(f"The {name} split ({split.describe()}) holds no text to train on.")
        meta = {
            "format": FORMAT_VERSION,
            "dtype": dtype.name,
            "shard_tokens": writer.shard_tokens,
            "num_chars": num_chars,
            "vocab_size": tokenizer.get_vocab_size(),
            "split": name,
            "source": split.describe(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.rename(tmp, final)  # atomic: the store appears complete or not at all
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise LmforgeError(
                f"The disk filled up while writing the token store in {final.parent}; free space there or "
                f"point paths.cache_dir (LMFORGE_CACHE) at a larger disk."
            ) from err
        raise LmforgeError(f"Cannot write the token store {tmp}: {err.strerror or err}.") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    log.info(
        "data: %s split: %s tokens (%.1f MB on disk) from %s characters in %.1f s",
        name, f"{writer.total:,}", writer.total * dtype.itemsize / 1e6, f"{num_chars:,}", seconds,
    )  # fmt: skip


def _encode_into(
    split: TextSplit,
    tokenizer: Tokenizer,
    writer: _ShardWriter,
    dtype: np.dtype,
    separator: str,
    total_bytes: int,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Encode the split's documents in batches of line chunks, ``separator`` between documents, and write
    their ids; return the documents' characters."""
    text_chars = read_chars = 0  # text_chars: of the documents, not counting separators
    batch: list[str] = []

    def write_batch() -> None:
        nonlocal read_chars
        ids = [e.ids for e in tokenizer.encode_batch(batch, add_special_tokens=False)]  # .ids builds a list: once
        writer.write(np.fromiter(itertools.chain.from_iterable(ids), dtype, count=sum(map(len, ids))))
        read_chars += sum(map(len, batch))  # characters stand in for bytes: exact for ASCII text
        if progress is not None:
            progress(min(read_chars, total_bytes) if total_bytes else read_chars, total_bytes)
        batch.clear()

    batch_chars = 0
    for i, doc in enumerate(split.documents()):
        if i:
            batch.append(separator)
            batch_chars += len(separator)
        for chunk in line_chunks(doc):
            batch.append(chunk)
            batch_chars += len(chunk)
            text_chars += len(chunk)
            if batch_chars >= BATCH_CHARS:
                write_batch()
                batch_chars = 0
    if batch:
        write_batch()
    return text_chars


class _ShardWriter:
    """Appends ids to ``shard_00000.bin``, ``shard_00001.bin``, ... of at most ``SHARD_TOKENS`` each."""

    def __init__(self, folder: Path, dtype: np.dtype):
        self.folder = folder
        self.dtype = dtype
        self.shard_tokens: list[int] = []
        self.total = 0
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.shard_tokens[-1] >= SHARD_TOKENS:
                self._next_shard()
            room = SHARD_TOKENS - self.shard_tokens[-1]
            part, ids = ids[:room], ids[room:]
            self._file.write(part.tobytes())
            self.shard_tokens[-1] += len(part)
            self.total += len(part)

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.folder / f"shard_{len(self.shard_tokens):05d}.bin", "wb")  # noqa: SIM115
        self.shard_tokens.append(0)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
