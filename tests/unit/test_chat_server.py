"""The chat and completion routes on a real socket: the synchronous ``openai`` client, Ember's own
:class:`~ember.client.Client` and ``ember invoke`` against the gateway under uvicorn (in a thread),
over a service whose ``generate`` is scripted; and a streaming client that hangs up, whose generation
must be closed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from generative_gateway import GENERATIVE, HELLO, RAW
from threaded_gateway import gateway_in_thread
from typer.testing import CliRunner

from ember.cli import commands as cli
from ember.client import Client
from ember.config import DeploySpec
from ember.errors import InvalidInput, ModelNotFound
from ember.service import EmberService
from ember.testing import FakeBackend
from ember.testing.generation import WORDS, ScriptedGeneration


class Live:
    def __init__(self, url: str, key: str, fake: ScriptedGeneration) -> None:
        self.url, self.key, self.fake = url, key, fake

    def wait_for(self, condition, what: str, timeout_s: float = 30.0) -> None:
        """A bounded poll: the server thread changes the fake's counters."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    home = tmp_path_factory.mktemp("chat")
    model = home / "model.py"
    model.write_text("class M: ...\n")
    fake = ScriptedGeneration(hold_after=None)

    async def prepare(service: EmberService, backend: FakeBackend) -> None:
        for worker in backend.workers():
            worker.described = GENERATIVE
        await service.deploy(DeploySpec(source=f"{model}:M", name="llm", warmup=False))
        for worker in backend.workers():
            worker.described = RAW
        await service.deploy(DeploySpec(source=f"{model}:M", name="raw", warmup=False))
        service.generate = fake.generate  # type: ignore[attr-defined]

    with gateway_in_thread(home, prepare) as (url, key):
        yield Live(url, key, fake)


@pytest.fixture
def client(live: Live) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key=live.key, max_retries=0, timeout=60.0) as client:
        yield client


def test_the_sync_client_chats_whole_and_streamed(client: openai.OpenAI):
    answer = client.chat.completions.create(model="llm", messages=HELLO, max_completion_tokens=3)
    assert answer.choices[0].message.content == "".join(WORDS[:3])
    assert answer.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model="llm", messages=HELLO, max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(WORDS[:3])
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5


def test_the_sync_client_completes_whole_and_streamed(client: openai.OpenAI):
    answer = client.completions.create(model="llm", prompt="Once", max_tokens=2, n=2, seed=3)
    assert [c.text for c in answer.choices] == [WORDS[3] + WORDS[4], WORDS[4] + WORDS[5]]
    parts = list(client.completions.create(model="llm", prompt="Once", max_tokens=2, stream=True))
    assert "".join(p.choices[0].text for p in parts) == WORDS[0] + WORDS[1]


def test_unknown_model_is_a_404_the_client_reads(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError, match="ghost"):
        client.chat.completions.create(model="ghost", messages=HELLO)


def test_a_client_that_hangs_up_mid_stream_stops_its_generation(live: Live):
    live.fake.hold_after = 2
    try:
        closed = live.fake.closed
        headers = {"Authorization": f"Bearer {live.key}"}
        body = {"model": "llm", "messages": HELLO, "stream": True}
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role, then the first tokens; then the model stalls
        live.wait_for(lambda: live.fake.closed == closed + 1, "the stream to be closed")
        assert live.fake.open == 0
    finally:
        live.fake.hold_after = None


def test_the_client_streams_a_chat_and_a_completion(live: Live):
    with Client(live.url, api_key=live.key) as ember:
        assert list(ember.generate("llm", "Hi", max_tokens=3)) == list(WORDS[:3])
        assert "".join(ember.generate("llm", "Hi", chat=False, max_tokens=2, seed=1)) == WORDS[1] + WORDS[2]
        _, request, _ = live.fake.calls[-1]
        assert request.prompt == "Hi" and request.params.seed == 1
        assert "".join(ember.generate("llm", "Hi", stop=[" models"])) == "Ember keeps"
        with pytest.raises(ModelNotFound, match="ghost"):
            list(ember.generate("ghost", "Hi"))
        with pytest.raises(InvalidInput, match="over the model's length limit"):
            list(ember.generate("llm", "Hi", max_tokens=1000))


def test_ember_invoke_streams_the_answer_to_the_terminal(live: Live, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EMBER_API_KEY", live.key)
    result = CliRunner().invoke(cli.app, ["invoke", "llm", "Hello there", "--max-tokens", "4", "--url", live.url])
    assert result.exit_code == 0, result.output
    assert result.output == "".join(WORDS[:4]) + "\n"
    result = CliRunner().invoke(
        cli.app, ["invoke", "llm", "Once", "--no-chat", "--temperature", "0", "--max-tokens", "2", "--url", live.url]
    )
    assert result.exit_code == 0 and result.output == WORDS[0] + WORDS[1] + "\n"
    _, request, _ = live.fake.calls[-1]
    assert request.prompt == "Once" and request.params.temperature == 0.0
    result = CliRunner().invoke(cli.app, ["invoke", "llm", "--data", '{"x": 1}', "--url", live.url])
    assert result.exit_code == 1 and "generative" in result.output
    result = CliRunner().invoke(cli.app, ["invoke", "raw", "Once", "--url", live.url])
    assert result.exit_code == 1 and "no chat template" in result.output and "--no-chat" in result.output
    result = CliRunner().invoke(cli.app, ["invoke", "raw", "Once", "--no-chat", "--max-tokens", "1", "--url", live.url])
    assert result.exit_code == 0 and result.output == WORDS[0] + "\n"
