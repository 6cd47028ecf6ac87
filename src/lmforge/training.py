"""One training run from a composed config: run dir, build, fit, test, report."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lmforge import tracking
from lmforge.compose.parts import build_loggers, check_pairing
from lmforge.compose.run import Run, build_run
from lmforge.compose.weights import starting_weights
from lmforge.console import log_to_file, setup_console
from lmforge.data.tokenizers import save_tokenizer
from lmforge.distributed import (
    RUN_DIR_VAR,
    RUN_ID_VAR,
    is_rank_zero,
    slurm_restarts,
    torchrun_restart_caveat,
)
from lmforge.experiments.instruct import score_replies
from lmforge.finetune import describe_trainable
from lmforge.rundirs.checkpoints import resume_checkpoint
from lmforge.rundirs.choose import choose_run_dir, command_line_overrides
from lmforge.rundirs.new import save_hydra_files

log = logging.getLogger("lmforge")


def _float_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in sorted(metrics.items())}


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Train (and test, when the task has a test split) as the config says.

    Returns:
        the record appended to the results table: run id and dir, metadata, metrics.
    """
    setup_console(quiet=not is_rank_zero())
    stopwatch = tracking.Stopwatch()
    if is_rank_zero() and (caveat := torchrun_restart_caveat()):
        log.warning(caveat)
    cfg, finished = choose_run_dir(cfg)
    if finished is not None:
        return finished
    run_dir = Path(cfg.paths.run_dir)
    # Lightning starts the other DDP ranks as copies of this command; they inherit these.
    os.environ[RUN_DIR_VAR], os.environ[RUN_ID_VAR] = str(run_dir), cfg.run_id
    file_log = log_to_file(run_dir) if is_rank_zero() else None
    try:
        return _train_in(cfg, run_dir, stopwatch)
    except BaseException:
        tracking.finish_wandb(exit_code=1)  # else the next run in this process would log into this one
        raise
    finally:
        if file_log is not None:
            logging.getLogger().removeHandler(file_log)
            file_log.close()
        if is_rank_zero():
            os.environ.pop(RUN_DIR_VAR, None)
            os.environ.pop(RUN_ID_VAR, None)


def run_stages(cfg: DictConfig, overrides: list[str]) -> list[dict[str, Any]]:
    """Run an experiment's ``stages`` one after another, each a run of its own.

    A stage is a list of overrides (``task=mlm``, ``trainer.max_steps=3000``); the command
    line's overrides come after them (so ``trainer.max_steps=10`` shortens every stage), and
    every stage after the first starts from the previous stage's weights (``init_from``).

    Args:
        cfg: the composed config holding ``stages``.
        overrides: the command line's overrides.
    Returns:
        the records of the stage runs, in order.
    """
    from hydra import compose

    setup_console()
    records: list[dict[str, Any]] = []
    names = list(cfg.stages)
    for i, name in enumerate(names):
        stage_overrides = [*cfg.stages[name], *overrides, "stages=null"]
        if cfg.paths.get("run_dir"):  # a named run dir holds one dir per stage
            stage_overrides.append(f"paths.run_dir={Path(cfg.paths.run_dir) / name}")
        if records:
            stage_overrides.append(f"init_from={records[-1]['run_dir']}")
        log.info("stage %d/%d: %s (%s)", i + 1, len(names), name, " ".join(cfg.stages[name]))
        records.append(run_training(compose(config_name="train", overrides=stage_overrides)))
    return records


def _train_in(cfg: DictConfig, run_dir: Path, stopwatch: tracking.Stopwatch) -> dict[str, Any]:
    """Build, fit and test the run in its dir, and record it."""
    start_from = resume_checkpoint(run_dir) if cfg.get("resume") else None
    log.info("run dir: %s%s", run_dir, f" (resuming from {start_from.relative_to(run_dir)})" if start_from else "")
    check_pairing(cfg)  # before W&B starts a run (or the hub a download) for nothing
    weights = starting_weights(cfg)
    git = tracking.git_state()  # taken now: the code this run imported, not what the tree holds when it ends
    if is_rank_zero():
        _save_run_files(cfg, run_dir)
    saved_config = OmegaConf.to_yaml(cfg)
    loggers = build_loggers(cfg)
    with _wandb_starting(loggers):  # W&B takes a few seconds to start: overlap it with the build
        run = build_run(cfg, loggers, weights)
    if is_rank_zero():
        save_tokenizer(run.tokenizer, run_dir)
        if OmegaConf.to_yaml(cfg) != saved_config:  # the build settled something (model.n_positions)
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        _report_start(cfg, run, loggers)
    outcome = _fit_and_test(cfg, run, start_from, run_dir / "checkpoints" / "last.ckpt")
    record = _make_record(cfg, run, outcome, stopwatch, git)
    if run.trainer.is_global_zero:
        tracking.write_json(run_dir / "metrics.json", record)
        tracking.append_result(cfg.paths.results_file, record)
        curves = tracking.plot_curves(tracking.csv_history(run_dir / "csv"), run_dir / "curves.png")
        _summary(record, run, loggers, curves)
    return record


