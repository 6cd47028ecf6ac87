"""Exact training losses: accumulated micro-batches and DDP ranks step as one process over one batch.

Each task's loss averages over items whose number varies from batch to batch (target tokens, masked
tokens, tagged words, windows, examples). One SGD step with lr=1 moves each parameter by minus its
gradient, so the parameters' changes compare the gradients. The micro-batches hold different numbers
of items, so that a mean of per-batch means would give other gradients and another logged loss; each
test checks that it would, so that it can fail.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from pytorch_lightning.loggers import Logger
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import DDPStrategy
from tokenizers import Tokenizer, models
from torch.utils.data import DataLoader

from conftest import free_port
from lmforge.data.tokenizers import EOS
from lmforge.models.bert import Bert
from lmforge.models.gpt import GPT
from lmforge.models.transformer import Transformer
from lmforge.tasks.classification import ClassificationTask
from lmforge.tasks.language_modeling import LanguageModelingTask
from lmforge.tasks.masked_lm import IGNORE, MaskedLanguageModelingTask
from lmforge.tasks.question_answering import QuestionAnsweringTask
from lmforge.tasks.seq2seq import Seq2SeqTask
from lmforge.tasks.token_classification import TokenClassificationTask

TASKS = ("classification", "tagging", "tagging-crf", "qa", "masked-lm", "seq2seq", "lm")
T = 8  # every batch is padded to T positions, so that micro-batches concatenate into one batch
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", EOS]
VOCAB = SPECIALS + [f"w{i}" for i in range(26)]
SGD = functools.partial(torch.optim.SGD, lr=1.0)


class FixedMasks(MaskedLanguageModelingTask):
    """Masks the tokens whose id is a multiple of 3: random masks would differ between the runs compared."""

    def _masked_batch(self, window: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        ends = window.new_full((window.shape[0], 1), self.cls_id), window.new_full((window.shape[0], 1), self.sep_id)
        ids = torch.cat([ends[0], window, ends[1]], dim=1)
        chosen = (ids % 3 == 0) & (ids >= len(SPECIALS))
        return ids.masked_fill(chosen, self.mask_id), torch.where(chosen, ids, IGNORE)


def build(name: str) -> pl.LightningModule:
    """A tiny task without dropout, the same weights at every call."""
    torch.manual_seed(0)
    bert = functools.partial(Bert, len(VOCAB), n_layer=1, n_head=2, hidden_size=16, intermediate_size=32,
                             n_positions=T + 2, dropout=0.0)  # fmt: skip
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    if name == "classification":
        return ClassificationTask(bert(), 3, SGD, dropout=0.0)
    if name.startswith("tagging"):
        return TokenClassificationTask(bert(), 5, SGD, dropout=0.0, crf=name == "tagging-crf")
    if name == "qa":
        return QuestionAnsweringTask(bert(), SGD, dropout=0.0, max_length=T)
    if name == "masked-lm":
        return FixedMasks(bert(), SGD, tokenizer=tokenizer)
    if name == "seq2seq":
        backbone = Transformer(len(VOCAB), n_layer=1, n_head=2, d_model=16, d_ff=32, n_positions=T, dropout=0.0)
        return Seq2SeqTask(backbone, SGD, tokenizer=tokenizer, label_smoothing=0.1)
    return LanguageModelingTask(GPT(len(VOCAB), n_layer=1, n_head=2, n_embd=16, n_positions=T), SGD)


def micro_batches(name: str) -> list:
    """Four micro-batches of ``name``'s data with different item counts (rows, or lengths for token tasks)."""
    g = torch.Generator().manual_seed(1)
    by_examples = name in ("classification", "qa", "lm")  # their items are rows (or fixed-length rows)
    batches = []
    for rows in (3, 1, 2, 1) if by_examples else (2, 2, 2, 2):
        lengths = torch.randint(2, T + 1, (rows,), generator=g)
        mask = (torch.arange(T) < lengths[:, None]).long()
        ids = torch.randint(len(SPECIALS), len(VOCAB), (rows, T), generator=g) * mask
        if name == "classification":
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, (rows,), generator=g)})
        elif name.startswith("tagging"):
            tags = torch.randint(5, (rows, T), generator=g).masked_fill(mask == 0, IGNORE)
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": tags})
        elif name == "qa":
            start = (torch.rand(rows, generator=g) * lengths).long()
            end = torch.minimum(start + 1, lengths - 1)
            batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                            "start_positions": start, "end_positions": end})  # fmt: skip
        elif name == "masked-lm":
            batches.append((torch.randint(len(SPECIALS), len(VOCAB), (rows, T), generator=g),))
        elif name == "seq2seq":
            eos = VOCAB.index(EOS)
            labels = ids.masked_fill(mask == 0, IGNORE)
            decoder_input_ids = torch.cat([torch.full((rows, 1), eos), ids[:, :-1]], dim=1)
            source = torch.randint(len(SPECIALS), len(VOCAB), (rows, T), generator=g)
            batches.append({"input_ids": source, "attention_mask": torch.ones_like(source),
                            "decoder_input_ids": decoder_input_ids, "labels": labels})  # fmt: skip
        else:
            batches.append((ids, torch.randint(len(SPECIALS), len(VOCAB), (rows, T), generator=g)))
    return batches


