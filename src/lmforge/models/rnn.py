"""Recurrent backbones: embeddings, then a stack of LSTM or GRU layers, one or both directions.

Padding is skipped with packed sequences, so a padded batch gives the same states as one
sentence at a time, whichever side the padding is on.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class RNN(nn.Module):
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
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, not {cell!r}")
        self.cell = cell
        self.bidirectional = bidirectional
        self.hidden_size = hidden_size * (2 if bidirectional else 1)  # width of what the heads see
        self.embedding_size = embedding_size
        self.embeddings = nn.Embedding(vocab_size, embedding_size)
        self.dropout = nn.Dropout(dropout)
        self.rnn = CELLS[cell](
            embedding_size,
            hidden_size,
            num_layers=n_layer,
            bidirectional=bidirectional,
            batch_first=True,
            dropout=dropout if n_layer > 1 else 0.0,
        )
        nn.init.normal_(self.embeddings.weight, std=0.1)

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
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Move real tokens to the front of each row (stable, so their order is kept), which is what
        # packing expects, and put the outputs back where their tokens came from afterwards.
        order = torch.sort(1 - attention_mask.long(), dim=1, stable=True).indices
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        x = self.embeddings(input_ids)
        if input_features is not None:
            x = x + input_features
        x = self.dropout(x.gather(1, order[..., None].expand_as(x)))
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=input_ids.shape[1])
        out = self.dropout(out)
        return torch.zeros_like(out).scatter(1, order[..., None].expand_as(out), out)

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
