"""``finetune=``: which weights of a built backbone train.

``full`` trains everything; ``freeze`` fixes the embeddings, the first k blocks or the whole
backbone; ``lora``, ``adalora`` and ``ia3`` add ``peft``'s adapters to the modules the model
config's ``targets`` name (the base weights freeze); ``adapter`` adds bottleneck adapters after
the attention and feed-forward outputs; ``prefix`` and ``prompt`` (written here: ``peft``'s
versions need a ``transformers`` model) learn keys and values before each attention layer's, or
input vectors before the tokens. The task's head always trains. A method acts on the
backbone in place, after its starting weights are loaded.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Iterator

import pytorch_lightning as pl
import torch
from torch import nn

from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge")


def _pattern(targets: dict[str, str] | None, groups: Iterable[str], model: str) -> str:
    """One regular expression over module names for the chosen target groups of a model config."""
    groups = list(groups)
    missing = [g for g in groups if not (targets or {}).get(g)]
    if missing:
        raise LmforgeError(
            f"Model {model} names no model.targets.{missing[0]}, which this finetune method needs "
            f"(module-name patterns; LoRA-style methods serve the Transformer backbones)."
        )
    return "|".join(f"(?:{targets[g]})" for g in groups)


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted) of ``root`` is."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


class FinetuneMethod:
    """Base class: a method freezes or wraps parts of a backbone; ``full`` leaves it as it is.

    Attributes:
        adds_weights: the method adds new tensors beside frozen base weights, so checkpoints may
            leave the base out (it is reloaded from where the run started).
        mergeable: the added weights fold back into the base ones (for export).
    """

    name = "full"
    adds_weights = False
    mergeable = True

    def apply(self, backbone: nn.Module, targets: dict[str, str] | None, model: str) -> None:
        """Change which parameters of ``backbone`` train (in place)."""

    def merge(self, backbone: nn.Module) -> None:
        """Fold added weights into the base ones, leaving a plain backbone with its original names."""

    def callbacks(self) -> list[pl.Callback]:
        """Lightning callbacks the method needs during training."""
        return []


class Full(FinetuneMethod):
    """Every parameter trains (the default)."""


class Freeze(FinetuneMethod):
    """Fix parts of the backbone: its embeddings, its first ``layers`` blocks, or all of it (the head alone trains).

    Args:
        embeddings: freeze the token (and position) embeddings.
        layers: freeze the first this many blocks.
        backbone: freeze the whole backbone.
    """

    name = "freeze"

    def __init__(self, embeddings: bool = True, layers: int = 0, backbone: bool = False):
        self.embeddings, self.layers, self.whole = embeddings, layers, backbone

    def apply(self, backbone: nn.Module, targets: dict[str, str] | None, model: str) -> None:
        """Set ``requires_grad=False`` on the chosen parameters."""
        if self.whole:
            backbone.requires_grad_(False)
            return
        embeddings = _pattern(targets, ["embeddings"], model) if self.embeddings else None
        blocks = _pattern(targets, ["blocks"], model) if self.layers else None
        for name, module in backbone.named_modules():
            if embeddings and re.fullmatch(embeddings, name):
                module.requires_grad_(False)
            block = re.fullmatch(rf"(?:{blocks})\.(\d+)", name) if blocks else None
            if block and int(block.group(block.lastindex)) < self.layers:
                module.requires_grad_(False)


class _PeftMethod(FinetuneMethod):
    """Shared by the methods that ``peft`` injects into a plain module."""

    adds_weights = True

    def __init__(self, modules: Iterable[str]):
        self.modules = list(modules)

    def config(self, pattern: str, targets: dict[str, str], model: str):
        raise NotImplementedError

    def apply(self, backbone: nn.Module, targets: dict[str, str] | None, model: str) -> None:
        """Inject the adapters into the target modules; everything else in the backbone freezes."""
        from peft import inject_adapter_in_model

        pattern = _pattern(targets, self.modules, model)
        if not any(re.fullmatch(pattern, name) for name, _ in backbone.named_modules()):
            raise LmforgeError(f"model.targets of {model} match no module of the backbone: {pattern}.")
        inject_adapter_in_model(self.config(pattern, targets, model), backbone)

    def merge(self, backbone: nn.Module) -> None:
        """Merge every adapter into its base layer and put the base layer back in its place."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(backbone.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                _replace_module(backbone, name, module.get_base_layer())


