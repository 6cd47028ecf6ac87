"""T5 (v1, the original ``t5-small`` family): an encoder-decoder with relative position buckets.

Implements the seq2seq backbone interface of :class:`lmforge.models.backbone.Seq2SeqBackbone`. The module
tree reproduces the parameter names of the public Hugging Face checkpoint (``shared``,
``encoder.block.0.layer.0.SelfAttention.q``, ``decoder.block.0.layer.1.EncDecAttention.o``,
``decoder.block.0.layer.2.DenseReluDense.wi``, ``encoder.final_layer_norm``, ``lm_head``), so its
state dict loads with ``load_state_dict`` once the aliases in :data:`HF_ALIASES` are dropped.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.models.backbone import Seq2SeqBackbone
from lmforge.models.copy import CopyHead
from lmforge.models.layers import Attention, BlockRunner, KVCache, LayerCache, attention_mask_for, memory_keys_values

# Keys of a Hugging Face T5 state dict that are other names for ``shared.weight``.
HF_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """Map key-minus-query offsets to T5's buckets: exact for small distances, log-spaced up to ``max_distance``.

    Args:
        relative_position: integer tensor of ``key_position - query_position``.
        bidirectional: encoder (keys on both sides, half the buckets each) or decoder
            (only keys at or before the query; later ones share bucket 0 and are masked anyway).
    Returns:
        a long tensor of the same shape with values in ``[0, num_buckets)``.
    """
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # clamp(min=1) only keeps log() finite where the exact branch is taken anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5LayerNorm(nn.Module):
    """Root-mean-square layer norm: no mean subtraction and no bias, a learned scale only; statistics in fp32."""

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (..., C) by its root mean square and scale."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(self.weight.dtype)


class T5Attention(Attention):
    """Unscaled, bias-free multi-head attention; the first self-attention of a stack also owns the position bias.

    Args:
        d_model: model width.
        n_head: heads.
        d_kv: width per head (``n_head * d_kv`` need not equal ``d_model``).
        dropout: dropout on the attention weights.
        relative_bias: whether this layer owns ``relative_attention_bias`` (one scalar per bucket and head).
        bidirectional: encoder-style buckets (see :func:`relative_position_bucket`).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_kv: int,
        dropout: float,
        relative_bias: bool = False,
        bidirectional: bool = True,
        num_buckets: int = 32,
        max_distance: int = 128,
    ):
        super().__init__(d_model, n_head, head_dim=d_kv, dropout=dropout, bias=False, scaled=False)
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = num_buckets, max_distance
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, n_head)

    def position_bias(self, n_queries: int, n_keys: int) -> torch.Tensor:
        """(1, heads, n_queries, n_keys) score bias; the queries are the last ``n_queries`` of the key positions."""
        device = self.relative_attention_bias.weight.device
        queries = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
        keys = torch.arange(n_keys, device=device)[None, :]
        bucket = relative_position_bucket(keys - queries, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]


class T5LayerSelfAttention(nn.Module):
    """Pre-norm residual self-attention: ``x + dropout(attn(norm(x)))``."""

    def __init__(self, d_model: int, n_head: int, d_kv: int, dropout: float, eps: float, **bias_args):
        super().__init__()
        self.SelfAttention = T5Attention(d_model, n_head, d_kv, dropout, **bias_args)
        self.layer_norm = T5LayerNorm(d_model, eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C); ``bias`` is the additive position bias with the mask folded in."""
        return x + self.dropout(self.SelfAttention(self.layer_norm(x), bias, cache=cache))


class T5LayerCrossAttention(nn.Module):
    """Pre-norm residual attention over the encoder output (no position bias)."""

    def __init__(self, d_model: int, n_head: int, d_kv: int, dropout: float, eps: float):
        super().__init__()
        self.EncDecAttention = T5Attention(d_model, n_head, d_kv, dropout)
        self.layer_norm = T5LayerNorm(d_model, eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C), attending to the encoder keys and values ``memory_kv``."""
        return x + self.dropout(self.EncDecAttention(self.layer_norm(x), mask, kv=memory_kv))


class T5DenseReluDense(nn.Module):
    """T5 v1 feed-forward network: widen (``wi``), ReLU, dropout, project back (``wo``); no biases."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C)."""
        return self.wo(self.dropout(torch.relu(self.wi(x))))


