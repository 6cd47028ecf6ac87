"""A reader for extractive question answering from scratch: bidirectional attention flow (Seo et al. 2017).

It reads the windows that ``task=squad`` gives every backbone (``[CLS] question [SEP] context [SEP]``,
segment ids 0 then 1) but treats the two parts as the paper does:

1. embed each token, plus a flag for context tokens that occur in the question (the exact-match
   feature of DrQA, Chen et al. 2017: without pretrained word vectors, word overlap is what a small
   model learns from first);
2. a shared bidirectional LSTM reads the question and the context, each on its own;
3. attention flow: each context token attends over the question (context-to-question), and the
   context tokens most related to some question word are summed into one vector
   (question-to-context); the four products form a question-aware context ``G``;
4. two bidirectional LSTM layers model ``G`` (``M``), a third reads ``M`` for the answer's end (``M2``).

The hidden state of a context token is ``[G; M; M2]``: the task's linear head reads the start from
it as ``[G; M]`` and the end as ``[G; M2]`` would. [CLS] has a learned state (a window without the
answer points there); the question's positions and padding are zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.backbone import Backbone
from lmforge.models.rnn import real_tokens_first, restore_order, run_packed


class PackedLSTM(nn.Module):
    """A bidirectional LSTM over the tokens a mask selects in each row, in their order; zeros elsewhere."""

    def __init__(self, input_size: int, hidden_size: int, n_layer: int = 1, dropout: float = 0.0):
        super().__init__()
        self.rnn = nn.LSTM(input_size, hidden_size, n_layer, batch_first=True, bidirectional=True,
                           dropout=dropout if n_layer > 1 else 0.0)  # fmt: skip

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, E) inputs and a (B, T) mask -> (B, T, 2 * hidden_size) states."""
        order, lengths = real_tokens_first(mask, mask)
        out, _ = run_packed(self.rnn, x.gather(1, order[..., None].expand_as(x)), lengths)
        return restore_order(out, order) * mask[..., None]


class BiDAF(Backbone):
    """Bidirectional attention flow over a question and its context.

    Args:
        vocab_size: number of token ids (taken from the tokenizer).
        embedding_size: width of the token embeddings.
        hidden_size: state width per direction of every LSTM.
        modeling_layers: LSTM layers that model the question-aware context.
        dropout: dropout on the embeddings and on every LSTM's input.
        n_positions: longest window the data may give it (the LSTMs set no limit; this is a data setting).
    """

    kind = "reader"
    takes_token_type_ids = True

    def __init__(self, vocab_size: int, embedding_size: int = 128, hidden_size: int = 96, modeling_layers: int = 2,
                 dropout: float = 0.2, n_positions: int = 512):  # fmt: skip
        super().__init__()
        width = 2 * hidden_size  # a bidirectional LSTM's output
        self.n_positions = n_positions
        self.hidden_size = 4 * width + width + width  # [G; M; M2]
        self.embeddings = nn.Embedding(vocab_size, embedding_size)
        self.dropout = nn.Dropout(dropout)
        self.contextual = PackedLSTM(embedding_size + 1, hidden_size)
        self.similarity = nn.Linear(3 * width, 1)  # w^T [h; u; h * u], computed without the (T, T, 3C) tensor
        self.modeling = PackedLSTM(4 * width, hidden_size, modeling_layers, dropout)
        self.end_reader = PackedLSTM(4 * width + width, hidden_size)
        self.no_answer = nn.Parameter(torch.zeros(self.hidden_size))
        nn.init.normal_(self.embeddings.weight, std=0.1)

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The token embedding table (``embeddings``)."""
        return self.embeddings

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids, mask and segment ids (0: [CLS] question [SEP], 1: context [SEP]) -> (B, T, hidden_size)."""
        if token_type_ids is None:
            raise ValueError("BiDAF reads a question and a context: it needs token_type_ids (task=squad)")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        context = real & (token_type_ids == 1)
        question = real & (token_type_ids == 0)
        question[:, 0] = False  # [CLS]
        overlap = (input_ids[:, :, None] == input_ids[:, None, :]) & question[:, None, :]
        in_question = (overlap.any(-1) & context).float()[..., None]
        x = self.dropout(torch.cat([self.embeddings(input_ids), in_question], -1))
        c_mask, q_mask = context.float(), question.float()
        h = self.contextual(x, c_mask)  # the context's states, zeros elsewhere
        u = self.contextual(x, q_mask)  # the question's
        g = self._attention_flow(h, u, context, question)
        m = self.modeling(self.dropout(g), c_mask)
        m2 = self.end_reader(self.dropout(torch.cat([g, m], -1)), c_mask)
        states = torch.cat([g, m, m2], -1)
        cls = torch.zeros_like(states[:, :1]) + self.no_answer
        return torch.cat([cls, states[:, 1:]], 1)

    forward = hidden_states

    def _attention_flow(self, h: torch.Tensor, u: torch.Tensor, context: torch.Tensor, question: torch.Tensor):
        """The question-aware context states ``[h; c2q; h * c2q; h * q2c]`` (B, T, 4C), zeros off the context."""
        width = h.shape[-1]
        w_h, w_u, w_hu = self.similarity.weight[0].split(width)
        scores = (h @ w_h)[:, :, None] + (u @ w_u)[:, None, :] + (h * w_hu) @ u.transpose(1, 2)
        scores = scores + self.similarity.bias
        # Finite fills: a row with nothing to attend to gets uniform weights over zeros, not NaN.
        scores = scores.masked_fill(~question[:, None, :], -1e9)  # (B, T context, T question)
        c2q = scores.softmax(-1) @ u
        best = scores.max(-1).values.masked_fill(~context, -1e9)  # each context token's closest question word
        q2c = (best.softmax(-1)[:, None, :] @ h).expand_as(h)
        return torch.cat([h, c2q, h * c2q, h * q2c], -1) * context[..., None]
