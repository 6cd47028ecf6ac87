"""``lmforge-prepare``: build a run's tokenizer and token stores ahead of training.

It composes the same config as ``train.py`` (same overrides), so the stores it writes under
``paths.cache_dir`` are the ones a later ``train.py`` with those overrides opens at once.
"""

from __future__ import annotations

import logging
import time

from hydra.utils import get_class
from omegaconf import DictConfig

from lmforge.console import setup_console
from lmforge.data import token_store
from lmforge.data.language_modeling import LanguageModelingDataModule
from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge")


def prepare_data(cfg: DictConfig) -> dict[str, token_store.TokenStore]:
    """Build (or find) the tokenizer and every split's token store of the composed run config; log their sizes."""
    from lmforge.compose.parts import build_data

    setup_console()
    if not issubclass(get_class(cfg.task.data._target_), LanguageModelingDataModule):
        raise LmforgeError(
            f"lmforge-prepare builds the token stores of language-modelling tasks (task=text, code, "
            f"tinyshakespeare, wikitext2, mlm); task {cfg.task.name} reads its examples when it trains."
        )
    started = time.perf_counter()
    with token_store.progress_bar():
        tokenizer, datamodule = build_data(cfg, required=("train",))
    for split, store in datamodule.stores.items():
        log.info(
            "%s: %s tokens (%s, %.1f MB) from %s characters: %s",
            split, f"{len(store):,}", store.dtype.name, store.num_bytes / 1e6, f"{store.num_chars:,}", store.path,
        )  # fmt: skip
    log.info("tokenizer: %s (%d tokens); ready in %.1f s", cfg.tokenizer.get("name"), tokenizer.get_vocab_size(),
             time.perf_counter() - started)  # fmt: skip
    return datamodule.stores
