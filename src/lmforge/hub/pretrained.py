"""``model.pretrained``: find a Hugging Face checkpoint, read its weights and tokenizer, load it into a task.

``model.pretrained`` is a folder (config.json + safetensors or .bin), a hub id, ``auto`` (the
model config's ``hub_id``: a copy under ``<data_dir>/models/<name>``, else the hub when it can
be reached, else training from scratch with one log line), ``required`` (as auto, but no
weights is an error), or null (from scratch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tokenizers import Tokenizer
from torch import nn

from lmforge.data.tokenizers import gpt2_tokenizer, load_tokenizer, wordpiece_tokenizer
from lmforge.errors import LmforgeError
from lmforge.hub.network import hub_reachable
from lmforge.models.backbone import grown_vocabulary
from lmforge.models.hf_config_fields import unclassified_fields
from lmforge.models.pretrained import (
    Family,
    backbone_kwargs,
    family_of_backbone,
    family_of_config,
    head_kind,
    import_state,
    read_hf_folder,
)
from lmforge.rundirs.checkpoints import group_names

log = logging.getLogger("lmforge")

AUTO, REQUIRED = "auto", "required"
# What is fetched of a hub repository: the config, one weights format, the tokenizer files.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt")


@dataclass
class PretrainedWeights:
    """A Hugging Face checkpoint read for one run.

    Args:
        source: what ``model.pretrained`` resolved to (a folder), recorded in the run's config.
        family: the model family it belongs to.
        config: its config.json.
        state: its tensors under lmforge task names (``backbone.*``, ``head.*``).
        unused: Hugging Face names with no lmforge counterpart.
        tokenizer: the checkpoint's own tokenizer, when the folder has one.
    """

    source: str
    family: Family
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    unused: list[str]
    tokenizer: Tokenizer | None

    def model_overrides(self) -> dict[str, Any]:
        """The backbone constructor arguments the checkpoint fixes (its architecture and vocabulary size).

        A config.json value lmforge's backbone would compute differently is refused in one sentence.
        """
        return backbone_kwargs(self.family, self.config)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Fail in one sentence when the run's tokenizer has ids the checkpoint's embeddings do not cover.

        Special tokens added on top of its vocabulary (a chat template's) are not counted: their rows are new.
        """
        if tokenizer.get_vocab_size(with_added_tokens=False) > self.config["vocab_size"]:
            raise LmforgeError(
                f"The tokenizer has {tokenizer.get_vocab_size():,} tokens but the checkpoint {self.source} was "
                f"trained with {self.config['vocab_size']:,}; use the checkpoint's own tokenizer (its tokenizer.json)."
            )

    def load_into(self, task: nn.Module) -> str:
        """Copy the checkpoint into a task's backbone (and head, where names and shapes fit); return one log line."""
        own = task.state_dict()
        state = dict(self.state)
        for name, tensor in self.state.items():  # a vocabulary grown by a chat template's special tokens
            if name.startswith("backbone.") and name in own and own[name].shape != tensor.shape:
                grown = grown_vocabulary(task.backbone, tensor, own[name])
                state[name] = tensor if grown is None else grown
        fits = {n: t for n, t in state.items() if n in own and own[n].shape == t.shape}
        # A head of another kind may have the right shape (a 2-class classifier, a start/end head): leave it out.
        saved_as = set(self.config.get("architectures") or [])
        kind = head_kind(task)
        wanted = self.family.architectures.get(kind)
        if kind is not None and wanted not in saved_as and saved_as & set(self.family.architectures.values()):
            fits = {n: t for n, t in fits.items() if not n.startswith("head.")}
        for name, tensor in state.items():
            if name.startswith("backbone.") and name in own and name not in fits:
                raise LmforgeError(
                    f"{name} is {tuple(tensor.shape)} in {self.source} but {tuple(own[name].shape)} in this model."
                )
        task.load_state_dict(fits, strict=False)
        head = sum(n.startswith("head.") for n in fits)
        loaded = {own[n].data_ptr() for n in fits}  # tied tensors (an output head) come with what they alias
        fresh = [n for n in own if n not in fits and own[n].data_ptr() not in loaded]
        unused = self.unused + [n for n in self.state if n not in fits]
        return (
            f"pretrained weights from {self.source}: loaded {len(fits) - head} backbone and {head} head tensors; "
            f"newly initialised: {group_names(fresh)}; not used from the checkpoint: {group_names(unused)}"
        )


