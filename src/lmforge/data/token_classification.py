"""Token classification data (named entities, chunks, parts of speech; NER is ``task=conll2003``): tagged
sentences from CoNLL-style column files or the hub (``TaggedSentences``), words split into sub-tokens, each
word's tag on its first sub-token.

A CoNLL file has one word per line, its columns separated by spaces (the word first, its
tags after it) and a blank line between sentences, as in CoNLL-2003's ``token POS chunk NER``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Encoding, Tokenizer

from lmforge.data.examples import ExampleDataModule, ExampleRows, as_table
from lmforge.data.labels import IGNORE
from lmforge.data.sources import SPLITS, TextCorpus, map_columns, require_columns, rows_table
from lmforge.data.text_splits import ArrowText, TextSplit
from lmforge.data.tokenizers import cached_tokenizer, pad_token_id, tokenizer_fingerprint
from lmforge.errors import LmforgeError

OUTSIDE = "O"


def conll_sentences(path: str | Path, tag_column: int = -1) -> Iterator[tuple[list[str], list[str]]]:
    """The sentences of a CoNLL column file, one at a time, as (words, tags) of equal lengths.

    Args:
        path: the file.
        tag_column: which column holds the tag (-1: the last; CoNLL-2003's chunk tags are column 2).
    """
    words: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            columns = line.split()
            if not columns or columns[0] == "-DOCSTART-":
                if words:
                    yield words, tags
                    words, tags = [], []
                continue
            try:
                tag = columns[tag_column]
            except IndexError:
                raise LmforgeError(
                    f"{path}:{number} has {len(columns)} columns, too few for tag_column={tag_column}."
                ) from None
            if len(columns) < 2:
                raise LmforgeError(f"{path}:{number} has one column; a CoNLL line is a word followed by its tags.")
            words.append(columns[0])
            tags.append(tag)
    if words:
        yield words, tags


def read_conll(path: str | Path, tag_column: int = -1) -> tuple[list[list[str]], list[list[str]]]:
    """Read a (small) CoNLL column file into sentences of words and their tags: (words, tags)."""
    sentences = list(conll_sentences(path, tag_column))
    return [w for w, _ in sentences], [t for _, t in sentences]


def _conll_rows(path: str, tag_column: int, stamp: str) -> Iterator[dict]:
    # ``stamp`` (size and time) is in the arguments so that an edited file is read again.
    for words, tags in conll_sentences(path, tag_column):
        yield {"tokens": words, "tags": tags}


def _tag_names_of(batch: dict, tags_column: str, tokens_column: str, names: list[str] | None) -> dict:
    tags = batch[tags_column]
    return {
        "tokens": batch[tokens_column],
        "tags": [[names[t] for t in row] for row in tags] if names else [[str(t) for t in row] for row in tags],
    }


def _tag_indices(batch: dict, tag_names: list[str]) -> dict:
    index = {tag: i for i, tag in enumerate(tag_names)}
    return {"tags": [[index[tag] for tag in row] for row in batch["tags"]]}


def _sentence_text(batch: dict) -> dict:
    return {"text": [" ".join(words) for words in batch["tokens"]]}


def distinct_tags(table) -> set[str]:
    """Every tag name used in a table's ``tags`` column (computed by Arrow, a chunk at a time)."""
    import pyarrow.compute as pc

    return {str(t) for t in pc.unique(pc.list_flatten(table.data.table.column("tags"))).to_pylist()}


@dataclass
class TaggedSentences(TextCorpus):
    """A token-classification dataset: per split, sentences as word lists and one tag per word.

    ``load`` gives split -> an Arrow table of ``tokens`` (the words) and ``tags`` (one tag index per
    word), in the datasets cache, memory-mapped; the tag names are discovered from the training split
    (``O`` first, the rest sorted) and handed to the DataModule by :meth:`data_arguments`.

    Args (beyond :class:`TextCorpus`):
        tag_column: column of the local files that holds the tag (-1: the last).
        tokens_column: hub dataset column holding the word lists.
        tags_column: hub dataset column holding the tags (ClassLabel integers or strings).
        tag_names: the tags in index order; None discovers them (and :meth:`load` fills this in).
    """

    tag_column: int = -1
    tokens_column: str = "tokens"
    tags_column: str = "ner_tags"
    tag_names: list[str] | None = None

    def training_text(self, splits: dict) -> TextSplit:
        """The training sentences, words joined by spaces, one sentence per line."""
        return ArrowText(map_columns(splits["train"], _sentence_text, {}), "text", joiner="\n")

    @staticmethod
    def _size(split) -> str:
        return f"{len(split):,} sentences"

    def data_arguments(self) -> dict:
        """The tag names in index order, known once the data is loaded."""
        return {"tag_names": self.tag_names}

    def _from_folder(self, folder: Path) -> dict:
        from datasets import Features, Sequence, Value

        files = {split: folder / f for split, f in self.local_files.items() if (folder / f).is_file()}
        if not files:
            raise LmforgeError(
                f"Dataset folder {folder} holds none of the expected files: {', '.join(self.local_files.values())}."
            )
        features = Features({"tokens": Sequence(Value("string")), "tags": Sequence(Value("string"))})
        tables = {}
        for split, path in files.items():
            stat = path.stat()
            arguments = {
                "path": str(path),
                "tag_column": self.tag_column,
                "stamp": f"{stat.st_size}:{stat.st_mtime_ns}",
            }
            tables[split] = rows_table(_conll_rows, arguments, features, f"{path} holds no tagged sentences.")
        return self._indexed(tables)

    def _from_hub(self) -> dict:
        from datasets import load_dataset

        ds = load_dataset(self.hub_id, self.hub_config)
        splits = {}
        for split in ds:
            if split not in SPLITS:
                continue
            require_columns(
                ds[split], (self.tokens_column, self.tags_column), f"Dataset '{self.name}' ({self.hub_id}) split {split}",
                "set task.source.tokens_column / tags_column",
            )  # fmt: skip
            # A sequence of ClassLabel integers carries the names; a sequence of strings is named already.
            names = getattr(getattr(ds[split].features[self.tags_column], "feature", None), "names", None)
            arguments = {"tags_column": self.tags_column, "tokens_column": self.tokens_column, "names": names}
            splits[split] = map_columns(ds[split], _tag_names_of, arguments)
        return self._indexed(splits)

    def _indexed(self, splits: dict) -> dict:
        """Name the tags (from the training split, unless given) and replace every tag by its index."""
        used = {split: distinct_tags(table) for split, table in splits.items()}
        if not self.tag_names:
            seen = used["train"] if "train" in used else set().union(*used.values())
            self.tag_names = [OUTSIDE] * (OUTSIDE in seen) + sorted(seen - {OUTSIDE})
        for split, tags in used.items():
            unknown = sorted(tags - set(self.tag_names))
            if unknown:
                raise LmforgeError(
                    f"Dataset '{self.name}' split {split} has tags missing from the training split "
                    f"(or task.source.tag_names): {', '.join(unknown[:5])}."
                )
        arguments = {"tag_names": list(self.tag_names)}
        return {split: map_columns(table, _tag_indices, arguments, keep=("tokens",)) for split, table in splits.items()}


@dataclass
class TaggedExample:
    """One encoded sentence.

    ``labels`` has one entry per token (the word's tag on its first sub-token, ``IGNORE`` elsewhere);
    ``word_positions`` one per word (the index of its first sub-token, -1 when truncation or the
    normaliser left it no token); ``chars`` the UTF-8 bytes (+1; 0 is padding) of each token's text.
    """

    ids: list[int]
    labels: list[int]
    word_positions: list[int]
    word_tags: list[int]
    chars: list[list[int]]


EXAMPLE_COLUMNS = tuple(TaggedExample.__dataclass_fields__)


def align_tags(encoding: Encoding, words: list[str], tags: list[int], max_chars: int) -> TaggedExample:
    """Put each word's tag on the first token it was split into; ``IGNORE`` on every other token."""
    labels = [IGNORE] * len(encoding.ids)
    positions = [-1] * len(words)
    chars = []
    for i, (word, (start, end)) in enumerate(zip(encoding.word_ids, encoding.offsets)):
        if word is None:  # [CLS], [SEP]
            chars.append([])
            continue
        if positions[word] < 0:
            positions[word] = i
            labels[i] = tags[word]
        # Offsets of pre-tokenized input are within the word, and in the original (cased) text.
        chars.append([b + 1 for b in words[word][start:end].encode("utf-8")[:max_chars]])
    return TaggedExample(encoding.ids, labels, positions, list(tags), chars)


def encode_sentences(
    tokenizer: Tokenizer, sentences: list[list[str]], tags: list[list[int]], max_length: int, max_chars: int
) -> list[TaggedExample]:
    """Encode sentences given as words (pre-tokenized: a word never merges with its neighbours) with their tags.

    Args:
        tokenizer: the run's tokenizer (left as it is; truncation is set on a copy).
        sentences: the words of each sentence.
        tags: one tag index per word (any placeholder, ``O`` say, when only predicting).
        max_length: longest tokenized sentence; the words past it get no position.
        max_chars: bytes of each token kept for character features.
    """
    encodings = truncating(tokenizer, max_length).encode_batch(sentences, is_pretokenized=True)
    return [
        align_tags(encoding, words, word_tags, max_chars)
        for encoding, words, word_tags in zip(encodings, sentences, tags, strict=True)
    ]


def truncating(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    """A copy of ``tokenizer`` that cuts encodings at ``max_length`` tokens."""
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    tokenizer.enable_truncation(max_length)
    return tokenizer


def _encode_tagged(batch: dict, tokenizer: str, max_chars: int) -> dict:
    """A `datasets.map` batch of sentences (``tokens``, ``tags``) encoded into TaggedExample columns."""
    encodings = cached_tokenizer(tokenizer).encode_batch(batch["tokens"], is_pretokenized=True)
    examples = [
        align_tags(e, w, t, max_chars) for e, w, t in zip(encodings, batch["tokens"], batch["tags"], strict=True)
    ]
    return {name: [getattr(e, name) for e in examples] for name in EXAMPLE_COLUMNS}


def collate_tagged(batch: list[TaggedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad encoded sentences (right padding) to the longest in the batch.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (B, T); ``word_positions``, ``word_tags`` (B, W);
        ``char_ids`` (B, T, C).
    """
    B = len(batch)
    T = max(len(e.ids) for e in batch)
    W = max(max(len(e.word_tags) for e in batch), 1)
    C = max(max((len(c) for e in batch for c in e.chars), default=1), 1)
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((B, T), dtype=torch.long),
        "labels": torch.full((B, T), IGNORE, dtype=torch.long),
        "word_positions": torch.full((B, W), -1, dtype=torch.long),
        "word_tags": torch.full((B, W), IGNORE, dtype=torch.long),
        "char_ids": torch.zeros((B, T, C), dtype=torch.long),
    }
    for i, e in enumerate(batch):
        n, w = len(e.ids), len(e.word_tags)
        out["input_ids"][i, :n] = torch.tensor(e.ids)
        out["attention_mask"][i, :n] = 1
        out["labels"][i, :n] = torch.tensor(e.labels)
        out["word_positions"][i, :w] = torch.tensor(e.word_positions)
        out["word_tags"][i, :w] = torch.tensor(e.word_tags)
        for t, chars in enumerate(e.chars):
            out["char_ids"][i, t, : len(chars)] = torch.tensor(chars, dtype=torch.long)
    return out


class TokenClassificationDataModule(ExampleDataModule):
    """Batches for tagging: ``input_ids``, ``attention_mask``, ``labels`` (B, T); ``word_positions``,
    ``word_tags`` (B, W) to read predictions back per word; ``char_ids`` (B, T, C) for character features.

    Args:
        texts: split -> an Arrow table (or a dict of columns) of ``tokens`` (the words) and ``tags`` (a tag
            index per word), from :class:`lmforge.data.token_classification.TaggedSentences`; the encoded sentences go into
            the datasets cache beside it, memory-mapped.
        tokenizer: the run's tokenizer; words are encoded pre-tokenized, so a word never merges with its
            neighbours (it may still split, "1996-08-22" into five tokens).
        tag_names: the tags in index order.
        max_length: longest tokenized sentence; the words past it get no prediction (scored as ``O``).
        batch_size: sentences per training batch.
        eval_batch_size: sentences per validation and test batch (None: ``batch_size``); larger ones let
            ``trainer.limit_val_batches`` cover the whole validation split.
        max_token_chars: bytes of each token kept for character features.
        seed: seed of the training order.
        num_workers: DataLoader worker processes.
        cache_dir: unused; accepted so every DataModule is built alike.
    """

    size_unit = "sentences"

    def __init__(
        self,
        texts: dict[str, dict[str, list]],
        tokenizer: Tokenizer,
        tag_names: list[str],
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        max_token_chars: int = 20,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, seed, num_workers)
        self.block_size = max_length
        self.tag_names = list(tag_names)
        self.max_token_chars = max_token_chars
        self.pad_id = pad_token_id(tokenizer)
        settings = {"tokenizer": tokenizer_fingerprint(truncating(tokenizer, max_length)), "max_chars": max_token_chars}
        self.texts = {split: as_table(data) for split, data in texts.items()}  # raw rows, for prediction files
        self.examples = {
            split: ExampleRows(map_columns(table, _encode_tagged, settings), EXAMPLE_COLUMNS)
            for split, table in self.texts.items()
        }

    def task_arguments(self) -> dict:
        """What the task needs to know about the data: the tags."""
        # max_token_chars too, so that texts labelled later are encoded as the training data was.
        return {"num_tags": len(self.tag_names), "tag_names": self.tag_names, "max_token_chars": self.max_token_chars}

    def collate(self, batch: list[tuple]) -> dict[str, torch.Tensor]:
        """Pad a list of sentences (rows of :data:`EXAMPLE_COLUMNS`; right padding) to the longest in the batch."""
        return collate_tagged([TaggedExample(*row) for row in batch], self.pad_id)
