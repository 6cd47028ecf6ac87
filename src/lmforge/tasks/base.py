"""What every task LightningModule shares: the backbone check, the optimizer set-up, metric logging, RNG in
checkpoints."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torchmetrics import Metric, MetricCollection

from lmforge.errors import LmforgeError
from lmforge.models.backbone import Backbone, backbone_kind
from lmforge.tasks.optim import OptimizerFactory, SchedulerFactory, configure_optimization
from lmforge.tasks.rng import capture_rng_state, restore_rng_state

KIND_NAMES = {"encoder": "an encoder", "decoder": "a decoder", "rnn": "an RNN", "seq2seq": "an encoder-decoder",
              "reader": "a question-and-context reader"}  # fmt: skip


def _compute_and_reset(scores: Metric | MetricCollection | dict[str, Metric]) -> dict[str, torch.Tensor]:
    """Name -> value of every score of :meth:`TaskModule.log_epoch_scores`'s ``scores``; the metrics start over."""
    if isinstance(scores, dict):
        computed, metrics = {name: metric.compute() for name, metric in scores.items()}, scores.values()
    else:
        computed, metrics = scores.compute(), [scores]
    for metric in metrics:
        metric.reset()
    return computed


class TaskModule(pl.LightningModule):
    """Base class of the tasks: holds the backbone, the optimizer and schedule partials, and implements the shared hooks.

    A task's ``__init__`` starts with :meth:`checked_kind` (before it reads anything else) and keeps its
    backbone with :meth:`attach_backbone`; the backbone offers what :class:`lmforge.models.backbone.Backbone`
    declares.

    Args:
        optimizer: partial optimizer, called with the parameter groups.
        scheduler: partial schedule, called with the optimizer and the total steps; or None.
    """

    # The kinds of backbone (their ``kind`` attribute) this task can train.
    backbone_kinds: tuple[str, ...] = ("encoder", "decoder", "rnn")

    @classmethod
    def check_backbone(cls, kind: str | None, model: str) -> None:
        """Fail in one sentence when this task cannot train a backbone of this kind (before any data is read)."""
        if kind not in cls.backbone_kinds:
            wanted = " or ".join(KIND_NAMES[k] for k in cls.backbone_kinds)
            raise LmforgeError(
                f"{cls.__name__} needs {wanted} backbone; model {model} is {KIND_NAMES.get(kind, repr(kind))}."
            )

    def checked_kind(self, backbone: Backbone) -> str:
        """The backbone's kind, once :meth:`check_backbone` has accepted it (one sentence naming the class if not)."""
        kind = backbone_kind(backbone)
        self.check_backbone(kind, type(backbone).__name__)
        return kind

    def attach_backbone(self, backbone: Backbone, uses_pooler: bool = False) -> None:
        """Keep ``backbone`` as ``self.backbone``, its pooler frozen unless this task reads it.

        DDP fails on a parameter that never gets a gradient (or needs ``find_unused_parameters``, a pass
        over the graph every step), so a pooler the task does not read leaves training altogether; it
        stays in the checkpoint, for export.
        """
        self.backbone = backbone
        if backbone.pooler is not None and not uses_pooler:
            backbone.pooler.requires_grad_(False)

    def __init__(self, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None):
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # Set by lmforge.compose.parts.make_task: plain values (classes, characters per token) that rebuild the task.
        self.data_arguments: dict = {}
        # Set by the training run for adapter methods: where the frozen base weights come from.
        self.base_weights: dict | None = None
        # training_loss's state: (summed item losses, items) of the optimizer step so far, and the count
        # that divides the returned sums (kept in checkpoints, so that a resumed run computes as before).
        self._step_totals: torch.Tensor | None = None
        self._reference_items: float | None = None

    def training_loss(self, loss_sum: torch.Tensor, items: torch.Tensor | int) -> torch.Tensor:
        """The loss for ``training_step`` to return, from one micro-batch's summed item losses and item count.

        Items are what a task's loss averages over: target tokens, masked tokens, tagged words, windows,
        examples. The optimizer step's gradient becomes that of the mean over all the step's items, across
        the micro-batches of gradient accumulation and the DDP ranks, rather than a mean of per-batch means.
        That count is known only after the last micro-batch, so :meth:`on_before_optimizer_step` rescales
        the gradients then.
        """
        items = torch.as_tensor(items, dtype=torch.float32, device=loss_sum.device)
        if self._reference_items is None:
            # The bare sum (of thousands of token losses) would overflow fp16 gradients under loss scaling, so
            # it is divided by a fixed count: the run's first micro-batch's, the same on every rank (DDP averages
            # the ranks' gradients, so they must share it). The rescaling undoes it exactly.
            self._reference_items = float(self._sum_over_ranks(items.clamp(min=1))) / self.trainer.world_size
        totals = torch.stack([loss_sum.detach().float(), items])
        self._step_totals = totals if self._step_totals is None else self._step_totals + totals
        return loss_sum / self._reference_items

    def on_train_start(self) -> None:
        """Forget the counts of an interrupted fit."""
        self._step_totals = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Rescale the step's gradients to the mean over all its items, and log that mean as ``train/loss``.

        Lightning calls this after the step's last backward pass and fp16 unscaling, and before gradient
        clipping, so clipping and the optimizer see the exact gradients (callbacks' hooks of this name run
        before this one, and see them before the rescaling).
        """
        if self._step_totals is None:  # training_step did not use training_loss
            return
        loss_sum, items = self._sum_over_ranks(self._step_totals).unbind()
        self._step_totals = None
        items = items.clamp(min=1)
        # Lightning divided every micro-batch's loss by accumulate_grad_batches (in an epoch's shorter last
        # window too) and DDP or FSDP averaged the ranks' gradients (or their shards): undo both, and the
        # reference count, then divide by the step's items.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size * self._reference_items / items
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
        self.log_train(loss_sum / items)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as ``trainer.gradient_clip_val`` says; under FSDP by the norm over all shards.

        Lightning's FSDP precision refuses clipping by norm: a local ``clip_grad_norm_`` would see one
        shard's norm. The root FSDP module's own ``clip_grad_norm_`` reduces over the shards.
        """
        fsdp = isinstance(self.trainer.strategy, pl.strategies.FSDPStrategy)
        if fsdp and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the DDP ranks (in place), or itself in a single process."""
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def log_train(self, loss: torch.Tensor) -> None:
        """Log the training loss and learning rate to the bar and the loggers.

        Only on the steps Lightning hands to the loggers (every ``log_every_n_steps``): logging
        every step costs a few percent of step time on small models.
        """
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0 or self.global_step == 0:
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)

    def log_epoch_scores(
        self,
        prefix: str,
        loss: Metric,
        scores: Metric | MetricCollection | dict[str, Metric] | None = None,
        rename: dict[str, str] | None = None,
    ) -> torch.Tensor:
        """Log ``<prefix>/loss`` and every score under ``<prefix>/`` (on the bar for validation), reset the
        metrics, and return the loss (for what a task derives from it: perplexity, bits per character).

        Args:
            scores: a metric whose ``compute`` gives a dict of scores (a collection, entity scores, SQuAD),
                or name -> metric of one score each.
            rename: score name -> the name it is logged under.
        """
        value = loss.compute()
        loss.reset()
        self.log(f"{prefix}/loss", value, prog_bar=prefix == "val")
        if scores is not None:
            rename = rename or {}
            computed = {rename.get(name, name): v for name, v in _compute_and_reset(scores).items()}
            # A collection made with clone(prefix="val/") names its scores with the prefix already.
            scoped = {name if name.startswith(f"{prefix}/") else f"{prefix}/{name}": v for name, v in computed.items()}
            self.log_dict(scoped, prog_bar=prefix == "val")
        return value

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the random generators (a resumed run draws the same numbers) and what the task knows of its data.

        An adapter run (LoRA, IA3...) from a public checkpoint or another run leaves out its frozen base
        weights and names where they come from instead (``base``), so its checkpoints stay small.
        """
        checkpoint["rng_state"] = capture_rng_state()
        checkpoint["data_arguments"] = self.data_arguments
        checkpoint["loss_reference_items"] = self._reference_items
        if self.base_weights:
            checkpoint["base"] = self.base_weights
            frozen = {p.data_ptr() for p in self.parameters() if not p.requires_grad}  # tied names included
            for name, tensor in list(checkpoint["state_dict"].items()):
                if tensor.data_ptr() in frozen:
                    del checkpoint["state_dict"][name]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the random generators and the training loss's reference count saved with the checkpoint."""
        if "rng_state" in checkpoint:
            restore_rng_state(checkpoint["rng_state"])
        self._reference_items = checkpoint.get("loss_reference_items")

    def configure_optimizers(self):
        """Optimizer with weight decay on matrices only, and a per-step schedule."""
        return configure_optimization(self, self.optimizer_factory, self.scheduler_factory)

    # -- predictions on disk (lmforge.predictions): a JSON line per example of the evaluated split ------------

    # The file in the run dir, and the split whose epoch writes it; lmforge-evaluate sets both.
    predictions_file: str = "predictions.jsonl"
    predictions_split: str = "test"
    # Open during that epoch only; the steps write their batch's lines through it when it is not None.
    prediction_writer = None

    def on_test_epoch_start(self) -> None:
        """Open the test split's prediction file."""
        self._open_predictions("test")

    def on_validation_epoch_start(self) -> None:
        """Open a prediction file when validation is the split asked for (``lmforge-evaluate split=validation``)."""
        self._open_predictions("validation")

    def on_test_end(self) -> None:
        """Finish the prediction file: parts merged across processes, renamed into place."""
        self._close_predictions()

    def on_validation_end(self) -> None:
        """Finish the prediction file, if this validation wrote one."""
        self._close_predictions()

    def _open_predictions(self, split: str) -> None:
        from lmforge.predictions import PredictionWriter

        if split == self.predictions_split and not self.trainer.sanity_checking:
            self.prediction_writer = PredictionWriter(self.trainer, split, self.predictions_file)

    def _close_predictions(self) -> None:
        if self.prediction_writer is not None:
            self.prediction_writer.close()
            self.prediction_writer = None