class LoRA(_PeftMethod):
    """Low-rank adapters (``peft.LoraConfig``) on the target modules.

    Args:
        r: rank of the update.
        alpha: scale of the update is ``alpha / r``.
        dropout: dropout on the adapter's input.
        modules: target groups of the model config (``attention``, ``feedforward``).
    """

    name = "lora"

    def __init__(self, r: int = 8, alpha: int = 16, dropout: float = 0.05, modules: Iterable[str] = ("attention",)):
        super().__init__(modules)
        self.r, self.alpha, self.dropout = r, alpha, dropout

    def config(self, pattern: str, targets: dict[str, str], model: str):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=pattern)


class IA3(_PeftMethod):
    """Learned rescaling of activations (``peft.IA3Config``): keys, values and the feed-forward inputs.

    Args:
        modules: target groups of the model config.
        feedforward: which of those groups are feed-forward layers (scaled on their input).
    """

    name = "ia3"

    def __init__(
        self, modules: Iterable[str] = ("attention", "feedforward"), feedforward: Iterable[str] = ("feedforward",)
    ):
        super().__init__(modules)
        self.feedforward = list(feedforward)

    def config(self, pattern: str, targets: dict[str, str], model: str):
        from peft import IA3Config

        return IA3Config(target_modules=pattern, feedforward_modules=_pattern(targets, self.feedforward, model))


