"""A linear-chain conditional random field: sequence-level scores over per-position tag emissions.

The score of tags y_1..y_n is start[y_1] + sum_t emissions[t, y_t] + sum_t transitions[y_{t-1}, y_t]
+ end[y_n]; the forward algorithm sums over all tag sequences (the log-partition), Viterbi finds
the best one. Masks are prefixes: each row's real positions come first.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearChainCRF(nn.Module):
    """Transition scores between tags, with the log-likelihood and Viterbi decoding they define.

    Args:
        num_tags: number of tags.
    """

    def __init__(self, num_tags: int):
        super().__init__()
        self.num_tags = num_tags
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))  # [from, to]

    def score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The unnormalised log score of given tag sequences.

        Args:
            emissions: (B, T, K) per-position tag scores.
            tags: (B, T) tag indices; anything outside the mask is ignored.
            mask: (B, T) bool, True at the real positions (a prefix of each row).
        Returns:
            (B,) scores.
        """
        tags = tags.masked_fill(~mask, 0)
        on = mask.to(emissions.dtype)
        emitted = (emissions.gather(2, tags[..., None]).squeeze(2) * on).sum(1)
        moved = (self.transitions[tags[:, :-1], tags[:, 1:]] * on[:, 1:]).sum(1)
        last = tags.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)
        return self.start[tags[:, 0]] + emitted + moved + self.end[last]

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log sum over all tag sequences of exp(score), by the forward algorithm: (B, T, K), (B, T) -> (B,)."""
        alpha = self.start + emissions[:, 0]  # (B, K): log-sum of the paths ending in each tag
        for t in range(1, emissions.shape[1]):
            step = torch.logsumexp(alpha[:, :, None] + self.transitions, dim=1) + emissions[:, t]
            alpha = torch.where(mask[:, t, None], step, alpha)
        return torch.logsumexp(alpha + self.end, dim=1)

    def log_likelihood(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log p(tags | emissions) of each row (0 for a row with no real position): (B,)."""
        llh = self.score(emissions, tags, mask) - self.log_partition(emissions, mask)
        return torch.where(mask.any(1), llh, torch.zeros_like(llh))

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The highest-scoring tag sequence of each row by Viterbi: (B, T, K), (B, T) -> (B, T), 0 outside the mask."""
        B, T, K = emissions.shape
        stay = torch.arange(K, device=emissions.device).expand(B, K)
        best = self.start + emissions[:, 0]  # (B, K): score of the best path ending in each tag
        back = []  # back[t-1][b, k]: the tag before k at step t on the best path
        for t in range(1, T):
            scores, previous = (best[:, :, None] + self.transitions).max(dim=1)
            on = mask[:, t, None]
            best = torch.where(on, scores + emissions[:, t], best)
            back.append(torch.where(on, previous, stay))  # past the end, a path stays on its tag
        tag = (best + self.end).argmax(1)
        path = [tag]
        for previous in reversed(back):
            tag = previous.gather(1, tag[:, None]).squeeze(1)
            path.append(tag)
        return torch.stack(path[::-1], dim=1).masked_fill(~mask, 0)
