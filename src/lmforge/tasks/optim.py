"""Optimizer set-up shared by every task: weight-decay groups and a per-step schedule."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytorch_lightning as pl
import torch
from torch import nn

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def weight_decay_groups(module: nn.Module) -> list[dict]:
    """Split trainable parameters: matrices and embeddings decay, biases and norm weights do not."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def configure_optimization(
    task: pl.LightningModule, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None
) -> dict:
    """Build the optimizer over the task's parameters and a scheduler stepped every optimizer step."""
    overrides = {}
    if getattr(optimizer, "keywords", {}).get("fused") and "mixed" in str(task.trainer.precision):
        # Lightning's mixed-precision plugin cannot clip the gradients of a fused optimizer.
        overrides["fused"] = False
    # An optimizer class may split the parameters its own way (MuonAdamW: hidden matrices vs the rest).
    groups = getattr(getattr(optimizer, "func", None), "parameter_groups", weight_decay_groups)
    opt = optimizer(groups(task), **overrides)
    if scheduler is None:
        return {"optimizer": opt}
    total = int(task.trainer.estimated_stepping_batches)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt, total_steps=total), "interval": "step"}}
