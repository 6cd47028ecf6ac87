"""Continuous batching for decoders: every sequence being generated is one row of a shared KV cache.

One thread owns the model. Each turn of its loop it admits waiting sequences while the batch has
room (a sequence's prompt is read alone, its keys and values then join the batch's cache), and
then runs one decoding step for every row at once. A row that finishes, or whose client went away,
leaves the batch at once, so a waiting sequence takes its place on the next turn.

Rows keep their own lengths: the cache is left-padded so that every row's newest token is in the
last column, and the attention mask marks the padding, from which the decoder also counts each
row's positions (:meth:`lmforge.models.gpt.GPT.hidden_states`). A sequence therefore computes
what it would alone, up to the rounding of batched matrix products.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.generation import filter_logits
from lmforge.models.layers import KVCache
from lmforge.serve.text import IncrementalText

log = logging.getLogger("lmforge")


@dataclass
class Sampling:
    """How one sequence picks its tokens (the OpenAI parameters of the same names).

    ``temperature`` 0 is greedy decoding; None is the model's default (1 for decoders, a seq2seq
    run's own decoding, beam search, for seq2seq models). ``presence_penalty`` and ``frequency_penalty`` lower the
    logit of every token already generated, by a constant and by its count; ``logit_bias`` adds to
    the logits of the token ids it names.
    """

    max_tokens: int
    temperature: float | None = None
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)


# Called with ("text", piece), ("done", (finish_reason, generated tokens)) or ("error", message).
Sink = Callable[[str, object], None]


class Sequence:
    """One generated choice: its prompt, how it samples, the tokens so far, and where its text goes.

    Args:
        prompt_ids: the prompt's token ids.
        sampling: see :class:`Sampling`.
        seed: seeds the sequence's own random generator, so that its samples do not depend on
            what else is in the batch.
        text: turns its tokens into text and watches for stop strings.
        sink: called from the engine's thread with each piece of text, then with the end.
    """

    def __init__(self, prompt_ids: list[int], sampling: Sampling, seed: int, text: IncrementalText, sink: Sink):
        self.prompt_ids, self.sampling, self.text, self.sink = prompt_ids, sampling, text, sink
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens: list[int] = []
        self.cancelled = False  # set by the server when the client goes away

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from (V,) float logits on the CPU."""
        s = self.sampling
        if s.logit_bias:
            logits = logits.clone()
            for token, bias in s.logit_bias.items():
                logits[token] += bias
        if self.tokens and (s.presence_penalty or s.frequency_penalty):
            counts = torch.bincount(torch.tensor(self.tokens), minlength=logits.shape[0]).to(logits.dtype)
            logits = logits - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).to(logits.dtype)
        temperature = 1.0 if s.temperature is None else s.temperature
        if temperature == 0:
            return int(logits.argmax())
        probs = filter_logits(logits[None] / temperature, top_p=s.top_p).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def accept(self, token: int, eos: int | None) -> bool:
        """Take the chosen token; report text and, when the sequence is over, its end. True when over."""
        if token == eos:
            return self._finish("stop")
        self.tokens.append(token)
        piece = self.text.add(token)
        if piece:
            self.sink("text", piece)
        if self.text.stopped:
            return self._finish("stop")
        if len(self.tokens) >= self.sampling.max_tokens:
            return self._finish("length")
        return False

    def _finish(self, reason: str) -> bool:
        rest = self.text.finish()
        if rest:
            self.sink("text", rest)
        self.sink("done", (reason, len(self.tokens)))
        return True


