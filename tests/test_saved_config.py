"""Run dirs saved before a class moved module still open: their config's old ``_target_`` is updated."""

from __future__ import annotations

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from lmforge.rundirs.config import MOVED_TARGETS, saved_config


def test_an_old_target_in_a_saved_config_is_read_as_its_new_path(tmp_path):
    old = "lmforge.data.datamodules.LanguageModelingDataModule"
    OmegaConf.save(
        {"task": {"data": {"_target_": old, "block_size": 64}, "name": "t"}, "seed": 3}, tmp_path / "config.yaml"
    )
    cfg = saved_config(tmp_path)
    assert cfg.task.data._target_ == MOVED_TARGETS[old] and cfg.task.data.block_size == 64 and cfg.seed == 3
    assert get_class(cfg.task.data._target_).__name__ == "LanguageModelingDataModule"


@pytest.mark.parametrize("old", sorted(MOVED_TARGETS))
def test_every_moved_target_names_a_class_that_exists_now(old):
    assert get_class(MOVED_TARGETS[old]).__name__ == old.rsplit(".", 1)[1]
