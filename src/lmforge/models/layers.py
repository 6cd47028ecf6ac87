"""Transformer building blocks shared by the backbones.

Parameter names follow the public GPT-2 checkpoint (``c_attn``, ``c_proj``,
``c_fc``, ``ln_1``) so that a checkpoint maps onto them by a name table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2/BERT initialisation for ``Module.apply``: normal(0, std) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask and one fused q/k/v projection.

    Args:
        n_embd: model width.
        n_head: number of attention heads; must divide ``n_embd``.
        dropout: dropout on the attention weights and on the output.
        bias: whether the projections have biases.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """Attend over the sequence.

        Args:
            x: (B, T, C) hidden states of the new tokens.
            attention_mask: optional (B, T), 1 for real tokens and 0 for padding (not with a cache).
            cache: keys and values of earlier tokens; the new ones are appended to it.
        Returns:
            (B, T, C) hidden states.
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)  # (B, heads, past + T, head_dim)
        dropout = self.dropout if self.training else 0.0
        if attention_mask is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            # New token i sees every cached token and the new tokens up to itself.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
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


class KVCache:
    """One :class:`LayerCache` per Transformer block."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Number of cached positions."""
        return self.layers[0].length


class MLP(nn.Module):
    """Position-wise feed-forward network: widen 4x, GELU, project back."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        # GPT-2 was trained with the tanh approximation of GELU.
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) hidden states to (B, T, C)."""
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class PreNormBlock(nn.Module):
    """A pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """Map (B, T, C) hidden states to (B, T, C)."""
        x = x + self.attn(self.ln_1(x), attention_mask, cache)
        return x + self.mlp(self.ln_2(x))
