"""The backbone contract: what every model in :mod:`lmforge.models` offers the tasks, generation and fine-tuning.

A backbone is the network without a task head. The tasks (:mod:`lmforge.tasks`) put their heads on it,
:mod:`lmforge.generation` decodes with it and :mod:`lmforge.finetune` freezes or extends it, all through
the members :class:`Backbone` declares, never through a particular model class.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lmforge.models.tuning import SoftPrompt

# What a backbone can be; tasks say which of these they train (``TaskModule.backbone_kinds``).
KINDS = ("encoder", "decoder", "seq2seq", "rnn", "reader")


def backbone_kind(model: Any) -> str | None:
    """The ``kind`` of a backbone class or instance, or None for anything that does not declare a valid one.

    Reads the class attribute, so a model config's ``_target_`` class answers without being built.
    """
    kind = getattr(model, "kind", None)
    return kind if kind in KINDS else None


class Backbone(nn.Module):
    """Base class of every backbone: the members below are all that tasks, generation and fine-tuning rely on.

    Class attributes (readable from the class, before anything is built):
        kind: ``"encoder"`` (bidirectional, BERT), ``"decoder"`` (causal, GPT), ``"seq2seq"``
            (encoder-decoder: Transformer, T5, RNNSeq2Seq; see :class:`Seq2SeqBackbone`), ``"rnn"``
            (recurrent encoder) or ``"reader"`` (reads a question and a context apart: BiDAF, for
            extractive question answering only).
        supports_prompt: finetune=prompt may give it a soft prompt (:meth:`set_prompt`).
        takes_token_type_ids: ``hidden_states`` takes ``token_type_ids`` (segment ids, BERT).
        takes_document_ids: ``hidden_states`` and ``forward`` take ``document_ids`` (packed rows: GPT, BERT).

    Attributes:
        hidden_size: width of the hidden states that task heads read.
        n_positions: longest sequence it takes, or None when it sets no limit of its own.
        pooler: a module that sums (B, T, hidden_size) hidden states up as (B, hidden_size) (BERT's
            [CLS] pooler), or None. A task that does not read it freezes it
            (:meth:`lmforge.tasks.base.TaskModule.attach_backbone`).
        prompt: the :class:`~lmforge.models.tuning.SoftPrompt` of finetune=prompt, or None.

    Hidden states (encoders, decoders, RNNs):
        ``hidden_states(input_ids, attention_mask=None, **extra) -> (B, T, hidden_size)``, with
        ``attention_mask`` 1 for real tokens and 0 for padding. The extras are ``cache`` (decoders),
        ``token_type_ids`` (when ``takes_token_type_ids``), ``input_features`` (RNNs: added to the
        word embeddings) and ``document_ids`` (when ``takes_document_ids``). ``forward`` is the same,
        except that a decoder's gives next-token logits (B, T, vocab) through its ``lm_head``.

    Packed rows (``document_ids``, (B, T) ints, see :mod:`lmforge.models.documents`):
        several documents share a row; each token attends only to tokens of its own document
        (earlier ones only, in a decoder) and positions restart at 0 at each document's start, so a
        document's hidden states are those it has alone in a row. Padding takes an id of its own
        (-1). Only without a cache and without a soft prompt: generation never passes them.

    Encoder-decoders: see :class:`Seq2SeqBackbone` (``encode``, ``decode``, ``forward``).

    Caches:
        :meth:`new_cache` gives an empty cache for decoding a token at a time (a decoder's
        ``forward(..., cache=)``, an encoder-decoder's ``decode(..., cache=)``), or None where the
        backbone cannot. A cache has ``length`` (the tokens it has seen) and
        ``reorder(index, same_source=False)`` (for beam search).

    Fine-tuning hooks:
        :attr:`word_embeddings` (the token embedding table), :meth:`set_prompt` with
        :meth:`prepend_prompt` / :meth:`drop_prompt` (where each backbone reads its soft prompt), and,
        for prefix tuning, its self-attention layers, which are
        :class:`~lmforge.models.tuning.PrefixableAttention`.
    """

    kind: ClassVar[str]
    supports_prompt: ClassVar[bool] = False
    takes_token_type_ids: ClassVar[bool] = False
    takes_document_ids: ClassVar[bool] = False

    hidden_size: int
    n_positions: int | None
    pooler: nn.Module | None
    prompt: SoftPrompt | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if backbone_kind(cls) is None:
            raise TypeError(f"{cls.__name__}.kind must be one of {', '.join(KINDS)}.")

    def __init__(self) -> None:
        super().__init__()
        # Instance attributes, not class ones: nn.Module keeps an assigned module in _modules, where a
        # class attribute of the same name would hide it.
        self.n_positions = None
        self.pooler = None
        self.prompt = None

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The token embedding table."""
        raise NotImplementedError(f"{type(self).__name__} does not say which table embeds its tokens")

    def new_cache(self) -> Any:
        """An empty cache for decoding a token at a time, or None when this backbone has none."""
        return None

    def set_prompt(self, prompt: SoftPrompt) -> None:
        """Read ``prompt``'s vectors before the tokens from now on (finetune=prompt)."""
        if not self.supports_prompt:
            raise TypeError(f"{type(self).__name__} takes no soft prompt")
        self.prompt = prompt

    def prepend_prompt(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, C) embeddings and their optional (B, T) key mask with the soft prompt in front; unchanged without one."""
        if self.prompt is None:
            return x, mask
        return self.prompt.prepend(x, mask)

    def drop_prompt(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P + T, C) states without the soft prompt's P positions; unchanged without a prompt."""
        return x if self.prompt is None else x[:, self.prompt.length :]


class Seq2SeqBackbone(Backbone):
    """An encoder-decoder: the seq2seq task and :mod:`lmforge.generation` rely on these members.

    - ``vocab_size``: the joint vocabulary of source and target;
    - :meth:`encode` returns the encoder output ("memory": a tensor, or a tuple of tensors, batch first);
    - :meth:`decode` returns (B, T, vocab) logits; with a cache from :meth:`new_cache`, only the target
      tokens it has not seen are passed;
    - :meth:`forward` is encode, then decode the whole target (teacher forcing).
    """

    kind = "seq2seq"
    vocab_size: int

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        """(B, S) source ids and mask -> the memory that :meth:`decode` reads."""
        raise NotImplementedError

    def decode(
        self, decoder_input_ids: torch.Tensor, memory: Any, memory_mask: torch.Tensor | None = None, cache: Any = None
    ) -> torch.Tensor:
        """Next-token logits (B, T, vocab) of the target so far, given the memory and the (B, S) source mask."""
        raise NotImplementedError

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, decoder_input_ids: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced logits (B, T, vocab) of the target given the whole source."""
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)


def grown_vocabulary(backbone: Backbone, saved: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    """``saved`` extended with ``own``'s extra rows when ``own`` is the token embedding table (or a head tied
    to it) and the run's tokenizer has more tokens than the checkpoint's (special tokens a chat template
    added): the checkpoint's tokens keep their vectors, the new ones their fresh initialisation. None otherwise."""
    if own.data_ptr() != backbone.word_embeddings.weight.data_ptr():
        return None
    if saved.shape[1:] != own.shape[1:] or saved.shape[0] >= own.shape[0]:
        return None
    return torch.cat([saved.to(own.dtype), own[saved.shape[0] :].detach()])
