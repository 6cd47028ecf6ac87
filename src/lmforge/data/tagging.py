"""Tagged sentences (named entities, chunks, parts of speech): CoNLL-style column files or the hub.

A CoNLL file has one word per line, its columns separated by spaces (the word first, its
tags after it) and a blank line between sentences, as in CoNLL-2003's ``token POS chunk NER``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.data.sources import SPLITS, TextCorpus, require_columns
from lmforge.errors import LmforgeError

OUTSIDE = "O"


def read_conll(path: Path, tag_column: int = -1) -> tuple[list[list[str]], list[list[str]]]:
    """Read a CoNLL column file into sentences of words and their tags.

    Args:
        path: the file.
        tag_column: which column holds the tag (-1: the last; CoNLL-2003's chunk tags are column 2).
    Returns:
        (words, tags): one list per sentence, of equal lengths.
    """
    words: list[list[str]] = [[]]
    tags: list[list[str]] = [[]]
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            columns = line.split()
            if not columns or columns[0] == "-DOCSTART-":
                if words[-1]:
                    words.append([])
                    tags.append([])
                continue
            try:
                tag = columns[tag_column]
            except IndexError:
                raise LmforgeError(
                    f"{path}:{number} has {len(columns)} columns, too few for tag_column={tag_column}."
                ) from None
            if len(columns) < 2:
                raise LmforgeError(f"{path}:{number} has one column; a CoNLL line is a word followed by its tags.")
            words[-1].append(columns[0])
            tags[-1].append(tag)
    if not words[-1]:
        words.pop()
        tags.pop()
    return words, tags


@dataclass
class TaggedSentences(TextCorpus):
    """A token-classification dataset: per split, sentences as word lists and one tag per word.

    ``load`` gives split -> {"tokens": [[word, ...], ...], "tags": [[tag index, ...], ...]}; the tag
    names are discovered from the training split (``O`` first, the rest sorted) and handed to the
    DataModule by :meth:`data_arguments`.

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

    def training_text(self, splits: dict) -> str:
        """The training sentences, words joined by spaces, one sentence per line."""
        return "\n".join(" ".join(words) for words in splits["train"]["tokens"])

    @staticmethod
    def _size(split) -> str:
        return f"{len(split['tokens']):,} sentences"

    def data_arguments(self) -> dict:
        """The tag names in index order, known once the data is loaded."""
        return {"tag_names": self.tag_names}

    def _from_folder(self, folder: Path) -> dict:
        files = {split: folder / f for split, f in self.local_files.items() if (folder / f).is_file()}
        if not files:
            raise LmforgeError(
                f"Dataset folder {folder} holds none of the expected files: {', '.join(self.local_files.values())}."
            )
        return self._indexed({split: read_conll(path, self.tag_column) for split, path in files.items()})

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
            tags = [[names[t] if names else str(t) for t in row] for row in ds[split][self.tags_column]]
            splits[split] = (ds[split][self.tokens_column], tags)
        return self._indexed(splits)

    def _indexed(self, splits: dict[str, tuple[list, list]]) -> dict:
        """Name the tags (from the training split, unless given) and replace every tag by its index."""
        if not self.tag_names:
            named = [splits["train"]] if "train" in splits else splits.values()
            seen = {tag for _, tags in named for sentence in tags for tag in sentence}
            self.tag_names = [OUTSIDE] * (OUTSIDE in seen) + sorted(seen - {OUTSIDE})
        index = {tag: i for i, tag in enumerate(self.tag_names)}
        out = {}
        for split, (words, tags) in splits.items():
            unknown = sorted({tag for sentence in tags for tag in sentence} - set(index))
            if unknown:
                raise LmforgeError(
                    f"Dataset '{self.name}' split {split} has tags missing from the training split "
                    f"(or task.source.tag_names): {', '.join(unknown[:5])}."
                )
            out[split] = {"tokens": words, "tags": [[index[tag] for tag in sentence] for sentence in tags]}
        return out
