"""LSTM and GRU backbones: padding on either side, final states, the word tokenizer."""

import pytest
import torch

from lmforge.data.tokenizers import pad_token_id, word_tokenizer
from lmforge.models.rnn import RNN


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padded_batch_equals_one_sentence_at_a_time_on_either_side(cell):
    torch.manual_seed(0)
    model = RNN(vocab_size=40, cell=cell, n_layer=2, hidden_size=8, embedding_size=6).eval()
    a, b = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 11])
    alone = [model(x[None])[0] for x in (a, b)]
    right = model(torch.tensor([[5, 6, 7, 8, 9], [10, 11, 0, 0, 0]]), torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]))
    left = model(torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 10, 11]]), torch.tensor([[1] * 5, [0, 0, 0, 1, 1]]))
    torch.testing.assert_close(right[0], alone[0])
    torch.testing.assert_close(right[1, :2], alone[1])
    torch.testing.assert_close(left[1, 3:], alone[1])
    assert right[1, 2:].abs().sum() == 0 and left[1, :3].abs().sum() == 0  # nothing leaks into padding


def test_final_states_are_the_last_layers_final_hidden_states():
    torch.manual_seed(0)
    model = RNN(vocab_size=40, cell="lstm", n_layer=2, hidden_size=8, embedding_size=6).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 10, 11, 12, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    final = model.final_states(model(ids, mask), mask)
    for row, real in ((0, ids[0]), (1, ids[1, 1:4])):
        _, (h_n, _) = model.rnn(model.embeddings(real[None]))  # h_n: (layers * 2, 1, hidden)
        torch.testing.assert_close(final[row], torch.cat([h_n[-2, 0], h_n[-1, 0]]))


def test_word_tokenizer_keeps_frequent_words_and_pads_with_id_zero():
    tok = word_tokenizer("the film is good\nthe film is bad\nthe plot\n", vocab_size=6)
    assert tok.get_vocab_size() == 6 and pad_token_id(tok) == 0
    assert tok.encode("The film is AWFUL").tokens == ["the", "film", "is", "<unk>"]