class T5LayerFF(nn.Module):
    """Pre-norm residual feed-forward network."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, eps: float):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(d_model, d_ff, dropout)
        self.layer_norm = T5LayerNorm(d_model, eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C)."""
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    """``layer``: self-attention, then (decoder only) cross-attention, then the feed-forward network."""

    def __init__(
        self, d_model: int, n_head: int, d_kv: int, d_ff: int, dropout: float, eps: float, is_decoder: bool, **bias_args
    ):
        super().__init__()
        layers: list[nn.Module] = [
            T5LayerSelfAttention(d_model, n_head, d_kv, dropout, eps, bidirectional=not is_decoder, **bias_args)
        ]
        if is_decoder:
            layers.append(T5LayerCrossAttention(d_model, n_head, d_kv, dropout, eps))
        layers.append(T5LayerFF(d_model, d_ff, dropout, eps))
        self.layer = nn.ModuleList(layers)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C); ``memory_kv`` and ``memory_mask`` are used by decoder blocks only."""
        x = self.layer[0](x, bias, cache)
        if len(self.layer) == 3:
            x = self.layer[1](x, memory_kv, memory_mask)
        return self.layer[-1](x)


class T5Stack(BlockRunner, nn.Module):
    """The encoder or the decoder: blocks sharing the first block's position bias, then a final norm.

    Args:
        n_layer: blocks.
        is_decoder: causal self-attention with one-sided buckets, plus cross-attention.
        num_buckets, max_distance: relative position buckets (see :func:`relative_position_bucket`).
    """

    def __init__(
        self,
        n_layer: int,
        d_model: int,
        n_head: int,
        d_kv: int,
        d_ff: int,
        dropout: float,
        eps: float,
        is_decoder: bool,
        num_buckets: int,
        max_distance: int,
    ):
        super().__init__()
        self.is_decoder = is_decoder
        self.block = nn.ModuleList(
            T5Block(
                d_model, n_head, d_kv, d_ff, dropout, eps, is_decoder,
                relative_bias=i == 0, num_buckets=num_buckets, max_distance=max_distance,
            )
            for i in range(n_layer)
        )  # fmt: skip
        self.final_layer_norm = T5LayerNorm(d_model, eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Run the blocks over embedded tokens.

        Args:
            x: (B, T, C) token embeddings; with a cache, of the tokens it has not seen.
            key_mask: optional (B, T), 1 for real tokens and 0 for padding (the encoder's source mask).
            memory_kv: per decoder block, the encoder keys and values.
            memory_mask: boolean mask over the encoder positions, broadcastable to (B, 1, T, S).
            cache: decoder self-attention cache, extended in place.
        Returns:
            (B, T, C) states after the final norm.
        """
        T = x.shape[1]
        n_keys = T + (cache.length if cache is not None else 0)
        bias = self.block[0].layer[0].SelfAttention.position_bias(T, n_keys)
        mask = attention_mask_for(key_mask, T, n_keys, causal=self.is_decoder, device=x.device)
        if mask is not None:
            # attention_mask_for keeps every query's own position, so no row becomes all -inf.
            bias = torch.where(mask, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))
        x = self.dropout(x)
        for i, block in enumerate(self.block):
            kv = memory_kv[i] if memory_kv is not None else None
            x = self.run_block(block, x, bias, kv, memory_mask, cache.layers[i] if cache is not None else None)
        return self.dropout(self.final_layer_norm(x))


