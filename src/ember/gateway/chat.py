"""``POST /v1/chat/completions`` and ``POST /v1/completions``, in OpenAI's shapes, streamed or whole.

A request (:mod:`ember.gateway.completions`) becomes one generation per choice; every choice's first
chunk is awaited before the answer starts, so refusals are proper statuses in OpenAI's error object.
A streamed answer is server-sent events: ``chat.completion.chunk`` objects (the first delta of each
choice carries ``role``, the last its ``finish_reason``; ``text_completion`` objects for
completions), choices interleaved as they produce tokens, then with ``stream_options.include_usage``
a chunk with empty ``choices`` and the ``usage``, then ``data: [DONE]``. An error after the answer
began is an event ``{"error": {...}}`` and then ``[DONE]``: the official clients raise it. A client
that disconnects stops its generations (:mod:`ember.gateway.streams`).

``usage`` counts the model's tokens, as the worker's tokenizer counted them; choices of one prompt
share its prompt tokens.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ember.clock import Clock
from ember.config import Deployment
from ember.errors import EmberError, InternalError
from ember.gateway import auth
from ember.gateway.completions import BadParameter, ChatRequest, CompletionRequest, parse_chat, parse_completion
from ember.gateway.edge import openai_error, read_json
from ember.gateway.streams import (
    DONE,
    EventStream,
    Generates,
    Opened,
    event,
    interleave,
    open_streams,
    until_disconnected,
)
from ember.generation import TokenChunk

__all__ = ["generative_deployment", "midstream_error", "model_length", "routes"]

log = logging.getLogger("ember.gateway")

#: A model whose metadata lacks a length limit (it should not happen) is held to this many tokens.
FALLBACK_MAX_MODEL_LEN = 2048


def routes(service: Generates, clock: Clock) -> list[Route]:
    async def chat_completions(request: Request) -> Response:
        parsed = parse_chat(await read_json(request))
        return await _serve(service, clock, request, parsed, _ChatShape())

    async def completions(request: Request) -> Response:
        parsed = parse_completion(await read_json(request))
        return await _serve(service, clock, request, parsed, _CompletionShape())

    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]


def midstream_error(exc: Exception) -> EmberError:
    """What a stream that has begun says of an error: Ember's own as is; anything else is a bug."""
    if isinstance(exc, EmberError):
        return exc
    log.error("internal error in a token stream", exc_info=exc)
    return InternalError(f"internal error ({type(exc).__name__}); the server log has details")


def generative_deployment(service: Generates, request: Request, name: str, route: str) -> Deployment:
    """The caller's model ``name``, which must be generative: a one-shot model gets a 400 naming the
    routes it answers on."""
    d = service.deployment(name)
    auth.check_model(request, name, d.tenant)
    if not d.generative:
        other = " or /v1/embeddings" if d.metadata.task == "embeddings" else ""
        raise BadParameter(
            f"model '{name}' is not a generative model, so it does not answer on {route}; "
            f"call it on /v2/models/{name}/infer{other}",
            "model",
        )
    return d


def model_length(d: Deployment) -> int:
    """The longest prompt + output a sequence of ``d`` may reach."""
    if d.max_model_len is not None:
        return d.max_model_len
    info = d.metadata.generation
    return info.max_model_len if info is not None else FALLBACK_MAX_MODEL_LEN


async def _serve(
    service: Generates, clock: Clock, request: Request, parsed: ChatRequest | CompletionRequest, shape: _Shape
) -> Response:
    name = auth.qualified(request, parsed.model)
    route = "/v1/chat/completions" if isinstance(parsed, ChatRequest) else "/v1/completions"
    d = generative_deployment(service, request, name, route)
    info = d.metadata.generation
    if isinstance(parsed, ChatRequest) and info is not None and not info.chat_template:
        raise BadParameter(
            f"model '{name}' has no chat template, so it cannot take messages; send a prompt to /v1/completions",
            "messages",
        )
    requests = parsed.requests(model_length(d))
    opened = await until_disconnected(request.receive, open_streams(service, name, requests))
    if opened is None:  # the client left while its first tokens were awaited: nobody to answer
        return Response(status_code=499)
    answer = _Answer(shape, parsed.model, int(clock.wall()), len(requests), parsed.n)
    if parsed.stream:
        return EventStream(_events(answer, opened, parsed.include_usage), opened.close)
    try:
        whole = await until_disconnected(request.receive, _collect(answer, opened))
    finally:
        await opened.close()
    return JSONResponse(whole) if whole is not None else Response(status_code=499)


async def _events(answer: _Answer, opened: Opened, include_usage: bool) -> AsyncIterator[bytes]:
    usage: dict[str, Any] = {"usage": None} if include_usage else {}
    try:
        for i in range(answer.choices):
            opening = answer.shape.opening(i)
            if opening is not None:
                yield event(answer.chunk([opening], usage))
        async for i, chunk in interleave(opened):
            yield event(answer.chunk([answer.add(i, chunk)], usage))
        if include_usage:
            yield event(answer.chunk([], {"usage": answer.usage()}))
    except Exception as exc:  # the answer has begun: an error ends it as an event
        yield event(openai_error(midstream_error(exc)))
    yield DONE


async def _collect(answer: _Answer, opened: Opened) -> dict[str, Any]:
    async for i, chunk in interleave(opened):
        answer.add(i, chunk)
    return answer.whole()


