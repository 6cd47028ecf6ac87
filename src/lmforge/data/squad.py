"""SQuAD files and hub datasets (the source of question answering): questions on paragraphs, answers as
character spans, read one question at a time into `datasets` tables."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data.sources import SPLITS, TextCorpus, map_columns, require_columns, rows_table
from lmforge.data.text_splits import ArrowText, TextSplit
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

COLUMNS = ("id", "title", "context", "question", "answers")


def squad_rows(path: str | Path) -> Iterator[dict]:
    """The questions of an official SQuAD JSON file (``{"data": [{"title", "paragraphs": [...]}]}``), one
    row each in file order: ``id``, ``title``, ``context``, ``question`` (str) and ``answers``
    (``{"text": [str], "answer_start": [int]}``)."""
    try:
        articles = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    yield {
                        "id": qa["id"], "title": article["title"], "context": paragraph["context"],
                        "question": qa["question"],
                        "answers": {"text": [a["text"] for a in qa["answers"]],
                                    "answer_start": [a["answer_start"] for a in qa["answers"]]},
                    }  # fmt: skip
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LmforgeError(f"{path} is not a SQuAD-format JSON file (data / paragraphs / qas): {err!r}.") from err


def read_squad_file(path: str | Path) -> dict[str, list]:
    """A (small) SQuAD JSON file as columns: the rows of :func:`squad_rows`, one list per column."""
    rows = list(squad_rows(path))
    return {column: [row[column] for row in rows] for column in COLUMNS}


def _squad_table_rows(path: str, stamp: str) -> Iterator[dict]:
    # ``stamp`` (size and time) is in the arguments so that an edited file is read again.
    yield from squad_rows(path)


def _training_text(batch: dict) -> dict:
    # Each paragraph once (its questions follow one another), then the questions.
    contexts = [c for i, c in enumerate(batch["context"]) if i == 0 or c != batch["context"][i - 1]]
    return {"text": contexts + batch["question"]}


def _features():
    from datasets import Features, Sequence, Value

    text = {name: Value("string") for name in COLUMNS[:4]}
    return Features({**text, "answers": {"text": Sequence(Value("string")), "answer_start": Sequence(Value("int32"))}})


@dataclass
class SquadQuestions(TextCorpus):
    """A SQuAD-format question answering dataset: per split, the columns of :func:`read_squad_file`.

    Locally a file named ``unsplit`` in ``local_files`` is divided by article: the articles of
    ``validation_articles`` and ``test_articles`` are those splits, every other article is training
    data (the mirror holds only SQuAD's dev file, so scores on such a split are not SQuAD dev scores).
    Files named ``train``/``validation`` are read as they are.

    Args (beyond :class:`TextCorpus`):
        validation_articles: titles of the articles that form the local validation split.
        test_articles: titles of the articles that form the local (held-out) test split.
        text_only: give each split as one text (its distinct contexts, a line each) instead of
            questions, so that ``task=mlm task/source=squad`` pretrains on the training articles.
        extra_files: with ``text_only``, more text files (relative to the data mirror) added to the
            training text, e.g. WikiText-2 (the same kind of Wikipedia prose).
    """

    validation_articles: list[str] = field(default_factory=list)
    test_articles: list[str] = field(default_factory=list)
    text_only: bool = False
    extra_files: list[str] = field(default_factory=list)

    def load(self, data_dir: str | None, required: tuple[str, ...] = ("train", "validation")) -> dict:
        """Read the splits (see :meth:`TextCorpus.load`): Arrow tables of :data:`COLUMNS`, in the
        datasets cache; as texts when ``text_only``."""
        splits = super().load(data_dir, required)
        if not self.text_only:
            return splits
        # The held-out test articles stay unread: pretraining text is training and validation text only.
        texts = {
            split: "\n".join(dict.fromkeys(columns["context"])) for split, columns in splits.items() if split != "test"
        }
        root = Path(data_dir).expanduser() if data_dir else Path.cwd()
        for spec in self.extra_files:
            path = root / spec
            if not path.is_file():
                raise LmforgeError(f"task.source.extra_files names {path}, which does not exist.")
            texts["train"] += "\n" + path.read_text(encoding="utf-8")
        return texts

    def training_text(self, splits: dict) -> TextSplit | str:
        """The text a tokenizer is trained on: the training contexts and questions."""
        train = splits["train"]
        if isinstance(train, str):
            return train
        return ArrowText(map_columns(train, _training_text, {}), "text", joiner="\n")

    @staticmethod
    def _size(split) -> str:
        return f"{len(split):,} chars" if isinstance(split, str) else f"{len(split):,} questions"

    def _from_folder(self, folder: Path) -> dict:
        files = {split: folder / f for split, f in self.local_files.items() if (folder / f).is_file()}
        if not files:
            raise LmforgeError(
                f"Dataset folder {folder} holds none of the expected files: {', '.join(self.local_files.values())}."
            )
        splits = {}
        for split, path in files.items():
            stat = path.stat()
            arguments = {"path": str(path), "stamp": f"{stat.st_size}:{stat.st_mtime_ns}"}
            splits[split] = rows_table(_squad_table_rows, arguments, _features(), f"{path} holds no questions.")
        if "unsplit" in splits:
            splits.update(self._split_by_article(splits.pop("unsplit")))
        return splits

    def _split_by_article(self, table) -> dict:
        held = {"validation": set(self.validation_articles), "test": set(self.test_articles)}
        title_of = np.asarray(table.data.table.column("title").to_numpy(zero_copy_only=False))
        titles = set(title_of.tolist())
        unknown = sorted((held["validation"] | held["test"]) - titles)
        if unknown:
            raise LmforgeError(
                f"Dataset '{self.name}' has no article titled {', '.join(unknown[:3])} (task.source.*_articles)."
            )
        if held["validation"] & held["test"]:
            raise LmforgeError(
                f"Articles {', '.join(sorted(held['validation'] & held['test']))} are in both validation and test."
            )
        rows = {split: np.flatnonzero(np.isin(title_of, sorted(names))) for split, names in held.items()}
        rows["train"] = np.flatnonzero(~np.isin(title_of, sorted(held["validation"] | held["test"])))
        return {split: table.select(keep) for split, keep in rows.items() if len(keep)}

    def _from_hub(self) -> dict:
        from datasets import load_dataset

        ds = load_dataset(self.hub_id, self.hub_config)
        splits = {}
        for split in ds:
            if split in SPLITS:
                require_columns(
                    ds[split],
                    COLUMNS,
                    f"Dataset '{self.name}' ({self.hub_id}) split {split}",
                    "use a SQuAD-format dataset",
                )
                splits[split] = ds[split].select_columns(list(COLUMNS))
        return splits