class T5(Seq2SeqBackbone):
    """T5 v1 encoder-decoder: one embedding table for source, target and (scaled, tied) output head.

    Args:
        vocab_size: number of token ids (taken from the tokenizer).
        n_layer: encoder blocks.
        n_decoder_layer: decoder blocks (None: ``n_layer``).
        n_head: attention heads.
        d_model: model width.
        d_kv: width per head.
        d_ff: feed-forward width.
        relative_attention_num_buckets: position buckets per stack.
        relative_attention_max_distance: distance beyond which all offsets share a bucket.
        dropout: dropout on embeddings, attention weights, sublayer outputs, inside the
            feed-forward network and after each stack's final norm.
        layer_norm_epsilon: epsilon of the RMS norms.
        n_positions: longest sequence the rest of the pipeline should feed it; T5 has no
            position table, so this is a limit for data settings, not an architectural one.
        copy: a copy head (:mod:`lmforge.models.copy`): each output token may also be copied from the
            source. Its weights are new: a public checkpoint loads without them, and the run cannot be
            exported to ``transformers``' T5.
    """

    supports_prompt = True  # read by the encoder

    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 6,
        n_decoder_layer: int | None = None,
        n_head: int = 8,
        d_model: int = 512,
        d_kv: int = 64,
        d_ff: int = 2048,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        dropout: float = 0.1,
        layer_norm_epsilon: float = 1e-6,
        n_positions: int = 512,
        copy: bool = False,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = d_model
        self.n_positions = n_positions
        self.shared = nn.Embedding(vocab_size, d_model)
        stack_args = dict(
            d_model=d_model,
            n_head=n_head,
            d_kv=d_kv,
            d_ff=d_ff,
            dropout=dropout,
            eps=layer_norm_epsilon,
            num_buckets=relative_attention_num_buckets,
            max_distance=relative_attention_max_distance,
        )
        self.encoder = T5Stack(n_layer, is_decoder=False, **stack_args)
        self.decoder = T5Stack(n_decoder_layer or n_layer, is_decoder=True, **stack_args)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.shared.weight  # tied, as in T5 v1
        self.copy_head = CopyHead(d_model, d_model) if copy else None
        self._init_weights(d_model, n_head, d_kv, d_ff)

    def _init_weights(self, d_model: int, n_head: int, d_kv: int, d_ff: int) -> None:
        # Mesh TensorFlow's initialisation (as in Hugging Face, initializer_factor 1): unscaled
        # attention relies on the query std absorbing 1/sqrt(d_kv).
        nn.init.normal_(self.shared.weight, std=1.0)
        for module in self.modules():
            if isinstance(module, T5LayerNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, T5DenseReluDense):
                nn.init.normal_(module.wi.weight, std=d_model**-0.5)
                nn.init.normal_(module.wo.weight, std=d_ff**-0.5)
            elif isinstance(module, T5Attention):
                nn.init.normal_(module.q.weight, std=(d_model * d_kv) ** -0.5)
                nn.init.normal_(module.k.weight, std=d_model**-0.5)
                nn.init.normal_(module.v.weight, std=d_model**-0.5)
                nn.init.normal_(module.o.weight, std=(n_head * d_kv) ** -0.5)
                if hasattr(module, "relative_attention_bias"):
                    nn.init.normal_(module.relative_attention_bias.weight, std=d_model**-0.5)

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The token embedding table (``shared``: source, target and the tied head)."""
        return self.shared

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(B, S) source ids and mask -> (B, S, d_model) encoder output (and the source ids, with a copy head).

        A soft prompt is encoded with the source; the decoder sees the source positions only.
        """
        x, mask = self.prepend_prompt(self.shared(input_ids), attention_mask)
        memory = self.drop_prompt(self.encoder(x, mask))
        return (memory, input_ids) if self.copy_head is not None else memory

    def new_cache(self) -> KVCache:
        """An empty cache for :meth:`decode`: decoder self-attention keys/values plus the encoder's, computed once."""
        return KVCache(len(self.decoder.block))

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, T, V) for the target so far (log-probabilities with a copy head), given
        :meth:`encode`'s output and the (B, S) source mask.

        With a cache, the position bias covers the new queries at ``past .. past + T`` against
        keys ``0 .. past + T``, so step-by-step decoding matches decoding the whole target.
        """
        if self.copy_head is not None:
            memory, source_ids = memory
        kv = [
            memory_keys_values(b.layer[1].EncDecAttention, memory, cache, i) for i, b in enumerate(self.decoder.block)
        ]
        cross_mask = None if memory_mask is None else memory_mask.bool()[:, None, None, :]
        x = self.decoder(self.shared(decoder_input_ids), None, kv, cross_mask, cache)
        # The tied head sees states rescaled by d_model**-0.5, since the embedding has unit scale.
        logits = self.lm_head(x * self.hidden_size**-0.5)
        if self.copy_head is not None:
            return self.copy_head(logits, x, memory, memory_mask, source_ids)
        return logits
