"""Sampling filters and generation."""

import torch

from lmforge.generation import filter_logits, generate
from lmforge.models.gpt import GPT


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isinf(out).tolist() == [[True, False, False, True]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), top_p=0.75)
    # 0.5 alone < 0.75, 0.5 + 0.3 >= 0.75: keep the first two.
    assert torch.isinf(out).tolist() == [[False, False, True, True]]
    # The top token is always kept, even for a tiny p.
    assert not torch.isinf(filter_logits(probs.log(), top_p=0.01)[0, 0])


def test_greedy_is_deterministic_and_sampling_is_seeded():
    torch.manual_seed(0)
    model = GPT(vocab_size=30, n_layer=1, n_head=2, n_embd=16, n_positions=8)
    prompt = torch.tensor([[1, 2, 3]])
    a = generate(model, prompt, 12, temperature=0)
    b = generate(model, prompt, 12, temperature=0)
    assert a.shape == (1, 15) and torch.equal(a, b)  # longer than n_positions: the context slides
    # Greedy picks the argmax of the model's own next-token logits.
    assert a[0, 3].item() == model(prompt)[0, -1].argmax().item()
    s1 = generate(model, prompt, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    s2 = generate(model, prompt, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2)


def test_generation_stops_at_eos():
    torch.manual_seed(0)
    model = GPT(vocab_size=30, n_layer=1, n_head=2, n_embd=16, n_positions=64)
    prompt = torch.tensor([[1, 2]])
    first = generate(model, prompt, 1, temperature=0)[0, -1].item()
    out = generate(model, prompt, 10, temperature=0, eos_token_id=first)
    assert out.shape[1] == 3


def test_kv_cache_gives_the_same_tokens_and_logits_as_full_recompute():
    torch.manual_seed(0)
    model = GPT(vocab_size=40, n_layer=2, n_head=2, n_embd=16, n_positions=24).eval()
    prompt = torch.randint(0, 40, (3, 5))
    # 30 new tokens: cached up to 24 positions, then the sliding window without cache.
    cached = generate(model, prompt, 30, temperature=0, use_cache=True)
    plain = generate(model, prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    # Step by step through the cache equals one pass over the whole sequence.
    ids = torch.randint(0, 40, (2, 12))
    cache = model.new_cache()
    steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(ids), atol=1e-5, rtol=1e-5)
    # A chunk of several new tokens after a cached prefix uses the offset causal mask.
    cache = model.new_cache()
    chunked = torch.cat([model(ids[:, :5], cache=cache), model(ids[:, 5:], cache=cache)], dim=1)
    torch.testing.assert_close(chunked, model(ids), atol=1e-5, rtol=1e-5)
