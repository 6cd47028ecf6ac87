"""Learning-rate schedules as LambdaLR factories (the ``scheduler=`` config group).

Each factory takes the optimizer and the total number of optimizer steps and
returns a scheduler stepped once per optimizer step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, warmup_steps: int) -> float:
    # (step + 1) so that the first step already trains, as in nanoGPT.
    return (step + 1) / (warmup_steps + 1)


def cosine_with_warmup(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """Linear warm-up to the peak rate, then cosine decay to ``min_lr_ratio`` x peak at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)

    return LambdaLR(optimizer, factor)


def linear_with_warmup(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up, then linear decay to ``min_lr_ratio`` x peak at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress * (1.0 - min_lr_ratio)

    return LambdaLR(optimizer, factor)


def constant_with_warmup(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up, then the peak rate until the end."""
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup_steps) if step < warmup_steps else 1.0)
