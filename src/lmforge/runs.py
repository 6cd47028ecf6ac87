"""Reopen a finished (or killed) run directory: its config, tokenizer and checkpoint weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer
from torch import nn

from lmforge.compose import build_backbone, build_finetune
from lmforge.data.tokenizers import load_tokenizer
from lmforge.errors import LmforgeError

# Prefixes that wrappers add to parameter names: the task's attribute, torch.compile, DDP.
_PREFIXES = ("backbone.", "_orig_mod.", "module.")


@dataclass
class SavedRun:
    """A run directory opened for generation, evaluation or export."""

    run_dir: Path
    cfg: DictConfig
    tokenizer: Tokenizer
    backbone: nn.Module
    checkpoint: Path
    saved: dict[str, Any]  # the checkpoint as read (task weights, data facts, base), so it is read once


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


def load_run(run_dir: str | Path, checkpoint: str = "best") -> SavedRun:
    """Open a run dir: its saved config and tokenizer, and the backbone with the chosen checkpoint's weights."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / "config.yaml").is_file():
        raise LmforgeError(f"{run_dir} is not a run directory (no config.yaml in it).")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    tokenizer = load_tokenizer(run_dir)
    path = find_checkpoint(run_dir, checkpoint)
    backbone = build_backbone(cfg.model, tokenizer.get_vocab_size())
    saved = load_checkpoint(path)
    if saved.get("base"):  # an adapter run: its checkpoints hold the adapters, the base comes from where it started
        load_base_weights(backbone, saved["base"])
    build_finetune(cfg).apply(backbone, cfg.model.get("targets"), cfg.model.name)
    missing, unexpected = backbone.load_state_dict(backbone_state_dict(saved), strict=False)
    if unexpected or (missing and not saved.get("base")):
        raise LmforgeError(
            f"Checkpoint {path} does not fit the run's model {cfg.model.name} (missing {len(missing)}, unexpected {len(unexpected)} tensors)."
        )
    backbone.eval()
    return SavedRun(run_dir, cfg, tokenizer, backbone, path, saved)


def _merged_adapter_backbone(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The plain backbone weights of an adapter run's checkpoint: its base with LoRA/IA3 folded in."""
    run = load_run(checkpoint.parent.parent, str(checkpoint))
    method = build_finetune(run.cfg)
    if not method.mergeable:
        raise LmforgeError(
            f"init_from: {checkpoint} is a finetune={method.name} run, whose added weights do not fold into the "
            f"backbone; start from the run it was trained on instead."
        )
    method.merge(run.backbone)
    return run.backbone.state_dict()


def load_base_weights(backbone: nn.Module, base: dict[str, str]) -> None:
    """Load the frozen base an adapter run started from: ``{"pretrained": folder}`` or ``{"init_from": ckpt}``."""
    if "pretrained" in base:
        from lmforge.models.pretrained import family_of_backbone, import_state, read_hf_folder

        folder = Path(base["pretrained"])
        family = family_of_backbone(f"{type(backbone).__module__}.{type(backbone).__name__}")
        _, hf_state = read_hf_folder(folder)
        state = {n.removeprefix("backbone."): t for n, t in import_state(family, hf_state)[0].items()}
    else:
        path = Path(base["init_from"])
        saved = load_checkpoint(path)
        state = _merged_adapter_backbone(path) if saved.get("base") else backbone_state_dict(saved)
    backbone.load_state_dict(state, strict=False)


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


def init_backbone(backbone: nn.Module, checkpoint: Path) -> str:
    """Copy a checkpoint's backbone weights into ``backbone``; return one line saying what was and was not loaded.

    Tensors the backbone lacks (the old task's head) are skipped; tensors the checkpoint lacks
    stay as initialised. A tensor whose shape differs is an error: the models do not match.
    """
    saved = load_checkpoint(checkpoint)
    state = backbone_state_dict(saved)
    if saved.get("base"):  # an adapter run: its base plus its adapters, merged, start this one
        state = _merged_adapter_backbone(checkpoint)
    own = backbone.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise LmforgeError(
                f"init_from: {name} is {tuple(tensor.shape)} in {checkpoint} but {tuple(own[name].shape)} in this "
                f"model; use the model (and tokenizer) of the run the checkpoint came from."
            )
    loaded = [name for name in own if name in state]
    if not loaded:
        raise LmforgeError(f"init_from: {checkpoint} holds no weights of this {type(backbone).__name__} backbone.")
    backbone.load_state_dict({name: state[name] for name in loaded}, strict=False)
    fresh = [name for name in own if name not in state]
    skipped = [name for name in saved.get("state_dict", {}) if not name.startswith("backbone.")]
    fresh_text = f"{group_names(fresh)} and the task head" if fresh else "the task head only"
    return (
        f"init_from {checkpoint}: loaded {len(loaded)} of {len(own)} backbone tensors; "
        f"newly initialised: {fresh_text}; not used from the checkpoint: {group_names(skipped)}"
    )
