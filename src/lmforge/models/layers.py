"""Transformer building blocks shared by the backbones.

Parameter names follow the public GPT-2 checkpoint (``c_attn``, ``c_proj``,
``c_fc``, ``ln_1``) so that a checkpoint maps onto them by a name table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.models.tuning import KVPrefix, PrefixableAttention


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2/BERT initialisation for ``Module.apply``: normal(0, std) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class BlockRunner:
    """Mixed into the module that loops over a stack of blocks: runs each block, recomputing its
    activations in the backward pass instead of keeping them when :attr:`activation_checkpointing` is on.

    Checkpointing trades about one extra forward pass per step for keeping only each block's input,
    which is what lets a long context or a big batch fit in memory. It applies only while training
    with gradients, so validation, generation and the KV cache are unchanged.
    """

    activation_checkpointing: bool = False

    def run_block(self, block: nn.Module, *args):
        """``block(*args)``, checkpointed when activation checkpointing is on and gradients are being recorded."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant: correct with frozen inputs (PEFT), DDP and nested autograd; dropout masks are replayed.
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Turn on activation checkpointing in every block stack of ``model``; returns how many stacks it found."""
    stacks = [m for m in model.modules() if isinstance(m, BlockRunner)]
    for stack in stacks:
        stack.activation_checkpointing = True
    return len(stacks)


class CausalSelfAttention(PrefixableAttention, nn.Module):
    """Multi-head self-attention with a causal mask and one fused q/k/v projection.

    Args:
        n_embd: model width.
        n_head: number of attention heads; must divide ``n_embd``.
        dropout: dropout on the attention weights and on the output.
        bias: whether the projections have biases.
        scale: factor of the attention scores (None: 1 / sqrt(head_dim)).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True, scale: float | None = None):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.dropout = dropout
        self.scale = scale
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.prefix: KVPrefix | None = None  # set by finetune=prefix

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """Attend over the sequence.

        Args:
            x: (B, T, C) hidden states of the new tokens.
            attention_mask: optional 1 for real tokens and 0 for padding: (B, T), or with a cache
                (B, past + T), covering the cached positions too; or a ready boolean (B, 1, T, T) mask,
                True where a query may attend (packed rows: :func:`~lmforge.models.documents.document_attention_mask`).
            cache: keys and values of earlier tokens; the new ones are appended to it.
        Returns:
            (B, T, C) hidden states.
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.append(k, v)  # (B, heads, past + T, head_dim)
        k, v, attention_mask = self.with_prefix(k, v, attention_mask, 1)
        dropout = self.dropout if self.training else 0.0
        if attention_mask is None and k.shape[2] == T:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.scale)
        else:
            mask = attention_mask
            if attention_mask is None or attention_mask.dim() == 2:  # a key mask: add the causal part
                mask = attention_mask_for(attention_mask, T, k.shape[2], causal=True, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class LayerCache:
    """Keys and values of the tokens one attention layer has already seen (for fast decoding)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Number of cached positions."""
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, heads, T, head_dim) keys and values; return all cached ones."""
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = torch.cat([self.keys, k], dim=2)
            self.values = torch.cat([self.values, v], dim=2)
        return self.keys, self.values

    def reorder(self, index: torch.Tensor) -> None:
        """Keep (and repeat) the batch rows in ``index``: beam search follows its surviving beams."""
        if self.keys is not None:
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)


class KVCache:
    """One :class:`LayerCache` per Transformer block.

    Encoder-decoders also keep, per block, the keys and values of the encoder output
    (``cross``): computed at the first decoding step, reused by every later one.
    """

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        # Cached positions that are not tokens (a soft prompt's), left out of ``length``.
        self.offset = 0

    @property
    def length(self) -> int:
        """Number of cached token positions."""
        return self.layers[0].length - self.offset

    def reorder(self, index: torch.Tensor, same_source: bool = False) -> None:
        """Keep (and repeat) the batch rows in ``index`` in every layer.

        ``same_source``: every row is replaced by a row of the same source (beam search after its
        first step), so the encoder's keys and values, identical across those rows, stay as they are.
        """
        for layer in self.layers:
            layer.reorder(index)
        if same_source:
            return
        self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for kv in self.cross]  # fmt: skip


