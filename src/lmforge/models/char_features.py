"""Features of a token's spelling: a character CNN over its UTF-8 bytes and its casing pattern.

What lifts taggers over randomly initialised word vectors: unseen names still have capitals and
familiar endings (Chiu and Nichols 2016; Ma and Hovy 2016).
"""

from __future__ import annotations

import torch
from torch import nn

# Casing classes (Reimers and Gurevych 2017), computed from ASCII bytes.
PAD, NUMERIC, LOWER, UPPER, INITIAL_UPPER, MAINLY_NUMERIC, HAS_DIGIT, OTHER = range(8)


def casing_classes(char_ids: torch.Tensor) -> torch.Tensor:
    """The casing class of each token from its bytes (+1, 0 = padding): (B, T, C) -> (B, T)."""
    b = char_ids - 1  # the bytes; -1 at padding
    n = (char_ids > 0).sum(-1)
    upper = ((b >= 65) & (b <= 90)).sum(-1)
    lower = ((b >= 97) & (b <= 122)).sum(-1)
    digit = ((b >= 48) & (b <= 57)).sum(-1)
    first_upper = (b[..., 0] >= 65) & (b[..., 0] <= 90)
    classes = torch.full_like(n, OTHER)
    # Assigned from the weakest condition to the strongest, so the strongest that holds wins.
    classes[digit > 0] = HAS_DIGIT
    classes[2 * digit > n] = MAINLY_NUMERIC
    classes[first_upper] = INITIAL_UPPER
    classes[(upper == n) & (n > 0)] = UPPER
    classes[(lower == n) & (n > 0)] = LOWER
    classes[(digit == n) & (n > 0)] = NUMERIC
    classes[n == 0] = PAD
    return classes


class CharFeatures(nn.Module):
    """Per-token spelling features, projected to the width of the word embeddings they are added to.

    Args:
        out_size: width of the output (the backbone's embedding size).
        char_embedding_size: width of the byte embeddings.
        filters: channels of the character convolution (0: no CNN).
        kernel_size: bytes the convolution sees at once.
        casing_size: width of the casing-class embedding (0: none).
    """

    def __init__(
        self,
        out_size: int,
        char_embedding_size: int = 30,
        filters: int = 50,
        kernel_size: int = 3,
        casing_size: int = 0,
    ):
        super().__init__()
        self.filters = filters
        self.chars = nn.Embedding(257, char_embedding_size, padding_idx=0) if filters else None
        self.conv = nn.Conv1d(char_embedding_size, filters, kernel_size, padding=kernel_size // 2) if filters else None
        self.casing = nn.Embedding(8, casing_size) if casing_size else None
        self.proj = nn.Linear(filters + casing_size, out_size)

    def forward(self, char_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, C) bytes + 1 of each token (0 = padding) -> (B, T, out_size)."""
        B, T, C = char_ids.shape
        parts = []
        if self.conv is not None:
            x = self.chars(char_ids.view(B * T, C)).transpose(1, 2)  # (B*T, E, C)
            x = self.conv(x).masked_fill((char_ids.view(B * T, 1, C) == 0), float("-inf"))
            x = x.max(-1).values  # (B*T, filters): max over the token's bytes
            parts.append(torch.where(torch.isinf(x), torch.zeros_like(x), x).view(B, T, self.filters))
        if self.casing is not None:
            parts.append(self.casing(casing_classes(char_ids)))
        return self.proj(torch.cat(parts, dim=-1))
