"""Learning-rate schedules against nanoGPT's formula."""

import math

import pytest
import torch

from lmforge.tasks.schedules import constant_with_warmup, cosine_with_warmup, linear_with_warmup


def lrs(factory, steps, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = factory(opt, total_steps=steps, **kw)
    out = []
    for _ in range(steps + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def nanogpt_lr(it, lr=1e-3, warmup=100, decay=2000, min_lr=1e-4):
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_cosine_with_warmup_matches_nanogpt():
    got = lrs(cosine_with_warmup, 2000, warmup_steps=100, min_lr_ratio=0.1)
    for step in (0, 50, 99, 100, 500, 1000, 1999, 2000):
        assert got[step] == pytest.approx(nanogpt_lr(step), rel=1e-9)


def test_linear_decays_to_its_floor_and_constant_stays_flat():
    lin = lrs(linear_with_warmup, 100, warmup_steps=10, min_lr_ratio=0.0)
    assert lin[10] == pytest.approx(1e-3) and lin[55] == pytest.approx(0.5e-3) and lin[100] == pytest.approx(0.0)
    const = lrs(constant_with_warmup, 50, warmup_steps=0)
    assert set(const) == {1e-3}
