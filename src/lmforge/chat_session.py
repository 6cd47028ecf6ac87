"""A multi-turn chat with a decoder that keeps its KV cache from one turn to the next (``lmforge-generate chat=true``).

Each turn renders the whole conversation with the run's chat template, but only the tokens the
cache has not seen go through the model: the cache is cut back to the longest common start of what
it holds and the new prompt (a reply re-tokenized from its text may differ from the tokens that
were sampled), and the rest is read in one pass. A conversation that outgrows the context loses its
oldest turns (a system message stays) and starts a fresh cache.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.data.chat_template import ChatTemplate
from lmforge.errors import LmforgeError
from lmforge.generation import filter_logits


class ChatSession:
    """Replies of a decoder to a growing conversation.

    Args:
        model: a decoder backbone (``forward(ids, cache=)``, ``new_cache()``, ``n_positions``).
        tokenizer: the run's tokenizer.
        template: the run's chat template.
        eos_id: the token that ends a reply.
        max_new_tokens, temperature, top_k, top_p: sampling (temperature 0: greedy).
        seed: seeds the sampling.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, template: ChatTemplate, eos_id: int,
                 max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0):  # fmt: skip
        self.model, self.tokenizer, self.template, self.eos_id = model.eval(), tokenizer, template, eos_id
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.generator = torch.Generator().manual_seed(seed)
        self.device = next(model.parameters()).device
        self.cache, self.seen = model.new_cache(), []  # the cache holds the keys and values of ``seen``
        self.reused = 0  # tokens of the last prompt the cache already held

    @torch.inference_mode()
    def reply(self, messages: list[dict]) -> str:
        """The assistant's next message after ``messages``."""
        prompt = self._fitting_prompt(messages)
        common = 0
        while common < min(len(prompt), len(self.seen)) and prompt[common] == self.seen[common]:
            common += 1
        common = min(common, len(prompt) - 1)  # the last prompt token goes through the model for its logits
        self._keep(common)
        self.reused = common
        logits = self._read(prompt[common:])
        generated = []
        for _ in range(self.max_new_tokens):
            token = self._choose(logits)
            if token == self.eos_id or len(self.seen) >= self.model.n_positions:
                break
            generated.append(token)
            logits = self._read([token])
        return self.tokenizer.decode(generated).strip()

    def _fitting_prompt(self, messages: list[dict]) -> list[int]:
        """The prompt's ids, dropping the oldest turns (not a system message) until it fits with a reply."""
        messages = list(messages)
        room = self.model.n_positions - min(self.max_new_tokens, self.model.n_positions // 2)
        while True:
            text = self.template.render(messages, add_generation_prompt=True)
            prompt = self.tokenizer.encode(text, add_special_tokens=False).ids
            if len(prompt) <= room:
                return prompt
            first = 1 if messages and messages[0]["role"] == "system" else 0
            if len(messages) - first <= 1:
                raise LmforgeError(f"The message is {len(prompt)} tokens; the model reads at most {room} before "
                                   f"its reply (n_positions {self.model.n_positions}).")  # fmt: skip
            del messages[first]

    def _keep(self, n: int) -> None:
        """Cut the cache back to its first ``n`` tokens."""
        if n == len(self.seen):
            return
        end = self.cache.offset + n  # a soft prompt's positions stay in front
        for layer in self.cache.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[:, :, :end], layer.values[:, :, :end]
        if n == 0:
            self.cache = self.model.new_cache()
        self.seen = self.seen[:n]

    def _read(self, ids: list[int]) -> torch.Tensor:
        """Put ``ids`` through the model after what the cache holds; the next token's (V,) logits."""
        logits = self.model(torch.tensor([ids], device=self.device), cache=self.cache)[0, -1]
        self.seen += ids
        return logits.float().cpu()

    def _choose(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        probs = filter_logits(logits[None] / self.temperature, self.top_k, self.top_p).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
