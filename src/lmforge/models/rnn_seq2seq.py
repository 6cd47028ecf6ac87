"""Recurrent encoder-decoders with attention (Bahdanau et al., 2015; Luong et al., 2015).

A (bi)directional LSTM or GRU reads the source; a unidirectional one of the same cell writes
the target, starting from a learned projection of the encoder's final states. At every step
the decoder's output attends over the encoder outputs, and the context and that output make
the attentional vector, which predicts the next token and is fed back with the next input
(Luong's input feeding). The backbone has the seq2seq interface of
:class:`lmforge.models.backbone.Seq2SeqBackbone`.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.backbone import Seq2SeqBackbone
from lmforge.models.copy import CopyHead
from lmforge.models.rnn import check_cell, real_tokens_first, recurrent_layers, restore_order, run_packed


class AdditiveAttention(nn.Module):
    """Bahdanau's score ``v^T tanh(W_q q + W_k k)``: a one-hidden-layer MLP over query and key.

    Args:
        query_size: width of the decoder states that ask.
        key_size: width of the encoder outputs.
        attention_size: width of the hidden layer.
    """

    def __init__(self, query_size: int, key_size: int, attention_size: int):
        super().__init__()
        self.query = nn.Linear(query_size, attention_size, bias=False)
        self.key = nn.Linear(key_size, attention_size)
        self.score = nn.Linear(attention_size, 1, bias=False)

    def project_keys(self, states: torch.Tensor) -> torch.Tensor:
        """(B, S, key_size) encoder outputs -> (B, S, attention_size) keys (once per source)."""
        return self.key(states)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, query_size) query and projected keys -> (B, S) unnormalised scores."""
        return self.score(torch.tanh(keys + self.query(query)[:, None])).squeeze(-1)


class DotAttention(nn.Module):
    """Luong's "general" score ``q^T W k``, divided by sqrt(query_size).

    Args:
        query_size: width of the decoder states that ask.
        key_size: width of the encoder outputs.
    """

    def __init__(self, query_size: int, key_size: int):
        super().__init__()
        self.key = nn.Linear(key_size, query_size, bias=False)
        # Unscaled dot products of wide states saturate the softmax early in training.
        self.scale = query_size**-0.5

    def project_keys(self, states: torch.Tensor) -> torch.Tensor:
        """(B, S, key_size) encoder outputs -> (B, S, query_size) keys (once per source)."""
        return self.key(states)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, query_size) query and projected keys -> (B, S) unnormalised scores."""
        return torch.bmm(keys, query[:, :, None]).squeeze(-1) * self.scale


ATTENTIONS = ("additive", "dot")


def make_attention(attention: str, width: int) -> AdditiveAttention | DotAttention:
    """The score of ``attention`` (one of :data:`ATTENTIONS`) between decoder states and encoder outputs, both ``width`` wide."""
    return AdditiveAttention(width, width, width) if attention == "additive" else DotAttention(width, width)


def attend(scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of (B, S) scores over the real positions of ``mask``; returns the (B, C) context and the weights.

    Padding gets exactly zero weight. A source with no real token at all gets uniform weights
    rather than NaN.
    """
    scores = scores.float()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(-1).to(values.dtype)
    return torch.bmm(weights[:, None], values).squeeze(1), weights


class RNNDecoderCache:
    """Where :meth:`RNNSeq2Seq.decode` stopped: the recurrent state and the last attentional vector.

    ``state`` is the decoder's hidden state (``(h,)`` for a GRU, ``(h, c)`` for an LSTM), each
    (B, layers, hidden); ``feed`` is the (B, hidden) attentional vector that goes in with the
    next token. Both are None until the first call.
    """

    def __init__(self) -> None:
        self.state: tuple[torch.Tensor, ...] | None = None
        self.feed: torch.Tensor | None = None
        self._length = 0

    @property
    def length(self) -> int:
        """Number of target tokens already consumed."""
        return self._length

    def update(self, state: tuple[torch.Tensor, ...], feed: torch.Tensor, n_tokens: int) -> None:
        """Keep the state after ``n_tokens`` more tokens."""
        self.state, self.feed = state, feed
        self._length += n_tokens

    def reorder(self, index: torch.Tensor, same_source: bool = False) -> None:
        """Keep (and repeat) the batch rows in ``index``: beam search follows its surviving beams.

        ``same_source`` is accepted for the interface of :class:`lmforge.models.layers.KVCache`; the
        recurrent state is reordered either way.
        """
        if self.state is not None:
            self.state = tuple(s.index_select(0, index) for s in self.state)
            self.feed = self.feed.index_select(0, index)


