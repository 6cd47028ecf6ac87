"""GPT: a decoder-only Transformer in the shape of GPT-2.

Parameter names match the public GPT-2 checkpoint (``transformer.wte``,
``transformer.h.0.attn.c_attn``, ``transformer.ln_f``, ``lm_head``), so loading
it is a name table plus a transpose of the Conv1D weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.models.backbone import Backbone
from lmforge.models.documents import document_attention_mask, document_positions
from lmforge.models.layers import BlockRunner, KVCache, PreNormBlock, init_normal


class GPT(BlockRunner, Backbone):
    """Token + learned position embeddings, pre-LayerNorm blocks, tied output head.

    Args:
        vocab_size: number of token ids (taken from the tokenizer).
        n_layer: number of Transformer blocks.
        n_head: attention heads per block.
        n_embd: model width.
        n_positions: longest sequence the position table covers.
        dropout: dropout on embeddings, attention and MLP outputs.
        bias: whether linear layers and LayerNorms have biases.
        n_inner: MLP width (None: 4 x n_embd).
        layer_norm_epsilon: epsilon of the LayerNorms.
        scale_attn_weights: divide attention scores by sqrt(head_dim).
        scale_attn_by_inverse_layer_idx: also divide them by the block's number (1 for the first), as some
            GPT-2 variants do.
    """

    kind = "decoder"
    supports_prompt = True
    takes_document_ids = True

    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 12,
        n_head: int = 12,
        n_embd: int = 768,
        n_positions: int = 1024,
        dropout: float = 0.0,
        bias: bool = True,
        n_inner: int | None = None,
        layer_norm_epsilon: float = 1e-5,
        scale_attn_weights: bool = True,
        scale_attn_by_inverse_layer_idx: bool = False,
    ):
        super().__init__()

        def scale(i: int) -> float | None:
            """Factor of block i's attention scores (None: 1 / sqrt(head_dim), SDPA's own)."""
            if not scale_attn_by_inverse_layer_idx:
                return None if scale_attn_weights else 1.0
            return ((n_embd // n_head) ** -0.5 if scale_attn_weights else 1.0) / (i + 1)

        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.hidden_size = n_embd
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(n_positions, n_embd),
                drop=nn.Dropout(dropout),
                h=nn.ModuleList(
                    PreNormBlock(n_embd, n_head, dropout, bias, layer_norm_epsilon, scale(i), n_inner)
                    for i in range(n_layer)
                ),
                ln_f=nn.LayerNorm(n_embd, eps=layer_norm_epsilon, bias=bias),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(init_normal)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at init.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The token embedding table (``transformer.wte``, tied to ``lm_head``)."""
        return self.transformer.wte

    def num_parameters(self, exclude_positions: bool = False) -> int:
        """Count parameters once (the tied head is not counted twice)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if exclude_positions else n

    def flops_per_token(self, context: int) -> int:
        """Training FLOPs (forward and backward) per token at ``context`` tokens, for model FLOPs utilisation:
        6 per parameter (the head's matrix product counts; position lookups do not) plus 12 per layer, width
        and attended position (the estimate of the PaLM paper, which nanoGPT's MFU uses too)."""
        return 6 * self.num_parameters(exclude_positions=True) + 12 * len(self.transformer.h) * self.n_embd * context

    def new_cache(self) -> KVCache:
        """An empty key/value cache for :meth:`forward` (incremental decoding)."""
        return KVCache(len(self.transformer.h))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the blocks.

        Args:
            input_ids: (B, T) token ids; with a cache, only the tokens it has not seen.
            attention_mask: optional, 1 for real tokens, 0 for padding: (B, T), or with a cache
                (B, past + T). Positions count real tokens only, so a left-padded prompt is
                read exactly as the same prompt without padding.
            cache: keys and values of earlier positions, extended in place.
            document_ids: optional (B, T) ints for packed rows (:mod:`lmforge.models.documents`): a token
                attends only to earlier tokens of its own document, and positions restart at each
                document's start. Not with a cache or a soft prompt.
        Returns:
            (B, T, n_embd) final hidden states, after ``ln_f``.
        """
        past = cache.length if cache is not None else 0
        end = past + input_ids.shape[1]
        if end > self.n_positions:
            raise ValueError(f"sequence of {end} tokens is longer than n_positions={self.n_positions}")
        if document_ids is not None:
            if cache is not None or self.prompt is not None:
                raise ValueError("packed rows (document_ids) cannot be read with a KV cache or a soft prompt")
            pos = document_positions(document_ids)
            attention_mask = document_attention_mask(document_ids, attention_mask, causal=True)  # (B, 1, T, T)
        elif attention_mask is None:
            pos = torch.arange(past, end, device=input_ids.device)
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(pos))
        x, attention_mask, prompted = self._with_prompt(x, attention_mask, cache)
        for i, block in enumerate(self.transformer.h):
            x = self.run_block(block, x, attention_mask, cache.layers[i] if cache is not None else None)
        x = self.transformer.ln_f(x)
        return self.drop_prompt(x) if prompted else x

    def _with_prompt(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Embeddings and mask with the soft prompt's positions, and whether ``x`` holds them.

        The prompt goes before the first tokens, without a position. Decoding with a cache, it is read
        once, at the first step, and lives in the cache after that; the mask covers it at every step.
        """
        if self.prompt is None:
            return x, attention_mask, False
        first = cache is None or cache.layers[0].length == 0
        if first:
            x, _ = self.prepend_prompt(x, None)
            if cache is not None:
                cache.offset = self.prompt.length
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(len(x), self.prompt.length), attention_mask], 1)
        return x, attention_mask, first

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: optional (B, T) (with a cache: (B, past + T)), 1 for real tokens, 0 for padding.
            cache: optional :class:`KVCache` from :meth:`new_cache`, for incremental decoding.
            document_ids: optional (B, T) documents of packed rows (see :meth:`hidden_states`).
        Returns:
            (B, T, vocab_size) logits.
        """
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache, document_ids))
