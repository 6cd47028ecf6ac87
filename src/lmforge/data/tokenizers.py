"""Tokenizers built with the `tokenizers` library: character-level, trained BPE, GPT-2.

Each builder takes the training text (a string, or an iterable of text pieces: a bounded
sample of a large corpus; some builders ignore it) and returns a ``tokenizers.Tokenizer``.
Tokenizer configs are partials of these builders, so the composition function can build the
tokenizer once the training text is found; :func:`build_tokenizer` caches trained ones.
A run saves its tokenizer as ``tokenizer.json``; everything that reloads the run
uses that file through :func:`load_tokenizer`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.data.text_splits import TextSplit, as_text_split, line_chunks, sample_chunks
from lmforge.errors import LmforgeError
from lmforge.hub.network import hub_reachable

log = logging.getLogger(__name__)

TrainingText = str | TextSplit | Iterable[str]

UNK = "<unk>"
EOS = "<|endoftext|>"
PAD = "<pad>"


def char_tokenizer(train_text: TrainingText) -> Tokenizer:
    """One token per character seen in the training text, plus ``<unk>`` for the rest."""
    chars = sorted(set().union(*map(set, _pieces(train_text))))
    vocab = {ch: i for i, ch in enumerate(chars)}
    vocab[UNK] = len(vocab)
    # A BPE model without merges maps each character to its id: the same ids as a character-level
    # WordLevel model, about 4x faster to encode, since no pre-tokenizer cuts the text into words.
    tok = Tokenizer(models.BPE(vocab, [], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([UNK])
    return tok


def bpe_tokenizer(train_text: TrainingText, vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (the GPT-2 scheme) trained on the training text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_pieces(train_text), trainer=trainer)
    return tok


def word_tokenizer(
    train_text: TrainingText, vocab_size: int = 30000, min_frequency: int = 1, lowercase: bool = True
) -> Tokenizer:
    """Whole words and punctuation marks (BERT's pre-tokenizer), the most frequent ``vocab_size`` of the training text.

    The vocabulary RNN classifiers and taggers are usually trained with; unseen words become ``<unk>``.
    """
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, UNK], show_progress=False
    )
    tok.train_from_iterator(_pieces(train_text), trainer=trainer)
    return tok


def gpt2_tokenizer(
    train_text: TrainingText | None = None, local_dir: str | None = None, hub_id: str = "gpt2"
) -> Tokenizer:
    """The public GPT-2 byte-level BPE (50,257 tokens), from local files or the hub.

    Args:
        train_text: ignored; present so that every builder has the same call.
        local_dir: folder holding ``vocab.json`` and ``merges.txt``.
        hub_id: hub repository that holds ``tokenizer.json``, used when online.
    """
    if local_dir and (Path(local_dir) / "vocab.json").is_file():
        tok = Tokenizer(models.BPE.from_file(str(Path(local_dir) / "vocab.json"), str(Path(local_dir) / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([EOS])
        return tok
    if hub_reachable():
        return Tokenizer.from_pretrained(hub_id)
    raise LmforgeError(
        f"The GPT-2 tokenizer files were not found in {local_dir} (vocab.json, merges.txt) "
        f"and the hub ({hub_id}) cannot be reached; set LMFORGE_DATA to a data mirror or go online."
    )


def wordpiece_tokenizer(
    train_text: TrainingText | None = None,
    vocab_file: str | None = None,
    hub_id: str = "google-bert/bert-base-uncased",
    vocab_size: int = 8192,
    lowercase: bool = True,
) -> Tokenizer:
    """BERT's WordPiece: from a ``vocab.txt``, else the hub, else trained on the training text.

    Args:
        train_text: text to train a vocabulary on when no file or hub copy is used.
        vocab_file: a BERT ``vocab.txt`` (one token per line, line number = id).
        hub_id: hub repository with ``tokenizer.json``; null trains a vocabulary instead.
        vocab_size: size of a trained vocabulary.
        lowercase: lower-case and strip accents (the "uncased" models).
    """
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if vocab_file and Path(vocab_file).is_file():
        tok = Tokenizer(models.WordPiece.from_file(str(vocab_file), unk_token="[UNK]"))
    elif hub_id and hub_reachable():
        return Tokenizer.from_pretrained(hub_id)
    elif train_text is not None:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    else:
        raise LmforgeError(
            f"No WordPiece vocabulary: {vocab_file} does not exist and the hub ({hub_id}) cannot be reached."
        )
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    if not (vocab_file and Path(vocab_file).is_file()):
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(_pieces(train_text), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def pad_token_id(tokenizer: Tokenizer) -> int:
    """The id batches are padded with: the tokenizer's own pad token, else 0 (masked out anyway)."""
    for token in ("[PAD]", "<pad>", "<|endoftext|>"):
        if tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return 0


def with_end_of_sequence(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer``, given an end-of-sequence token (``<|endoftext|>``, a special token after its last
    id) when it has none: what a task that ends its targets with one needs (a character or word
    vocabulary trained for translation)."""
    if not any(tokenizer.token_to_id(token) is not None for token in END_OF_SEQUENCE):
        tokenizer.add_special_tokens([EOS])
    return tokenizer


END_OF_SEQUENCE = (EOS, "</s>", "[SEP]")  # what each tokenizer family calls it


def eos_token_id(tokenizer: Tokenizer) -> int:
    """The end-of-sequence id that seq2seq targets end with (and decoders start from)."""
    for token in END_OF_SEQUENCE:
        if tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    raise LmforgeError(
        f"The tokenizer has no end-of-sequence token ({EOS}, </s> or [SEP]), which generation needs; "
        f"use tokenizer=bpe (a joint BPE vocabulary) or tokenizer=gpt2."
    )


def _pieces(text: TrainingText) -> Iterable[str]:
    """The training text in pieces: a string or a split cut into chunks of lines, an iterable of pieces as it is."""
    if isinstance(text, TextSplit):
        return text.chunks()
    return _chunks(text) if isinstance(text, str) else text


def _chunks(text: str, size: int = 1 << 16):
    """Yield the text in pieces of whole lines, so that encoding and training can work in batches."""
    return line_chunks(text.splitlines(keepends=True), size)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode a long text as one id sequence, in parallel batches of whole lines."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(list(_chunks(text)), add_special_tokens=False):
        ids.extend(enc.ids)
    return ids


def save_tokenizer(tokenizer: Tokenizer, run_dir: str | Path) -> Path:
    """Write ``tokenizer.json`` into a run directory and return its path."""
    path = Path(run_dir) / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by :func:`save_tokenizer` (a run dir or the json file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises bare Exceptions
        raise LmforgeError(f"Cannot read the tokenizer file {path}: {err}") from err


@functools.lru_cache(maxsize=4)
def cached_tokenizer(serialized: str) -> Tokenizer:
    """A tokenizer from its JSON, built once per process: for `datasets.map` functions, whose
    arguments are plain values that the map's cache key can hash."""
    return Tokenizer.from_str(serialized)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A stable string that changes when the tokenizer's vocabulary or rules change."""
    return json.dumps(json.loads(tokenizer.to_str()), sort_keys=True)


def build_tokenizer(
    builder: Callable[[Iterable[str]], Tokenizer],
    training_text: TextSplit | str,
    cache_dir: str | None,
    config_key: str,
    sample_chars: int | None = None,
) -> Tokenizer:
    """The run's tokenizer from ``builder``, trained on a seeded sample of at most ``sample_chars``
    characters of ``training_text`` (all of it when None or smaller).

    A tokenizer that was trained on the text is saved under ``<cache_dir>/tokenizers/``, keyed by
    ``config_key`` (the tokenizer's config), the text's fingerprint and the sample size: the next
    run with the same corpus loads it instead of training again. One process trains while others
    wait on a file lock. Builders that never read the text (public vocabularies) are not cached.
    """
    split = as_text_split(training_text)
    trained = False

    def sample() -> Iterable[str]:
        nonlocal trained
        trained = True
        yield from sample_chunks(split, sample_chars, seed=0)

    if not cache_dir:
        return builder(sample())
    key = hashlib.sha256(f"{config_key}\0{split.fingerprint}\0{sample_chars}".encode()).hexdigest()[:32]
    path = Path(cache_dir).expanduser() / "tokenizers" / f"{key}.json"
    if path.is_file():
        return load_tokenizer(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():  # trained by another process while this one waited
            return load_tokenizer(path)
        tokenizer = builder(sample())
        if trained:
            tmp = path.with_suffix(".tmp")
            tokenizer.save(str(tmp))
            tmp.replace(path)
    return tokenizer
