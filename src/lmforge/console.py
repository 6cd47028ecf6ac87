"""What a run shows on the console and writes to its log file."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

# Library chatter that says nothing about the run; real warnings still show.
QUIET_LOGGERS = ("pytorch_lightning", "lightning", "lightning_fabric", "datasets", "wandb", "torch")
IGNORED_WARNINGS = (
    r".*does not have many workers.*",
    r".*number of training batches .* is smaller than the logging interval.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*Found .* module\(s\) in eval mode at the start of training.*",
    r".*Experiment logs directory .* exists and is not empty.*",
    # Our sampler continues a resumed epoch itself (data/datamodules.py), which Lightning cannot see.
    r".*resuming from a checkpoint that ended before the epoch ended.*",
    r".*You requested to overfit but enabled train dataloader shuffling.*",
)


class _NotSamples(logging.Filter):
    """Keep generated samples out of the console; they go to the log file and the loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("lmforge.samples")


class _ConsoleFormatter(logging.Formatter):
    """Plain message for INFO; the level in front of warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


def setup_console(quiet: bool = False) -> None:
    """Send lmforge's INFO lines to the console and silence library chatter.

    Args:
        quiet: warnings and errors only (DDP workers other than rank 0).
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    for h in list(root.handlers):  # Hydra's own console handler, if it set one up
        if (
            isinstance(h, logging.StreamHandler)
            and not isinstance(h, logging.FileHandler)
            and not getattr(h, "_lmforge", False)
        ):
            root.removeHandler(h)
    if not any(getattr(h, "_lmforge", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_ConsoleFormatter())
        handler.addFilter(_NotSamples())
        handler._lmforge = True
        root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if "SLURM_JOB_ID" not in os.environ:
        # Lightning's hint to start ranks with srun fires wherever srun is installed (a login node, a
        # laptop with Slurm's client); it only makes sense inside an allocation.
        warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system but is not used.*")


def log_to_file(run_dir: str | Path) -> logging.Handler:
    """Also write every log line, samples included, to ``<run_dir>/train.log``."""
    handler = logging.FileHandler(Path(run_dir) / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler
