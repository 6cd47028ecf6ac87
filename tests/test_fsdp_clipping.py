"""Under FSDP, trainer.gradient_clip_val clips by the norm over all shards (Lightning's own FSDP path refuses it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

from lmforge.tasks.base import TaskModule


class RootModule(torch.nn.Module):
    """Stands in for the root FullyShardedDataParallel module: records the norm it was asked to clip to."""

    def __init__(self):
        super().__init__()
        self.clipped_to: list[float] = []

    def clip_grad_norm_(self, max_norm: float) -> None:
        self.clipped_to.append(max_norm)


@pytest.mark.parametrize("strategy", [FSDPStrategy, DDPStrategy])
def test_gradient_clipping_goes_through_the_root_fsdp_module_only_under_fsdp(monkeypatch, strategy):
    task = TaskModule(optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    trainer = SimpleNamespace(strategy=object.__new__(strategy), model=RootModule())
    monkeypatch.setattr(TaskModule, "trainer", property(lambda self: trainer))
    lightning_clipped = []
    monkeypatch.setattr(task, "clip_gradients", lambda *args: lightning_clipped.append(args[1:]))
    task.configure_gradient_clipping(None, 1.0, "norm")
    if strategy is FSDPStrategy:
        assert trainer.model.clipped_to == [1.0] and lightning_clipped == []
    else:
        assert trainer.model.clipped_to == [] and lightning_clipped == [(1.0, "norm")]