def select_rows(value, index: torch.Tensor):
    """``index_select`` on dim 0 of a tensor, or of every tensor in a (nested) tuple or list; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index)
    return type(value)(select_rows(v, index) for v in value)


def memory_keys_values(
    attention: Attention, memory: torch.Tensor, cache: KVCache | None, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's keys and values of the encoder output: computed once per source with a cache
    (kept in ``cache.cross``), at every call without one."""
    if cache is None:
        return attention.keys_values(memory)
    if cache.cross[layer] is None:
        cache.cross[layer] = attention.keys_values(memory)
    return cache.cross[layer]


def attention_mask_for(
    key_mask: torch.Tensor | None, n_queries: int, n_keys: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """A boolean mask (True = may attend) for :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        key_mask: optional (B, n_keys), 1 for real tokens and 0 for padding.
        n_queries: number of new positions; they are the last ``n_queries`` of the keys.
        causal: whether a query may only see keys up to its own position.
    Returns:
        (B or 1, 1, n_queries, n_keys), or None when nothing is masked. Every query may
        attend to its own position, so a padding row never has all its keys masked (NaN).
    """
    if key_mask is None and not causal:
        return None
    past = n_keys - n_queries
    mask = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    if causal:
        mask = mask.tril(diagonal=past)
    mask = mask[None, None]
    if key_mask is not None:
        own = torch.zeros_like(mask[0, 0])
        if n_queries <= n_keys:
            own[:, past:] = torch.eye(n_queries, dtype=torch.bool, device=device)
        mask = (mask & key_mask.bool()[:, None, None, :]) | own
    return mask


class Attention(PrefixableAttention, nn.Module):
    """Multi-head attention with separate query, key, value and output projections (``q``, ``k``, ``v``, ``o``).

    Self-attention (keys from ``x``, appended to a cache when decoding) or cross-attention
    (keys and values from :meth:`keys_values` of the encoder output, passed as ``kv``).

    Args:
        d_model: model width.
        n_head: number of heads.
        head_dim: width per head (default ``d_model // n_head``; T5 sizes set it).
        dropout: dropout on the attention weights.
        bias: whether the projections have biases.
        scaled: divide scores by sqrt(head_dim) (T5 folds that into its initialisation instead).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        head_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        scaled: bool = True,
    ):
        super().__init__()
        if head_dim is None:
            if d_model % n_head:
                raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
            head_dim = d_model // n_head
        self.n_head, self.head_dim = n_head, head_dim
        self.dropout = dropout
        self.scale = None if scaled else 1.0
        inner = n_head * head_dim
        self.q = nn.Linear(d_model, inner, bias=bias)
        self.k = nn.Linear(d_model, inner, bias=bias)
        self.v = nn.Linear(d_model, inner, bias=bias)
        self.o = nn.Linear(inner, d_model, bias=bias)
        self.prefix: KVPrefix | None = None  # set by finetune=prefix (self-attention only)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project (B, S, C) states to (B, heads, S, head_dim) keys and values."""
        return self._heads(self.k(states)), self._heads(self.v(states))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """Attend from (B, T, C) queries.

        Args:
            mask: boolean (True = attend) or additive float mask broadcastable to (B, heads, T, S).
            kv: precomputed keys and values (cross-attention); None attends over ``x`` itself.
            cache: self-attention cache of earlier positions; the new keys and values are appended.
        Returns:
            (B, T, C) attention output, after the output projection.
        """
        q = self._heads(self.q(x))
        if kv is None:
            k, v = self.keys_values(x)
            if cache is not None:
                k, v = cache.append(k, v)
            k, v, mask = self.with_prefix(k, v, mask, True if mask is None or mask.dtype == torch.bool else 0.0)
        else:
            k, v = kv
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        B, _, T, _ = y.shape
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """Position-wise feed-forward network: widen (4x unless ``inner`` is given), GELU, project back."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True, inner: int | None = None):
        super().__init__()
        inner = inner or 4 * n_embd
        self.c_fc = nn.Linear(n_embd, inner, bias=bias)
        # GPT-2 was trained with the tanh approximation of GELU.
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(inner, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) hidden states to (B, T, C)."""
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class PreNormBlock(nn.Module):
    """A pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    ``eps`` is the LayerNorms' epsilon, ``scale`` the attention's (see :class:`CausalSelfAttention`),
    ``inner`` the MLP's width (see :class:`MLP`).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        dropout: float = 0.0,
        bias: bool = True,
        eps: float = 1e-5,
        scale: float | None = None,
        inner: int | None = None,
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, scale)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias, inner)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """Map (B, T, C) hidden states to (B, T, C)."""
        x = x + self.attn(self.ln_1(x), attention_mask, cache)
        return x + self.mlp(self.ln_2(x))