class GenerationEngine:
    """Generates for many sequences at once with one decoder (continuous batching).

    Args:
        model: a decoder backbone (``forward(ids, attention_mask=, cache=)``, ``new_cache()``).
        eos_id: the token that ends a sequence (None: only lengths and stop strings end them).
        max_batch_size: rows decoded together; more sequences wait for a free row.
    """

    def __init__(self, model: nn.Module, eos_id: int | None, max_batch_size: int):
        self.model, self.eos_id, self.max_batch_size = model, eos_id, max_batch_size
        self.device = next(model.parameters()).device
        self.waiting: queue.Queue[Sequence | None] = queue.Queue()
        self.rows: list[Sequence] = []
        self.next_tokens: list[int] = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, columns): 1 for tokens, 0 for left padding
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-generation", daemon=True)

    def start(self) -> None:
        """Start the engine's thread."""
        self._thread.start()

    def close(self) -> None:
        """Finish what runs and waits, then stop the thread."""
        self._closing = True
        self.waiting.put(None)
        self._thread.join()

    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence; it joins the batch when a row is free."""
        self.waiting.put(sequence)

    @property
    def busy_rows(self) -> int:
        """Rows being decoded now."""
        return len(self.rows)

    def _loop(self) -> None:
        with torch.inference_mode():
            while self._admit():
                try:
                    if self.rows:
                        self._step()
                except Exception as err:  # a failed step fails its batch, and the server goes on
                    log.exception("generation step failed")
                    for sequence in self.rows:
                        sequence.sink("error", f"generation failed: {err}")
                    self.rows, self.next_tokens, self.cache, self.mask = [], [], None, None

    def _admit(self) -> bool:
        """Move waiting sequences into free rows; False once closing with nothing left to run."""
        while len(self.rows) < self.max_batch_size:
            if self._closing and self.waiting.empty():
                return bool(self.rows)
            try:  # an idle engine sleeps on the queue; a busy one only looks
                sequence = self.waiting.get_nowait() if self.rows or self._closing else self.waiting.get()
            except queue.Empty:
                return True
            if sequence is not None and not sequence.cancelled:
                self._prefill(sequence)
        return True

    def _prefill(self, sequence: Sequence) -> None:
        """Read a prompt alone, pick its first token, and give it a row unless that token ends it."""
        cache = self.model.new_cache()
        ids = torch.tensor([sequence.prompt_ids], device=self.device)
        try:
            logits = self.model(ids, cache=cache)[:, -1].float().cpu()
        except Exception as err:
            log.exception("prompt failed")
            sequence.sink("error", f"generation failed: {err}")
            return
        token = sequence.choose(logits[0])
        if sequence.accept(token, self.eos_id):
            return
        self._join(cache, len(sequence.prompt_ids))
        self.rows.append(sequence)
        self.next_tokens.append(token)

    def _step(self) -> None:
        """One token for every row: each row's latest token goes through the model with the cache."""
        self._leave([i for i, s in enumerate(self.rows) if s.cancelled])
        if not self.rows:
            return
        ids = torch.tensor(self.next_tokens, device=self.device)[:, None]
        self.mask = F.pad(self.mask, (0, 1), value=1)
        logits = self.model(ids, attention_mask=self.mask, cache=self.cache)[:, -1].float().cpu()
        over = []
        for i, sequence in enumerate(self.rows):
            token = sequence.choose(logits[i])
            self.next_tokens[i] = token
            if sequence.accept(token, self.eos_id):
                over.append(i)
        self._leave(over)

    def _join(self, cache: KVCache, length: int) -> None:
        """Add a prompt's one-row cache to the batch, left-padding whichever is shorter."""
        mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        columns = max(self.mask.shape[1], length)
        at = self.cache.offset  # a soft prompt's positions stay first, the padding goes after them
        for mine, new in zip(self.cache.layers, cache.layers):
            grow, add = columns - self.mask.shape[1], columns - length
            mine.keys = torch.cat([_pad_columns(mine.keys, grow, at), _pad_columns(new.keys, add, at)])
            mine.values = torch.cat([_pad_columns(mine.values, grow, at), _pad_columns(new.values, add, at)])
        self.mask = torch.cat([F.pad(self.mask, (columns - self.mask.shape[1], 0)), F.pad(mask, (columns - length, 0))])

    def _leave(self, finished: list[int]) -> None:
        """Drop the rows in ``finished``, and the padding columns no row needs any more."""
        if not finished:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(finished)]
        self.rows = [self.rows[i] for i in keep]
        self.next_tokens = [self.next_tokens[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns of padding only
        if unused:
            at = self.cache.offset
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys = torch.cat([layer.keys[:, :, :at], layer.keys[:, :, at + unused :]], 2)
                layer.values = torch.cat([layer.values[:, :, :at], layer.values[:, :, at + unused :]], 2)


def _pad_columns(t: torch.Tensor, n: int, at: int) -> torch.Tensor:
    """(B, heads, L, D) keys or values with ``n`` zero columns inserted before column ``at``."""
    if n == 0:
        return t
    zeros = t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3])
    return torch.cat([t[:, :, :at], zeros, t[:, :, at:]], 2)
