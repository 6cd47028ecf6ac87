"""``optimizer=muon``: PyTorch's Muon for the hidden weight matrices, AdamW for everything else.

As in modded-nanogpt, Muon (momentum, then the update orthogonalized by Newton-Schulz iterations)
trains the 2-D weights of the linear layers inside the backbone's blocks; AdamW trains the token and
position embeddings, the output head (tied or not), the task's own heads, norms and biases. Both live
in one :class:`MuonAdamW`, so Lightning steps, clips, schedules and checkpoints it like any optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.optim._muon as _torch_muon
from torch import nn

from lmforge.errors import LmforgeError


def split_parameters(module: nn.Module) -> dict[str, list[str]]:
    """Names of the trainable parameters, by who trains them: ``muon``, ``adamw_decay``, ``adamw_no_decay``.

    ``muon`` gets the weights of the ``nn.Linear`` layers inside ``module.backbone`` (the whole module
    when it has none) that are real matrices (both sides > 1), not tied to an embedding and not a head
    (``lm_head``...); ``adamw_decay`` the other matrices (embeddings, heads); ``adamw_no_decay`` the
    vectors (norms, biases). Each parameter is named once, under its first name (a tied head is its
    embedding).
    """
    backbone = getattr(module, "backbone", module)
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    hidden = {
        id(m.weight)
        for name, m in backbone.named_modules()
        if isinstance(m, nn.Linear)
        and "head" not in name.rsplit(".", 1)[-1]
        and min(m.weight.shape) > 1
        and id(m.weight) not in embeddings
    }
    groups: dict[str, list[str]] = {"muon": [], "adamw_decay": [], "adamw_no_decay": []}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in hidden:
            groups["muon"].append(name)
        else:
            groups["adamw_decay" if param.dim() >= 2 else "adamw_no_decay"].append(name)
    return groups


def muon_parameter_groups(module: nn.Module) -> list[dict]:
    """Parameter groups for :class:`MuonAdamW`; one sentence when the model has no matrix for Muon (an LSTM)."""
    names = split_parameters(module)
    if not names["muon"]:
        raise LmforgeError(
            f"optimizer=muon found no hidden weight matrix (an nn.Linear inside the backbone) in "
            f"{type(getattr(module, 'backbone', module)).__name__}; use optimizer=adamw for this model."
        )
    params = dict(module.named_parameters())
    return [
        {"params": [params[n] for n in names["muon"]], "muon": True},
        {"params": [params[n] for n in names["adamw_decay"]]},
        {"params": [params[n] for n in names["adamw_no_decay"]], "weight_decay": 0.0},
    ]


def _newton_schulz_float32(grad: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    """torch's ``_zeropower_via_newtonschulz`` (same quintic iteration), in float32 instead of bfloat16."""
    a, b, c = ns_coefficients
    x = grad.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@contextmanager
def _orthogonalize_in_float32() -> Iterator[None]:
    # torch's Muon casts to bfloat16, which CPUs without AVX512-BF16/AMX emulate: on this project's
    # 2-core EPYC the iterations of a 4x128 GPT took 0.75 s a step in bfloat16, 33 ms in float32.
    # A torch that renamed this private function runs its own iterations instead.
    original = getattr(_torch_muon, "_zeropower_via_newtonschulz", None)
    if original is None:
        yield
        return
    _torch_muon._zeropower_via_newtonschulz = _newton_schulz_float32
    try:
        yield
    finally:
        _torch_muon._zeropower_via_newtonschulz = original


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` over the groups marked ``muon``, ``torch.optim.AdamW`` over the rest, as one optimizer.

    The groups and the state are this optimizer's own (``param_groups``, ``state``, ``state_dict``), and the
    two inner optimizers work on those very dicts: a schedule scales both learning rates, clipping sees
    every parameter, and a checkpoint saves and restores both. On the CPU the Newton-Schulz iterations run
    in float32 (torch's bfloat16 is emulated there); elsewhere as torch does.

    Args:
        params: groups from :func:`muon_parameter_groups` (``muon: True`` marks Muon's).
        lr, momentum, nesterov, ns_steps, weight_decay, adjust_lr_fn: Muon's.
        adamw_lr, betas, adamw_weight_decay, eps, fused: AdamW's (a group's own ``weight_decay`` wins).
    """

    parameter_groups = staticmethod(muon_parameter_groups)

    def __init__(
        self,
        params: Iterable[dict],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        adjust_lr_fn: str | None = None,
        adamw_lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        adamw_weight_decay: float = 0.0,
        eps: float = 1e-8,
        fused: bool | None = None,
    ) -> None:
        hidden, rest = [], []
        for group in params:
            group = dict(group)  # the caller's dicts stay as they are
            (hidden if group.pop("muon", False) else rest).append(group)
        rest = [group for group in rest if group["params"]]
        inner: list[torch.optim.Optimizer] = [
            torch.optim.Muon(
                hidden, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn,
            )
        ]  # fmt: skip
        if rest:
            inner.append(
                torch.optim.AdamW(
                    rest, lr=adamw_lr, betas=tuple(betas), weight_decay=adamw_weight_decay, eps=eps, fused=fused
                )
            )
        self.inner = inner
        super().__init__([g for opt in inner for g in opt.param_groups], {})
        self._share_groups_and_state()

    def _share_groups_and_state(self) -> None:
        # The inner optimizers read and write this optimizer's group dicts and state (disjoint parameters).
        start = 0
        for opt in self.inner:
            opt.param_groups = self.param_groups[start : start + len(opt.param_groups)]
            opt.state = self.state
            start += len(opt.param_groups)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore groups and state (``Optimizer.load_state_dict`` makes new dicts: hand them to both again)."""
        super().load_state_dict(state_dict)
        self._share_groups_and_state()

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step and one AdamW step (the closure, if any, runs once)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        on_cpu = self.param_groups[0]["params"][0].device.type == "cpu"
        with _orthogonalize_in_float32() if on_cpu else nullcontext():
            for opt in self.inner:
                opt.step()
        return loss
