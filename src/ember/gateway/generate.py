"""Triton's generate extension: ``POST /v2/models/{name}[/versions/{v}]/generate`` and ``/generate_stream``.

The request is ``{"text_input": "...", "parameters": {...}}``; the parameters are ``max_tokens``
(default 16), ``temperature``, ``top_p``, ``seed``, ``stop`` (a string or a list; ``stop_words`` is
the same, as TensorRT-LLM names it), ``ignore_eos``, ``exclude_input_in_output`` (true by default:
``text_output`` holds the generated text alone; false puts the prompt before it) and ``stream``
(false on ``/generate``; on ``/generate_stream``, false sends the whole text as one event). As
Triton allows, they may also be given beside ``text_input`` instead of inside ``parameters``. Any
other field is a 400 naming it.

``/generate`` answers ``{"model_name", "model_version", "text_output", "finish_reason"}`` (and the
request's ``id``, if it had one); ``/generate_stream`` answers the same objects as server-sent events
``data: {...}``, each with the text the step added, the last with ``finish_reason``. An error before
the first token is a JSON ``{"error": "..."}`` with its status; an error after it, an event
``data: {"error": "..."}`` that ends the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ember.config import Deployment, validation_message
from ember.errors import InvalidInput, ModelNotFound
from ember.gateway.chat import midstream_error, model_length
from ember.gateway.completions import INT64_MAX, INT64_MIN, MAX_STOP, MAX_STOP_CHARS
from ember.gateway.edge import read_json
from ember.gateway.streams import EventStream, Generates, Opened, event, interleave, open_streams, until_disconnected
from ember.generation import GenerateRequest, SamplingParams

__all__ = ["GenerateBody", "parse_generate", "routes"]

DEFAULT_MAX_TOKENS = 16


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    text_input: str
    id: str | None = Field(None, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_words: str | list[str] | None = None
    ignore_eos: bool = False
    exclude_input_in_output: bool = True
    stream: bool | None = None

    @field_validator("stop", "stop_words")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters")
        return value

    def stops(self) -> tuple[str, ...]:
        found: list[str] = []
        for value in (self.stop, self.stop_words):
            found += [value] if isinstance(value, str) else value or []
        return tuple(s for s in dict.fromkeys(found) if s)  # TensorRT-LLM clients send "" for none

    def request(self, max_model_len: int) -> GenerateRequest:
        asked = self.max_tokens if self.max_tokens is not None else min(DEFAULT_MAX_TOKENS, max_model_len)
        if asked > max_model_len:
            raise InvalidInput(
                f"max_tokens is {asked}, over the model's length limit of {max_model_len} tokens "
                "(prompt and output together): ask for fewer"
            )
        params = SamplingParams(
            max_tokens=asked,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stops(),
            ignore_eos=self.ignore_eos,
        )
        return GenerateRequest(params, prompt=self.text_input)


def parse_generate(body: Any) -> GenerateBody:
    """The request, its ``parameters`` folded in beside ``text_input``."""
    if not isinstance(body, dict):
        example = '{"text_input": "...", "parameters": {"max_tokens": 16}}'
        raise InvalidInput(f"the body must be a JSON object like {example}")
    fields = dict(body)
    parameters = fields.pop("parameters", None) or {}
    if not isinstance(parameters, dict):
        raise InvalidInput('"parameters" must be a JSON object of name: value pairs')
    both = sorted(set(parameters) & set(fields))
    if both:
        raise InvalidInput(f"{', '.join(both)} given both in parameters and beside text_input: give each once")
    if "text_input" in parameters:
        raise InvalidInput("text_input goes beside parameters, not in them")
    try:
        return GenerateBody.model_validate({**fields, **parameters})
    except ValidationError as exc:
        raise InvalidInput(validation_message(exc, GenerateBody.model_fields)) from None


def routes(service: Generates) -> list[Route]:
    async def generate(request: Request) -> Response:
        return await _serve(service, request, streamed=False)

    async def generate_stream(request: Request) -> Response:
        return await _serve(service, request, streamed=True)

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    return [
        Route(f"{model}/generate", generate, methods=["POST"]),
        Route(f"{versioned}/generate", generate, methods=["POST"]),
        Route(f"{model}/generate_stream", generate_stream, methods=["POST"]),
        Route(f"{versioned}/generate_stream", generate_stream, methods=["POST"]),
    ]


def _deployment(service: Generates, request: Request, route: str) -> Deployment:
    name, version = request.path_params["name"], request.path_params.get("version")
    d = service.deployment(name)
    if version not in (None, "", str(d.version)):
        raise ModelNotFound(f"{name} version {version}")
    if not d.generative:
        raise InvalidInput(
            f"model '{name}' is not a generative model, so it does not answer on {route}; "
            f"call it on /v2/models/{name}/infer"
        )
    return d


async def _serve(service: Generates, request: Request, streamed: bool) -> Response:
    raw = await read_json(request)
    d = _deployment(service, request, "/generate_stream" if streamed else "/generate")
    body = parse_generate(raw)
    if body.stream and not streamed:
        raise InvalidInput(f"stream: true needs /v2/models/{d.name}/generate_stream; /generate answers once")
    opened = await until_disconnected(request.receive, open_streams(service, d.name, [body.request(model_length(d))]))
    if opened is None:
        return Response(status_code=499)
    head = {"model_name": d.name, "model_version": str(d.version), **({"id": body.id} if body.id else {})}
    prefix = "" if body.exclude_input_in_output else body.text_input
    if streamed and body.stream is not False:
        return EventStream(_events(head, prefix, opened), opened.close)
    try:
        whole = await until_disconnected(request.receive, _whole(head, prefix, opened))
    finally:
        await opened.close()
    if whole is None:
        return Response(status_code=499)
    return EventStream(_one(whole), _nothing) if streamed else JSONResponse(whole)


async def _whole(head: dict[str, str], prefix: str, opened: Opened) -> dict[str, Any]:
    text, finish = prefix, None
    async for _, chunk in interleave(opened):
        text += chunk.text
        finish = chunk.finish_reason or finish
    return {**head, "text_output": text, "finish_reason": finish}


async def _events(head: dict[str, str], prefix: str, opened: Opened) -> AsyncIterator[bytes]:
    try:
        async for _, chunk in interleave(opened):
            text, prefix = prefix + chunk.text, ""
            yield event({**head, "text_output": text, "finish_reason": chunk.finish_reason})
    except Exception as exc:  # the answer has begun: an error ends it as an event
        yield event(midstream_error(exc).to_json())


async def _one(answer: dict[str, Any]) -> AsyncIterator[bytes]:
    yield event(answer)


async def _nothing() -> None:
    return None
