"""Sampling filters and generation: greedy, sampling, beam search, caches, for decoders and encoder-decoders."""

import pytest
import torch

from lmforge.generation import ban_repeated_ngrams, filter_logits, generate, penalize_repetition
from lmforge.models.gpt import GPT
from lmforge.models.rnn_seq2seq import RNNSeq2Seq
from lmforge.models.t5 import T5
from lmforge.models.transformer import Transformer


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


@pytest.mark.parametrize("options", [{"temperature": 0.0}, {"temperature": 1.0}, {"num_beams": 3}], ids=str)
def test_no_sequence_ends_before_min_new_tokens(options):
    """The end token the model wants first is ruled out for the first 4 tokens, then allowed."""
    torch.manual_seed(0)
    model = GPT(vocab_size=30, n_layer=1, n_head=2, n_embd=16, n_positions=64)
    prompt = torch.tensor([[1, 2], [3, 4]])
    end = generate(model, prompt, 1, temperature=0)[0, -1].item()  # greedy's first token: make it the end
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(30).index_fill(0, torch.tensor([end]), 5.0))
    settings = dict(eos_token_id=end, pad_token_id=0, generator=torch.Generator().manual_seed(0), **options)
    assert (generate(model, prompt, 10, **settings)[:, 2] == end).any()  # without the rule, rows end at once
    out = generate(model, prompt, 10, min_new_tokens=4, **settings)[:, 2:]
    assert not (out[:, :4] == end).any()
    assert (out[:, 4:] == end).any()  # then the end comes as the model wants


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


# -- one API for every generating backbone ---------------------------------------------------------

EOS = 1
SEQ2SEQ = {
    "transformer": lambda: Transformer(40, n_layer=2, n_head=2, d_model=32, d_ff=64, dropout=0.0),
    "transformer-prenorm": lambda: Transformer(40, n_layer=1, n_head=2, d_model=32, d_ff=64, norm_first=True),
    "t5": lambda: T5(40, n_layer=2, n_head=2, d_model=32, d_kv=16, d_ff=64, dropout=0.0),
    "lstm-attention": lambda: RNNSeq2Seq(40, cell="lstm", hidden_size=16, embedding_size=16, attention="additive"),
    "gru-attention": lambda: RNNSeq2Seq(40, cell="gru", hidden_size=16, embedding_size=16, attention="dot"),
}


def _source_batch():
    """Three sources, the last two right-padded."""
    input_ids = torch.randint(2, 40, (3, 7))
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return input_ids.masked_fill(mask == 0, 0), mask


def _seq2seq_generate(model, input_ids, mask, **options):
    options = {"eos_token_id": EOS, "decoder_start_token_id": EOS, "pad_token_id": 0, **options}
    return generate(model, input_ids, 12, attention_mask=mask, **options)


def _sequence_log_prob(model, input_ids, mask, tokens) -> torch.Tensor:
    """Sum of the log-probabilities the model gives each generated row (up to and including its EOS)."""
    decoder_input = torch.cat([torch.full((len(tokens), 1), EOS), tokens[:, :-1]], dim=1)
    log_probs = model(input_ids, mask, decoder_input).log_softmax(-1).gather(2, tokens[..., None])[..., 0]
    ended = (tokens == EOS).long().cumsum(1)
    keep = (ended == 0) | ((ended == 1) & (tokens == EOS))  # tokens up to the first EOS
    return (log_probs * keep).sum(1)


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_seq2seq_cache_changes_nothing_for_greedy_and_beam_search(name):
    torch.manual_seed(0)
    model = SEQ2SEQ[name]().eval()
    input_ids, mask = _source_batch()
    for options in ({"temperature": 0.0}, {"num_beams": 3}):
        cached = _seq2seq_generate(model, input_ids, mask, **options)
        uncached = _seq2seq_generate(model, input_ids, mask, use_cache=False, **options)
        assert torch.equal(cached, uncached), options


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_one_beam_is_greedy_and_more_beams_score_at_least_greedy(name):
    torch.manual_seed(1)
    model = SEQ2SEQ[name]().eval()
    input_ids, mask = _source_batch()
    greedy = _seq2seq_generate(model, input_ids, mask, temperature=0.0)
    assert torch.equal(_seq2seq_generate(model, input_ids, mask, num_beams=1, temperature=0.0), greedy)
    # The first greedy token is the argmax of the decoder's first logits.
    first = model.decode(torch.full((3, 1), EOS), model.encode(input_ids, mask), mask)[:, -1].argmax(-1)
    assert torch.equal(greedy[:, 0], first)
    # Length penalty 0 ranks by log-probability alone: beam search's best is at least as likely as greedy's.
    beams = _seq2seq_generate(model, input_ids, mask, num_beams=4, length_penalty=0.0, early_stopping=False)
    with torch.no_grad():
        beam_score = _sequence_log_prob(model, input_ids, mask, _padded_to(beams, 12))
        greedy_score = _sequence_log_prob(model, input_ids, mask, _padded_to(greedy, 12))
    assert (beam_score >= greedy_score - 1e-4).all(), (beam_score, greedy_score)


