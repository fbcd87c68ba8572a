"""``/v1/chat/completions`` and ``/v1/completions`` in process: the official ``openai`` client (async,
over the ASGI transport) and raw SSE, against the gateway over a service whose ``generate`` is a
:class:`~ember.testing.generation.ScriptedGeneration` (the service's seam, scripted)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from generative_gateway import HELLO, Env, events, with_gateway

from ember.errors import DeadlineUnmeetable, EmberError, ModelFailed
from ember.generation import GenerateRequest, TokenChunk
from ember.testing.generation import WORDS, ScriptedGeneration, word_script


def test_a_chat_completion_through_the_openai_client(tmp_path):
    async def test(env: Env) -> None:
        async with env.openai() as client:
            answer = await client.chat.completions.create(model="llm", messages=HELLO, max_tokens=4, seed=0)
        (choice,) = answer.choices
        assert choice.message.role == "assistant"
        assert choice.message.content == "".join(WORDS[:4])
        assert choice.finish_reason == "length" and choice.index == 0
        assert answer.object == "chat.completion" and answer.model == "llm" and answer.id.startswith("chatcmpl-")
        assert answer.usage is not None
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (2, 4, 6)
        ((name, request, _),) = env.fake.calls
        assert name == "llm" and request.params.max_tokens == 4 and request.params.seed == 0

    fake = with_gateway(tmp_path, test)
    assert fake.finished == 1 and fake.open == 0


def test_a_stop_string_ends_the_choice_with_stop(tmp_path):
    async def test(env: Env) -> None:
        async with env.openai() as client:
            answer = await client.chat.completions.create(model="llm", messages=HELLO, stop=[" warm"])
        assert answer.choices[0].message.content == "Ember keeps models"
        assert answer.choices[0].finish_reason == "stop"

    with_gateway(tmp_path, test)


def test_n_choices_are_separate_seeded_generations(tmp_path):
    async def test(env: Env) -> None:
        async with env.openai() as client:
            answer = await client.chat.completions.create(model="llm", messages=HELLO, n=3, seed=1, max_tokens=2)
        assert [c.index for c in answer.choices] == [0, 1, 2]
        assert [c.message.content for c in answer.choices] == [
            WORDS[1] + WORDS[2],
            WORDS[2] + WORDS[3],
            WORDS[3] + WORDS[4],
        ]
        assert answer.usage is not None
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (2, 6)  # the prompt counted once
        assert [request.params.seed for _, request, _ in env.fake.calls] == [1, 2, 3]

    with_gateway(tmp_path, test)


def test_a_streamed_chat_through_the_openai_client(tmp_path):
    async def test(env: Env) -> None:
        async with env.openai() as client:
            stream = await client.chat.completions.create(
                model="llm", messages=HELLO, max_tokens=3, stream=True, stream_options={"include_usage": True}
            )
            chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "".join(WORDS[:3])
        finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishing == ["length"]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens == 2
        assert all(c.usage is None for c in chunks[:-1])
        assert len({c.id for c in chunks}) == 1

    with_gateway(tmp_path, test)


def test_completions_whole_and_streamed_through_the_openai_client(tmp_path):
    async def test(env: Env) -> None:
        async with env.openai() as client:
            whole = await client.completions.create(model="llm", prompt="Once upon a time", max_tokens=5)
            stream = await client.completions.create(model="llm", prompt="Once upon", max_tokens=5, stream=True)
            parts = [chunk async for chunk in stream]
        assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
        assert whole.choices[0].text == "".join(WORDS[:5]) and whole.choices[0].finish_reason == "length"
        assert whole.usage is not None and whole.usage.prompt_tokens == 4
        assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
        assert parts[-1].choices[0].finish_reason == "length"

    with_gateway(tmp_path, test)


def test_the_sse_wire_format_is_openais(tmp_path):
    async def test(env: Env) -> None:
        async with env.http() as http:
            body = {"model": "llm", "messages": HELLO, "max_tokens": 2, "n": 2, "stream": True}
            r = await http.post("/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = events(r.text)
        assert data[-1] == "[DONE]"
        chunks = data[:-1]
        assert all(c["object"] == "chat.completion.chunk" and len(c["choices"]) <= 1 for c in chunks)
        assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
        assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
        for index in (0, 1):
            mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
            assert "".join(m["delta"].get("content", "") for m in mine) == "".join(WORDS[:2])
            assert [m["finish_reason"] for m in mine] == [None, None, "length"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4

    with_gateway(tmp_path, test)


def test_logprobs_in_chat_and_completions(tmp_path):
    async def test(env: Env) -> None:
        async with env.openai() as client:
            answer = await client.chat.completions.create(
                model="llm", messages=HELLO, max_tokens=2, logprobs=True, top_logprobs=2
            )
            text = await client.completions.create(model="llm", prompt="Hi", max_tokens=2, logprobs=1)
        content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
        assert [t.token for t in content] == list(WORDS[:2]) and [t.logprob for t in content] == [-0.5, -0.5]
        assert [a.token for a in content[1].top_logprobs] == [WORDS[1], WORDS[2]]
        assert content[0].bytes == list(WORDS[0].encode())
        logprobs = text.choices[0].logprobs
        assert logprobs is not None and logprobs.tokens == list(WORDS[:2])
        assert logprobs.text_offset == [0, len(WORDS[0])] and logprobs.top_logprobs == [
            {WORDS[0]: -0.5},
            {WORDS[1]: -0.5},
        ]

    with_gateway(tmp_path, test)


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "fragment"),
    [
        ("/v1/chat/completions", {"model": "ghost", "messages": HELLO}, 404, None, "ghost"),
        ("/v1/chat/completions", {"model": "m", "messages": HELLO}, 400, "model", "/v2/models/m/infer"),
        ("/v1/completions", {"model": "m", "prompt": "x"}, 400, "model", "/v2/models/m/infer"),
        ("/v1/embeddings", {"model": "llm", "input": "x"}, 400, "model", "/v1/chat/completions"),
        ("/v1/chat/completions", {"model": "llm", "messages": HELLO, "max_tokens": 65}, 400, "max_tokens", "64"),
        ("/v1/chat/completions", {"model": "llm", "messages": HELLO, "tools": [{}]}, 400, "tools", "tool"),
        ("/v1/chat/completions", {"model": "llm", "messages": HELLO, "bogus": 1}, 400, "bogus", "bogus"),
        ("/v1/chat/completions", {"model": "llm", "messages": [{"role": "x", "content": "y"}]}, 400, None, "role"),
        ("/v1/completions", {"model": "llm", "prompt": [1, 2, 3]}, 400, "prompt", "token arrays"),
        ("/v1/chat/completions", {"model": "raw", "messages": HELLO}, 400, "messages", "/v1/completions"),
    ],
)
def test_bad_requests_answer_in_openais_error_shape(tmp_path, path, body, status, param, fragment):
    async def test(env: Env) -> None:
        async with env.http() as http:
            r = await http.post(path, json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and fragment in error["message"]
        if param is not None:
            assert error["param"] == param
        assert env.fake.calls == []

    with_gateway(tmp_path, test)


def test_an_admission_refusal_is_a_429_with_retry_after_before_any_byte(tmp_path):
    def refuse(name: str, request: GenerateRequest) -> list[TokenChunk | EmberError]:
        return [DeadlineUnmeetable("the first token cannot come within the TTFT objective", retry_after_s=3.0)]

    async def test(env: Env) -> None:
        async with env.http() as http:
            r = await http.post("/v1/chat/completions", json={"model": "llm", "messages": HELLO, "stream": True})
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["type"] == "rate_limit_error" and "TTFT" in r.json()["error"]["message"]
        async with env.openai() as client:
            with pytest.raises(openai.RateLimitError, match="TTFT"):
                await client.chat.completions.create(model="llm", messages=HELLO)

    with_gateway(tmp_path, test, ScriptedGeneration(refuse))


def test_one_refused_choice_closes_the_others(tmp_path):
    def second_refused(name: str, request: GenerateRequest) -> list[TokenChunk | EmberError]:
        if request.params.seed == 1:
            return [DeadlineUnmeetable("full", retry_after_s=1.0)]
        return list(word_script(name, request))

    async def test(env: Env) -> None:
        async with env.http() as http:
            r = await http.post("/v1/completions", json={"model": "llm", "prompt": "x", "n": 3, "seed": 0})
        assert r.status_code == 429

    fake = with_gateway(tmp_path, test, ScriptedGeneration(second_refused))
    assert fake.open == 0 and len(fake.calls) == 3


def test_an_error_mid_stream_is_an_error_event_then_done(tmp_path):
    def fails(name: str, request: GenerateRequest) -> list[TokenChunk | EmberError]:
        return [*word_script(name, request)[:2], ModelFailed("the model raised in decode step 3")]

    async def test(env: Env) -> None:
        async with env.http() as http:
            r = await http.post("/v1/chat/completions", json={"model": "llm", "messages": HELLO, "stream": True})
            assert r.status_code == 200
            data = events(r.text)
            assert data[-1] == "[DONE]"
            assert data[-2]["error"]["message"] == "the model raised in decode step 3"
            assert data[-2]["error"]["type"] == "server_error"
            r = await http.post("/v1/chat/completions", json={"model": "llm", "messages": HELLO})
            assert r.status_code == 500 and "decode step 3" in r.json()["error"]["message"]
        async with env.openai() as client:
            stream = await client.chat.completions.create(model="llm", messages=HELLO, stream=True)
            with pytest.raises(openai.APIError, match="decode step 3"):
                async for _ in stream:
                    pass

    fake = with_gateway(tmp_path, test, ScriptedGeneration(fails))
    assert fake.open == 0


def test_a_bug_mid_stream_is_an_internal_error_event(tmp_path):
    def buggy(name: str, request: GenerateRequest) -> list[TokenChunk | EmberError]:
        chunks = word_script(name, request)
        return [chunks[0], chunks[1].text]  # type: ignore[list-item]  # a str: the stream raises AttributeError, a bug

    async def test(env: Env) -> None:
        async with env.http() as http:
            r = await http.post("/v1/completions", json={"model": "llm", "prompt": "x", "stream": True})
        data = events(r.text)
        assert data[-1] == "[DONE]" and data[-2]["error"]["code"] == "InternalError"
        assert "AttributeError" in data[-2]["error"]["message"]

    with_gateway(tmp_path, test, ScriptedGeneration(buggy))


def test_a_client_that_disconnects_mid_stream_closes_its_generations(tmp_path):
    async def test(env: Env) -> None:
        body = json.dumps({"model": "llm", "messages": HELLO, "n": 2, "stream": True}).encode()
        sent: list[dict[str, Any]] = []
        requested = False
        read_some = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            await read_some.wait()  # the client reads the first events, then hangs up
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if len([m for m in sent if m["type"] == "http.response.body"]) == 3:
                read_some.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"authorization", f"Bearer {env.key}".encode()), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 5000),
            "server": ("ember", 80),
        }
        await env.app(scope, receive, send)
        assert sent[0]["status"] == 200
        assert not any(m.get("more_body") is False for m in sent)  # the answer was cut, not finished
        assert env.fake.closed == 2 and env.fake.open == 0

    with_gateway(tmp_path, test, ScriptedGeneration(hold_after=2))


def test_a_client_that_leaves_before_a_whole_answer_closes_its_generation(tmp_path):
    async def test(env: Env) -> None:
        body = json.dumps({"model": "llm", "prompt": "x"}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:  # the body, then the client is gone
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"authorization", f"Bearer {env.key}".encode())],
            "client": ("127.0.0.1", 5000),
            "server": ("ember", 80),
        }
        await env.app(scope, receive, send)
        assert env.fake.closed == 1 and env.fake.open == 0

    with_gateway(tmp_path, test, ScriptedGeneration(hold_after=1))