def _save_run_files(cfg: DictConfig, run_dir: Path) -> None:
    """What the run dir holds before training: the resolved config, Hydra's files, the uncommitted diff."""
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    save_hydra_files(cfg, run_dir)
    tracking.save_git_diff(run_dir)
    if cfg.get("resume"):
        tracking.keep_csv_history(run_dir / "csv")


@contextmanager
def _wandb_starting(loggers: list[Any]) -> Iterator[None]:
    """Start the W&B loggers' runs in threads for the body's duration; a failed body waits for them too."""
    starting = [
        threading.Thread(target=tracking.start_wandb, args=(lg,), daemon=True)
        for lg in loggers
        if type(lg).__name__ == "WandbLogger" and is_rank_zero()
    ]
    for thread in starting:
        thread.start()
    try:
        yield
    finally:  # a failed build must not leave W&B starting behind our back
        for thread in starting:
            thread.join()


@dataclass
class _Outcome:
    """What fitting and testing gave: the metrics, the best checkpoint, why the run stopped early."""

    metrics: dict[str, float]
    best_checkpoint: str | None
    stopped_early: str | None


def _fit_and_test(cfg: DictConfig, run: Run, start_from: Path | None, last_ckpt: Path) -> _Outcome:
    """Fit (from ``start_from`` when resuming), save the final state, then test the best checkpoint."""
    trainer = run.trainer
    trainer.fit(
        run.task, datamodule=run.datamodule, ckpt_path=str(start_from) if start_from else None, weights_only=True
    )
    trainer.save_checkpoint(last_ckpt)  # the periodic last.ckpt may be older than the final step
    stopped_early = _stopped_early(trainer)
    if stopped_early and is_rank_zero():
        log.info("stopped early at step %d of %d: %s", trainer.global_step, trainer.max_steps, stopped_early)
    speeds = ("tokens_per_s", "/mfu")  # the record has them over the whole run
    metrics = _float_metrics({k: v for k, v in trainer.callback_metrics.items() if not k.endswith(speeds)})
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if getattr(run.datamodule, "has_test_split", False) and cfg.get("test_after_fit", True):
        # The checkpoint, not the model in memory: with callbacks=ema it holds the averaged weights.
        test = trainer.test(run.task, datamodule=run.datamodule, ckpt_path=best or str(last_ckpt), verbose=False)
        metrics.update(_float_metrics(test[0] if test else {}))
        if is_rank_zero():  # tuned on the instruction mixture: each task's replies scored by its own metric
            replies = Path(cfg.paths.run_dir) / "replies.jsonl"
            metrics.update(
                score_replies(run.backbone, run.tokenizer, cfg, run.datamodule, "test", replies_file=replies)
            )
    if checkpoint is not None and checkpoint.best_model_score is not None:
        metrics[f"best_{checkpoint.monitor}"] = round(float(checkpoint.best_model_score), 6)
    return _Outcome(metrics, best or None, stopped_early)


