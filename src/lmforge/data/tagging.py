"""Tagged sentences (named entities, chunks, parts of speech): CoNLL-style column files or the hub.

A CoNLL file has one word per line, its columns separated by spaces (the word first, its
tags after it) and a blank line between sentences, as in CoNLL-2003's ``token POS chunk NER``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.sources import SPLITS, TextCorpus, map_columns, require_columns, rows_table
from lmforge.data.text_splits import ArrowText, TextSplit
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
