"""The fine-tuning hooks of the backbones: learned keys and values before an attention layer's own (finetune=prefix)
and learned vectors before the tokens (finetune=prompt).

They reach a backbone through one seam each: :class:`PrefixableAttention`, mixed into the self-attention
layers, and :meth:`lmforge.models.backbone.Backbone.set_prompt`, whose prompt each backbone reads where it
embeds its tokens.
"""

from __future__ import annotations

import torch
from torch import nn


class KVPrefix(nn.Module):
    """Learned keys and values placed before a self-attention layer's own (prefix tuning, Li & Liang 2021).

    Every query may attend to them; the layer's outputs keep the input's length and positions.

    Args:
        n_head: heads of the attention layer.
        head_dim: width per head.
        length: number of prefix positions.
    """

    def __init__(self, n_head: int, head_dim: int, length: int):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(n_head, length, head_dim) * 0.02)
        self.values = nn.Parameter(torch.randn(n_head, length, head_dim) * 0.02)

    def extend(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, attend: bool | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Prepend the prefix to (B, heads, S, head_dim) keys and values, and to a mask over the keys (last dim).

        ``attend`` is the mask value that lets a query see a key (1 or True for key masks, 0.0 for additive biases).
        """
        B = k.shape[0]
        k = torch.cat([self.keys.expand(B, -1, -1, -1).to(k.dtype), k], dim=2)
        v = torch.cat([self.values.expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
        if mask is not None:
            pad = torch.full((*mask.shape[:-1], self.keys.shape[1]), attend, dtype=mask.dtype, device=mask.device)
            mask = torch.cat([pad, mask], dim=-1)
        return k, v, mask


class PrefixableAttention:
    """Mixed into the self-attention layers that prefix tuning extends: the one way a :class:`KVPrefix` reaches them.

    finetune=prefix calls :meth:`add_prefix`; the layer's forward passes its keys and values through
    :meth:`with_prefix` after its KV cache, which holds the tokens' own keys only. The layer sets
    ``prefix = None`` in its ``__init__`` and has ``n_head`` and ``head_dim``.
    """

    prefix: KVPrefix | None
    n_head: int
    head_dim: int

    def add_prefix(self, length: int) -> None:
        """Give the layer ``length`` learned key and value positions (prefix tuning)."""
        self.prefix = KVPrefix(self.n_head, self.head_dim, length)

    def with_prefix(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, attend: bool | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values and mask with the prefix in front (see :meth:`KVPrefix.extend`); unchanged without one."""
        if self.prefix is None:
            return k, v, mask
        return self.prefix.extend(k, v, mask, attend)


class SoftPrompt(nn.Module):
    """Learned vectors placed before a sequence's token embeddings (prompt tuning, Lester et al. 2021).

    Args:
        vectors: (length, width) starting values (prompt tuning starts from embeddings of real tokens).
    """

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(vectors.clone())

    @property
    def length(self) -> int:
        """Number of prompt positions."""
        return self.vectors.shape[0]

    def prepend(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, C) embeddings and an optional (B, T) key mask -> (B, P + T, C) and (B, P + T)."""
        B = x.shape[0]
        x = torch.cat([self.vectors.expand(B, -1, -1).to(x.dtype), x], dim=1)
        if mask is not None:
            mask = torch.cat([mask.new_ones(B, self.length), mask], dim=1)
        return x, mask
