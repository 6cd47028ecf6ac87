"""The original encoder-decoder Transformer (Vaswani et al., 2017): sinusoidal positions, post-norm blocks.

Every seq2seq backbone (this one, T5, the RNNs with attention) has the interface of
:class:`lmforge.models.backbone.Seq2SeqBackbone`, which the seq2seq task and :mod:`lmforge.generation` rely on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.models.backbone import Seq2SeqBackbone
from lmforge.models.copy import CopyHead
from lmforge.models.layers import Attention, BlockRunner, KVCache, attention_mask_for, memory_keys_values


def sinusoidal_positions(n_positions: int, d_model: int) -> torch.Tensor:
    """(n_positions, d_model) table: sine on even dimensions, cosine on odd ones, wavelengths up to 10000 * 2pi."""
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class FeedForward(nn.Module):
    """Position-wise feed-forward network: widen, ReLU, dropout, project back."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        # Dropout draws a random mask per element, which costs as much as a matmul's share on a CPU: skip it at 0.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C)."""
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))


class Sublayer(nn.Module):
    """A residual connection around a sublayer, with its LayerNorm after (post-norm) or before (pre-norm)."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        """``norm(x + sublayer(x))``, or ``x + sublayer(norm(x))`` when ``norm_first``."""
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention over the source, then the feed-forward network."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float, norm_first: bool,
                 attention_dropout: float, activation_dropout: float):  # fmt: skip
        super().__init__()
        self.self_attn = Attention(d_model, n_head, dropout=attention_dropout)
        self.ff = FeedForward(d_model, d_ff, activation_dropout)
        self.sublayers = nn.ModuleList(Sublayer(d_model, dropout, norm_first) for _ in range(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Map (B, S, C) source states to (B, S, C)."""
        x = self.sublayers[0](x, lambda h: self.self_attn(h, mask))
        return self.sublayers[1](x, self.ff)


class DecoderLayer(nn.Module):
    """Causal self-attention, attention over the encoder output, then the feed-forward network."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float, norm_first: bool,
                 attention_dropout: float, activation_dropout: float):  # fmt: skip
        super().__init__()
        self.self_attn = Attention(d_model, n_head, dropout=attention_dropout)
        self.cross_attn = Attention(d_model, n_head, dropout=attention_dropout)
        self.ff = FeedForward(d_model, d_ff, activation_dropout)
        self.sublayers = nn.ModuleList(Sublayer(d_model, dropout, norm_first) for _ in range(3))

    def forward(self, x, self_mask, memory_kv, memory_mask, cache=None) -> torch.Tensor:
        """Map (B, T, C) target states to (B, T, C), attending to the encoder's keys and values ``memory_kv``."""
        x = self.sublayers[0](x, lambda h: self.self_attn(h, self_mask, cache=cache))
        x = self.sublayers[1](x, lambda h: self.cross_attn(h, memory_mask, kv=memory_kv))
        return self.sublayers[2](x, self.ff)


class Transformer(BlockRunner, Seq2SeqBackbone):
    """Encoder-decoder Transformer with one embedding table shared by source, target and output (a joint vocabulary).

    Args:
        vocab_size: number of token ids (taken from the tokenizer).
        n_layer: encoder layers.
        n_decoder_layer: decoder layers (None: ``n_layer``).
        n_head: attention heads.
        d_model: model width.
        d_ff: feed-forward width.
        n_positions: longest source or target the position table covers.
        dropout: dropout on embeddings, attention weights, sublayer outputs and inside the feed-forward network.
        norm_first: pre-norm blocks (more stable for deep stacks) instead of the original post-norm.
        attention_dropout: dropout on the attention weights (None: ``dropout``). At 0 the attention
            runs the fused kernel, not the unfused one that dropout needs: a faster step on a CPU.
        activation_dropout: dropout inside the feed-forward network (None: ``dropout``).
        copy: a copy head (:mod:`lmforge.models.copy`): each output token may also be copied from the source.
    """

    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 6,
        n_decoder_layer: int | None = None,
        n_head: int = 8,
        d_model: int = 512,
        d_ff: int = 2048,
        n_positions: int = 512,
        dropout: float = 0.1,
        norm_first: bool = False,
        attention_dropout: float | None = None,
        activation_dropout: float | None = None,
        copy: bool = False,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = d_model
        self.n_positions = n_positions
        self.embed = nn.Embedding(vocab_size, d_model)
        self.register_buffer("positions", sinusoidal_positions(n_positions, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        activation_dropout = dropout if activation_dropout is None else activation_dropout
        block = (d_model, n_head, d_ff, dropout, norm_first, attention_dropout, activation_dropout)
        self.encoder = nn.ModuleList(EncoderLayer(*block) for _ in range(n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(*block) for _ in range(n_decoder_layer or n_layer))
        # Pre-norm stacks end with a LayerNorm; post-norm ones already end normalised.
        self.encoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.copy_head = CopyHead(d_model, d_model) if copy else None
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        # Embeddings are multiplied by sqrt(d_model), so they start at unit scale after it.
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The token embedding table (``embed``: source, target and output)."""
        return self.embed

    def _embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        end = start + ids.shape[1]
        if end > self.n_positions:
            raise ValueError(f"sequence of {end} tokens is longer than n_positions={self.n_positions}")
        return self.dropout(self.embed(ids) * math.sqrt(self.hidden_size) + self.positions[start:end])

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(B, S) source ids and mask -> (B, S, d_model) encoder output (and the source ids, with a copy head)."""
        x = self._embed(input_ids)
        mask = attention_mask_for(attention_mask, x.shape[1], x.shape[1], causal=False, device=x.device)
        for layer in self.encoder:
            x = self.run_block(layer, x, mask)
        memory = self.encoder_norm(x)
        return (memory, input_ids) if self.copy_head is not None else memory

    def new_cache(self) -> KVCache:
        """An empty cache for :meth:`decode`: decoder self-attention keys/values plus the encoder's, computed once."""
        return KVCache(len(self.decoder))

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, T, V) for the target so far, given :meth:`encode`'s output and the (B, S) mask
        (log-probabilities with a copy head)."""
        if self.copy_head is not None:
            memory, source_ids = memory
        past = cache.length if cache is not None else 0
        x = self._embed(decoder_input_ids, start=past)
        T = x.shape[1]
        self_mask = attention_mask_for(None, T, past + T, causal=True, device=x.device) if T > 1 else None
        cross_mask = None if memory_mask is None else memory_mask.bool()[:, None, None, :]
        for i, layer in enumerate(self.decoder):
            kv = memory_keys_values(layer.cross_attn, memory, cache, i)
            x = self.run_block(layer, x, self_mask, kv, cross_mask, cache.layers[i] if cache is not None else None)
        hidden = self.decoder_norm(x)
        logits = hidden @ self.embed.weight.T
        if self.copy_head is not None:
            return self.copy_head(logits, hidden, memory, memory_mask, source_ids)
        return logits
