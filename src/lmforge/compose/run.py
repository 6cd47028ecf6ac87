"""A whole training run's objects from one composed config: tokenizer, data, backbone, task, trainer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from tokenizers import Tokenizer
from torch import nn

from lmforge.callbacks import TokenThroughput
from lmforge.compose.parts import (
    build_backbone,
    build_callbacks,
    build_data,
    build_finetune,
    build_loggers,
    build_task,
    fit_context_to_data,
)
from lmforge.compose.weights import StartingWeights
from lmforge.errors import LmforgeError, sentence
from lmforge.models.layers import enable_activation_checkpointing

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a training run is made of, built from one config."""

    tokenizer: Tokenizer
    datamodule: pl.LightningDataModule
    backbone: nn.Module
    task: pl.LightningModule
    trainer: pl.Trainer
    throughput: TokenThroughput | None


def resolve_deterministic(value: Any, accelerator: Any) -> bool | str | None:
    """Lightning's ``deterministic=`` for ``trainer.deterministic``: ``auto`` is ``"warn"`` when the run
    trains on the CPU (bitwise-repeatable at no cost there) and ``False`` on an accelerator (where
    deterministic kernels are slower); any other value is passed on as it is."""
    if value != "auto":
        return value
    if accelerator == "auto":
        import torch

        mps = getattr(torch.backends, "mps", None)
        on_cpu = not torch.cuda.is_available() and not (mps is not None and mps.is_available())
    else:
        on_cpu = accelerator == "cpu"
    return "warn" if on_cpu else False


def build_run(cfg: DictConfig, loggers: list[Any] | None = None, weights: StartingWeights | None = None) -> Run:
    """Build tokenizer, data, backbone, task and trainer from a composed config.

    Args:
        cfg: the composed ``train.yaml`` with ``paths.run_dir`` set.
        loggers: already built loggers (the CLI builds them first to report where they write);
            None builds them from the config.
        weights: where the starting weights (and so the tokenizer) come from, as
            :func:`lmforge.compose.weights.starting_weights` decided; None trains from scratch.
    """
    weights = weights or StartingWeights()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer, datamodule = build_data(cfg, weights.tokenizer(cfg))
    weights.check_tokenizer(tokenizer)
    if not weights.loads and not cfg.get("resume"):
        fit_context_to_data(cfg, datamodule)
    backbone = build_backbone(cfg.model, tokenizer.get_vocab_size())
    task = build_task(cfg, backbone, tokenizer, datamodule)
    method = build_finetune(cfg)
    weights.load_into(task, method)
    method.apply(backbone, cfg.model.get("targets"), cfg.model.name)
    task.finetune = method
    if cfg.get("activation_checkpointing") and not enable_activation_checkpointing(backbone):
        raise LmforgeError(
            f"activation_checkpointing=true needs a transformer backbone; {cfg.model.name} has no blocks to checkpoint."
        )
    if cfg.get("compile"):
        if cfg.task.module.get("loss_chunk_size"):
            raise LmforgeError(
                "task.module.loss_chunk_size cannot be used with compile=true: the chunked loss runs the blocks "
                "outside the backbone's compiled forward."
            )
        backbone.compile()  # in place: parameter names (and checkpoints) stay the same
    callbacks = [*build_callbacks(cfg), *method.callbacks()]
    try:
        trainer = instantiate(
            cfg.trainer,
            logger=loggers if loggers is not None else build_loggers(cfg),
            callbacks=callbacks,
            deterministic=resolve_deterministic(
                cfg.trainer.get("deterministic"), cfg.trainer.get("accelerator", "auto")
            ),
        )
    except InstantiationException as err:  # a value Lightning refuses (trainer.precision=bogus, no GPU)
        raise LmforgeError(sentence(f"The trainer cannot be built from trainer.*: {err.__cause__}")) from err
    throughput = next((c for c in callbacks if isinstance(c, TokenThroughput)), None)
    return Run(tokenizer, datamodule, backbone, task, trainer, throughput)
