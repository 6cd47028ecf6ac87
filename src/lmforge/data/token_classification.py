"""Token classification data: words split into sub-tokens, each word's tag on its first sub-token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Encoding, Tokenizer

from lmforge.data.examples import ExampleDataModule, ExampleRows, as_table
from lmforge.data.labels import IGNORE
from lmforge.data.sources import map_columns
from lmforge.data.tokenizers import cached_tokenizer, pad_token_id, tokenizer_fingerprint


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
            index per word), from :class:`lmforge.data.tagging.TaggedSentences`; the encoded sentences go into
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
