"""A run directory's checkpoints: which one to resume or start from, reading one safely, the weights in it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import LmforgeError

# Prefixes that wrappers add to parameter names: the task's attribute, torch.compile, DDP.
_PREFIXES = ("backbone.", "_orig_mod.", "module.")


def find_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """``best`` (by validation loss, else last), ``last``, or a path to a ``.ckpt`` file."""
    ckpt_dir = run_dir / "checkpoints"
    if which == "last":
        path = ckpt_dir / "last.ckpt"
    elif which == "best":
        metrics = run_dir / "metrics.json"
        recorded = json.loads(metrics.read_text()).get("best_checkpoint") if metrics.is_file() else None
        candidates = [Path(recorded)] if recorded else sorted(ckpt_dir.glob("step*.ckpt"))
        path = next((p for p in candidates if p.is_file()), ckpt_dir / "last.ckpt")
    else:
        path = Path(which).expanduser()
    if not path.is_file():
        raise LmforgeError(
            f"No checkpoint at {path}; the run in {run_dir} has not saved one (checkpoint=best|last|<path>)."
        )
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a damaged file is one clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise LmforgeError(
            f"Checkpoint {path} cannot be read ({type(err).__name__}); it is corrupt or not an lmforge checkpoint."
        ) from err


def backbone_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's weights from a Lightning checkpoint, wrapper prefixes removed."""
    state = {}
    for name, tensor in checkpoint.get("state_dict", checkpoint).items():
        if not name.startswith("backbone."):
            continue
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        state[name] = tensor
    return state


def load_task_state(task: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Load a checkpoint's task weights (backbone and head); the frozen base of an adapter run is already loaded."""
    missing, unexpected = task.load_state_dict(checkpoint["state_dict"], strict=False)
    if checkpoint.get("base"):
        missing = [name for name in missing if not name.startswith("backbone.")]
    if missing or unexpected:
        raise LmforgeError(
            f"The checkpoint does not fit the run's task (missing {len(missing)}, unexpected {len(unexpected)} tensors)."
        )


def init_source(spec: str) -> tuple[Path, Path | None]:
    """Where ``init_from=`` points: (checkpoint, its run dir or None).

    A run dir gives its best checkpoint; a ``.ckpt`` file inside a run dir gives that run dir too.
    """
    path = Path(spec).expanduser().resolve()
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise LmforgeError(f"init_from={spec} is not a run directory (no config.yaml in it).")
        return find_checkpoint(path, "best"), path
    if path.is_file():
        run_dir = path.parent.parent
        return path, run_dir if (run_dir / "tokenizer.json").is_file() else None
    raise LmforgeError(f"init_from={spec}: no such run directory or checkpoint file.")


def group_names(names: list[str]) -> str:
    """Parameter names summarised by their first two components, e.g. ``encoder.layer (24)``."""
    counts: dict[str, int] = {}
    for name in names:
        key = ".".join(name.split(".")[:2])
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({n})" if n > 1 else k for k, n in counts.items()) or "none"


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest state a run dir can resume from: ``checkpoints/last.ckpt``, or the ``hpc_ckpt_<n>.ckpt``
    that Lightning saves when Slurm sends the USR1 signal of ``sbatch --signal=USR1@90``; None when neither exists."""
    saved = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    return max((p for p in saved if p.is_file()), key=lambda p: p.stat().st_mtime, default=None)
