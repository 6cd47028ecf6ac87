"""Lightning callbacks of our own: throughput, a stop on a non-finite loss, a progress bar that counts
optimizer steps and an exponential moving average of the weights."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar, WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn

from lmforge.errors import LmforgeError
from lmforge.tracking import process_age_seconds


class TokenThroughput(pl.Callback):
    """Log training tokens per second (input tokens of every batch, all ranks) to the progress bar, and the
    model FLOPs utilisation (``train/mfu``) when the backbone counts its FLOPs and the device's peak is known.

    It also keeps the totals and the start-up time (command to first training step), which the
    run summary and the results table report.

    Args:
        log_every_n_steps: steps between two logged rates.
        peak_tflops: the peak dense TFLOP/s of one device at the run's precision; None looks the GPU up
            in Lightning's table (no MFU on a CPU or a GPU it does not list).
    """

    def __init__(self, log_every_n_steps: int = 10, peak_tflops: float | None = None):
        self.log_every_n_steps = log_every_n_steps
        self.peak_tflops = peak_tflops
        self.tokens = 0
        self.flops = 0.0
        self.train_seconds = 0.0
        self._window_tokens = 0
        self._window_flops = 0.0
        self._window_start: float | None = None
        self._batch_start: float | None = None
        self._flops_per_token = None
        self._peak_flops: float | None = None  # of all devices together
        self.startup_seconds: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        """Find the devices' peak and, when there is one, the backbone's FLOPs count (no counting without)."""
        peak = (
            self.peak_tflops * 1e12 if self.peak_tflops else peak_flops(trainer.strategy.root_device, trainer.precision)
        )
        self._peak_flops = peak * trainer.world_size if peak else None
        backbone = getattr(pl_module, "backbone", None)
        self._flops_per_token = getattr(backbone, "flops_per_token", None) if self._peak_flops else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Start the batch clock."""
        self._batch_start = time.perf_counter()
        if self.startup_seconds is None:
            self.startup_seconds = process_age_seconds()
        if self._window_start is None:
            self._window_start = self._batch_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Count the batch's tokens (and FLOPs) and log the rates over the last few steps."""
        n = _count_tokens(batch) * trainer.world_size
        flops = n * self._flops_per_token(_sequence_length(batch)) if self._flops_per_token else 0.0
        now = time.perf_counter()
        self.tokens += n
        self.flops += flops
        self.train_seconds += now - self._batch_start
        self._window_tokens += n
        self._window_flops += flops
        if (batch_idx + 1) % self.log_every_n_steps == 0:
            seconds = max(now - self._window_start, 1e-9)
            pl_module.log("train/tokens_per_s", self._window_tokens / seconds, prog_bar=True, rank_zero_only=True)
            if self._window_flops:
                pl_module.log("train/mfu", self._window_flops / seconds / self._peak_flops, rank_zero_only=True)
            self._window_tokens, self._window_flops, self._window_start = 0, 0.0, now

    def on_validation_start(self, trainer, pl_module) -> None:
        """Validation time does not count against the training rate."""
        self._window_tokens, self._window_flops, self._window_start = 0, 0.0, None

    @property
    def tokens_per_second(self) -> float:
        """Training tokens per second of training-step time over the whole run."""
        return self.tokens / self.train_seconds if self.train_seconds else 0.0

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation over the whole run's training steps; None when it cannot be known."""
        if not (self.flops and self.train_seconds):  # no peak, or a backbone that does not count its FLOPs
            return None
        return self.flops / self.train_seconds / self._peak_flops


