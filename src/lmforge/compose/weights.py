"""Where a run's weights come from: a public checkpoint (``model.pretrained``), another run (``init_from``),
its own checkpoints (resume, and reopening a finished run), and so which tokenizer it must use."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict
from tokenizers import Tokenizer
from torch import nn

from lmforge.compose.parts import build_backbone, build_finetune
from lmforge.data.tokenizers import load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.finetune import FinetuneMethod
from lmforge.hub.pretrained import PretrainedWeights, resolve_pretrained
from lmforge.models.backbone import grown_vocabulary
from lmforge.rundirs.checkpoints import (
    backbone_state_dict,
    find_checkpoint,
    group_names,
    init_source,
    load_checkpoint,
)
from lmforge.rundirs.config import saved_config

log = logging.getLogger(__name__)


@dataclass
class StartingWeights:
    """What a run starts from, as :func:`starting_weights` decided: a public checkpoint, another run's
    checkpoint, or neither (from scratch, or a resumed run whose weights are in its own checkpoints).

    Args:
        pretrained: the public checkpoint read for ``model.pretrained``.
        init_checkpoint: the checkpoint ``init_from`` names.
        init_run: the run dir that checkpoint belongs to (its tokenizer), when it is in one.
    """

    pretrained: PretrainedWeights | None = None
    init_checkpoint: Path | None = None
    init_run: Path | None = None

    @property
    def loads(self) -> bool:
        """Whether weights are copied into the built task."""
        return self.pretrained is not None or self.init_checkpoint is not None

    def tokenizer(self, cfg: DictConfig) -> Tokenizer | None:
        """The tokenizer whose ids the weights were trained on; None lets the config build one."""
        if cfg.get("resume"):
            return load_tokenizer(cfg.paths.run_dir)
        if self.init_run is not None:
            return load_tokenizer(self.init_run)
        return self.pretrained.tokenizer if self.pretrained is not None else None

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Fail in one sentence when the tokenizer has ids the public checkpoint's embeddings do not cover."""
        if self.pretrained is not None:
            self.pretrained.check_tokenizer(tokenizer)

    def load_into(self, task: pl.LightningModule, method: FinetuneMethod) -> None:
        """Copy the starting weights into a built task (before ``method`` adds its weights) and log what was loaded.

        An adapter method's checkpoints keep the adapters and the head only: the task records where its
        frozen base comes from, so that a resume or a reopening loads that base again.
        """
        if self.pretrained is not None:
            log.info(self.pretrained.load_into(task))
            base = {"pretrained": self.pretrained.source}
        elif self.init_checkpoint is not None:
            log.info(init_backbone(task.backbone, self.init_checkpoint))
            base = {"init_from": str(self.init_checkpoint)}
        else:
            return
        if method.adds_weights:
            task.base_weights = base
            task.strict_loading = False


def starting_weights(cfg: DictConfig) -> StartingWeights:
    """Decide what a run starts from, and pin ``cfg.model`` to it so that the saved config rebuilds the model
    (and ``cfg.tokenizer`` to the tokenizer of the run that ``init_from`` names).

    ``init_from`` wins over ``model.pretrained``. A resumed run has its weights in its last checkpoint,
    except the frozen base of adapter methods (LoRA...), which its checkpoints leave out: only then are the
    starting weights read again.
    """
    resuming = bool(cfg.get("resume"))
    if resuming and not build_finetune(cfg).adds_weights:
        return StartingWeights()
    init_checkpoint, init_run = init_source(cfg.init_from) if cfg.get("init_from") else (None, None)
    pretrained = None if init_checkpoint else resolve_pretrained(cfg.model, cfg.paths.data_dir)
    with open_dict(cfg):
        if init_run is not None:  # its tokenizer comes along: the saved config and the log name that one
            cfg.tokenizer = saved_config(init_run).tokenizer
        if pretrained is not None:  # the checkpoint fixes the architecture
            cfg.model.update(pretrained.model_overrides())
            cfg.model.pretrained = pretrained.source
        elif cfg.model.get("pretrained") and not resuming:
            cfg.model.pretrained = None  # auto found no weights: a resumed run must not find some later
    return StartingWeights(pretrained, init_checkpoint, init_run)


@dataclass
class SavedRun:
    """A run directory opened for generation, evaluation or export."""

    run_dir: Path
    cfg: DictConfig
    tokenizer: Tokenizer
    backbone: nn.Module
    checkpoint: Path
    saved: dict[str, Any]  # the checkpoint as read (task weights, data facts, base), so it is read once


def load_run(run_dir: str | Path, checkpoint: str = "best") -> SavedRun:
    """Open a run dir: its saved config and tokenizer, and the backbone with the chosen checkpoint's weights."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / "config.yaml").is_file():
        raise LmforgeError(f"{run_dir} is not a run directory (no config.yaml in it).")
    cfg = saved_config(run_dir)
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
    for name, tensor in list(state.items()):
        if name in own and own[name].shape != tensor.shape:
            if (grown := grown_vocabulary(backbone, tensor, own[name])) is not None:
                state[name] = grown
                continue
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
