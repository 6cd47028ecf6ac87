"""LSTM and GRU encoder-decoders with attention: cached decoding, padding, beam reordering, learning."""

import pytest
import torch

from lmforge.models.layers import select_rows
from lmforge.models.rnn_seq2seq import RNNSeq2Seq

VARIANTS = [(cell, attention) for cell in ("lstm", "gru") for attention in ("additive", "dot")]


def tiny(cell: str, attention: str, **kwargs) -> RNNSeq2Seq:
    torch.manual_seed(0)
    sizes = dict(vocab_size=30, n_layer=2, hidden_size=8, embedding_size=6, dropout=0.1)
    return RNNSeq2Seq(cell=cell, attention=attention, **{**sizes, **kwargs}).eval()


SOURCE = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
SOURCE_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
TARGET = torch.tensor([[1, 11, 12, 13, 14, 15], [1, 16, 17, 18, 19, 20]])


@pytest.mark.parametrize("cell,attention", VARIANTS)
def test_cached_step_by_step_decoding_equals_full_decoding(cell, attention):
    model = tiny(cell, attention)
    memory = model.encode(SOURCE, SOURCE_MASK)
    full = model.decode(TARGET, memory, SOURCE_MASK)
    cache = model.new_cache()
    # A first chunk of several tokens, then one at a time, as a prompted generation would.
    steps = [model.decode(TARGET[:, :2], memory, SOURCE_MASK, cache=cache)]
    for t in range(2, TARGET.shape[1]):
        steps.append(model.decode(TARGET[:, t : t + 1], memory, SOURCE_MASK, cache=cache))
    assert cache.length == TARGET.shape[1]
    torch.testing.assert_close(torch.cat(steps, 1), full)
    assert full.shape == (2, TARGET.shape[1], 30)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("cell,attention", VARIANTS)
def test_source_padding_on_either_side_does_not_change_a_sentences_logits(cell, attention, bidirectional):
    model = tiny(cell, attention, bidirectional=bidirectional)
    short, target = torch.tensor([[8, 9, 10]]), TARGET[1:]
    alone = model(short, None, target)
    right = model(SOURCE, SOURCE_MASK, TARGET)[1:]
    left = model(torch.tensor([[0, 0, 8, 9, 10]]), torch.tensor([[0, 0, 1, 1, 1]]), target)
    torch.testing.assert_close(right, alone)
    torch.testing.assert_close(left, alone)


@pytest.mark.parametrize("cell,attention", VARIANTS)
def test_attention_weights_are_zero_on_source_padding(cell, attention):
    model = tiny(cell, attention)
    memory = model.encode(SOURCE, SOURCE_MASK)
    logits, weights = model.decode_with_attention(TARGET, memory, SOURCE_MASK)
    torch.testing.assert_close(logits, model.decode(TARGET, memory, SOURCE_MASK))
    assert weights.shape == (2, TARGET.shape[1], SOURCE.shape[1])
    assert (weights[1, :, 3:] == 0).all() and (weights[1, :, :3] > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, TARGET.shape[1]))


@pytest.mark.parametrize("cell,attention", VARIANTS)
def test_reordered_memory_and_cache_give_the_repeated_batchs_logits(cell, attention):
    model = tiny(cell, attention)
    index = torch.tensor([1, 0, 1, 1])
    memory = model.encode(SOURCE, SOURCE_MASK)
    cache = model.new_cache()
    model.decode(TARGET[:, :3], memory, SOURCE_MASK, cache=cache)
    cache.reorder(index)
    memory, mask = select_rows(memory, index), SOURCE_MASK[index]
    continued = model.decode(TARGET[index, 3:], memory, mask, cache=cache)
    direct = model(SOURCE[index], SOURCE_MASK[index], TARGET[index])[:, 3:]
    torch.testing.assert_close(continued, direct)


@pytest.mark.parametrize("cell,attention", [("lstm", "additive"), ("gru", "dot")])
def test_a_few_steps_on_a_copy_task_lower_the_loss(cell, attention):
    model = tiny(cell, attention, hidden_size=16, embedding_size=16, dropout=0.0, n_layer=1).train()
    generator = torch.Generator().manual_seed(1)
    source = torch.randint(3, 30, (16, 6), generator=generator)
    target = torch.cat([torch.ones(16, 1, dtype=torch.long), source], 1)  # 1 starts the target
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        logits = model(source, None, target[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 30), target[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # token frequencies alone get no lower than about 3.2


def test_unknown_cell_or_attention_is_refused():
    with pytest.raises(ValueError, match="cell"):
        RNNSeq2Seq(vocab_size=10, cell="rnn")
    with pytest.raises(ValueError, match="attention"):
        RNNSeq2Seq(vocab_size=10, attention="multiplicative")
