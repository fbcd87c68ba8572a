"""The chat and completion request bodies: OpenAI's fields, every unknown or unserved one a 400 naming
it, and the conversion into one GenerateRequest per choice."""

from __future__ import annotations

from typing import Any

import pytest

from ember.gateway.completions import BadParameter, parse_chat, parse_completion
from ember.generation import ChatMessage

HELLO = [{"role": "user", "content": "Hello"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": HELLO, **fields}


def test_a_chat_request_becomes_one_generate_request_per_choice_seeded_in_turn():
    body = chat(n=3, seed=41, temperature=0.5, top_p=0.9, stop="\n", max_completion_tokens=7)
    requests = parse_chat(body).requests(max_model_len=100)
    assert [r.params.seed for r in requests] == [41, 42, 43]
    for r in requests:
        assert r.messages == (ChatMessage("user", "Hello"),) and r.prompt is None
        assert (r.params.max_tokens, r.params.temperature, r.params.top_p) == (7, 0.5, 0.9)
        assert r.params.stop == ("\n",) and r.params.logprobs is None


def test_without_max_tokens_a_sequence_may_run_to_the_models_length():
    (request,) = parse_chat(chat()).requests(max_model_len=2048)
    assert request.params.max_tokens == 2048 and request.params.seed is None
    (request,) = parse_completion({"model": "m", "prompt": "x"}).requests(max_model_len=2048)
    assert request.params.max_tokens == 16  # OpenAI's default for completions


def test_text_parts_are_joined_and_every_role_is_taken():
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    (request,) = parse_chat({"model": "m", "messages": messages}).requests(64)
    assert request.messages is not None
    assert [(m.role, m.content) for m in request.messages] == [
        ("developer", "Be brief."),
        ("system", "a\nb"),
        ("user", "Hi"),
        ("assistant", ""),
        ("tool", "42"),
    ]


def test_ignore_eos_is_vllms_extension_for_exact_lengths():
    assert parse_chat(chat(ignore_eos=True)).requests(64)[0].params.ignore_eos
    assert not parse_completion({"model": "m", "prompt": "x"}).requests(64)[0].params.ignore_eos


def test_logprobs_become_the_number_of_alternatives():
    assert parse_chat(chat(logprobs=True)).requests(64)[0].params.logprobs == 0
    assert parse_chat(chat(logprobs=True, top_logprobs=5)).requests(64)[0].params.logprobs == 5
    assert parse_chat(chat(logprobs=False)).requests(64)[0].params.logprobs is None
    assert parse_completion({"model": "m", "prompt": "x", "logprobs": 3}).requests(64)[0].params.logprobs == 3


def test_a_list_of_prompts_gets_n_choices_each_in_order():
    requests = parse_completion({"model": "m", "prompt": ["a", "b"], "n": 2, "seed": 7}).requests(64)
    assert [(r.prompt, r.params.seed) for r in requests] == [("a", 7), ("a", 8), ("b", 7), ("b", 8)]


def test_seeds_stay_64_bit_integers():
    requests = parse_chat(chat(seed=2**63 - 1, n=2)).requests(64)
    assert [r.params.seed for r in requests] == [2**63 - 1, -(2**63)]


def test_fields_that_mean_off_are_accepted():
    off = chat(
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        user="u-1",
        stream=True,
        stream_options={"include_usage": True},
    )
    parsed = parse_chat(off)
    assert parsed.stream and parsed.include_usage
    assert parse_completion({"model": "m", "prompt": "x", "echo": False, "best_of": 1}).requests(8)


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (chat(temprature=1), "temprature", "no field 'temprature'"),
        (chat(tools=[{"type": "function"}]), "tools", "tool calling"),
        (chat(functions=[{"name": "f"}]), "functions", "function calling"),
        (chat(response_format={"type": "json_object"}), "response_format", "structured output"),
        (chat(audio={"voice": "alloy"}), "audio", "audio"),
        (chat(presence_penalty=0.5), "presence_penalty", "penalties"),
        (chat(logit_bias={"1": 5}), "logit_bias", "logit_bias"),
        (chat(n=9), "n", "at most 8"),
        (chat(n=0), "n", "at least 1"),
        (chat(max_tokens=0), "max_tokens", "at least 1"),
        (chat(max_tokens=65), "max_tokens", "limit of 64 tokens"),
        (chat(max_tokens=5, max_completion_tokens=6), "max_completion_tokens", "disagree"),
        (chat(temperature=2.5), "temperature", "at most 2"),
        (chat(temperature="hot"), "temperature", "a number"),
        (chat(top_p=0), "top_p", "greater than 0"),
        (chat(top_p=1.5), "top_p", "at most 1"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
        (chat(stop=""), "stop", "must not be empty"),
        (chat(seed=1.5), "seed", "whole number"),
        (chat(top_logprobs=21, logprobs=True), "top_logprobs", "at most 20"),
        (chat(top_logprobs=2), "top_logprobs", "needs logprobs"),
        (chat(logprobs=3), "logprobs", "true or false"),
        (chat(stream_options={"include_usage": True}), "stream_options", "stream: true"),
        (chat(stream=True, stream_options={"include_usage": True, "extra": 1}), "stream_options.extra", "extra"),
        ({"model": "m", "messages": []}, "messages", "1 to"),
        ({"model": "m", "messages": "hi"}, "messages", "a JSON list"),
        ({"model": "m", "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "'user'"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0]", "needs content"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role", "required"),
        ({"model": "m", "messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name", "name"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
            "'image_url'",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string"),
        ({"messages": HELLO}, "model", "required"),
    ],
)
def test_a_bad_chat_field_is_a_400_naming_it(body, param, fragment):
    with pytest.raises(BadParameter) as caught:
        parse_chat(body).requests(max_model_len=64)
    assert caught.value.http_status == 400
    assert caught.value.param == param
    assert fragment in caught.value.message
    for pydantic_words in ("Input should", "Value error", "Extra inputs", "Field required"):
        assert pydantic_words not in caught.value.message


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"model": "m", "prompt": [1, 2]}, "prompt", "token arrays"),
        ({"model": "m", "prompt": []}, "prompt", "list of 1 to"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo", "echo"),
        ({"model": "m", "prompt": "x", "suffix": "end"}, "suffix", "suffix"),
        ({"model": "m", "prompt": "x", "best_of": 3}, "best_of", "best_of"),
        ({"model": "m", "prompt": "x", "logprobs": 6}, "logprobs", "at most 5"),
        ({"model": "m", "prompt": "x", "logprobs": True}, "logprobs", "whole number"),
        ({"model": "m", "prompt": "x", "messages": HELLO}, "messages", "no field 'messages'"),
    ],
)
def test_a_bad_completion_field_is_a_400_naming_it(body, param, fragment):
    with pytest.raises(BadParameter) as caught:
        parse_completion(body).requests(max_model_len=64)
    assert caught.value.param == param
    assert fragment in caught.value.message


def test_a_body_that_is_not_an_object_says_what_one_looks_like():
    with pytest.raises(BadParameter.__mro__[1]) as caught:
        parse_chat([1, 2])
    assert '"messages"' in caught.value.message