def _padded_to(tokens: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(tokens, (0, length - tokens.shape[1]), value=EOS)


def test_a_padded_batch_generates_what_each_source_generates_alone():
    torch.manual_seed(2)
    model = SEQ2SEQ["transformer"]().eval()
    input_ids, mask = _source_batch()
    batch = _seq2seq_generate(model, input_ids, mask, num_beams=3)
    for i in range(3):
        n = int(mask[i].sum())
        alone = _seq2seq_generate(model, input_ids[i : i + 1, :n], mask[i : i + 1, :n], num_beams=3)
        assert batch[i, : alone.shape[1]].tolist() == alone[0].tolist()


def test_decoder_beam_search_and_left_padded_prompts():
    torch.manual_seed(3)
    model = GPT(vocab_size=40, n_layer=2, n_head=2, n_embd=16, n_positions=64).eval()
    prompt = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = generate(model, prompt, 6, temperature=0.0, attention_mask=mask)
    alone = generate(model, prompt[1:, 2:], 6, temperature=0.0)
    assert out[1, 2:].tolist() == alone[0].tolist()  # padding on the left changes nothing
    beam1 = generate(model, prompt, 6, num_beams=1, temperature=0.0, attention_mask=mask)
    assert torch.equal(beam1, out)
    cached = generate(model, prompt, 6, num_beams=3, attention_mask=mask, eos_token_id=EOS)
    uncached = generate(model, prompt, 6, num_beams=3, attention_mask=mask, eos_token_id=EOS, use_cache=False)
    assert torch.equal(cached, uncached) and torch.equal(cached[:, :4], prompt)


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = penalize_repetition(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert torch.equal(penalize_repetition(logits, torch.tensor([[0]]), 1.0), logits)
    torch.manual_seed(4)
    model = GPT(vocab_size=40, n_layer=1, n_head=2, n_embd=16, n_positions=64).eval()
    prompt = torch.tensor([[3, 4]])
    plain = generate(model, prompt, 20, temperature=0.0)[0, 2:].tolist()
    penalised = generate(model, prompt, 20, temperature=0.0, repetition_penalty=100.0)[0, 2:].tolist()
    assert len(set(penalised)) > len(set(plain))  # a random tiny model loops; the penalty breaks the loop


@pytest.mark.parametrize("n", [1, 2, 3])
def test_banned_ngrams_match_transformers(n):
    from transformers import NoRepeatNGramLogitsProcessor

    generator = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 3, (4, 20), generator=generator)  # three tokens used: many repeats
    logits = torch.randn(4, 6, generator=generator)
    expected = NoRepeatNGramLogitsProcessor(n)(ids, logits.clone())
    assert torch.equal(ban_repeated_ngrams(logits, ids, n), expected)
    assert torch.isinf(expected).any()  # the case is not vacuous
    assert torch.equal(ban_repeated_ngrams(logits, ids, 0), logits)


def _repeated_ngrams(tokens: list[int], n: int) -> int:
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(ngrams) - len(set(ngrams))


@pytest.mark.parametrize("options", [{"temperature": 0.0}, {"num_beams": 3}], ids=["greedy", "beams"])
def test_no_repeat_ngram_size_stops_a_looping_model_from_repeating(options):
    torch.manual_seed(4)
    model = GPT(vocab_size=40, n_layer=1, n_head=2, n_embd=16, n_positions=64).eval()
    prompt = torch.tensor([[3, 4]])
    plain = generate(model, prompt, 20, **options)[0].tolist()
    assert _repeated_ngrams(plain, 2) > 0  # a random tiny model loops
    assert _repeated_ngrams(generate(model, prompt, 20, no_repeat_ngram_size=2, **options)[0].tolist(), 2) == 0
    torch.manual_seed(0)
    seq2seq = SEQ2SEQ["transformer"]().eval()
    input_ids, mask = _source_batch()
    for row in _seq2seq_generate(seq2seq, input_ids, mask, no_repeat_ngram_size=2, **options).tolist():
        assert _repeated_ngrams(row[: row.index(EOS)] if EOS in row else row, 2) == 0