# Dense peak FLOP/s of GPUs that Lightning's table does not name as torch reports them ("NVIDIA H200").
_MORE_PEAK_FLOPS = {
    "h200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12}
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak dense FLOP/s of one GPU at a Lightning precision (``bf16-mixed``, ``16-mixed``, ``32-true``);
    None on a CPU or a GPU whose peak is not known."""
    if device.type != "cuda":
        return None
    from lightning_fabric.utilities.throughput import get_available_flops

    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(precision).split("-")[0], torch.float32)
    name = torch.cuda.get_device_name(device).lower()
    extra = next((table for chip, table in _MORE_PEAK_FLOPS.items() if chip in name), None)
    if extra is not None and "sxm" not in name and "nvl" not in name:
        tf32 = dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest"
        return extra["tfloat32" if tf32 else dtype]
    return get_available_flops(device, dtype)


def _sequence_length(batch) -> int:
    """Positions per sequence of a batch: a dict with input ids, or (inputs, labels)."""
    return (batch["input_ids"] if isinstance(batch, dict) else batch[0]).shape[-1]


def _count_tokens(batch) -> int:
    """Real (non-padding) input tokens of a batch: a dict with an attention mask, or (inputs, labels)."""
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return batch[0].numel()


class StopOnNonFiniteLoss(pl.Callback):
    """Stop the run in one sentence when the training loss becomes NaN or infinite.

    Lightning runs the checkpoint callbacks after every other one, so the step whose loss is not
    finite saves nothing: ``checkpoints/last.ckpt`` keeps the last state saved before it.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Raise :class:`LmforgeError` when this batch's loss is not finite (on any DDP rank)."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        finite = loss is None or bool(torch.isfinite(loss.detach()).all())
        # Every rank must take the same decision, or the others would wait on it forever.
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        saved = [c.last_model_path for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")]
        kept = f"{saved[0]} is the last state saved before it" if saved else "no checkpoint was saved before it"
        group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
        lr = group.get("initial_lr", group.get("lr"))
        lower = f"lower optimizer.lr (now {lr:g})" if lr is not None else "lower optimizer.lr"
        raise LmforgeError(
            f"The training loss became {float(loss)} at step {trainer.global_step}, so the run stopped "
            f"({kept}); {lower} or use trainer.gradient_clip_val and start again.",
            every_rank=True,
        )


class StepProgressBar(RichProgressBar):
    """Rich progress bar whose training total is the run's remaining steps when ``max_steps`` ends it first."""

    @property
    def total_train_batches(self):
        """Batches shown as the bar's total for this epoch."""
        total = super().total_train_batches
        max_steps = self.trainer.max_steps
        if max_steps and max_steps > 0 and isinstance(total, (int, float)):
            return min(total, (max_steps - self.trainer.global_step) * self.trainer.accumulate_grad_batches)
        return total

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's "Epoch 0/-2" is meaningless when max_steps ends the run.
        return f"epoch {current_epoch}"

    def get_metrics(self, trainer, pl_module):
        """Drop the logger's version number; show the learning rate and throughput readably."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if "train/lr" in metrics:  # too small for the bar's 3 decimals
            metrics["train/lr"] = f"{float(metrics['train/lr']):.2e}"
        if "train/tokens_per_s" in metrics:
            metrics["train/tokens_per_s"] = f"{float(metrics['train/tokens_per_s']):,.0f}"
        return metrics


class ExponentialMovingAverage(WeightAveraging):
    """Validate, checkpoint and test an exponential moving average of the weights (Polyak averaging).

    Lightning's :class:`WeightAveraging` does the bookkeeping: it swaps the average in for
    validation and saves it as each checkpoint's ``state_dict``, which the test, ``init_from=`` and
    the inference commands load; the trained weights go to ``current_model_state``, from which a
    resumed run continues. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n``
    updates, so the average follows the model closely early on instead of remembering the random
    initialisation at the first validations.
    """

    def __init__(self, decay: float = 0.999, **kwargs):
        if not 0.0 < decay < 1.0:
            raise LmforgeError(f"callbacks.ema.decay must lie between 0 and 1, not {decay}.")
        self.decay = decay
        super().__init__(avg_fn=self._update, **kwargs)

    def _update(self, average: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        if not average.is_floating_point():  # integer or boolean buffers (masks, ids) are copied
            return current
        decay = torch.clamp((1.0 + num_averaged) / (10.0 + num_averaged), max=self.decay)
        return average.lerp_(current, (1.0 - decay).to(average.dtype))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """Resuming training restores the trained weights and the average; testing keeps the average."""
        # Lightning's WeightAveraging loads current_model_state whenever it holds an average, so a
        # test after fit (ckpt_path=best) would score the trained weights instead of the average.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer, pl_module) -> None:
        """Keep the trained weights in the model: the final checkpoint saves them beside the average."""
        # Lightning's WeightAveraging copies the average over them here, so a last.ckpt written after
        # fit would lose them and resume= would continue from the average.
