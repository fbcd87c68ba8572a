"""A sequence's text as it grows token by token: what can be sent now, and where a stop string ends it.

Text is released only once it is settled: a trailing U+FFFD (the first bytes of a multi-byte
character whose last bytes are still to come) and a tail that could be the start of a stop string
are held back until the next tokens decide them. A stop string ends the text just before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["TextStream"]

_REPLACEMENT = "\ufffd"
#: Tokens decoded again before the newest ones, so that a tokenizer joining tokens (spaces, bytes)
#: renders them in context.
_CONTEXT_TOKENS = 6


class TextStream:
    """Incremental detokenization of one sequence's output, with its stop strings."""

    def __init__(self, detokenize: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._detokenize = detokenize
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        #: The text of ``_ids[:_settled_ids]``, settled: later tokens do not change it.
        self._settled_text = ""
        self._settled_ids = 0
        #: How much of the whole text was sent.
        self._sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        return self._settled_text + self._tail()

    def push(self, token_id: int) -> str:
        """Add a token; return the text that can be sent now (possibly empty). After a stop string
        (``stopped``), the text ends before it and later calls return nothing."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        text = self.text
        if self._stop:
            start = max(0, self._sent - max(len(s) for s in self._stop))
            hits = [i for s in self._stop if (i := text.find(s, start)) >= 0]
            if hits:
                self.stopped = True
                return self._release(text[: min(hits)])
        end = len(text)
        if text.endswith(_REPLACEMENT):
            end = len(text.rstrip(_REPLACEMENT))
        end = min(end, self._hold_for_stop(text, end))
        self._settle()
        return self._release(text[:end])

    def flush(self) -> str:
        """The sequence ended: whatever was held back (a partial stop string, a broken character)."""
        if self.stopped:
            return ""
        return self._release(self.text)

    def _release(self, text: str) -> str:
        out = text[self._sent :]
        self._sent = max(self._sent, len(text))
        return out

    def _hold_for_stop(self, text: str, end: int) -> int:
        """Where the sendable text must end so that no possible start of a stop string is sent."""
        cut = end
        for stop in self._stop:
            for n in range(min(len(stop) - 1, end), 0, -1):
                if text[end - n : end] == stop[:n]:
                    cut = min(cut, end - n)
                    break
        return cut

    def _tail(self) -> str:
        context = self._ids[max(0, self._settled_ids - _CONTEXT_TOKENS) : self._settled_ids]
        whole = self._detokenize(context + self._ids[self._settled_ids :])
        prefix = self._detokenize(context)
        if whole.startswith(prefix):
            return whole[len(prefix) :]
        return whole  # a tokenizer that rewrites its context: fall back to decoding the new tokens alone

    def _settle(self) -> None:
        """Fold all but the newest tokens into the settled text once they render without U+FFFD."""
        if len(self._ids) - self._settled_ids <= _CONTEXT_TOKENS:
            return
        tail = self._tail()
        if tail.endswith(_REPLACEMENT):
            return
        self._settled_text += tail
        self._settled_ids = len(self._ids)
