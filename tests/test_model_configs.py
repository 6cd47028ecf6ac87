"""The model configs and the family defaults they share: each ``conf/model/<model>.yaml`` holds what is its
own and lists its family's ``conf/model/family/<family>.yaml`` (the ``finetune=`` targets) after ``_self_``,
so the composed model is the model's keys then the family's, the key order it had when every model file
carried its targets (the order names run dirs: ``config_digest``). The families are no ``model=`` options,
and every target pattern names modules of the backbone it is composed with."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lmforge.config_dirs import CONF_DIR, option_names
from lmforge.errors import LmforgeError
from lmforge.overrides import check_group_choices

MODEL_DIR = CONF_DIR / "model"
FAMILY_DIR = MODEL_DIR / "family"
MODELS = sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))
FAMILIES = sorted(p.stem for p in FAMILY_DIR.glob("*.yaml"))
FAMILY_ENTRY = "family@_here_"
# Keys of a model config that describe it rather than being constructor arguments.
DESCRIPTION_KEYS = ("name", "pretrained", "hub_id", "targets")


@functools.cache
def composed_model(model: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"model={model}"]).model


def own_file(model: str) -> tuple[list, DictConfig]:
    """A model file's defaults list and its keys without it."""
    raw = OmegaConf.load(MODEL_DIR / f"{model}.yaml")
    defaults = OmegaConf.to_container(raw.pop("defaults"))
    return defaults, raw


def family_of(defaults: list) -> str:
    (family,) = [entry[FAMILY_ENTRY] for entry in defaults if isinstance(entry, dict) and FAMILY_ENTRY in entry]
    return family


def test_the_families_are_not_model_options():
    assert MODELS and FAMILIES
    assert option_names("model", [CONF_DIR]) == set(MODELS)
    for family in FAMILIES:
        with pytest.raises(LmforgeError, match=f"Unknown model 'family/{family}'"):
            check_group_choices([f"model=family/{family}"], CONF_DIR)


@pytest.mark.parametrize("model", MODELS)
def test_a_model_lists_its_family_after_self_and_leaves_the_familys_keys_to_it(model):
    defaults, own = own_file(model)
    family = family_of(defaults)
    assert family in FAMILIES
    # After _self_: the family's keys come last, as they did when each model file carried them.
    assert defaults.index("_self_") < defaults.index({FAMILY_ENTRY: family}), defaults
    shared = OmegaConf.load(FAMILY_DIR / f"{family}.yaml")
    assert "targets" in shared and not set(own) & set(shared), "a key is set both by the model and its family"


def test_every_family_serves_a_model():
    assert {family_of(own_file(model)[0]) for model in MODELS} == set(FAMILIES)


@pytest.mark.parametrize("model", MODELS)
def test_the_composed_model_is_its_own_keys_then_its_familys(model):
    defaults, own = own_file(model)
    expected = OmegaConf.merge(own, OmegaConf.load(FAMILY_DIR / f"{family_of(defaults)}.yaml"))
    composed = composed_model(model)
    assert list(composed) == list(expected) and list(composed)[-1] == "targets"
    assert OmegaConf.to_container(composed) == OmegaConf.to_container(expected)


@pytest.mark.parametrize("model", MODELS)
def test_every_target_pattern_names_modules_of_the_models_backbone(model):
    cfg = composed_model(model)
    node = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in DESCRIPTION_KEYS}
    with torch.device("meta"):  # the module tree without allocating or initialising weights
        backbone = instantiate(node, vocab_size=64)
    names = [name for name, _ in backbone.named_modules()]
    assert cfg.targets
    for group, pattern in cfg.targets.items():
        if group == "blocks":  # freeze= layers counts the numbered blocks under it
            pattern = rf"(?:{pattern})\.\d+"
        assert any(re.fullmatch(pattern, name) for name in names), f"{model}: targets.{group} names no module"
