"""Where a task's text comes from: a local mirror folder, the HF hub, or the copy shipped in the package.

Text is read through `datasets` (its ``text`` builder for local files, the hub id
otherwise). The local mirror is the folder named by ``paths.data_dir``, which
defaults to the environment variable ``LMFORGE_DATA``; its layout is the one of
``shared/data`` (one sub-folder per dataset).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.hub import hub_reachable

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass
class TextCorpus:
    """A language-modelling corpus: one long text per split.

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
    """

    name: str
    local_dir: str | None = None
    local_files: dict[str, str] = field(default_factory=dict)
    hub_id: str | None = None
    hub_config: str | None = None
    text_column: str = "text"
    holdout_fraction: float = 0.1
    builtin: str | None = None

    def load(self, data_dir: str | None, required: tuple[str, ...] = ("train", "validation")) -> dict[str, str]:
        """Read every available split as one string, looking in the mirror, then the hub, then the package.

        Args:
            data_dir: root of the local data mirror (may be None).
            required: splits the run needs; a source that lacks one is an error.
        Returns:
            split name -> text.
        """
        folder = Path(data_dir).expanduser() / self.local_dir if data_dir and self.local_dir else None
        if folder is not None and folder.is_dir():
            texts, where = self._from_folder(folder), str(folder)
        elif self.hub_id and hub_reachable():
            texts, where = self._from_hub(), f"the hub ({self.hub_id})"
        elif self.builtin:
            texts, where = self._from_builtin(), "the copy shipped with lmforge"
        else:
            looked = str(folder) if folder is not None else "no folder (paths.data_dir is not set)"
            hub = f"the hub id {self.hub_id} is unreachable or offline" if self.hub_id else "it has no hub id"
            raise LmforgeError(
                f"Dataset '{self.name}' not found: looked in {looked} and {hub}; "
                f"set LMFORGE_DATA (or paths.data_dir) to the folder that holds '{self.local_dir}/'."
            )
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

    def training_text(self, splits: dict) -> str:
        """The text a tokenizer is trained on: the training split."""
        return splits["train"]

    @staticmethod
    def _size(split) -> str:
        return f"{len(split):,} chars"

    def _from_folder(self, folder: Path) -> dict[str, str]:
        from datasets import load_dataset

        files = {split: str(folder / f) for split, f in self.local_files.items() if (folder / f).is_file()}
        if not files:
            raise LmforgeError(
                f"Dataset folder {folder} holds none of the expected files: {', '.join(self.local_files.values())}."
            )
        ds = load_dataset("text", data_files=files, sample_by="document", keep_in_memory=True)
        return {split: "".join(ds[split]["text"]) for split in ds}

    def _from_hub(self) -> dict[str, str]:
        from datasets import load_dataset

        ds = load_dataset(self.hub_id, self.hub_config)
        return {split: "".join(ds[split][self.text_column]) for split in ds if split in SPLITS}

    def _from_builtin(self) -> dict[str, str]:
        text = resources.files("lmforge.data.builtin").joinpath(f"{self.builtin}.txt").read_text(encoding="utf-8")
        return {"unsplit": text}

    def _split_holdout(self, texts: dict[str, str]) -> dict[str, str]:
        if set(texts) != {"unsplit"}:
            return texts
        text = texts["unsplit"]
        cut = int(len(text) * (1 - self.holdout_fraction))
        return {"train": text[:cut], "validation": text[cut:]}


@dataclass
class LabeledTexts(TextCorpus):
    """A text-classification dataset: per split, a list of texts and a list of integer labels.

    Local files are CSV, TSV or JSON lines (read with `datasets`' csv or json builder); the
    hub dataset is read by id. A split whose labels are all negative (GLUE's hidden test
    labels) is dropped.

    Args (beyond :class:`TextCorpus`):
        label_column: column holding the label (integers, or strings mapped to integers in sorted order).
        delimiter: field separator of CSV/TSV files.
        label_names: names of the classes, in label order; None discovers them from the data.
    """

    label_column: str = "label"
    delimiter: str = ","
    label_names: list[str] | None = None

    def training_text(self, splits: dict) -> str:
        """The training sentences, one per line."""
        return "\n".join(splits["train"]["text"])

    @staticmethod
    def _size(split) -> str:
        return f"{len(split['text']):,} examples"

    def _from_folder(self, folder: Path) -> dict:
        from datasets import load_dataset

        files = {split: str(folder / f) for split, f in self.local_files.items() if (folder / f).is_file()}
        if not files:
            raise LmforgeError(
                f"Dataset folder {folder} holds none of the expected files: {', '.join(self.local_files.values())}."
            )
        builder = "json" if next(iter(files.values())).endswith((".json", ".jsonl")) else "csv"
        options = {"delimiter": self.delimiter} if builder == "csv" else {}
        return self._columns(load_dataset(builder, data_files=files, keep_in_memory=True, **options))

    def _from_hub(self) -> dict:
        from datasets import load_dataset

        return self._columns(load_dataset(self.hub_id, self.hub_config))

    def _columns(self, ds) -> dict:
        out = {}
        for split in ds:
            if split not in SPLITS:
                continue
            columns = ds[split].column_names
            for col in (self.text_column, self.label_column):
                if col not in columns:
                    raise LmforgeError(
                        f"Dataset '{self.name}' split {split} has no column '{col}' (it has: {', '.join(columns)})."
                    )
            labels = list(ds[split][self.label_column])
            if all(isinstance(x, int) and x < 0 for x in labels):
                continue  # hidden test labels
            out[split] = {"text": [str(t) for t in ds[split][self.text_column]], "label": labels}
        names = self.label_names or sorted({str(x) for split in out.values() for x in split["label"]}, key=_natural)
        index = {name: i for i, name in enumerate(names)}
        for split in out.values():
            split["label"] = [index[str(x)] for x in split["label"]]
        self.label_names = names
        return out

    def _split_holdout(self, texts: dict) -> dict:
        return texts


def _natural(name: str):
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)
