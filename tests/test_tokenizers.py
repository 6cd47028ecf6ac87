"""Tokenizers: exact round trips, the public GPT-2 ids, saving and reloading."""

from pathlib import Path

import pytest

from conftest import DATA_DIR, requires_data
from lmforge.data.sources import TextCorpus
from lmforge.data.tokenizers import (
    bpe_tokenizer,
    char_tokenizer,
    encode_text,
    gpt2_tokenizer,
    load_tokenizer,
    save_tokenizer,
)
from lmforge.errors import LmforgeError


@pytest.fixture(scope="module")
def shakespeare():
    splits = TextCorpus(name="tinyshakespeare", builtin="tinyshakespeare").load(None)
    return {name: split.text() for name, split in splits.items()}


def test_char_tokenizer_round_trips_shakespeare_exactly(shakespeare):
    tok = char_tokenizer(shakespeare["train"])
    assert tok.get_vocab_size() == 66  # 65 characters + <unk>
    text = shakespeare["validation"][:5000]
    ids = encode_text(tok, text)
    assert len(ids) == len(text)  # one id per character, newlines included
    assert tok.decode(ids) == text
    assert tok.encode("€").ids == [tok.token_to_id("<unk>")]


def test_bpe_tokenizer_trains_to_its_vocab_size_and_round_trips(shakespeare):
    tok = bpe_tokenizer(shakespeare["train"][:200_000], vocab_size=500)
    assert tok.get_vocab_size() == 500
    text = shakespeare["validation"][:3000]
    ids = encode_text(tok, text)
    assert len(ids) < len(text) / 1.5  # merges compress
    assert tok.decode(ids) == text


@requires_data
def test_gpt2_tokenizer_from_local_files_gives_the_public_ids():
    tok = gpt2_tokenizer(local_dir=str(Path(DATA_DIR) / "tokenizers" / "gpt2"))
    assert tok.get_vocab_size() == 50257
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.token_to_id("<|endoftext|>") == 50256
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    assert tok.decode(encode_text(tok, text)) == text


def test_gpt2_tokenizer_without_files_or_hub_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmforgeError, match="GPT-2 tokenizer files were not found"):
        gpt2_tokenizer(local_dir=str(tmp_path))


def test_saved_tokenizer_reproduces_the_same_ids(tmp_path, shakespeare):
    tok = bpe_tokenizer(shakespeare["train"][:100_000], vocab_size=400)
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    text = shakespeare["validation"][:2000]
    assert encode_text(again, text) == encode_text(tok, text)


def test_corrupt_tokenizer_file_is_one_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="Cannot read the tokenizer file"):
        load_tokenizer(tmp_path)


@requires_data
def test_tokenizer_configs_find_their_files_in_the_mirror(cfg_factory):
    from lmforge.compose.parts import build_data

    for name, size in (("gpt2", 50257), ("wordpiece", 30522)):
        tokenizer, _ = build_data(cfg_factory([f"tokenizer={name}", "logger=none"]))
        assert tokenizer.get_vocab_size() == size, name
