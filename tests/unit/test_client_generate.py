"""``Client.generate`` reading OpenAI streams, against httpx's MockTransport."""

from __future__ import annotations

import json

import httpx
import pytest

from ember.client import Client
from ember.errors import DeadlineUnmeetable, EmberError


def sse(*events: object) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def client_answering(status: int, body: bytes, headers: dict[str, str] | None = None) -> Client:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"Content-Type": "text/event-stream", **(headers or {})})

    return Client("http://ember.test", transport=httpx.MockTransport(handler), api_key="k")


def test_an_error_event_mid_stream_raises_after_the_pieces_before_it():
    body = sse({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}, {"error": {"message": "worker died"}})
    pieces: list[str] = []
    with client_answering(200, body) as ember, pytest.raises(EmberError, match="worker died"):
        pieces.extend(ember.generate("llm", "hi"))
    assert pieces == ["Hel"]


def test_a_stream_cut_before_done_is_an_error():
    body = sse({"choices": [{"index": 0, "text": "a"}]})
    with client_answering(200, body) as ember, pytest.raises(EmberError, match=r"\[DONE\]"):
        list(ember.generate("llm", "hi", chat=False))


def test_a_refusal_in_openais_error_shape_keeps_its_message_and_retry_after():
    body = json.dumps({"error": {"message": "TTFT objective unmeetable", "type": "rate_limit_error"}}).encode()
    with client_answering(429, body, {"Retry-After": "4"}) as ember, pytest.raises(DeadlineUnmeetable) as caught:
        list(ember.generate("llm", "hi"))
    assert caught.value.message == "TTFT objective unmeetable" and caught.value.retry_after_s == 4.0


def test_usage_chunks_and_done_end_the_text():
    body = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
        b"[DONE]",
    )
    with client_answering(200, body) as ember:
        assert list(ember.generate("llm", "hi")) == ["Hi"]