def concatenate(batches: list):
    """The micro-batches as one batch."""
    if isinstance(batches[0], dict):
        return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    return tuple(torch.cat(parts) for parts in zip(*batches))


def fit(name: str, batches: list, accumulate: int = 1, **trainer_args) -> tuple[dict, float]:
    """One optimizer step of a fresh task over ``batches``: each parameter's change, and the logged train/loss."""
    task = build(name)
    before = {key: p.detach().clone() for key, p in task.named_parameters()}
    settings = dict(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=accumulate,
                    gradient_clip_val=None, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1)  # fmt: skip
    trainer = pl.Trainer(**{**settings, **trainer_args})
    trainer.fit(task, DataLoader(batches, batch_size=None))
    changes = {key: p.detach() - before[key] for key, p in task.named_parameters()}
    return changes, float(trainer.callback_metrics["train/loss"])


def largest_difference(a: dict, b: dict) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def mean_of_means(name: str, batches: list) -> tuple[dict, float]:
    """The changes and loss of per-micro-batch means averaged: what a step over ``batches`` gave before."""
    alone = [fit(name, [batch]) for batch in batches]
    changes = {key: sum(c[key] for c, _ in alone) / len(alone) for key in alone[0][0]}
    return changes, sum(loss for _, loss in alone) / len(alone)


@pytest.mark.parametrize("name", TASKS)
def test_accumulated_micro_batches_step_as_one_batch(name):
    batches = micro_batches(name)[:2]
    whole, whole_loss = fit(name, [concatenate(batches)])
    means, means_loss = mean_of_means(name, batches)
    assert largest_difference(means, whole) > 1e-4 and abs(means_loss - whole_loss) > 1e-4
    for accumulate in (2, 3):  # 3: an epoch's last window, with fewer micro-batches than accumulate_grad_batches
        changes, loss = fit(name, batches, accumulate)
        assert largest_difference(changes, whole) < 1e-6, accumulate
        assert loss == pytest.approx(whole_loss, abs=1e-6)


class Recorder(Logger):
    """Keeps what Lightning hands to the loggers."""

    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.rows.append((step, metrics))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


def test_train_loss_reaches_the_loggers_at_their_steps():
    """Logged in on_before_optimizer_step, it reaches the loggers every log_every_n_steps optimizer steps."""
    recorder = Recorder()
    batches = micro_batches("tagging")  # four steps of two micro-batches each
    fit("tagging", batches + batches, 2, max_steps=4, log_every_n_steps=2, logger=recorder)
    assert [step for step, metrics in recorder.rows if "train/loss" in metrics] == [1, 3]


def test_fp16_loss_scaling_and_the_rescaling_compose():
    """fp16 autocast on the CPU with a GradScaler: the step over two micro-batches is the one-batch step."""
    batches = micro_batches("tagging")[:2]

    def fp16() -> list:
        return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))]

    whole, whole_loss = fit("tagging", [concatenate(batches)], plugins=fp16())
    means, _ = mean_of_means("tagging", batches)
    changes, loss = fit("tagging", batches, 2, plugins=fp16())
    assert largest_difference(means, whole) > 0.1  # far above fp16's rounding
    assert largest_difference(changes, whole) < 1e-2 and loss == pytest.approx(whole_loss, abs=1e-4)


def _ddp_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of two gloo processes: two accumulated micro-batches of each task; rank 0 saves the outcome."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    for name in TASKS:
        mine = micro_batches(name)[2 * rank : 2 * rank + 2]
        outcome = fit(name, mine, 2, devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                      use_distributed_sampler=False)  # fmt: skip
        if rank == 0:
            torch.save(outcome, Path(out) / f"{name}.pt")


@pytest.mark.slow  # starts two processes
def test_two_ddp_ranks_step_as_one_process_over_both_ranks_batches(tmp_path):
    mp.spawn(_ddp_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    for name in TASKS:
        batches = micro_batches(name)
        whole, whole_loss = fit(name, [concatenate(batches)])
        # Before, each rank averaged its micro-batches' means and DDP averaged the ranks: a mean of all four.
        means, means_loss = mean_of_means(name, batches)
        assert largest_difference(means, whole) > 1e-4 and abs(means_loss - whole_loss) > 1e-4, name
        changes, loss = torch.load(tmp_path / f"{name}.pt")
        assert largest_difference(changes, whole) < 1e-6, name
        assert loss == pytest.approx(whole_loss, abs=1e-6), name
