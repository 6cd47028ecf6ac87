"""Preference tuning of a decoder (``task=dpo``): DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023).

Each pair is scored by the policy (the backbone being tuned) and by a frozen reference: the
log-probability of the chosen and of the rejected reply given the prompt. With
``h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))`` the loss is
``-log sigmoid(beta * h)`` (DPO) or ``(h - 1 / (2 beta))^2`` (IPO).

The reference is the policy's starting weights: a frozen copy made when training starts (kept in
the checkpoints, so a resumed run keeps it), another run's model (``task.module.reference=<run>``),
or, when a ``finetune=`` method adds weights (LoRA, adapters...), the same backbone with those
weights switched off, which needs no copy at all.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torchmetrics import MeanMetric

from lmforge.data.labels import IGNORE
from lmforge.errors import LmforgeError
from lmforge.finetune import added_weights_off
from lmforge.models.backbone import Backbone
from lmforge.tasks.base import TaskModule
from lmforge.tasks.optim import OptimizerFactory, SchedulerFactory

LOSSES = ("dpo", "ipo")


def sequence_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) summed log-probabilities of each row's labelled tokens (IGNORE left out) under ``model``."""
    logits = model(input_ids)
    # cross_entropy never holds the (N, T, V) log-probabilities: with a 50k vocabulary they dominate memory
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return -losses.view_as(labels).sum(-1)


def preference_loss(h: torch.Tensor, beta: float, loss: str = "dpo") -> torch.Tensor:
    """(B,) losses of the log-ratio differences ``h`` (chosen minus rejected, each policy minus reference)."""
    if loss == "dpo":
        return -F.logsigmoid(beta * h)
    return (h - 1 / (2 * beta)) ** 2


class PreferenceTask(TaskModule):
    """Tune a decoder to prefer the chosen replies over the rejected ones.

    Args:
        backbone: a decoder (the policy).
        optimizer, scheduler: partials, as for every task.
        tokenizer: the run's tokenizer (unused; every task takes it).
        beta: how far the policy may move from the reference (DPO's beta, IPO's tau).
        loss: ``dpo`` or ``ipo``.
        reference: a run dir whose model is the reference; None: the policy's starting weights.
    """

    backbone_kinds = ("decoder",)

    def __init__(self, backbone: Backbone, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 tokenizer: Tokenizer | None = None, beta: float = 0.1, loss: str = "dpo",
                 reference: str | None = None):  # fmt: skip
        super().__init__(optimizer, scheduler)
        self.checked_kind(backbone)
        self.attach_backbone(backbone)
        if loss not in LOSSES:
            raise LmforgeError(f"task.module.loss={loss}: use {' or '.join(LOSSES)}.")
        if beta <= 0:
            raise LmforgeError(f"task.module.beta={beta}: it must be above 0.")
        self.beta, self.loss_type, self.reference_run = beta, loss, reference
        self.reference: Backbone | None = None
        self.scores = {split: {name: MeanMetric() for name in ("loss", "reward_accuracy", "margin", "kl")}
                       for split in ("val", "test")}  # fmt: skip
        for split, metrics in self.scores.items():  # registered, so that they follow the device
            for name, metric in metrics.items():
                self.add_module(f"{split}_{name}", metric)

    def setup(self, stage: str) -> None:
        """Make the frozen reference before training (a resumed run then loads its own from the checkpoint)."""
        if stage != "fit" or self.reference is not None:
            return
        if self.reference_run:
            from lmforge.compose.weights import load_run

            self.reference = load_run(self.reference_run).backbone
        elif getattr(self, "finetune", None) is not None and self.finetune.adds_weights:
            return  # the backbone without its added weights is the reference
        else:
            self.reference = copy.deepcopy(self.backbone)
        self.reference.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        """Train mode for the policy only: the reference never drops out."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A checkpoint's reference loads where the task has one (a resumed fit), and is left out otherwise
        (evaluation, generation: the policy is the model)."""
        if self.reference is None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("reference.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits of the policy."""
        return self.backbone(input_ids)

    def _pairs(self, batch) -> dict[str, torch.Tensor]:
        """Per pair: the loss, the chosen and rejected rewards and the mean policy-reference log-ratio."""
        input_ids, labels = batch
        policy = sequence_logprobs(self.backbone, input_ids, labels)
        with torch.no_grad():
            if self.reference is not None:
                reference = sequence_logprobs(self.reference, input_ids, labels)
            else:
                with added_weights_off(self.backbone):
                    reference = sequence_logprobs(self.backbone, input_ids, labels)
        ratios = policy - reference
        chosen, rejected = ratios.chunk(2)
        return {"loss": preference_loss(chosen - rejected, self.beta, self.loss_type),
                "chosen": self.beta * chosen.detach(), "rejected": self.beta * rejected.detach(),
                "kl": (chosen.detach() + rejected.detach()) / 2}  # fmt: skip

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """The mean preference loss over the step's pairs; logs reward accuracy and margin."""
        pairs = self._pairs(batch)
        self.log("train/reward_accuracy", (pairs["chosen"] > pairs["rejected"]).float().mean())
        self.log("train/margin", (pairs["chosen"] - pairs["rejected"]).mean())
        return self.training_loss(pairs["loss"].sum(), len(pairs["loss"]))

    def _evaluate(self, batch, split: str) -> None:
        pairs = self._pairs(batch)
        n = len(pairs["loss"])
        metrics = self.scores[split]
        metrics["loss"].update(pairs["loss"].mean(), weight=n)
        metrics["reward_accuracy"].update((pairs["chosen"] > pairs["rejected"]).float().mean(), weight=n)
        metrics["margin"].update((pairs["chosen"] - pairs["rejected"]).mean(), weight=n)
        metrics["kl"].update(pairs["kl"].mean(), weight=n)

    def validation_step(self, batch, batch_idx: int) -> None:
        """Accumulate the pairs' loss, reward accuracy, margin and log-ratio."""
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        """As validation, on the test pairs."""
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        """Log val/loss, val/reward_accuracy, val/margin and val/kl."""
        metrics = self.scores["val"]
        self.log_epoch_scores("val", metrics["loss"], {k: m for k, m in metrics.items() if k != "loss"})

    def on_test_epoch_end(self) -> None:
        """Log the test scores."""
        metrics = self.scores["test"]
        self.log_epoch_scores("test", metrics["loss"], {k: m for k, m in metrics.items() if k != "loss"})
