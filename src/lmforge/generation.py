"""Text generation from a decoder: greedy and sampling with temperature, top-k and top-p."""

from __future__ import annotations

import torch
from torch import nn


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with probability >= top_p.

    Args:
        logits: (B, V) next-token logits.
    Returns:
        (B, V) filtered logits.
    """
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue each prompt token by token.

    Args:
        model: a decoder that maps (B, T) ids to (B, T, V) logits and has ``n_positions``.
        input_ids: (B, T) prompt ids.
        max_new_tokens: number of tokens to add.
        temperature: 0 means greedy; otherwise logits are divided by it before sampling.
        top_k, top_p: optional sampling filters.
        eos_token_id: stop a sequence once it produced this token (it keeps padding with it).
        generator: random generator for reproducible samples.
        use_cache: reuse keys and values of earlier positions when the model has ``new_cache``.
            Once the text outgrows ``n_positions`` the context slides and every step
            recomputes the last ``n_positions`` tokens, exactly as without a cache.
    Returns:
        (B, T + max_new_tokens) ids, prompt included.
    """
    was_training = model.training
    model.eval()
    ids = input_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    cache = model.new_cache() if use_cache and hasattr(model, "new_cache") else None
    for _ in range(max_new_tokens):
        if cache is not None and ids.shape[1] <= model.n_positions:
            logits = model(ids[:, cache.length :], cache=cache)[:, -1, :].float()
        else:
            logits = model(ids[:, -model.n_positions :])[:, -1, :].float()
        if temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        if eos_token_id is not None:
            next_id = torch.where(done[:, None], torch.full_like(next_id, eos_token_id), next_id)
            done |= next_id.squeeze(1) == eos_token_id
        ids = torch.cat([ids, next_id], dim=1)
        if eos_token_id is not None and done.all():
            break
    model.train(was_training)
    return ids
