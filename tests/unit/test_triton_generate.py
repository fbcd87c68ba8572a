"""Triton's generate extension (``/v2/models/{name}/generate`` and ``/generate_stream``) in process,
over a service whose ``generate`` is scripted; and which routes a generative model is refused on."""

from __future__ import annotations

import pytest
from generative_gateway import Env, events, with_gateway

from ember.errors import DeadlineUnmeetable, EmberError, ModelFailed
from ember.generation import GenerateRequest, TokenChunk
from ember.testing.generation import WORDS, ScriptedGeneration, word_script


def test_generate_answers_tritons_response_object(tmp_path):
    async def test(env: Env) -> None:
        async with env.http() as http:
            body = {"text_input": "Once upon a time", "parameters": {"max_tokens": 3, "temperature": 0, "seed": 2}}
            r = await http.post("/v2/models/llm/generate", json=body)
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            assert r.json() == {
                "model_name": "llm",
                "model_version": "1",
                "text_output": "".join(WORDS[2:5]),
                "finish_reason": "length",
            }
            r = await http.post("/v2/models/llm/versions/1/generate", json={"text_input": "Hi", "id": "req-7"})
            assert r.json()["id"] == "req-7" and r.json()["text_output"] == "".join(WORDS[:10] + WORDS[:6])
        ((name, first, _), (_, second, _)) = env.fake.calls
        assert name == "llm" and first.prompt == "Once upon a time"
        assert (first.params.max_tokens, first.params.temperature, first.params.seed) == (3, 0.0, 2)
        assert second.params.max_tokens == 16  # the default

    with_gateway(tmp_path, test)


def test_parameters_may_sit_beside_text_input_as_tensorrt_llm_clients_send_them(tmp_path):
    async def test(env: Env) -> None:
        async with env.http() as http:
            body = {"text_input": "Hi", "max_tokens": 20, "stop_words": [" warm"], "stop": "", "top_p": 0.5}
            r = await http.post("/v2/models/llm/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["text_output"] == "Ember keeps models" and r.json()["finish_reason"] == "stop"
        ((_, request, _),) = env.fake.calls
        assert request.params.stop == (" warm",) and request.params.top_p == 0.5

    with_gateway(tmp_path, test)


def test_generate_stream_sends_each_steps_text_as_an_event(tmp_path):
    async def test(env: Env) -> None:
        async with env.http() as http:
            body = {"text_input": "Hi", "parameters": {"max_tokens": 3, "stream": True}}
            r = await http.post("/v2/models/llm/generate_stream", json=body)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            data = events(r.text)
            assert [d["text_output"] for d in data] == list(WORDS[:3])
            assert [d["finish_reason"] for d in data] == [None, None, "length"]
            assert all(d["model_name"] == "llm" and d["model_version"] == "1" for d in data)
            whole = {"text_input": "Hi", "parameters": {"max_tokens": 3, "stream": False}}
            r = await http.post("/v2/models/llm/generate_stream", json=whole)
            (only,) = events(r.text)
            assert only["text_output"] == "".join(WORDS[:3])
            body = {"text_input": "Hi:", "parameters": {"max_tokens": 2, "exclude_input_in_output": False}}
            r = await http.post("/v2/models/llm/generate_stream", json=body)
            assert "".join(d["text_output"] for d in events(r.text)) == "Hi:" + WORDS[0] + WORDS[1]

    with_gateway(tmp_path, test)


def test_an_error_mid_stream_is_an_error_event(tmp_path):
    def fails(name: str, request: GenerateRequest) -> list[TokenChunk | EmberError]:
        return [*word_script(name, request)[:1], ModelFailed("the model raised")]

    async def test(env: Env) -> None:
        async with env.http() as http:
            r = await http.post("/v2/models/llm/generate_stream", json={"text_input": "Hi"})
            assert r.status_code == 200
            data = events(r.text)
            assert data[0]["text_output"] == WORDS[0] and data[-1] == {"error": "the model raised"}
            r = await http.post("/v2/models/llm/generate", json={"text_input": "Hi"})
            assert r.status_code == 500 and r.json() == {"error": "the model raised"}

    fake = with_gateway(tmp_path, test, ScriptedGeneration(fails))
    assert fake.open == 0


def test_a_refusal_before_the_first_token_is_a_status_with_retry_after(tmp_path):
    def refuse(name: str, request: GenerateRequest) -> list[TokenChunk | EmberError]:
        return [DeadlineUnmeetable("no room for the first token in time", retry_after_s=2.0)]

    async def test(env: Env) -> None:
        async with env.http() as http:
            for route in ("generate", "generate_stream"):
                r = await http.post(f"/v2/models/llm/{route}", json={"text_input": "Hi"})
                assert r.status_code == 429 and r.headers["retry-after"] == "2"
                assert r.headers["content-type"] == "application/json"
                assert r.json() == {"error": "no room for the first token in time"}

    with_gateway(tmp_path, test, ScriptedGeneration(refuse))


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v2/models/ghost/generate", {"text_input": "x"}, 404, "ghost"),
        ("/v2/models/llm/versions/3/generate", {"text_input": "x"}, 404, "version 3"),
        ("/v2/models/m/generate", {"text_input": "x"}, 400, "/v2/models/m/infer"),
        ("/v2/models/m/generate_stream", {"text_input": "x"}, 400, "/v2/models/m/infer"),
        ("/v2/models/llm/generate", {"parameters": {"max_tokens": 3}}, 400, "text_input is required"),
        ("/v2/models/llm/generate", {"text_input": "x", "parameters": {"top_k": 3}}, 400, "no field 'top_k'"),
        ("/v2/models/llm/generate", {"text_input": "x", "max_tokens": 1, "parameters": {"max_tokens": 2}}, 400, "both"),
        ("/v2/models/llm/generate", {"text_input": "x", "parameters": {"max_tokens": 65}}, 400, "limit of 64"),
        ("/v2/models/llm/generate", {"text_input": "x", "parameters": {"stream": True}}, 400, "generate_stream"),
        ("/v2/models/llm/generate", {"text_input": "x", "parameters": [1]}, 400, "JSON object"),
        ("/v2/models/llm/generate", ["x"], 400, "text_input"),
        (
            "/v2/models/llm/infer",
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]},
            400,
            "/v2/models/llm/generate_stream",
        ),
    ],
)
def test_bad_generate_requests_get_a_clear_error(tmp_path, path, body, status, fragment):
    async def test(env: Env) -> None:
        async with env.http() as http:
            r = await http.post(path, json=body)
        assert r.status_code == status, r.text
        assert fragment in r.json()["error"], r.json()
        assert env.fake.calls == []

    with_gateway(tmp_path, test)


def test_the_server_lists_the_generate_extension(tmp_path):
    async def test(env: Env) -> None:
        async with env.http() as http:
            assert "generate" in (await http.get("/v2")).json()["extensions"]
            assert (await http.get("/v2/models/llm")).json()["name"] == "llm"

    with_gateway(tmp_path, test)


@pytest.mark.parametrize("route", ["generate", "generate_stream", "versions/1/generate"])
def test_generate_is_a_call_that_takes_from_the_tenants_rate_quota(route):
    from ember.gateway.auth import Action, _classify

    assert _classify("POST", f"/v2/models/llm/{route}") == (Action.INVOKE, 3)
    assert _classify("GET", "/v2/models/llm") == (Action.READ, 3)