class RNNSeq2Seq(Seq2SeqBackbone):
    """LSTM or GRU encoder-decoder with attention; one embedding table for source and target (a joint vocabulary).

    The decoder is as wide as the encoder's output (``hidden_size`` times the number of
    directions), which is also ``self.hidden_size``. The output layer reuses the embedding
    table, through a projection from the decoder width to ``embedding_size``.

    Args:
        vocab_size: number of token ids (taken from the tokenizer).
        cell: ``lstm`` or ``gru``, for both encoder and decoder.
        n_layer: stacked recurrent layers, in the encoder and in the decoder.
        hidden_size: encoder state width per direction.
        embedding_size: width of the token embeddings.
        bidirectional: the encoder reads right-to-left as well.
        attention: ``additive`` (Bahdanau's MLP score) or ``dot`` (Luong's general score, scaled).
        dropout: dropout on the embeddings, between stacked layers and on the attentional vectors.
        n_positions: longest source or target the tasks and generation will pass (recurrent
            layers have no table to outgrow; it is the limit other code reads and reports).
        copy: a copy head (:mod:`lmforge.models.copy`): each output token may also be copied from the source.
    """

    def __init__(
        self,
        vocab_size: int,
        cell: str = "lstm",
        n_layer: int = 1,
        hidden_size: int = 256,
        embedding_size: int = 256,
        bidirectional: bool = True,
        attention: str = "additive",
        dropout: float = 0.0,
        n_positions: int = 512,
        copy: bool = False,
    ):
        super().__init__()
        check_cell(cell)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, not {attention!r}")
        self.vocab_size = vocab_size
        self.cell = cell
        self.n_layer = n_layer
        self.bidirectional = bidirectional
        self.embedding_size = embedding_size
        self.n_positions = n_positions
        width = hidden_size * (2 if bidirectional else 1)
        self.hidden_size = width  # the decoder's width
        self.embed = nn.Embedding(vocab_size, embedding_size)
        self.dropout = nn.Dropout(dropout)
        self.encoder = recurrent_layers(cell, embedding_size, hidden_size, n_layer, bidirectional, dropout)
        # One projection per state tensor (h, and c for an LSTM), shared by the layers.
        self.bridge = nn.ModuleList(nn.Linear(width, width) for _ in range(2 if cell == "lstm" else 1))
        self.decoder = self._decoder_cells(cell, embedding_size, width, n_layer)
        self.attention = make_attention(attention, width)
        self.combine = nn.Linear(2 * width, width, bias=False)
        self.out_proj = nn.Linear(width, embedding_size, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))
        self.copy_head = CopyHead(width, width) if copy else None
        nn.init.normal_(self.embed.weight, std=0.1)

    @staticmethod
    def _decoder_cells(cell: str, embedding_size: int, width: int, n_layer: int) -> nn.ModuleList:
        """The decoder's layers, one step cell each; the first reads the token embedding and the previous
        attentional vector."""
        # Input feeding runs the decoder a step at a time, where cells are faster than a one-step nn.LSTM/GRU.
        step_cell = nn.LSTMCell if cell == "lstm" else nn.GRUCell
        return nn.ModuleList(step_cell(embedding_size + width if i == 0 else width, width) for i in range(n_layer))

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The token embedding table (``embed``: source, target and, through ``out_proj``, output)."""
        return self.embed

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Read the source.

        Args:
            input_ids: (B, S) source ids.
            attention_mask: (B, S), 1 for real tokens, 0 for padding (either side).
        Returns:
            the memory, all batch first: the (B, S, hidden) encoder outputs (zeros at padding),
            their (B, S, A) attention keys, the decoder's initial state, one (B, layers, hidden)
            tensor per state tensor (h, then c for an LSTM), and, with a copy head, the source ids.
        """
        order, lengths = real_tokens_first(input_ids, attention_mask)
        out, final = run_packed(self.encoder, self.dropout(self.embed(input_ids.gather(1, order))), lengths)
        outputs = restore_order(out, order)
        source = (input_ids,) if self.copy_head is not None else ()
        return (outputs, self.attention.project_keys(outputs), *self._initial_state(final), *source)

    def _initial_state(self, final: torch.Tensor | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The decoder's first state from the encoder's final one: per state tensor, (B, layers, hidden)."""
        initial = []
        for state, bridge in zip(final if isinstance(final, tuple) else (final,), self.bridge):
            B = state.shape[1]
            # (layers * directions, B, H) -> (B, layers, directions * H), both directions side by side
            state = state.view(self.n_layer, -1, B, state.shape[-1]).permute(2, 0, 1, 3).reshape(B, self.n_layer, -1)
            initial.append(torch.tanh(bridge(state)))
        return initial

    def new_cache(self) -> RNNDecoderCache:
        """An empty cache for :meth:`decode`: the decoder state, filled in by the first call."""
        return RNNDecoderCache()

    def decode_with_attention(
        self,
        decoder_input_ids: torch.Tensor,
        memory: tuple[torch.Tensor, ...],
        memory_mask: torch.Tensor | None = None,
        cache: RNNDecoderCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode`, also returning the (B, T, S) attention weights of each target token over the source."""
        if self.copy_head is not None:
            *memory, source_ids = memory
        values, keys, *initial = memory
        if cache is not None and cache.state is not None:
            state, feed = cache.state, cache.feed
        else:
            state, feed = tuple(initial), values.new_zeros(values.shape[0], self.hidden_size)
        layers = [tuple(s[:, i] for s in state) for i in range(self.n_layer)]  # per layer: (h,) or (h, c)
        mask = None if memory_mask is None else memory_mask.bool()
        x = self.dropout(self.embed(decoder_input_ids))
        attentional, weights = [], []
        # Input feeding makes each step depend on the last one's attentional vector: one step at a time.
        for t in range(x.shape[1]):
            h = torch.cat([x[:, t], feed], dim=-1)
            for i, step_cell in enumerate(self.decoder):
                out = step_cell(self.dropout(h) if i else h, layers[i] if self.cell == "lstm" else layers[i][0])
                layers[i] = out if isinstance(out, tuple) else (out,)
                h = layers[i][0]
            context, w = attend(self.attention.scores(h, keys), values, mask)
            feed = self.dropout(torch.tanh(self.combine(torch.cat([context, h], dim=-1))))
            attentional.append(feed)
            weights.append(w)
        if cache is not None:
            state = tuple(torch.stack([layer[k] for layer in layers], 1) for k in range(len(state)))
            cache.update(state, feed, x.shape[1])
        hidden = torch.stack(attentional, 1)
        logits = self.out_proj(hidden) @ self.embed.weight.T + self.out_bias
        if self.copy_head is not None:
            logits = self.copy_head(logits, hidden, values, memory_mask, source_ids)
        return logits, torch.stack(weights, 1)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory: tuple[torch.Tensor, ...],
        memory_mask: torch.Tensor | None = None,
        cache: RNNDecoderCache | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, T, V) for target tokens (log-probabilities with a copy head), given the memory
        from :meth:`encode` and the source mask (B, S).

        Without a cache the target runs from the initial state (teacher forcing); with one,
        ``decoder_input_ids`` are only the tokens it has not seen, and it is updated.
        """
        return self.decode_with_attention(decoder_input_ids, memory, memory_mask, cache)[0]