def _make_record(
    cfg: DictConfig, run: Run, outcome: _Outcome, stopwatch: tracking.Stopwatch, git: dict[str, Any]
) -> dict[str, Any]:
    """The run's line in the results table and its ``metrics.json``."""
    trainer, speed = run.trainer, run.throughput
    tokens_per_s = speed.tokens_per_second if speed else None
    return {
        "run_id": cfg.run_id,
        "run_dir": cfg.paths.run_dir,
        "started_at": stopwatch.started_at,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "tokenizer": cfg.tokenizer.get("name"),
        "parameters": _parameters(run.backbone),
        "trainable_parameters": _parameters(run.task, trainable=True),
        "device": _device_name(trainer),
        "world_size": trainer.world_size,  # processes that trained together (DDP ranks on every node)
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "requeues": slurm_restarts(),  # how often Slurm requeued the job before this run finished
        "steps": trainer.global_step,
        "stopped_early": outcome.stopped_early,  # why early stopping ended the run, else None
        "metrics": outcome.metrics,
        "wall_time_s": round(stopwatch.elapsed, 2),
        "peak_memory_mb": tracking.peak_memory_mb(),
        # Mean time of a training step (forward, backward, optimizer) in this process, validation excluded.
        "step_ms": round(1000 * speed.train_seconds / trainer.global_step, 2)
        if speed and trainer.global_step
        else None,
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        # Model FLOPs utilisation of the training steps, when the backbone and the device's peak are known.
        "mfu": round(speed.mfu, 4) if speed and speed.mfu else None,
        "startup_s": round(speed.startup_seconds, 2) if speed and speed.startup_seconds else None,
        "best_checkpoint": outcome.best_checkpoint,
        **tracking.run_metadata(cfg.seed, command_line_overrides(), git),
    }


def _parameters(module: torch.nn.Module, trainable: bool = False) -> int:
    """How many parameters a module has (only those that train, with ``trainable``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _stopped_early(trainer) -> str | None:
    """Why ``callbacks=[...,early-stopping]`` ended the run before ``trainer.max_steps``; None when it did not."""
    stopper = trainer.early_stopping_callback
    if stopper is None:
        return None
    message = getattr(stopper, "stopping_reason_message", None)  # recent Lightning says why
    if message is None and stopper.wait_count >= stopper.patience and trainer.global_step < trainer.max_steps:
        message = f"{stopper.monitor} did not improve for {stopper.patience} validations"
    return message


def _device_name(trainer) -> str:
    """What the run trained on: ``cpu``, ``cuda``, ``mps``..."""
    return type(trainer.accelerator).__name__.replace("Accelerator", "").lower()


def _report_start(cfg: DictConfig, run: Run, loggers: list[Any]) -> None:
    """One console line per choice that matters; hyperparameters to every logger."""
    trainer = run.trainer
    sizes = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in run.datamodule.split_sizes.items())
    device = _device_name(trainer)
    log.info(
        "model: %s (%s, %s parameters)",
        cfg.model.name,
        type(run.backbone).__name__,
        _fmt_params(_parameters(run.backbone)),
    )
    log.info("task: %s (%s %s)", cfg.task.name, sizes, getattr(run.datamodule, "size_unit", "examples"))
    log.info("tokenizer: %s (%d tokens)", cfg.tokenizer.get("name", "?"), run.tokenizer.get_vocab_size())
    log.info("finetune: %s, %s", cfg.get("finetune", {}).get("name", "full"), describe_trainable(run.task))
    log.info("device: %s x%d, precision %s", device, trainer.num_devices, trainer.precision)
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(hparams)
        if type(logger).__name__ == "WandbLogger":
            log.info("tracking: %s", tracking.describe_wandb(logger))
        elif getattr(logger, "log_dir", None):
            log.info("tracking: %s -> %s", type(logger).__name__.replace("Logger", ""), logger.log_dir)


def _summary(record: dict[str, Any], run: Run, loggers: list[Any], curves: Path | None) -> None:
    shown = {k: v for k, v in record["metrics"].items() if k.startswith(("val/", "test/", "best_"))}
    mfu = f", MFU {record['mfu']:.1%}" if record.get("mfu") else ""
    log.info("done in %.1f s (%s steps, %s tokens/s%s, peak memory %s MB)", record["wall_time_s"], record["steps"],
             record["tokens_per_s"], mfu, record["peak_memory_mb"])  # fmt: skip
    log.info("metrics: %s", ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    if record["best_checkpoint"]:
        log.info("best checkpoint: %s", record["best_checkpoint"])
    if curves:
        log.info("curves: %s", curves)
    samples = getattr(run.task, "samples", None)
    if samples:
        step, text = samples[-1]
        log.info("sample at step %d:\n%s", step, text)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            experiment = logger.experiment
            experiment.summary.update(record["metrics"])
            offline = experiment.settings.mode == "offline"
            experiment.finish()
            if offline:
                log.info("W&B is offline; upload with: wandb sync %s", Path(experiment.dir).parent)
    log.info("run dir: %s", record["run_dir"])
