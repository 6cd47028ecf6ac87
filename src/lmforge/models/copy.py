"""Copying source tokens into the output (``model.copy=true``): the pointer-generator of See et al. (2017).

A summary or a translation repeats many source tokens (names, numbers, rare words). An encoder-decoder
with a copy head predicts each target token from a mix of two distributions:

    P(w) = p_gen * softmax(logits)[w] + (1 - p_gen) * sum of a_i over the source positions i holding w

where ``a`` is an attention of the decoder state over the encoder output (one head of its own) and
``p_gen`` a learned switch, a sigmoid of the decoder state and the attended source. The backbone then
returns ``log P`` in place of logits: its softmax is ``P`` itself, so the cross-entropy, label
smoothing, greedy and beam search and sampling of the rest of lmforge work on it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class CopyHead(nn.Module):
    """Mixes a decoder's vocabulary distribution with a copy distribution over the source tokens.

    Args:
        hidden_size: width of the decoder states.
        memory_size: width of the encoder output.
    """

    def __init__(self, hidden_size: int, memory_size: int):
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.key = nn.Linear(memory_size, hidden_size, bias=False)
        self.switch = nn.Linear(hidden_size + memory_size, 1)  # p_gen's logit
        self.scale = hidden_size**-0.5

    def forward(
        self,
        logits: torch.Tensor,
        hidden: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        source_ids: torch.Tensor,
    ) -> torch.Tensor:
        """(B, T, V) log-probabilities of the mix, from the decoder's (B, T, V) logits and (B, T, C) states,
        the (B, S, C') encoder output, its (B, S) mask and the (B, S) source ids."""
        scores = (self.query(hidden) @ self.key(memory).transpose(1, 2)) * self.scale  # (B, T, S)
        if memory_mask is not None:
            scores = scores.masked_fill(~memory_mask.bool()[:, None, :], float("-inf"))
        attention = scores.float().softmax(-1)
        attended = attention.to(memory.dtype) @ memory  # (B, T, C')
        generate = torch.sigmoid(self.switch(torch.cat([hidden, attended], -1)).float())  # (B, T, 1)
        copied = torch.zeros_like(logits, dtype=torch.float32)
        copied.scatter_add_(2, source_ids[:, None, :].expand(-1, hidden.shape[1], -1), attention)
        mixed = generate * logits.float().softmax(-1) + (1 - generate) * copied
        # log(0) has an infinite gradient (times zero: NaN); no real distribution needs less than 1e-30.
        return mixed.clamp_min(1e-30).log()
