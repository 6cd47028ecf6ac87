"""Generated token ids into text, a piece at a time, cut at the first stop string."""

from __future__ import annotations

from tokenizers import Tokenizer


class IncrementalText:
    """The text of one sequence's generated tokens, released as it becomes final.

    Text is held back while it could still change: a token that ends inside a multi-byte character
    (the decoder shows it as U+FFFD), or an end that may be the start of a stop string. Once a stop
    string appears, the text ends before it and :attr:`stopped` is set.

    Args:
        tokenizer: the served model's tokenizer.
        stop: strings that end the text (not included in it).
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # what was released so far
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a token; return the text that is now final and was not released yet."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut])
        if text.endswith("\ufffd"):
            return ""
        return self._release(text[: len(text) - self._possible_stop_start(text)])

    def finish(self) -> str:
        """The text still held back, once no more tokens come."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids))

    def _release(self, upto: str) -> str:
        """Release ``upto`` (the text so far, of which :attr:`text` is the start); return the new part."""
        piece = upto[len(self.text) :]
        if piece:
            self.text = upto
        return piece

    def _stop_at(self, text: str) -> int | None:
        """Where the earliest stop string starts in ``text`` (searching only where a new one can be)."""
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _possible_stop_start(self, text: str) -> int:
        """The length of the longest end of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
