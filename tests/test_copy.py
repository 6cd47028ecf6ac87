"""The copy head (``model.copy=true``, pointer-generator): the mix is the formula's, decoding step by step
gives what one pass gives, and it copies source tokens that the vocabulary distribution never learned."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.generation import generate
from lmforge.models.copy import CopyHead
from lmforge.models.rnn_seq2seq import RNNSeq2Seq
from lmforge.models.t5 import T5
from lmforge.models.transformer import Transformer

EOS, PAD = 1, 0


def test_the_copy_head_mixes_the_two_distributions_as_the_formula_says():
    torch.manual_seed(0)
    B, T, S, V, C = 2, 3, 5, 11, 8
    head = CopyHead(C, C)
    logits, hidden, memory = torch.randn(B, T, V), torch.randn(B, T, C), torch.randn(B, S, C)
    source = torch.tensor([[4, 7, 4, 2, 9], [3, 3, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    log_p = head(logits, hidden, memory, mask, source)

    for b in range(B):
        for t in range(T):
            scores = torch.stack([head.query(hidden[b, t]) @ head.key(memory[b, i]) * C**-0.5 for i in range(S)])
            scores[mask[b] == 0] = float("-inf")  # padding (token 0 here) is never copied
            a = scores.softmax(0)
            p_gen = torch.sigmoid(head.switch(torch.cat([hidden[b, t], a @ memory[b]])))
            expected = p_gen * logits[b, t].softmax(0)
            for i in range(S):
                expected[source[b, i]] += (1 - p_gen[0]) * a[i]
            torch.testing.assert_close(log_p[b, t].exp(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(B, T))  # a distribution: the task's softmax keeps it
    assert torch.allclose(log_p.log_softmax(-1), log_p, atol=1e-5)


def copying_transformer(copy: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(1000, n_layer=1, n_decoder_layer=1, n_head=2, d_model=64, d_ff=128, n_positions=16,
                       dropout=0.0, norm_first=True, copy=copy)  # fmt: skip


# Every encoder-decoder backbone takes copy=true, at a tiny size.
COPYING = {
    "transformer": lambda: Transformer(1000, n_layer=1, n_head=2, d_model=32, d_ff=64, dropout=0.0, copy=True),
    "t5": lambda: T5(1000, n_layer=1, n_head=2, d_model=32, d_kv=16, d_ff=64, dropout=0.0, copy=True),
    "gru-attention": lambda: RNNSeq2Seq(1000, cell="gru", hidden_size=16, embedding_size=16, copy=True),
}


@pytest.mark.parametrize("name", COPYING)
def test_every_encoder_decoder_copies_and_decodes_step_by_step_as_in_one_pass(name):
    torch.manual_seed(0)
    model = COPYING[name]().eval()
    source = torch.randint(10, 1000, (3, 7))
    mask = torch.ones_like(source)
    mask[2, 5:] = 0
    target = torch.randint(10, 1000, (3, 6))
    whole = model(source, mask, target)
    torch.testing.assert_close(whole.exp().sum(-1), torch.ones(3, 6))  # log-probabilities of the mix
    memory, cache = model.encode(source, mask), model.new_cache()
    steps = [model.decode(target[:, t : t + 1], memory, mask, cache) for t in range(target.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=1e-5)
    settings = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD,
                    decoder_start_token_id=EOS, temperature=0.0)  # fmt: skip
    assert torch.equal(generate(model, source, **settings), generate(model, source, use_cache=False, **settings))
    assert generate(model, source, num_beams=3, **settings).shape[0] == 3  # beams reorder the source ids too


def random_copies(n: int, low: int, high: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources of 6 random token ids in [low, high) and EOS; the target is the source itself."""
    source = torch.randint(low, high, (n, 6), generator=torch.Generator().manual_seed(seed))
    source = torch.cat([source, torch.full((n, 1), EOS)], 1)
    return source, torch.cat([torch.full((n, 1), EOS), source[:, :-1]], 1)


@pytest.mark.slow
def test_only_the_copy_head_copies_tokens_it_never_saw_in_a_target():
    """Trained to copy ids 10-499, tested on ids 500-999: the vocabulary distribution has never been taught
    those, the copy distribution reads them off the source."""
    accuracy = {}
    for copy in (True, False):
        model = copying_transformer(copy)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(200):
            source, decoder_input = random_copies(32, 10, 500, seed=step)
            loss = F.cross_entropy(
                model(source, torch.ones_like(source), decoder_input).flatten(0, 1), source.flatten()
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        source, _ = random_copies(200, 500, 1000, seed=10_000)
        out = generate(model.eval(), source, attention_mask=torch.ones_like(source), max_new_tokens=7, eos_token_id=EOS,
                       pad_token_id=PAD, decoder_start_token_id=EOS, temperature=0.0)  # fmt: skip
        accuracy[copy] = (out[:, :6] == source[:, :6]).float().mean().item()
    assert accuracy[True] > 0.3 and accuracy[False] < 0.05, accuracy