@dataclass
class _Choice:
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Per token: (token text, log-probability, alternatives).
    logprobs: list[tuple[str, float, tuple[tuple[str, float], ...]]] = field(default_factory=list)
    asked_logprobs: bool = False


class _Answer:
    """One response being built: its id, and each choice's text, tokens and ending."""

    def __init__(self, shape: _Shape, model: str, created: int, choices: int, n: int) -> None:
        self.shape = shape
        self.model = model
        self.created = created
        self.id = f"{shape.id_prefix}-{uuid.uuid4().hex}"
        self.choices = choices
        self.n = n
        self.state = [_Choice() for _ in range(choices)]

    def add(self, i: int, chunk: TokenChunk) -> dict[str, Any]:
        """Take a choice's chunk; returns its part of a streamed chunk."""
        choice = self.state[i]
        start = len(choice.text)
        choice.text += chunk.text
        choice.prompt_tokens = max(choice.prompt_tokens, chunk.prompt_tokens)
        choice.completion_tokens = max(choice.completion_tokens, chunk.completion_tokens)
        if chunk.finish_reason is not None:
            choice.finish_reason = chunk.finish_reason
        logprobs = _token_logprobs(chunk)
        if chunk.logprobs is not None:
            choice.asked_logprobs = True
            choice.logprobs.extend(logprobs)
        return self.shape.delta(i, chunk, logprobs if chunk.logprobs is not None else None, start)

    def chunk(self, choices: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.shape.chunk_object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
            **extra,
        }

    def usage(self) -> dict[str, int]:
        """Tokens used: each prompt once (its ``n`` choices share it), every choice's output."""
        prompts: dict[int, int] = {}
        for i, choice in enumerate(self.state):
            prompts[i // self.n] = max(prompts.get(i // self.n, 0), choice.prompt_tokens)
        prompt = sum(prompts.values())
        completion = sum(choice.completion_tokens for choice in self.state)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.shape.whole_object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [self.shape.final(i, choice) for i, choice in enumerate(self.state)],
            "usage": self.usage(),
        }


def _token_logprobs(chunk: TokenChunk) -> list[tuple[str, float, tuple[tuple[str, float], ...]]]:
    if chunk.logprobs is None:
        return []
    count = len(chunk.logprobs)
    texts = chunk.token_texts if len(chunk.token_texts) == count else (chunk.text, *[""] * (count - 1))
    tops = chunk.top_logprobs if chunk.top_logprobs is not None and len(chunk.top_logprobs) == count else None
    return [(texts[k], chunk.logprobs[k], tops[k] if tops is not None else ()) for k in range(count)]


class _Shape:
    """What differs between chat and completions answers."""

    id_prefix = ""
    chunk_object = ""
    whole_object = ""

    def opening(self, i: int) -> dict[str, Any] | None:
        return None

    def delta(
        self, i: int, chunk: TokenChunk, logprobs: list[tuple[str, float, Any]] | None, offset: int
    ) -> dict[str, Any]:
        raise NotImplementedError

    def final(self, i: int, choice: _Choice) -> dict[str, Any]:
        raise NotImplementedError


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _chat_logprobs(logprobs: list[tuple[str, float, Any]]) -> dict[str, Any]:
    return {
        "content": [
            {**_token(text, lp), "top_logprobs": [_token(t, v) for t, v in alternatives]}
            for text, lp, alternatives in logprobs
        ],
        "refusal": None,
    }


class _ChatShape(_Shape):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"
    whole_object = "chat.completion"

    def opening(self, i: int) -> dict[str, Any]:
        return {
            "index": i,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def delta(
        self, i: int, chunk: TokenChunk, logprobs: list[tuple[str, float, Any]] | None, offset: int
    ) -> dict[str, Any]:
        return {
            "index": i,
            "delta": {"content": chunk.text} if chunk.text else {},
            "logprobs": None if logprobs is None else _chat_logprobs(logprobs),
            "finish_reason": chunk.finish_reason,
        }

    def final(self, i: int, choice: _Choice) -> dict[str, Any]:
        return {
            "index": i,
            "message": {"role": "assistant", "content": choice.text, "refusal": None},
            "logprobs": _chat_logprobs(choice.logprobs) if choice.asked_logprobs else None,
            "finish_reason": choice.finish_reason,
        }


def _completion_logprobs(logprobs: list[tuple[str, float, Any]], offset: int) -> dict[str, Any]:
    offsets = []
    for text, _, _ in logprobs:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": [text for text, _, _ in logprobs],
        "token_logprobs": [lp for _, lp, _ in logprobs],
        "top_logprobs": [dict(alternatives) for _, _, alternatives in logprobs],
        "text_offset": offsets,
    }


class _CompletionShape(_Shape):
    id_prefix = "cmpl"
    chunk_object = "text_completion"
    whole_object = "text_completion"

    def delta(
        self, i: int, chunk: TokenChunk, logprobs: list[tuple[str, float, Any]] | None, offset: int
    ) -> dict[str, Any]:
        return {
            "index": i,
            "text": chunk.text,
            "logprobs": None if logprobs is None else _completion_logprobs(logprobs, offset),
            "finish_reason": chunk.finish_reason,
        }

    def final(self, i: int, choice: _Choice) -> dict[str, Any]:
        return {
            "index": i,
            "text": choice.text,
            "logprobs": _completion_logprobs(choice.logprobs, 0) if choice.asked_logprobs else None,
            "finish_reason": choice.finish_reason,
        }
