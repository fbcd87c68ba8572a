"""A scripted stand-in for :meth:`EmberService.generate`, for tests of what sits above it (the gateway,
clients): :class:`ScriptedGeneration`.

It honours the service's seam exactly: ``generate(name, request, timeout_s=None)`` is an async
generator function, so calling it returns the stream and an admission error (a scripted
:class:`~ember.errors.EmberError` before any chunk) raises on the first ``__anext__``; an error later
in the script raises mid-stream; a stream closed early (``aclose()``, or its consumer cancelled) is
counted in :attr:`ScriptedGeneration.closed`, as the service would cancel the sequence.

Install it on a service (``service.generate = ScriptedGeneration().generate``) or call it directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from ember.errors import EmberError
from ember.generation import FinishReason, GenerateRequest, TokenChunk

__all__ = ["WORDS", "Script", "ScriptedGeneration", "word_script"]

#: What the default script says, a word per token, round and round.
WORDS = ("Ember", " keeps", " models", " warm", " and", " answers", " token", " by", " token", ".")

#: What a request gets: its chunks in order, and errors where they are raised.
Script = Callable[[str, GenerateRequest], Sequence[TokenChunk | EmberError]]


def word_script(name: str, request: GenerateRequest) -> list[TokenChunk | EmberError]:
    """The default answer: :data:`WORDS` a token each (starting ``seed`` words in), ending at a stop
    string (``stop``, the text cut before it) or at ``max_tokens`` (``length``).

    Prompt tokens are whitespace-separated words of the prompt (or of the messages); a token's
    log-probability is ``-0.5``, and its alternatives the next words, ``-1.0`` and lower.
    """
    text = request.prompt if request.prompt is not None else " ".join(m.content for m in request.messages or ())
    prompt_tokens = max(1, len(text.split()))
    params = request.params
    start = (params.seed or 0) % len(WORDS)
    chunks: list[TokenChunk | EmberError] = []
    said = ""
    for i in range(params.max_tokens):
        word = WORDS[(start + i) % len(WORDS)]
        cut = _stop_at(said + word, params.stop)
        reason: FinishReason | None = "length" if i == params.max_tokens - 1 else None
        if cut is not None:
            word, reason = (said + word)[:cut][len(said) :], "stop"
        logprobs = top = None
        if params.logprobs is not None:
            logprobs = (-0.5,)
            alternatives = [(WORDS[(start + i + k) % len(WORDS)], -0.5 - k * 0.5) for k in range(params.logprobs)]
            top = (tuple(alternatives),)
        chunks.append(
            TokenChunk(
                text=word,
                token_ids=(i,),
                prompt_tokens=prompt_tokens if i == 0 else 0,
                completion_tokens=i + 1,
                finish_reason=reason,
                logprobs=logprobs,
                top_logprobs=top,
                token_texts=(WORDS[(start + i) % len(WORDS)],) if params.logprobs is not None else (),
            )
        )
        said += word
        if reason is not None:
            break
    return chunks


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


@dataclass
class ScriptedGeneration:
    """Answers each request with ``script(name, request)``; records what it was asked and how each
    stream ended. With ``hold_after`` set, a stream stops after that many chunks and waits (as a slow
    model would) until :meth:`release`, or until it is closed."""

    script: Script = word_script
    hold_after: int | None = None
    #: Every call, in order: (model name, request, timeout_s).
    calls: list[tuple[str, GenerateRequest, float | None]] = field(default_factory=list)
    #: Streams closed (or cancelled) before their last chunk or error.
    closed: int = 0
    #: Streams that gave their last chunk, or raised their error.
    finished: int = 0
    _release: asyncio.Event | None = None

    def release(self) -> None:
        """Let held streams go on."""
        self._event().set()

    @property
    def open(self) -> int:
        """Streams started and neither finished nor closed."""
        return len(self.calls) - self.closed - self.finished

    async def generate(
        self, name: str, request: GenerateRequest, timeout_s: float | None = None
    ) -> AsyncIterator[TokenChunk]:
        self.calls.append((name, request, timeout_s))
        done = False
        try:
            for i, item in enumerate(self.script(name, request)):
                if self.hold_after is not None and i == self.hold_after:
                    await self._event().wait()
                if isinstance(item, EmberError):
                    done = True
                    raise item
                if item.finish_reason is not None:
                    done = True
                yield item
                if done:
                    return
            done = True
        finally:
            if done:
                self.finished += 1
            else:
                self.closed += 1

    def _event(self) -> asyncio.Event:
        if self._release is None:
            self._release = asyncio.Event()
        return self._release
