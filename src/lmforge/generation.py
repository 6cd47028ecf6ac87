"""Text generation for every backbone that generates: decoders (GPT) and encoder-decoders (Transformer, T5, RNNs).

One entry point, :func:`generate`: greedy decoding, sampling (temperature, top-k, top-p) and
beam search (beams, length penalty, early stopping), with a repetition penalty, a length
limit, an end-of-sequence token and batches of prompts of different lengths. Decoders reuse
the keys and values of earlier positions (KV cache); encoder-decoders encode the source once
and compute its keys and values once per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.backbone import backbone_kind
from lmforge.models.layers import select_rows


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with probability >= top_p.

    Args:
        logits: (B, V) next-token logits.
    Returns:
        (B, V) filtered logits.
    """
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalize_repetition(logits: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token already in ``ids`` less likely: positive logits divided by ``penalty``, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, ids)
    return logits.scatter(1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))


def ban_repeated_ngrams(logits: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid every token that would complete an ``n``-gram ``ids`` already holds (0 = off)."""
    if n <= 0 or ids.shape[1] < n:
        return logits
    ngrams = ids.unfold(1, n, 1)  # (B, W, n): every n-gram so far
    if n == 1:
        repeats = torch.ones(ngrams.shape[:2], device=ids.device)
    else:  # the n-grams whose first n - 1 tokens are the sequence's last n - 1
        repeats = (ngrams[:, :, :-1] == ids[:, None, ids.shape[1] - n + 1 :]).all(-1).float()
    banned = torch.zeros_like(logits).scatter_add_(1, ngrams[:, :, -1], repeats) > 0
    return logits.masked_fill(banned, float("-inf"))


def next_token_logits(steps, ids: torch.Tensor, repetition_penalty: float, no_repeat_ngram_size: int) -> torch.Tensor:
    """The model's next-token logits for ``ids`` after the repetition rules."""
    logits = penalize_repetition(steps.next_logits(ids).float(), ids, repetition_penalty)
    return ban_repeated_ngrams(logits, ids, no_repeat_ngram_size)


class DecoderSteps:
    """Next-token logits of a decoder for a batch of growing sequences (prompt + generated tokens).

    A left-padded batch of prompts is read through its attention mask; with a cache only the
    new token goes through the model at each step. Once a sequence outgrows ``n_positions``,
    the context slides and each step recomputes the last ``n_positions`` tokens.
    """

    def __init__(self, model: nn.Module, attention_mask: torch.Tensor | None, use_cache: bool):
        self.model = model
        self.mask = attention_mask
        self.cache = model.new_cache() if use_cache else None

    def next_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, V) logits of the token after ``ids`` (B, L)."""
        mask = self.mask
        if mask is not None and mask.shape[1] < ids.shape[1]:
            mask = self.mask = F.pad(mask, (0, ids.shape[1] - mask.shape[1]), value=1)
        n = self.model.n_positions
        if self.cache is not None and ids.shape[1] <= n:
            return self.model(ids[:, self.cache.length :], attention_mask=mask, cache=self.cache)[:, -1]
        return self.model(ids[:, -n:], attention_mask=None if mask is None else mask[:, -n:])[:, -1]

    def reorder(self, index: torch.Tensor, same_source: bool = False) -> None:
        """Keep (and repeat) the batch rows in ``index``."""
        self.mask = select_rows(self.mask, index)
        if self.cache is not None:
            self.cache.reorder(index)


class EncoderDecoderSteps:
    """Next-token logits of an encoder-decoder: the source is encoded once, the decoder runs step by step."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, use_cache: bool):
        self.model = model
        self.memory = model.encode(input_ids, attention_mask)
        self.memory_mask = attention_mask
        self.cache = model.new_cache() if use_cache else None

    def next_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, V) logits of the token after the decoder input ``ids`` (B, L)."""
        if self.cache is None:
            return self.model.decode(ids, self.memory, self.memory_mask)[:, -1]
        return self.model.decode(ids[:, self.cache.length :], self.memory, self.memory_mask, self.cache)[:, -1]

    def reorder(self, index: torch.Tensor, same_source: bool = False) -> None:
        """Keep (and repeat) the batch rows in ``index``: source encodings, masks and caches.

        ``same_source``: each row is replaced by a row of the same source, whose encoding is the same.
        """
        if not same_source:
            self.memory = select_rows(self.memory, index)
            self.memory_mask = select_rows(self.memory_mask, index)
        if self.cache is not None:
            self.cache.reorder(index, same_source)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    attention_mask: torch.Tensor | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    decoder_start_token_id: int | None = None,
    pad_token_id: int | None = None,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens for each row of ``input_ids``.

    Args:
        model: a decoder backbone or an encoder-decoder (:class:`lmforge.models.backbone.Seq2SeqBackbone`).
        input_ids: (B, T) prompts (decoder; left-pad a batch of different lengths) or sources (encoder-decoder).
        temperature, top_k, top_p: sampling, from logits divided by ``temperature`` (0: greedy decoding) and
            filtered by :func:`filter_logits`; beam search ignores them.
        eos_token_id: a sequence ends once it produced this token (then it is padded with ``pad_token_id``).
        generator: random generator for reproducible samples.
        use_cache: reuse keys and values of earlier positions.
        attention_mask: (B, T), 1 for real tokens and 0 for padding.
        num_beams: more than 1 runs beam search, which ranks finished sequences by
            log-probability / length ** ``length_penalty`` and with ``early_stopping`` stops a row once it
            has ``num_beams`` of them.
        repetition_penalty: above 1 discourages tokens the sequence already holds (1 = off).
        no_repeat_ngram_size: no n-gram of this size occurs twice in a sequence (0 = off).
        decoder_start_token_id: the first decoder input of an encoder-decoder.
        pad_token_id: what fills the rows that ended early (default: ``eos_token_id``, else 0).
        min_new_tokens: ``eos_token_id`` cannot come before this many generated tokens (a summary's
            shortest length, say).
    Returns:
        decoder: (B, T + n) prompts and their continuations; encoder-decoder: (B, n) generated tokens.
    """
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    repetition = (repetition_penalty, no_repeat_ngram_size)
    with evaluating(model):
        steps, ids, keep = _decoding_steps(model, input_ids, attention_mask, use_cache, decoder_start_token_id)
        if num_beams > 1:
            beams = BeamSearch(ids.shape[0], num_beams, ids.shape[1], length_penalty, early_stopping, eos_token_id)
            out = beams.run(steps, ids, max_new_tokens, repetition, pad, min_new_tokens)
        else:
            out = _sample(steps, ids, max_new_tokens, temperature, top_k, top_p, repetition, eos_token_id, pad,
                          generator, min_new_tokens)  # fmt: skip
    return out[:, keep:]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (no dropout), and put its mode back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _decoding_steps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    use_cache: bool,
    decoder_start_token_id: int | None,
) -> tuple[DecoderSteps | EncoderDecoderSteps, torch.Tensor, int]:
    """What produces the next-token logits, the sequences it starts from, and how many leading tokens of
    those the output leaves out (an encoder-decoder's start token)."""
    if backbone_kind(model) != "seq2seq":
        return DecoderSteps(model, attention_mask, use_cache), input_ids, 0
    if decoder_start_token_id is None:
        raise ValueError("an encoder-decoder needs decoder_start_token_id")
    steps = EncoderDecoderSteps(model, input_ids, attention_mask, use_cache)
    start = torch.full((input_ids.shape[0], 1), decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    return steps, start, 1


def _no_end_yet(logits: torch.Tensor, eos: int | None, step: int, min_new_tokens: int) -> torch.Tensor:
    """``logits`` with the end token ruled out while fewer than ``min_new_tokens`` tokens are generated."""
    if eos is not None and step < min_new_tokens:
        logits[:, eos] = float("-inf")
    return logits


def _sample(steps, ids, max_new_tokens, temperature, top_k, top_p, repetition, eos, pad, generator, min_new_tokens):
    """Greedy decoding (temperature 0) or sampling, one token per step for the whole batch."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        logits = _no_end_yet(next_token_logits(steps, ids, *repetition), eos, step, min_new_tokens)
        if temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        if eos is not None:
            next_id = torch.where(done[:, None], torch.full_like(next_id, pad), next_id)
            done |= next_id.squeeze(1) == eos
        ids = torch.cat([ids, next_id], dim=1)
        if eos is not None and done.all():
            break
    return ids


class BeamSearch:
    """Beam search over a batch: keeps the ``num_beams`` most likely continuations of each row and its
    finished hypotheses, and returns the best finished one per row.

    The batch holds ``rows * num_beams`` sequences, row b's beams at ``b * num_beams ...``. A row that is
    done goes on with padding beams, so that the batch stays rectangular.

    Args:
        rows: rows of the batch (prompts or sources).
        num_beams: beams per row.
        start: length of the sequences the search starts from (the prompts, or the start token).
        length_penalty: finished sequences rank by log-probability / length ** length_penalty.
        early_stopping: a row is done once it has ``num_beams`` finished sequences; otherwise only once
            no live beam can beat the worst of them.
        eos: the token that finishes a hypothesis (None: none finishes before the length limit).
    """

    def __init__(self, rows: int, num_beams: int, start: int, length_penalty: float, early_stopping: bool, eos):
        self.rows, self.K, self.start = rows, num_beams, start
        self.length_penalty, self.early_stopping, self.eos = length_penalty, early_stopping, eos
        self.finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(rows)]
        self.done = [False] * rows

    def normalise(self, score: float, length: int) -> float:
        """The rank of a sequence of ``length`` generated tokens and log-probability ``score``."""
        return score / (length**self.length_penalty)

    def run(
        self, steps, ids: torch.Tensor, max_new_tokens: int, repetition: tuple, pad: int, min_new_tokens: int = 0
    ) -> torch.Tensor:
        """Search from (rows, start) ``ids``; returns (rows, start + n) prompts and their best continuations."""
        B, K, device = self.rows, self.K, ids.device
        rows = torch.arange(B, device=device).repeat_interleave(K)
        steps.reorder(rows)
        ids = ids.index_select(0, rows)
        scores = torch.zeros(B, K, device=device)
        scores[:, 1:] = float("-inf")  # all beams start equal: only the first may expand at step one
        for step in range(max_new_tokens):
            logits = _no_end_yet(next_token_logits(steps, ids, *repetition), self.eos, step, min_new_tokens)
            V = logits.shape[-1]
            candidates = (scores.view(-1, 1) + logits.log_softmax(-1)).view(B, K * V)
            top_scores, top_index = candidates.topk(2 * K, dim=1)
            keep_rows, keep_tokens, keep_scores = self.advance(ids, top_scores, top_index, V, step, pad)
            index = torch.tensor(keep_rows, device=device)
            steps.reorder(index, same_source=True)
            ids = torch.cat([ids.index_select(0, index), torch.tensor(keep_tokens, device=device)[:, None]], dim=1)
            scores = torch.tensor(keep_scores, device=device).view(B, K)
            if all(self.done):
                break
        return self.best(ids, scores, pad)

    def advance(
        self, ids: torch.Tensor, top_scores: torch.Tensor, top_index: torch.Tensor, V: int, step: int, pad: int
    ) -> tuple[list[int], list[int], list[float]]:
        """The K beams each row goes on with, as (sequence it extends, token, score) lists over the batch.

        ``top_scores`` and ``top_index`` are each row's 2K best candidates (index: beam * V + token); a
        candidate that ends with ``eos`` among the best K finishes a hypothesis instead.
        """
        keep_rows, keep_tokens, keep_scores = [], [], []
        for b in range(self.rows):
            if self.done[b]:  # padding beams keep the batch rectangular
                keep_rows += [b * self.K] * self.K
                keep_tokens += [pad] * self.K
                keep_scores += [float("-inf")] * self.K
                continue
            live = self._advance_row(b, ids, top_scores[b].tolist(), top_index[b].tolist(), V, step)
            keep_rows += [row for row, _, _ in live]
            keep_tokens += [token for _, token, _ in live]
            keep_scores += [score for _, _, score in live]
        return keep_rows, keep_tokens, keep_scores

    def _advance_row(
        self, b: int, ids: torch.Tensor, top_scores: list[float], top_index: list[int], V: int, step: int
    ) -> list[tuple[int, int, float]]:
        """Row ``b``'s K live beams (sequence, token, score); records its finished hypotheses and whether it is done."""
        live = []
        for rank, (score, index) in enumerate(zip(top_scores, top_index)):
            row, token = b * self.K + index // V, index % V
            if self.eos is not None and token == self.eos:
                if rank < self.K:  # an end among the best K candidates finishes a hypothesis
                    text = torch.cat([ids[row, self.start :], ids.new_tensor([self.eos])])
                    self.finished[b].append((self.normalise(score, step + 1), text))
                continue
            live.append((row, token, score))
            if len(live) == self.K:
                break
        self.finished[b] = sorted(self.finished[b], key=lambda h: -h[0])[: self.K]
        if len(self.finished[b]) == self.K:
            best_live = self.normalise(max(score for _, _, score in live), step + 1)
            self.done[b] = self.early_stopping or self.finished[b][-1][0] >= best_live
        return live

    def best(self, ids: torch.Tensor, scores: torch.Tensor, pad: int) -> torch.Tensor:
        """Each row's prompt and its best hypothesis (live beams count for rows not done), padded to one length."""
        best = []
        for b in range(self.rows):
            if not self.done[b]:
                length = ids.shape[1] - self.start
                for j in range(self.K):
                    self.finished[b].append(
                        (self.normalise(float(scores[b, j]), length), ids[b * self.K + j, self.start :])
                    )
            best.append(max(self.finished[b], key=lambda h: h[0])[1])
        longest = max(len(tokens) for tokens in best)
        out = torch.full((self.rows, longest), pad, dtype=torch.long, device=ids.device)
        for b, tokens in enumerate(best):
            out[b, : len(tokens)] = tokens
        return torch.cat([ids[:: self.K, : self.start], out], dim=1)
