"""Recurrent backbones: embeddings, then a stack of LSTM or GRU layers, one or both directions.

Padding is skipped with packed sequences, so a padded batch gives the same states as one
sentence at a time, whichever side the padding is on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lmforge.models.backbone import Backbone

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


def check_cell(cell: str) -> None:
    """Refuse a recurrent cell other than those of :data:`CELLS`."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}, not {cell!r}")


def recurrent_layers(
    cell: str, input_size: int, hidden_size: int, n_layer: int, bidirectional: bool, dropout: float
) -> nn.RNNBase:
    """A batch-first stack of ``n_layer`` LSTM or GRU layers, with ``dropout`` between them (none for one layer)."""
    return CELLS[cell](
        input_size,
        hidden_size,
        num_layers=n_layer,
        bidirectional=bidirectional,
        batch_first=True,
        dropout=dropout if n_layer > 1 else 0.0,
    )


def real_tokens_first(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, T) order that moves each row's real tokens to its front, and the (B,) row lengths (on the CPU).

    Packing wants real tokens first; the sort is stable, so they keep their order, and
    :func:`restore_order` puts the outputs back where their tokens came from.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    order = torch.sort(1 - attention_mask.long(), dim=1, stable=True).indices
    return order, attention_mask.sum(1).clamp(min=1).cpu()


def run_packed(rnn: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Run ``rnn`` over the real tokens of (B, T, E) inputs put in :func:`real_tokens_first` order.

    Returns the (B, T, H) outputs, zeros past each row's length, and the final states.
    """
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, final = rnn(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out, final


def restore_order(out: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, T, H) outputs of tokens in ``order`` (:func:`real_tokens_first`), put back in their tokens' places."""
    return torch.zeros_like(out).scatter(1, order[..., None].expand_as(out), out)


class RNN(Backbone):
    """An LSTM or GRU encoder over token embeddings.

    Args:
        vocab_size: number of token ids (taken from the tokenizer).
        cell: ``lstm`` or ``gru``.
        n_layer: stacked recurrent layers.
        hidden_size: state width per direction.
        embedding_size: width of the token embeddings.
        bidirectional: read right-to-left as well; the output width doubles.
        dropout: dropout on the embeddings, between layers and on the outputs.
    """

    kind = "rnn"

    def __init__(
        self,
        vocab_size: int,
        cell: str = "lstm",
        n_layer: int = 1,
        hidden_size: int = 256,
        embedding_size: int = 256,
        bidirectional: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_cell(cell)
        self.cell = cell
        self.bidirectional = bidirectional
        self.hidden_size = hidden_size * (2 if bidirectional else 1)  # width of what the heads see
        self.embedding_size = embedding_size
        self.embeddings = nn.Embedding(vocab_size, embedding_size)
        self.dropout = nn.Dropout(dropout)
        self.rnn = recurrent_layers(cell, embedding_size, hidden_size, n_layer, bidirectional, dropout)
        nn.init.normal_(self.embeddings.weight, std=0.1)

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The token embedding table (``embeddings``)."""
        return self.embeddings

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode a batch.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for real tokens, 0 for padding (either side).
            input_features: optional (B, T, embedding_size) added to the token embeddings (a tagger's
                character features, say).
        Returns:
            (B, T, hidden_size) outputs of the last layer (both directions concatenated);
            zeros at padding positions.
        """
        order, lengths = real_tokens_first(input_ids, attention_mask)
        x = self.embeddings(input_ids)
        if input_features is not None:
            x = x + input_features
        out, _ = run_packed(self.rnn, self.dropout(x.gather(1, order[..., None].expand_as(x))), lengths)
        return restore_order(self.dropout(out), order)

    forward = hidden_states

    def final_states(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last layer's final state of each direction, read from :meth:`hidden_states`' output.

        Forward: the output at the last real token; backward: the output at the first real token.
        """
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        real = attention_mask.bool()
        last = (real * positions).argmax(1)
        first = torch.where(real, positions, hidden.shape[1]).argmin(1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if not self.bidirectional:
            return hidden[rows, last]
        half = hidden.shape[-1] // 2
        return torch.cat([hidden[rows, last, :half], hidden[rows, first, half:]], dim=-1)
