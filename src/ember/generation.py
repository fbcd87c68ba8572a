"""What a generative request is and what comes back, as it travels gateway -> scheduler -> worker.

The gateway turns an OpenAI chat or completion request (or a Triton generate request) into one
:class:`GenerateRequest` per choice (``n`` choices: ``n`` requests, the i-th seeded ``seed + i``).
The worker owns the tokenizer, the chat template, the KV cache and the token loop; it answers with a
stream of :class:`TokenChunk`, one per step that produced text for the sequence, the last one with a
``finish_reason``. Nothing here runs model code: these are the frozen values the seams exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ChatMessage", "FinishReason", "GenerateRequest", "GenerationInfo", "SamplingParams", "TokenChunk"]

#: Why a sequence ended: a stop string or the end-of-sequence token (``stop``), or ``max_tokens`` /
#: the model's length limit (``length``). ``cancelled`` never reaches a client: the client left.
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` is greedy decoding (``top_p`` then unused)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    #: Seeds this sequence's own generator: the same seed, prompt and model give the same tokens,
    #: whatever else shares the batch. None: a fresh random seed.
    seed: int | None = None
    #: Strings that end the sequence; the text returned stops before the first of them.
    stop: tuple[str, ...] = ()
    #: Return the chosen token's log-probability and this many alternatives (0..20); None: none.
    logprobs: int | None = None
    #: Keep going past the end-of-sequence token (benchmarks asking for an exact output length).
    ignore_eos: bool = False


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


@dataclass(frozen=True)
class GenerateRequest:
    """One sequence to generate: a raw ``prompt`` (completions) or chat ``messages`` (the worker
    applies the model's chat template), never both."""

    params: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a generate request has a prompt or messages, exactly one of them")

    def size_hint(self) -> int:
        """UTF-8 bytes of the prompt text: what the gateway knows of its length before the worker
        tokenizes it (admission estimates prompt tokens from it, then learns the ratio)."""
        if self.prompt is not None:
            return len(self.prompt.encode())
        return sum(len(m.content.encode()) for m in self.messages or ())


@dataclass(frozen=True)
class TokenChunk:
    """What one step added to one sequence.

    ``text`` is the newly decoded text (possibly empty while a multi-byte character or a possible
    stop string is held back), ``token_ids`` the tokens it came from. The first chunk of a stream
    carries ``prompt_tokens``; every chunk carries the running ``completion_tokens``. The last chunk
    has ``finish_reason`` set.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    #: Per token in ``token_ids``: its log-probability, when the request asked for them.
    logprobs: tuple[float, ...] | None = None
    #: Per token: the ``logprobs`` most likely alternatives as (token text, log-probability).
    top_logprobs: tuple[tuple[tuple[str, float], ...], ...] | None = None
    #: Texts of the tokens in ``token_ids`` (for ``logprobs`` answers), when asked for.
    token_texts: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class GenerationInfo:
    """What a generative model says about itself at deploy time (``ModelMetadata.generation``)."""

    #: The longest prompt + output the model itself supports (its position limit).
    max_model_len: int
    #: KV-cache bytes one token of one sequence holds on the device (all layers, keys and values).
    kv_bytes_per_token: int
    vocab_size: int
    #: Whether the tokenizer has a chat template (``/v1/chat/completions`` needs one).
    chat_template: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "max_model_len": self.max_model_len,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "vocab_size": self.vocab_size,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationInfo:
        return cls(
            max_model_len=int(data["max_model_len"]),
            kv_bytes_per_token=int(data["kv_bytes_per_token"]),
            vocab_size=int(data["vocab_size"]),
            chat_template=bool(data.get("chat_template", True)),
        )