def _download(hub_id: str) -> Path:
    """Fetch config, weights (safetensors if the repository has them) and tokenizer files of a hub model."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = HfApi().list_repo_files(hub_id)
        weights = [f for f in files if f.endswith(".safetensors")] or [
            f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")
        ]
        wanted = ["config.json", *weights, *(f for f in files if f in _TOKENIZER_FILES)]
        return Path(snapshot_download(hub_id, allow_patterns=wanted))
    except Exception as err:  # network, authentication and missing-repository errors
        raise LmforgeError(f"Cannot fetch {hub_id} from the Hugging Face hub ({type(err).__name__}).") from err


def folder_tokenizer(folder: Path) -> Tokenizer | None:
    """The tokenizer a checkpoint folder ships: tokenizer.json, a BERT vocab.txt, or GPT-2's vocab.json + merges.txt."""
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder / "tokenizer.json")
    if (folder / "vocab.txt").is_file():
        return wordpiece_tokenizer(vocab_file=str(folder / "vocab.txt"))
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return gpt2_tokenizer(local_dir=str(folder))
    return None


def _locate(model_cfg: DictConfig, data_dir: str | None) -> Path | None:
    """The folder ``model.pretrained`` names; None where ``auto`` finds no weights."""
    spec = str(model_cfg.pretrained)
    if spec not in (AUTO, REQUIRED):
        path = Path(spec).expanduser()
        if path.is_dir():
            return path.resolve()
        if hub_reachable():
            return _download(spec)
        raise LmforgeError(
            f"model.pretrained={spec} is not a folder here, and the Hugging Face hub cannot be reached to fetch it."
        )
    hub_id = model_cfg.get("hub_id")
    local = Path(data_dir) / "models" / hub_id.split("/")[-1] if data_dir and hub_id else None
    if local is not None and (local / "config.json").is_file():
        return local
    if hub_id and hub_reachable():
        return _download(hub_id)
    where = f"no copy in {local}" if local else "no local data mirror"
    reason = f"{where}, and the hub ({hub_id}) cannot be reached" if hub_id else "the model names no hub_id"
    if spec == REQUIRED:
        raise LmforgeError(f"model.pretrained=required, but {model_cfg.name} has no weights available: {reason}.")
    log.info("model %s: no pretrained weights (%s); training from scratch", model_cfg.name, reason)
    return None


def resolve_pretrained(model_cfg: DictConfig, data_dir: str | None) -> PretrainedWeights | None:
    """Read the checkpoint ``model.pretrained`` names (None when there is none to read)."""
    if not model_cfg.get("pretrained"):
        return None
    family = family_of_backbone(model_cfg._target_)
    if family is None:
        raise LmforgeError(
            f"model.pretrained: model {model_cfg.name} has no public checkpoint format; "
            f"lmforge reads GPT-2, BERT and T5 checkpoints (model=gpt2, bert-base, t5-small and their sizes)."
        )
    folder = _locate(model_cfg, data_dir)
    if folder is None:
        return None
    config, hf_state = read_hf_folder(folder)
    found = family_of_config(config, str(folder))
    if found is not family:
        raise LmforgeError(
            f"{folder} holds a {found.model_type} model, but model={model_cfg.name} is a {family.model_type} "
            f"backbone; pick the model config of that family."
        )
    state, unused = import_state(family, hf_state)
    unknown = unclassified_fields(family.model_type, config)
    if unknown:  # lmforge cannot vouch for what they do
        log.warning("%s: config.json fields lmforge does not know, ignored: %s", folder, ", ".join(unknown))
    return PretrainedWeights(str(folder), family, config, state, unused, folder_tokenizer(folder))
