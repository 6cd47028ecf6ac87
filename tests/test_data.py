"""Data sources and the language-modelling DataModule."""

import numpy as np
import pytest
import torch

from conftest import DATA_DIR, requires_data
from lmforge.data.language_modeling import LanguageModelingDataModule, TokenWindows
from lmforge.data.sources import TextCorpus
from lmforge.data.tokenizers import char_tokenizer, encode_text
from lmforge.errors import LmforgeError

WIKITEXT = dict(
    name="wikitext-2",
    local_dir="wikitext-2",
    local_files={"train": "train.txt", "validation": "validation.txt", "test": "test.txt"},
    hub_id="Salesforce/wikitext",
)


def test_windows_are_shifted_by_one():
    ids = np.arange(20, dtype=np.uint16)
    windows = TokenWindows(ids, block_size=5, stride=5)
    x, y = windows[1]
    assert x.tolist() == [5, 6, 7, 8, 9] and y.tolist() == [6, 7, 8, 9, 10]
    assert len(windows) == 3  # starts 0, 5, 10 (15 would need token 20)
    assert len(TokenWindows(ids, block_size=5, stride=1)) == 15


def test_builtin_shakespeare_is_split_90_10_by_character():
    texts = {k: v.text() for k, v in TextCorpus(name="tinyshakespeare", builtin="tinyshakespeare").load(None).items()}
    assert len(texts["train"]) == 1_003_854 and len(texts["validation"]) == 111_540
    assert texts["train"].startswith("First Citizen:")


@requires_data
def test_mirror_copy_equals_builtin_copy():
    builtin = TextCorpus(name="tinyshakespeare", builtin="tinyshakespeare").load(None)
    mirror = TextCorpus(name="tinyshakespeare", local_dir="tinyshakespeare", local_files={"unsplit": "input.txt"}).load(
        DATA_DIR
    )
    assert {k: v.text() for k, v in mirror.items()} == {k: v.text() for k, v in builtin.items()}


@requires_data
def test_local_wikitext_without_train_split_says_which_split_is_missing():
    with pytest.raises(LmforgeError, match=r"has no train split .*Salesforce/wikitext provides it"):
        TextCorpus(**WIKITEXT).load(DATA_DIR)
    texts = TextCorpus(**WIKITEXT).load(DATA_DIR, required=("validation", "test"))
    assert texts["validation"].text().count("\n") == 3760


def test_missing_dataset_names_the_folder_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmforgeError) as err:
        TextCorpus(**WIKITEXT).load(str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "wikitext-2") in message and "LMFORGE_DATA" in message
    assert "\n" not in message


def test_datamodule_caches_token_ids_and_batches_windows(tmp_path):
    texts = {"train": "to be or not to be, " * 200, "validation": "that is the question. " * 50}
    tok = char_tokenizer(texts["train"])
    dm = LanguageModelingDataModule(texts, tok, block_size=16, batch_size=4, cache_dir=str(tmp_path))
    assert len(list((tmp_path / "tokens").glob("*/meta.json"))) == 2
    assert dm.stores["train"].to_numpy().tolist() == encode_text(tok, texts["train"])
    again = LanguageModelingDataModule(texts, tok, block_size=16, batch_size=4, cache_dir=str(tmp_path))
    assert np.array_equal(again.stores["validation"].to_numpy(), dm.stores["validation"].to_numpy())
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    # The fixed validation order is the same every time.
    assert torch.equal(next(iter(dm.val_dataloader()))[0], next(iter(again.val_dataloader()))[0])
    assert dm.chars_per_token["train"] == 1.0