class AdaLoRA(LoRA):
    """LoRA whose ranks are reallocated by importance during training (``peft.AdaLoraConfig``).

    Args:
        init_r: starting rank of every adapter.
        target_r: average rank the budget shrinks to.
        alpha, dropout, modules: as for :class:`LoRA`.
        total_steps: optimizer steps of the run (the schedule of the rank budget); set from trainer.max_steps.
        warmup_fraction, final_fraction: parts of the run before the budget shrinks and after it is final.
        interval: steps between reallocations.
    """

    name = "adalora"

    def __init__(
        self,
        init_r: int = 12,
        target_r: int = 4,
        alpha: int = 16,
        dropout: float = 0.05,
        modules: Iterable[str] = ("attention",),
        total_steps: int = 1000,
        warmup_fraction: float = 0.1,
        final_fraction: float = 0.2,
        interval: int = 10,
    ):
        super().__init__(init_r, alpha, dropout, modules)
        if total_steps <= 0:
            raise LmforgeError("finetune=adalora schedules its rank budget over trainer.max_steps; set it (> 0).")
        self.target_r, self.total_steps, self.interval = target_r, total_steps, interval
        self.tinit, self.tfinal = int(warmup_fraction * total_steps), int(final_fraction * total_steps)
        self.tuner = None

    def config(self, pattern: str, targets: dict[str, str], model: str):
        from peft import AdaLoraConfig

        return AdaLoraConfig(init_r=self.r, target_r=self.target_r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                             target_modules=pattern, total_step=self.total_steps, tinit=self.tinit,
                             tfinal=self.tfinal, deltaT=self.interval)  # fmt: skip

    def apply(self, backbone: nn.Module, targets: dict[str, str] | None, model: str) -> None:
        """Inject the adapters through ``AdaLoraModel``, which also owns the rank allocator."""
        from peft.tuners.adalora import AdaLoraModel

        pattern = _pattern(targets, self.modules, model)
        self.tuner = AdaLoraModel(backbone, self.config(pattern, targets, model), "default")

    def callbacks(self) -> list[pl.Callback]:
        """Reallocate ranks after each optimizer step, while its gradients are still there.

        (Lightning zeroes gradients between the next forward and backward passes: changing the
        ranks then would break that backward pass, so this runs at the end of the batch.)
        """
        method = self

        class ReallocateRanks(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if method.tuner is not None and any(
                    p.grad is not None for n, p in pl_module.named_parameters() if "lora_" in n
                ):
                    method.tuner.update_and_allocate(trainer.global_step - 1)  # the step just taken, from 0

        return [ReallocateRanks()]


class BottleneckAdapter(nn.Module):
    """A module followed by a residual bottleneck: ``y + up(gelu(down(y)))``, zero at the start.

    Args:
        module: the wrapped layer (an attention or feed-forward output projection).
        size: width of the bottleneck.
    """

    def __init__(self, module: nn.Linear, size: int):
        super().__init__()
        self.base_layer = module
        self.adapter_down = nn.Linear(module.out_features, size)
        self.adapter_up = nn.Linear(size, module.out_features)
        nn.init.zeros_(self.adapter_up.weight)  # the adapted model starts as the base model
        nn.init.zeros_(self.adapter_up.bias)

    enabled = True  # off: the base layer alone (a preference task's reference model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output plus the adapter's correction."""
        y = self.base_layer(x)
        if not self.enabled:
            return y
        return y + self.adapter_up(torch.nn.functional.gelu(self.adapter_down(y)))


class Adapter(FinetuneMethod):
    """Bottleneck adapters (Houlsby et al.) after the attention and feed-forward output projections.

    Args:
        size: bottleneck width.
        modules: target groups of the model config (``outputs``: the output projections).
    """

    name = "adapter"
    adds_weights = True
    mergeable = False

    def __init__(self, size: int = 64, modules: Iterable[str] = ("outputs",)):
        self.size, self.modules = size, list(modules)

    def apply(self, backbone: nn.Module, targets: dict[str, str] | None, model: str) -> None:
        """Freeze the backbone and wrap each target linear layer in a :class:`BottleneckAdapter`."""
        pattern = _pattern(targets, self.modules, model)
        chosen = [(n, m) for n, m in backbone.named_modules() if re.fullmatch(pattern, n) and isinstance(m, nn.Linear)]
        if not chosen:
            raise LmforgeError(f"model.targets of {model} match no linear layer of the backbone: {pattern}.")
        backbone.requires_grad_(False)
        for name, module in chosen:
            _replace_module(backbone, name, BottleneckAdapter(module, self.size))


class Prefix(FinetuneMethod):
    """Prefix tuning: learned keys and values before every self-attention layer's own; the backbone freezes.

    Args:
        length: prefix positions per layer.
        modules: target groups of the model config (``self_attention``).
    """

    name = "prefix"
    adds_weights = True
    mergeable = False

    def __init__(self, length: int = 16, modules: Iterable[str] = ("self_attention",)):
        self.length, self.modules = length, list(modules)

    def apply(self, backbone: nn.Module, targets: dict[str, str] | None, model: str) -> None:
        """Freeze the backbone and give each target attention layer a :class:`~lmforge.models.tuning.KVPrefix`."""
        from lmforge.models.tuning import PrefixableAttention

        pattern = _pattern(targets, self.modules, model)
        chosen = [
            m for n, m in backbone.named_modules() if re.fullmatch(pattern, n) and isinstance(m, PrefixableAttention)
        ]
        if not chosen:
            raise LmforgeError(f"model.targets of {model} match no attention layer that takes a prefix: {pattern}.")
        backbone.requires_grad_(False)
        for module in chosen:
            module.add_prefix(self.length)


class Prompt(FinetuneMethod):
    """Prompt tuning: learned input vectors before the tokens (the encoder's, for encoder-decoders).

    They start as the embeddings of random vocabulary tokens; the backbone freezes.

    Args:
        length: number of prompt vectors.
    """

    name = "prompt"
    adds_weights = True
    mergeable = False

    def __init__(self, length: int = 20):
        self.length = length

    def apply(self, backbone: nn.Module, targets: dict[str, str] | None, model: str) -> None:
        """Freeze the backbone and give it a :class:`~lmforge.models.tuning.SoftPrompt`."""
        from lmforge.models.backbone import Backbone
        from lmforge.models.tuning import SoftPrompt

        if not (isinstance(backbone, Backbone) and backbone.supports_prompt):
            raise LmforgeError(f"finetune=prompt needs a Transformer backbone (GPT, BERT, T5); {model} has no prompt.")
        embedding = backbone.word_embeddings
        rows = torch.randint(embedding.num_embeddings, (self.length,))
        backbone.requires_grad_(False)
        backbone.set_prompt(SoftPrompt(embedding.weight.detach()[rows]))


def describe_trainable(task: nn.Module) -> str:
    """Trainable and total parameters of a task, as one log line."""
    total = sum(p.numel() for p in task.parameters())
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"


@contextlib.contextmanager
def added_weights_off(backbone: nn.Module) -> Iterator[None]:
    """Run the block with the weights a finetune= method added switched off (LoRA, AdaLoRA, IA3, adapters,
    prefixes, a soft prompt): the backbone computes what its frozen base computes, without a second copy."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft_layers = [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]
    adapters = [m for m in backbone.modules() if isinstance(m, BottleneckAdapter)]
    prefixed = [(m, m.prefix) for m in backbone.modules() if getattr(m, "prefix", None) is not None]
    prompt = getattr(backbone, "prompt", None)

    def switch(on: bool) -> None:
        for layer in peft_layers:
            layer.enable_adapters(on)
        for adapter in adapters:
            adapter.enabled = on
        for attention, prefix in prefixed:
            attention.prefix = prefix if on else None
        if prompt is not None:
            backbone.prompt = prompt if on else None

    switch(False)
    try:
        yield
    finally:
        switch(True)
