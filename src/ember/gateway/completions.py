"""What ``/v1/chat/completions`` and ``/v1/completions`` accept, and how a request becomes
:class:`~ember.generation.GenerateRequest` s.

The bodies are validated with OpenAI's field names. A field OpenAI does not have is a 400 naming it;
a field OpenAI has but Ember does not serve (``tools``, ``response_format`` other than text, penalties,
``logit_bias``, ``audio``...) is a 400 naming it too, unless it is null or holds the value that means
"off" (``presence_penalty: 0``, ``tools: []``, ``echo: false``), which changes nothing. Nothing is
silently ignored but ``user``, an opaque end-user id that does not change the answer. One field
is vLLM's, not OpenAI's: ``ignore_eos`` (generate past the end-of-sequence token, for benchmarks
that need exact output lengths).

``n`` choices are ``n`` requests, the i-th seeded ``seed + i`` (so choices differ, and each is
repeatable); a completion with a list of prompts is ``n`` requests per prompt, in order.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ember.config import validation_message
from ember.errors import InvalidInput
from ember.generation import ChatMessage, GenerateRequest, SamplingParams

__all__ = [
    "MAX_CHOICES",
    "MAX_PROMPTS",
    "BadParameter",
    "ChatRequest",
    "CompletionRequest",
    "parse_chat",
    "parse_completion",
]

#: Most choices (``n``) one request may ask for.
MAX_CHOICES = 8
#: Most prompts in one completion request (each gets ``n`` choices).
MAX_PROMPTS = 8
#: A completion's ``max_tokens`` when it gives none (OpenAI's default).
COMPLETION_MAX_TOKENS = 16
#: Most stop strings, as OpenAI allows.
MAX_STOP = 4
#: Longest stop string, in characters.
MAX_STOP_CHARS = 256
#: Most messages in one chat request.
MAX_MESSAGES = 4096
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Role = Literal["system", "user", "assistant", "developer", "tool"]


class BadParameter(InvalidInput):
    """A 400 about one field of the body; OpenAI's error object names it in ``param``."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Role
    content: Any = None
    #: Sent back by clients with a tool's answer; kept with the message, unused by the template.
    tool_call_id: str | None = None
    #: Fields of OpenAI's message that Ember does not serve: null (or empty) only.
    name: Any = None
    tool_calls: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None

    @field_validator("name", "tool_calls", "function_call", "refusal", "audio")
    @classmethod
    def _unserved(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, []):
            raise ValueError(f"a message's '{info.field_name}' is not supported by Ember; leave it out")
        return value

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content: a string or a list of text parts")
        return self

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str | list[dict[str, Any]] | None:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("a message's content must be a string or a non-empty list of text parts")
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                shown = f"'{kind}'" if isinstance(kind, str) else "not a text part"
                raise ValueError(f"content part {i} is {shown}; Ember's models take text parts alone")
            try:
                TextPart.model_validate(part)
            except ValidationError:
                shape = '{"type": "text", "text": "..."}'
                raise ValueError(f"content part {i} must be {shape} and nothing else") from None
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(str(part["text"]) for part in self.content)


