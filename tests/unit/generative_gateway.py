"""What the generative route tests share: a gateway over a service with a one-shot model ``m`` and
generative models ``llm`` and ``raw`` (no chat template) on fake workers in virtual time, whose
``generate`` is a :class:`~ember.testing.ScriptedGeneration`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai

from ember.clock import VirtualClock
from ember.config import DeploySpec
from ember.gateway.app import build_app
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, ScriptedGeneration, run_in_virtual_time

GENERATIVE = {
    "inputs": [],
    "outputs": [],
    "max_batch_size": 1,
    "task": "generate",
    "generation": {"max_model_len": 64, "kv_bytes_per_token": 1024, "vocab_size": 100, "chat_template": True},
}
#: A generative model whose tokenizer has no chat template: completions only.
RAW = {**GENERATIVE, "generation": {**GENERATIVE["generation"], "chat_template": False}}  # type: ignore[dict-item]
HELLO = [{"role": "user", "content": "Hello there"}]

Test = Callable[["Env"], Awaitable[None]]


class Env:
    def __init__(self, service: EmberService, app: Any, key: str, fake: ScriptedGeneration) -> None:
        self.service, self.app, self.key, self.fake = service, app, key, fake

    def openai(self) -> openai.AsyncOpenAI:
        transport = httpx2.ASGITransport(app=self.app)
        http = httpx2.AsyncClient(transport=transport, base_url="http://ember")
        return openai.AsyncOpenAI(base_url="http://ember/v1", api_key=self.key, http_client=http, max_retries=0)

    def http(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.AsyncClient(transport=transport, base_url="http://ember", headers=headers)


def with_gateway(tmp_path: Path, test: Test, fake: ScriptedGeneration | None = None) -> ScriptedGeneration:
    model = tmp_path / "model.py"
    model.write_text("class M: ...\n")
    fake = fake or ScriptedGeneration()

    async def main(clock: VirtualClock) -> None:
        service = EmberService(
            ServeOptions(home=tmp_path, warm_root=tmp_path / "shm"), clock=clock, backend=FakeBackend(clock)
        )
        async with service:
            await service.deploy(DeploySpec(source=f"{model}:M", name="m", warmup=False))
            for worker in service.backend.workers():
                worker.described = GENERATIVE  # type: ignore[attr-defined]
            await service.deploy(DeploySpec(source=f"{model}:M", name="llm", warmup=False))
            for worker in service.backend.workers():
                worker.described = RAW  # type: ignore[attr-defined]
            await service.deploy(DeploySpec(source=f"{model}:M", name="raw", warmup=False))
            service.generate = fake.generate  # type: ignore[attr-defined]
            app = build_app(service, manage_lifetime=False)
            key = (tmp_path / "admin.key").read_text().strip()
            await test(Env(service, app, key, fake))

    run_in_virtual_time(main)
    return fake


def events(body: str) -> list[Any]:
    """The data of each server-sent event, JSON-decoded (``[DONE]`` as is); checks the framing."""
    assert body.endswith("\n\n")
    out: list[Any] = []
    for block in body[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        data = block.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
