"""One completion request as it runs: its choices queued for generation, their text coming back as events.

A :class:`Generation` is what the HTTP side holds: it gathers the events of every choice (pieces
of text, then each choice's end) from the batching thread into the event loop, and cancels the
choices when the client goes away or the request runs out of time. Both kinds of generator feed
it: a decoder's engine (token by token) and a seq2seq model's batch worker (the whole text at once).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from itertools import count

from lmforge.serve.engine import Sampling, Sequence
from lmforge.serve.protocol import ApiError
from lmforge.serve.served import ServedModel
from lmforge.serve.text import IncrementalText


class _Mailbox:
    """Hands events from the batching thread to an event loop: one wake-up of the loop carries all the
    events that arrived since the last one (a decoding step's tokens for every row), not one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.items = loop, threading.Lock(), []

    def post(self, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((queue, item))
            first = len(self.items) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its mailbox
_unbatched = count()  # keys that batch with nothing: sampled seq2seq requests (each has its own generator)


@dataclass
class Choice:
    """What one choice produced."""

    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0


@dataclass
class Generation:
    """The choices of one request, running in the batching thread; their events arrive in :attr:`events`.

    Args:
        n_choices: how many choices it waits for.
        deadline: ``time.monotonic()`` by which it must be over.
    """

    n_choices: int
    deadline: float
    choices: list[Choice] = field(default_factory=list)
    _cancels: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self):
        loop = asyncio.get_running_loop()
        self.mailbox = _mailboxes.setdefault(loop, _Mailbox(loop))
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice() for _ in range(self.n_choices)]

    def sink(self, index: int):
        """The callback the batching thread reports choice ``index``'s events to."""
        return lambda kind, value: self.mailbox.post(self.queue, (index, kind, value))

    def cancel(self) -> None:
        """Free the rows (or batch places) of every choice that has not finished."""
        for cancel in self._cancels:
            cancel()

    async def events(self) -> AsyncIterator[tuple[int, str, object]]:
        """``(choice, "text", piece)`` and ``(choice, "done", reason)`` until every choice is over."""
        open_choices = self.n_choices
        try:
            while open_choices:
                remaining = self.deadline - time.monotonic()
                try:
                    if remaining <= 0:  # checked first: events that keep coming must not outrun the deadline
                        raise TimeoutError
                    index, kind, value = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    raise ApiError(408, "The request took longer than the server's request_timeout_s.",
                                   type="timeout", code="request_timeout") from None  # fmt: skip
                if kind == "error":
                    raise ApiError(500, str(value), type="server_error")
                choice = self.choices[index]
                if kind == "text":
                    choice.text += value
                else:
                    choice.finish_reason, choice.tokens = value
                    open_choices -= 1
                yield index, kind, value
        finally:
            if open_choices:
                self.cancel()

    async def finish(self) -> list[Choice]:
        """Wait for every choice; their texts and ends."""
        async for _ in self.events():
            pass
        return self.choices


def start_generation(
    served: ServedModel, prompts: list[list[int]], sources: list[str], sampling: Sampling, n: int, seed: int | None,
    timeout_s: float,
) -> Generation:  # fmt: skip
    """Queue ``n`` choices for each prompt (choice ``p * n + i``) and return the :class:`Generation`.

    ``prompts`` are token ids for a decoder; a seq2seq model reads ``sources`` (texts) instead.
    Choice ``i`` samples with ``seed + i``, so a seed gives the same texts however the request is batched.
    """
    job = Generation(len(prompts) * n, time.monotonic() + timeout_s)
    base = seed if seed is not None else secrets.randbits(48)
    for p in range(len(prompts)):
        for i in range(n):
            index = p * n + i
            if served.engine is not None:
                text = IncrementalText(served.tokenizer, sampling.stop)
                sequence = Sequence(prompts[p], sampling, base + i, text, job.sink(index))
                job._cancels.append(lambda s=sequence: setattr(s, "cancelled", True))
                served.engine.submit(sequence)
            else:
                _submit_seq2seq(served, job, index, sources[p], sampling, base + i)
    return job


def _submit_seq2seq(served: ServedModel, job: Generation, index: int, source: str, sampling: Sampling, seed: int):
    """Queue one seq2seq choice: the run's own decoding (beam search) unless a temperature was given."""
    options: dict = {"max_new_tokens": sampling.max_tokens}
    if sampling.temperature is not None:  # 0: greedy; above: sampling from the seeded generator
        options.update(num_beams=1, temperature=sampling.temperature, top_p=sampling.top_p)
        if sampling.temperature > 0:
            options.update(seed=seed, unbatched=next(_unbatched))
    future = served.worker.submit(source, key=tuple(sorted(options.items())))
    sink = job.sink(index)

    def report(done):
        if done.cancelled():
            return
        if done.exception() is not None:
            sink("error", f"generation failed: {done.exception()}")
            return
        text, reason = _cut_at_stop(done.result(), sampling.stop)
        tokens = len(served.tokenizer.encode(text, add_special_tokens=False).ids)
        if reason is None:
            reason = "length" if tokens >= sampling.max_tokens else "stop"
        if text:
            sink("text", text)
        sink("done", (reason, tokens))

    future.add_done_callback(report)
    job._cancels.append(future.cancel)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, str | None]:
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(found)], "stop") if found else (text, None)
