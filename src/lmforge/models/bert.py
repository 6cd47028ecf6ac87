"""BERT: a bidirectional Transformer encoder in the shape of bert-base-uncased.

Post-LayerNorm blocks, learned positions, segment (token type) embeddings and a tanh
pooler over the first ([CLS]) token. Parameter names match the public checkpoint's
``BertModel`` (``embeddings.word_embeddings``, ``encoder.layer.0.attention.self.query``,
``pooler.dense``), so loading it is a name-for-name copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.backbone import Backbone
from lmforge.models.documents import document_attention_mask, document_positions
from lmforge.models.layers import BlockRunner, init_normal
from lmforge.models.tuning import KVPrefix, PrefixableAttention


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int, type_vocab_size: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, hidden) embeddings; positions 0, 1, ... unless ``position_ids`` (B, T) are given."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) if position_ids is None else position_ids
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(types)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(PrefixableAttention, nn.Module):
    """Multi-head attention over the whole sequence, padding masked out."""

    def __init__(self, hidden_size: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.head_dim = hidden_size // n_head
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout
        self.prefix: KVPrefix | None = None  # set by finetune=prefix

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); ``mask`` is (B, 1, 1, T) or (B, 1, T, T) bool, True where attention is allowed."""
        B, T, C = x.shape
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (
            lin(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for lin in (self.query, self.key, self.value)
        )
        k, v, mask = self.with_prefix(k, v, mask, True)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, C)


class BertOutput(nn.Module):
    """Projection, dropout, then LayerNorm of the residual sum (post-norm)."""

    def __init__(self, in_size: int, hidden_size: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """LayerNorm(residual + dropout(dense(x)))."""
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class BertAttention(nn.Module):
    """Self-attention sub-layer: ``self`` (q, k, v) and ``output`` (projection + norm)."""

    def __init__(self, hidden_size: int, n_head: int, dropout: float):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, n_head, dropout)
        self.output = BertOutput(hidden_size, hidden_size, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    """The feed-forward widening: dense to ``intermediate_size`` and exact GELU."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, intermediate)."""
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """One post-LayerNorm encoder block."""

    def __init__(self, hidden_size: int, n_head: int, intermediate_size: int, dropout: float):
        super().__init__()
        self.attention = BertAttention(hidden_size, n_head, dropout)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size)
        self.output = BertOutput(intermediate_size, hidden_size, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(BlockRunner, nn.Module):
    """The stack of blocks (``encoder.layer.<i>``)."""

    def __init__(self, n_layer: int, hidden_size: int, n_head: int, intermediate_size: int, dropout: float):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(hidden_size, n_head, intermediate_size, dropout) for _ in range(n_layer))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        for layer in self.layer:
            x = self.run_block(layer, x, mask)
        return x


class BertPooler(nn.Module):
    """tanh(dense(hidden state of the first token)), the [CLS] summary BERT was pretrained with."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, C)."""
        return torch.tanh(self.dense(hidden[:, 0]))


class Bert(Backbone):
    """A BERT encoder.

    Args:
        vocab_size: number of token ids (taken from the tokenizer).
        n_layer: encoder blocks.
        n_head: attention heads per block.
        hidden_size: model width.
        intermediate_size: feed-forward width (4x hidden in the public models).
        n_positions: longest sequence the position table covers.
        type_vocab_size: number of segment ids.
        dropout: dropout on embeddings, attention weights and sub-layer outputs.
        layer_norm_eps: epsilon of every LayerNorm.
    """

    kind = "encoder"
    supports_prompt = True
    takes_token_type_ids = True
    takes_document_ids = True

    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 12,
        n_head: int = 12,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        n_positions: int = 512,
        type_vocab_size: int = 2,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.n_positions = n_positions
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, n_positions, type_vocab_size, dropout)
        self.encoder = BertEncoder(n_layer, hidden_size, n_head, intermediate_size, dropout)
        self.pooler = BertPooler(hidden_size)
        for module in self.modules():  # the embeddings' and both sub-layers' of every block
            if isinstance(module, nn.LayerNorm):
                module.eps = layer_norm_eps
        self.apply(init_normal)

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The token embedding table (the masked-LM head shares it)."""
        return self.embeddings.word_embeddings

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode a batch.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for real tokens, 0 for padding.
            token_type_ids: (B, T) segment ids (0 for the first sentence).
            document_ids: optional (B, T) ints for packed rows (:mod:`lmforge.models.documents`): a token
                attends only to the tokens of its own document, whose positions start at 0. Not with a
                soft prompt.
        Returns:
            (B, T, hidden_size) hidden states.
        """
        if document_ids is not None:
            if self.prompt is not None:
                raise ValueError("packed rows (document_ids) cannot be read with a soft prompt")
            x = self.embeddings(input_ids, token_type_ids, document_positions(document_ids))
            mask = document_attention_mask(document_ids, attention_mask, causal=False)  # (B, 1, T, T)
            return self.encoder(x, mask)
        x, attention_mask = self._with_prompt(self.embeddings(input_ids, token_type_ids), attention_mask)
        mask = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None  # (B, 1, 1, T)
        return self._without_prompt(self.encoder(x, mask))

    forward = hidden_states

    # A soft prompt goes after [CLS], so that the pooler still reads [CLS].

    def _with_prompt(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, C) embeddings and mask -> [CLS], the soft prompt, the rest; unchanged without a prompt."""
        if self.prompt is None:
            return x, attention_mask
        if attention_mask is None:
            attention_mask = x.new_ones(x.shape[:2], dtype=torch.long)
        rest, rest_mask = self.prepend_prompt(x[:, 1:], attention_mask[:, 1:])
        x = torch.cat([x[:, :1], rest], dim=1)
        return x, torch.cat([rest_mask.new_ones(len(x), 1), rest_mask], dim=1)

    def _without_prompt(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + P + T, C) states -> (B, 1 + T, C), the soft prompt's positions left out."""
        if self.prompt is None:
            return x
        return torch.cat([x[:, :1], self.drop_prompt(x[:, 1:])], dim=1)
