"""The parts of a run from their config groups: backbone, fine-tuning method, tokenizer and data, task,
loggers and callbacks."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from tokenizers import Tokenizer

from lmforge.data.tokenizers import build_tokenizer, with_end_of_sequence
from lmforge.errors import LmforgeError
from lmforge.finetune import FinetuneMethod, Full
from lmforge.models.backbone import Backbone, backbone_kind
from lmforge.tasks.base import TaskModule

log = logging.getLogger(__name__)


def _without(node: DictConfig, *keys: str) -> DictConfig:
    """A resolved copy of a config node without the given keys (descriptive keys, not constructor arguments).

    Resolved first: a detached copy could no longer see the keys its interpolations name.
    """
    values = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create({k: v for k, v in values.items() if k not in keys})


def _instantiate_reporting(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate``, but a user error raised by the constructor comes out as itself, not wrapped by Hydra."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, LmforgeError):
            raise err.__cause__ from None
        raise


# Keys of a model config that describe it rather than being constructor arguments.
MODEL_DESCRIPTION_KEYS = ("name", "pretrained", "hub_id", "targets")


def build_backbone(model_cfg: DictConfig, vocab_size: int) -> Backbone:
    """Instantiate a backbone from its ``model=`` config.

    Args:
        vocab_size: the tokenizer's vocabulary size, used unless the config fixes one
            (a pretrained checkpoint's embedding table may be larger than its tokenizer).
    """
    try:
        backbone = instantiate(
            _without(model_cfg, *MODEL_DESCRIPTION_KEYS), vocab_size=model_cfg.get("vocab_size") or vocab_size
        )
    except InstantiationException as err:  # a key this model does not take, a value it refuses
        raise LmforgeError(f"Model {model_cfg.get('name')} cannot be built from its config: {err.__cause__}.") from err
    if not isinstance(backbone, Backbone):  # a user's model class: the tasks rely on the contract
        raise LmforgeError(
            f"Model {model_cfg.get('name')} builds a {type(backbone).__name__}, which is not a backbone; "
            f"subclass lmforge.models.backbone.Backbone (docs/configuration.md)."
        )
    return backbone


def build_finetune(cfg: DictConfig) -> FinetuneMethod:
    """The ``finetune=`` method of a run (``full`` for configs saved before the group existed)."""
    node = cfg.get("finetune")
    return _instantiate_reporting(_without(node, "name")) if node else Full()


def build_loggers(cfg: DictConfig) -> list[Any]:
    """Instantiate every logger of the ``logger=`` group (W&B, CSV, TensorBoard, any mix)."""
    return [instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Instantiate every callback of the ``callbacks=`` group."""
    return [_instantiate_reporting(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]


def build_data(
    cfg: DictConfig, tokenizer: Tokenizer | None = None, required: tuple[str, ...] = ("train", "validation")
) -> tuple[Tokenizer, pl.LightningDataModule]:
    """Read the task's text, build (or take) the tokenizer and the DataModule.

    Args:
        cfg: a composed or saved run config.
        tokenizer: a run's saved tokenizer; None builds one from the config and the training text.
        required: splits that must exist.
    """
    source = instantiate(cfg.task.source)
    texts = source.load(cfg.paths.data_dir, required=required)
    if tokenizer is None:
        node = _without(cfg.tokenizer, "name", "sample_chars")
        tokenizer = build_tokenizer(
            instantiate(node),
            source.training_text(texts),
            cfg.paths.get("cache_dir"),
            config_key=json.dumps(OmegaConf.to_container(node), sort_keys=True),
            sample_chars=cfg.tokenizer.get("sample_chars"),
        )
        # Packing joins documents with an end-of-text token, which a character vocabulary lacks.
        if getattr(get_class(cfg.task.data._target_), "needs_end_of_sequence", False) or cfg.task.data.get("packing"):
            tokenizer = with_end_of_sequence(tokenizer)
    # Keys that task.data shares with task.source (a user's file path, its columns) are the source's, not the DataModule's.
    shared = {key for key in set(cfg.task.data) & set(cfg.task.source) if not key.startswith("_")}
    data_node = _without(cfg.task.data, *shared)
    # Data goes in through a partial: Hydra would copy every kwarg into its config tree (minutes for 67k sentences).
    try:
        datamodule = instantiate(data_node, _partial_=True)(
            texts=texts, tokenizer=tokenizer, cache_dir=cfg.paths.cache_dir, **source.data_arguments()
        )
    except TypeError as err:  # a task.data key this DataModule does not take
        raise LmforgeError(f"The data of task {cfg.task.name} cannot be built from task.data: {err}.") from err
    return tokenizer, datamodule


def fit_context_to_data(cfg: DictConfig, datamodule: pl.LightningDataModule) -> None:
    """Give a model that starts from scratch the context its data needs: ``model.n_positions`` raised to
    the DataModule's ``block_size`` (a decoder's: its ``joined_length``, source then target) with one log
    line, as learned positions have no trained length to keep."""
    block_size = getattr(datamodule, "block_size", None)
    if backbone_kind(get_class(cfg.model._target_)) == "decoder":
        block_size = getattr(datamodule, "joined_length", block_size)
    n_positions = cfg.model.get("n_positions")
    if block_size and n_positions and block_size > n_positions:
        log.info("model.n_positions: %d -> %d, the longest sequence of the task's data", n_positions, block_size)
        with open_dict(cfg):
            cfg.model.n_positions = block_size


def build_task(
    cfg: DictConfig, backbone: Backbone, tokenizer: Tokenizer, datamodule: pl.LightningDataModule, **overrides: Any
) -> pl.LightningModule:
    """Instantiate the task's LightningModule around a built backbone, with what it needs to know of the data."""
    block_size = getattr(datamodule, "block_size", None)
    n_positions = backbone.n_positions
    if block_size and n_positions and block_size > n_positions:
        raise LmforgeError(
            f"task.data.block_size={block_size} is longer than the model's n_positions={n_positions}; "
            f"lower task.data.block_size or raise model.n_positions."
        )
    return make_task(cfg, backbone, tokenizer, datamodule.task_arguments(), **overrides)


def make_task(
    cfg: DictConfig, backbone: Backbone, tokenizer: Tokenizer, data_arguments: dict[str, Any], **overrides: Any
) -> pl.LightningModule:
    """The task's LightningModule from its config, with the optimizer and schedule partials.

    Args:
        data_arguments: what the task needs to know of the data (classes, characters per
            token); kept in every checkpoint, so that a run's task can be rebuilt without its data.
    """
    task_class = _instantiate_reporting(cfg.task.module, _partial_=True)
    try:
        task = task_class(
            backbone=backbone,
            optimizer=instantiate(cfg.optimizer),
            scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
            tokenizer=tokenizer,
            **data_arguments,
            **overrides,
        )
    except TypeError as err:  # an override that this task does not take
        raise LmforgeError(f"Task {cfg.task.name} cannot be built: {err}.") from err
    task.data_arguments = data_arguments
    return task


def check_pairing(cfg: DictConfig) -> None:
    """Stop before any data is read when the task cannot train this kind of model (``model=gpt2 task=mlm``)."""
    task_class = get_class(cfg.task.module._target_)
    model_kind = backbone_kind(get_class(cfg.model._target_))
    if not issubclass(task_class, TaskModule):
        return
    try:
        task_class.check_backbone(model_kind, cfg.model.name)
    except LmforgeError as err:
        fitting = [name for name, kind in model_kinds().items() if kind in task_class.backbone_kinds]
        raise LmforgeError(f"{str(err).rstrip('.')}; models that can: {', '.join(fitting)}.") from None


def model_kinds() -> dict[str, str | None]:
    """Each model config's name (lmforge's and the user's) -> the kind of backbone it builds."""
    from lmforge.config_dirs import config_dirs

    kinds = {}
    for folder in reversed(config_dirs()):  # the user's dirs last: their files win
        for path in sorted((folder / "model").glob("*.yaml")):
            target = OmegaConf.load(path).get("_target_")
            if target:
                kinds[path.stem] = backbone_kind(get_class(target))
    return dict(sorted(kinds.items()))
