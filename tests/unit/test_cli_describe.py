"""``ember describe NAME``: one model in full, from the admin API (behind httpx's MockTransport)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from ember.cli import app
from ember.cli import describe as cli_describe
from ember.client import Client

runner = CliRunner()

MODEL: dict[str, Any] = {
    "name": "minilm",
    "version": 2,
    "tier": "hot",
    "instances": 1,
    "requests": 1234,
    "succeeded": 1230,
    "failed": 4,
    "queued": 0,
    "task": "embeddings",
    "slo_ms": 50.0,
    "slo_attainment": 0.987,
    "cold_starts": 1,
    "last_cold_start": {"tier": "cool", "seconds": 0.123, "at": 1.0},
    "bytes": 612,
    "source": "/abs/examples/minilm.py:MiniLM",
    "created_at": 1.0,
    "tenant": "default",
    "max_instances": 2,
    "settings": {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}],
        "max_batch_size": 32,
        "max_batch_wait_ms": 2.0,
        "max_queue": 1024,
        "keepalive_hot_s": 300.0,
        "keepalive_warm_s": 3600.0,
        "on_unmeetable": "best_effort",
        "warmup": True,
        "device": "auto",
        "options": {"normalize": True},
    },
}


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/admin/models/minilm":
            return httpx.Response(200, json=MODEL)
        return httpx.Response(
            404, json={"error": "model 'ghost' is not deployed; `ember ls` lists the deployed models"}
        )

    monkeypatch.setattr(
        cli_describe, "Client", lambda url, **kw: Client(url, transport=httpx.MockTransport(handler), **kw)
    )
    return paths


def test_describe_shows_inputs_outputs_slo_tier_and_options(seen: list[str]) -> None:
    result = runner.invoke(app, ["describe", "minilm"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert seen == ["/admin/models/minilm"]
    assert "minilm v2" in out
    for fragment in (
        "text",
        "BYTES",
        "[-1]",
        "embedding",
        "FP32",
        "[-1, 384]",
        "50 ms, met by 98.7% of 1,234 requests",
        "hot, 1 of at most 2 instances",
        "best-effort",
        "up to 32 rows, waiting at most 2 ms",
        "hot 300 s, then warm 3600 s",
        '{"normalize": true}',
        "612 B",
        "cool 123 ms",
    ):
        assert fragment in out, fragment


def test_describe_json_is_the_admin_answer(seen: list[str]) -> None:
    result = runner.invoke(app, ["describe", "minilm", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output) == MODEL


def test_describe_of_an_unknown_model_is_one_error_line(seen: list[str]) -> None:
    result = runner.invoke(app, ["describe", "ghost"])
    assert result.exit_code == 1
    assert result.output.startswith("error: model 'ghost' is not deployed")
