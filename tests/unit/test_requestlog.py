"""Request ids: an incoming id comes back in ``X-Request-Id`` and in the request's JSON log line."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from ember.clock import VirtualClock
from ember.config import DeploySpec
from ember.gateway.app import build_app
from ember.requestlog import REQUEST_LOG, RequestLog, request_id
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, LatencyProfile, run_in_virtual_time

Test = Callable[[httpx.AsyncClient, EmberService], Awaitable[None]]
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}]}
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _with_app(tmp_path: Path, test: Test, request_log: bool = True) -> None:
    model = tmp_path / "model.py"
    model.write_text("class M: ...\n")

    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(clock, profile=LatencyProfile(base_s=0.25, load_s=0.5))
        options = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm", request_log=request_log)
        async with EmberService(options, clock=clock, backend=backend) as service:
            await service.deploy(DeploySpec(source=f"{model}:M", name="m", on_unmeetable="best_effort"))
            transport = httpx.ASGITransport(app=build_app(service, manage_lifetime=False))
            key = (tmp_path / "home" / "admin.key").read_text().strip()
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://ember", headers=headers) as client:
                await test(client, service)

    run_in_virtual_time(main)


def _lines(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "home" / "logs" / REQUEST_LOG
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_incoming_request_id_comes_back_and_is_logged_with_the_model_s_figures(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, service: EmberService) -> None:
        await service.unload("m", "warm")
        r = await client.post("/v2/models/m/infer", json=BODY, headers={"X-Request-Id": "abc-123"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
        r = await client.post("/v2/models/m/infer", json=BODY, headers={"traceparent": TRACE})
        assert r.headers["x-request-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        r = await client.post("/v2/models/nope/infer", json=BODY)
        assert r.status_code == 404 and len(r.headers["x-request-id"]) == 32

    _with_app(tmp_path, test)
    first, second, missing = _lines(tmp_path)
    assert first["id"] == "abc-123" and first["status"] == 200
    assert first["model"] == "m" and first["tenant"] == "default"
    assert first["cold_start"] == "warm"  # it was unloaded to warm, so this request brought it back
    assert first["batch"] == 1 and first["compute_ms"] == 250.0
    assert first["queue_ms"] == pytest.approx(500.0)  # it waited for the load
    assert second["id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and second["cold_start"] is None
    assert missing["status"] == 404 and missing["model"] == "nope" and missing["tenant"] is None
    assert missing["error"] == "ModelNotFound" and first["error"] is None


def test_the_request_log_can_be_turned_off(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, service: EmberService) -> None:
        r = await client.post("/v2/models/m/infer", json=BODY, headers={"X-Request-Id": "kept"})
        assert r.headers["x-request-id"] == "kept"  # ids still come back

    _with_app(tmp_path, test, request_log=False)
    assert not (tmp_path / "home" / "logs" / REQUEST_LOG).exists()


def test_ids_that_are_not_sane_are_replaced() -> None:
    assert request_id("x" * 129, None) != "x" * 129
    assert request_id("bad id", None) != "bad id"
    assert request_id(None, "00-" + "0" * 32 + "-00f067aa0ba902b7-01") != "0" * 32
    assert request_id(None, "garbage") != "garbage"


def test_the_log_rotates(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "requests.jsonl", max_bytes=200, backups=2)
    for i in range(20):
        log.write({"id": str(i), "padding": "x" * 50})
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requests.jsonl", "requests.jsonl.1", "requests.jsonl.2"]