class _Sampling(_Strict):
    """The fields chat and completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    #: vLLM's extension: keep generating past the end-of-sequence token (exact output lengths).
    ignore_eos: bool = False
    # Known to OpenAI, not served: null or "off" only (see _unsupported).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop takes at most {MAX_STOP} strings, not {len(stops)}")
        for s in stops:
            if not s:
                raise ValueError("a stop string must not be empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string is at most {MAX_STOP_CHARS} characters long")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _params(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        seed = None if self.seed is None else _wrap64(self.seed + choice)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
            stop=self.stops(),
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
        )


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Known to OpenAI, not served: null or "off" only (see _unsupported).
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[Message]) -> list[Message]:
        if not 1 <= len(value) <= MAX_MESSAGES:
            raise ValueError(f"messages must hold 1 to {MAX_MESSAGES} messages, not {len(value)}")
        return value

    def limit(self) -> int | None:
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise BadParameter(
                f"max_tokens ({self.max_tokens}) and max_completion_tokens ({self.max_completion_tokens}) "
                "disagree; send one of them",
                "max_completion_tokens",
            )
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requests(self, max_model_len: int) -> list[GenerateRequest]:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadParameter("top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = _max_tokens(self.limit(), max_model_len)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        messages = tuple(ChatMessage(m.role, m.text()) for m in self.messages)
        return [GenerateRequest(self._params(max_tokens, logprobs, i), messages=messages) for i in range(self.n)]


class CompletionRequest(_Sampling):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=5)
    # Known to OpenAI, not served: null or "off" only (see _unsupported).
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[str]:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and 1 <= len(value) <= MAX_PROMPTS and all(isinstance(p, str) for p in value):
            return value
        raise ValueError(
            f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings (token arrays are not supported)"
        )

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def requests(self, max_model_len: int) -> list[GenerateRequest]:
        asked = self.max_tokens if self.max_tokens is not None else min(COMPLETION_MAX_TOKENS, max_model_len)
        max_tokens = _max_tokens(asked, max_model_len)
        return [
            GenerateRequest(self._params(max_tokens, self.logprobs, i), prompt=prompt)
            for prompt in self.prompts()
            for i in range(self.n)
        ]


#: Fields OpenAI has that Ember does not serve, and the values that mean "off" (accepted).
_OFF: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}

_WHY = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "parallel_tool_calls": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "response_format": 'structured output (only {"type": "text"})',
    "audio": "audio output",
    "modalities": "output other than text",
    "logit_bias": "logit_bias",
    "frequency_penalty": "penalties (0 only)",
    "presence_penalty": "penalties (0 only)",
    "echo": "echo",
    "suffix": "suffix (insertion)",
    "best_of": "best_of (use n)",
}


def parse_chat(body: Any) -> ChatRequest:
    """A chat completion request, or :class:`BadParameter` naming what is wrong."""
    return _parse(ChatRequest, body, '{"model": "...", "messages": [{"role": "user", "content": "Hello"}]}')


def parse_completion(body: Any) -> CompletionRequest:
    """A completion request, or :class:`BadParameter` naming what is wrong."""
    return _parse(CompletionRequest, body, '{"model": "...", "prompt": "Once upon a time"}')


Parsed = TypeVar("Parsed", bound=_Sampling)


def _parse(cls: type[Parsed], body: Any, example: str) -> Parsed:
    if not isinstance(body, dict):
        raise InvalidInput(f"the body must be a JSON object like {example}")
    try:
        parsed = cls.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        nested_extra = any(e["type"] == "extra_forbidden" and len(e["loc"]) > 1 for e in errors)
        message = validation_message(exc, () if nested_extra else cls.model_fields)
        raise BadParameter(message, _param(errors[0]["loc"])) from None
    _unsupported(body)
    if parsed.stream_options is not None and not parsed.stream:
        raise BadParameter("stream_options is only allowed with stream: true", "stream_options")
    return parsed


def _unsupported(body: dict[str, Any]) -> None:
    for name, off in _OFF.items():
        value = body.get(name)
        if value is not None and not any(
            value == v and isinstance(value, bool) == isinstance(v, bool) for v in off if v is not None
        ):
            what = _WHY.get(name, name)
            raise BadParameter(f"'{name}' is not supported: Ember does not serve {what}; leave it out", name)


def _max_tokens(asked: int | None, max_model_len: int) -> int:
    """The request's output limit: what it asked for, within the model's length (400 beyond it).
    Unasked, the model's length: the sequence ends at it with ``finish_reason: "length"``."""
    if asked is None:
        return max_model_len
    if asked > max_model_len:
        raise BadParameter(
            f"max_tokens is {asked}, over the model's length limit of {max_model_len} tokens "
            "(prompt and output together): ask for fewer",
            "max_tokens",
        )
    return asked


def _param(loc: tuple[int | str, ...]) -> str | None:
    """pydantic's error location as OpenAI's ``param``: ``messages[0].role``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _wrap64(seed: int) -> int:
    """``seed + i`` kept a signed 64-bit integer."""
    return seed if seed <= INT64_MAX else seed - 2**64
