"""The gateway's error mapping and edge checks, in process, on fake workers."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from ember.clock import VirtualClock
from ember.config import DeploySpec
from ember.errors import (
    DeadlineUnmeetable,
    EmberError,
    InternalError,
    InvalidInput,
    ModelExists,
    ModelFailed,
    ModelNotFound,
    Overloaded,
    ShuttingDown,
    StorageFull,
)
from ember.gateway import edge
from ember.gateway.app import build_app
from ember.gateway.edge import error_response
from ember.gateway.tensors import encode_infer_request, parse_infer_response
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, LatencyProfile, run_in_virtual_time


@pytest.mark.parametrize(
    ("error", "status", "retry"),
    [
        (InvalidInput("bad"), 400, False),
        (ModelNotFound("m"), 404, False),
        (ModelExists("m exists"), 409, False),
        (DeadlineUnmeetable("late", retry_after_s=2.5), 429, True),
        (Overloaded("full"), 503, True),
        (ShuttingDown("bye"), 503, True),
        (ModelFailed("boom"), 500, False),
        (StorageFull("disk full"), 507, False),
        (InternalError("bug"), 500, False),
    ],
)
def test_each_error_maps_to_its_status_once(error: EmberError, status: int, retry: bool):
    response = error_response(error)
    assert response.status_code == status
    assert json.loads(bytes(response.body)) == {"error": error.message}
    assert ("retry-after" in response.headers) == retry
    assert response.headers["ember-error"] == type(error).__name__
    if retry:
        assert int(response.headers["retry-after"]) >= 1


def _with_app(tmp_path: Path, test, **profile: float) -> None:
    model = tmp_path / "model.py"
    model.write_text("class M: ...\n")

    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(clock, profile=LatencyProfile(**profile))
        service = EmberService(ServeOptions(home=tmp_path, warm_root=tmp_path / "shm"), clock=clock, backend=backend)
        async with service:
            # Best effort: these tests build backlogs far past the SLO on purpose.
            spec = DeploySpec(source=f"{model}:M", name="m", max_queue=2, max_batch_size=1, on_unmeetable="best_effort")
            await service.deploy(spec)
            transport = httpx.ASGITransport(app=build_app(service, manage_lifetime=False))
            key = (tmp_path / "admin.key").read_text().strip()  # made by the app's first build on this home
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://ember", headers=headers) as client:
                await test(client, clock)

    run_in_virtual_time(main)


def _json_request(rows: int = 1, name: str = "x") -> dict:
    return {"inputs": [{"name": name, "datatype": "FP32", "shape": [rows, 4], "data": [1.5] * (4 * rows)}]}


def test_infer_answers_json_and_binary(tmp_path):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        r = await client.post("/v2/models/m/infer", json=_json_request())
        assert r.status_code == 200
        assert r.json()["outputs"][0]["data"] == [1.5] * 4
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        body, header = encode_infer_request({"x": x})
        r = await client.post(
            "/v2/models/m/infer", content=body, headers={"Inference-Header-Content-Length": str(header)}
        )
        outputs = parse_infer_response(r.content, int(r.headers["inference-header-content-length"]))
        np.testing.assert_array_equal(outputs["x"], x)
        r = await client.post(
            "/v2/models/m/infer",
            content=gzip.compress(json.dumps(_json_request()).encode()),
            headers={"Content-Encoding": "gzip"},
        )
        assert r.status_code == 200

    _with_app(tmp_path, test)


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v2/models/ghost/infer", _json_request(), 404, "ghost"),
        ("/v2/models/m/infer", b"{not json", 400, "JSON"),
        ("/v2/models/m/infer", _json_request(name="y"), 400, "unknown: y"),
        ("/v2/models/m/infer", _json_request(rows=2), 400, "at most 1"),
        ("/v2/models/m/versions/7/infer", _json_request(), 404, "version 7"),
        ("/v1/embeddings", {"model": "m", "input": "hi"}, 400, "not an embedding model"),
        ("/v1/embeddings", {"model": "ghost", "input": "hi"}, 404, "ghost"),
        ("/admin/models", {"source": "x.py:M", "slo_ms": -1}, 400, "slo_ms"),
        ("/admin/models", [1, 2], 400, "JSON object"),
    ],
)
def test_bad_requests_get_a_clear_error(tmp_path, path, body, status, fragment):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = await client.post(path, content=content)
        assert r.status_code == status
        error = r.json()["error"]
        if path.startswith("/v1/"):  # the OpenAI client reads error.message
            assert set(error) == {"message", "type", "param", "code"}
            error = error["message"]
        assert fragment in error

    _with_app(tmp_path, test)


def test_unknown_routes_and_methods_answer_json(tmp_path):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        r = await client.get("/nowhere")
        assert r.status_code == 404 and "no route" in r.json()["error"]
        r = await client.delete("/v2/models/m/infer")
        assert r.status_code == 405 and "DELETE" in r.json()["error"]

    _with_app(tmp_path, test)


def test_a_full_queue_answers_503_with_retry_after_and_the_rest_succeed(tmp_path):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        calls = [asyncio.ensure_future(client.post("/v2/models/m/infer", json=_json_request())) for _ in range(6)]
        answers = await asyncio.gather(*calls)
        statuses = sorted(r.status_code for r in answers)
        assert statuses.count(503) >= 1
        assert set(statuses) == {200, 503}
        assert all(int(r.headers["retry-after"]) >= 1 for r in answers if r.status_code == 503)

    _with_app(tmp_path, test, base_s=1.0)


def test_a_request_timeout_shorter_than_the_backlog_answers_429(tmp_path):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        slow = asyncio.ensure_future(client.post("/v2/models/m/infer", json=_json_request()))
        await clock.sleep(0.1)
        body = {**_json_request(), "parameters": {"timeout": 200_000}}  # 0.2 s, in microseconds
        r = await client.post("/v2/models/m/infer", json=body)
        assert r.status_code == 429 and "timeout" in r.json()["error"] and "retry-after" in r.headers
        assert (await slow).status_code == 200

    _with_app(tmp_path, test, base_s=1.0)


def test_the_body_limit_is_enforced_before_reading(tmp_path):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        r = await client.post("/v2/models/m/infer", content=b"{}", headers={"content-length": str(1 << 40)})
        assert r.status_code == 413 and "limit" in r.json()["error"]

    _with_app(tmp_path, test)


def test_metrics_use_tritons_names(tmp_path):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        await client.post("/v2/models/m/infer", json=_json_request())
        text = (await client.get("/metrics")).text
        assert 'nv_inference_request_success{model="m",version="1"} 1.0' in text
        assert 'nv_inference_exec_count{model="m",version="1"} 1.0' in text
        assert 'ember_cold_starts_total{model="m",tier="cool"} 1.0' in text
        assert 'ember_model_tier{model="m",tier="hot"} 1.0' in text

    _with_app(tmp_path, test)


@pytest.mark.parametrize(
    ("route", "how"),
    [
        ("/admin/models/m/unload", {"params": {"tier": "warm"}}),
        ("/v2/repository/models/m/unload", {"json": {"parameters": {"tier": "warm", "unload_dependents": False}}}),
    ],
)
def test_unload_to_warm_keeps_the_weights_in_host_memory(tmp_path, route, how):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        r = await client.post(route, **how)
        assert r.status_code == 200, r.text
        model = (await client.get("/admin/models/m")).json()
        assert model["tier"] == "warm" and model["instances"] == 0
        assert (await client.post("/v2/models/m/infer", json=_json_request())).status_code == 200
        model = (await client.get("/admin/models/m")).json()
        assert model["tier"] == "hot" and model["cold_starts"] == 2
        assert model["last_cold_start"]["tier"] == "warm"
        text = (await client.get("/metrics")).text
        assert 'ember_cold_starts_total{model="m",tier="warm"} 1.0' in text

    _with_app(tmp_path, test)


@pytest.mark.parametrize(
    ("route", "how"),
    [
        ("/admin/models/m/unload", {}),
        ("/admin/models/m/unload", {"params": {"tier": "cool"}}),
        ("/v2/repository/models/m/unload", {}),
        ("/v2/repository/models/m/unload", {"json": {}}),
        ("/v2/repository/models/m/unload", {"json": {"parameters": {"unload_dependents": False}}}),
        ("/v2/repository/models/m/unload", {"json": {"parameters": {"tier": "cool"}}}),
    ],
)
def test_unload_demotes_to_cool_by_default(tmp_path, route, how):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        assert (await client.post(route, **how)).status_code == 200
        assert (await client.get("/admin/models/m")).json()["tier"] == "cool"
        assert (await client.post("/v2/models/m/infer", json=_json_request())).status_code == 200
        assert (await client.get("/admin/models/m")).json()["last_cold_start"]["tier"] == "cool"

    _with_app(tmp_path, test)


def test_unload_to_warm_never_promotes_a_cool_model(tmp_path):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        await client.post("/admin/models/m/unload")
        r = await client.post("/admin/models/m/unload", params={"tier": "warm"})
        assert r.status_code == 200 and r.json()["tier"] == "cool"

    _with_app(tmp_path, test)


@pytest.mark.parametrize(
    ("route", "how", "fragment"),
    [
        ("/admin/models/m/unload", {"params": {"tier": "hot"}}, "cannot unload to tier 'hot'"),
        ("/admin/models/m/unload", {"params": {"tier": "WARM"}}, "use 'warm'"),
        ("/admin/models/ghost/unload", {"params": {"tier": "cold"}}, "cannot unload to tier 'cold'"),
        ("/v2/repository/models/m/unload", {"json": {"parameters": {"tier": "hot"}}}, "cannot unload to tier"),
        ("/v2/repository/models/m/unload", {"json": {"parameters": {"tier": 1}}}, "must be a string"),
        ("/v2/repository/models/m/unload", {"json": {"parameters": "warm"}}, '{"parameters": {"tier": "warm"}}'),
        ("/v2/repository/models/m/unload", {"json": ["warm"]}, "JSON object"),
    ],
)
def test_unload_to_a_bad_tier_is_refused_and_leaves_the_model_hot(tmp_path, route, how, fragment):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        r = await client.post(route, **how)
        assert r.status_code == 400
        assert r.headers["ember-error"] == "InvalidInput"
        assert fragment in r.json()["error"]
        assert (await client.get("/admin/models/m")).json()["tier"] == "hot"

    _with_app(tmp_path, test)


def _receiver(*messages: dict) -> object:
    """An ASGI ``receive`` that hands out ``messages``, then waits for ever (a client gone quiet)."""
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


def test_a_body_that_stops_arriving_is_cut_off_with_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge, "BODY_TIMEOUT_S", 0.01)
    first = {"type": "http.request", "body": b'{"inputs": [', "more_body": True}
    with pytest.raises(edge.BodyTimeout, match=r"did not arrive within 0\.01 s") as caught:
        asyncio.run(edge.receive_body(_receiver(first), "100", ""))
    assert caught.value.http_status == 408


def test_a_body_that_never_starts_is_cut_off_with_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge, "BODY_TIMEOUT_S", 0.01)
    with pytest.raises(edge.BodyTimeout):
        asyncio.run(edge.receive_body(_receiver(), "100", ""))


def test_a_body_in_parts_is_joined_and_a_client_that_hangs_up_is_not_answered() -> None:
    parts = [
        {"type": "http.request", "body": chunk, "more_body": more} for chunk, more in ((b"ab", True), (b"c", False))
    ]
    assert asyncio.run(edge.receive_body(_receiver(*parts), None, "")) == b"abc"
    with pytest.raises(edge.ClientGone):
        asyncio.run(edge.receive_body(_receiver(parts[0], {"type": "http.disconnect"}), None, ""))
    with pytest.raises(edge.PayloadTooLarge):
        asyncio.run(edge.receive_body(_receiver(*parts), None, "", limit=2))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"source": "x.py:M", "slo_ms": -1}, "slo_ms must be greater than 0 (got -1)"),
        ({"source": "x.py:M", "slo_ms": "fast"}, "slo_ms must be a number (got 'fast')"),
        ({"source": "x.py:M", "slow_ms": 5}, "there is no field 'slow_ms'; the fields are "),
        ({"slo_ms": 5}, "source is required"),
        ({"source": "x.py:M", "on_unmeetable": "drop"}, "on_unmeetable must be 'refuse' or 'best_effort'"),
        ({"source": "x.py:M", "max_queue": 1.5}, "max_queue must be a whole number"),
        ({"source": "x.py:M", "name": "bad name"}, "model name 'bad name' is not allowed"),
    ],
)
def test_a_bad_deploy_body_is_told_in_embers_words_not_pydantics(tmp_path, body, fragment):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        r = await client.post("/admin/models", json=body)
        assert r.status_code == 400
        error = r.json()["error"]
        assert fragment in error
        for pydantic_words in ("Input should", "Value error", "Extra inputs", "Field required", "valid dictionary"):
            assert pydantic_words not in error

    _with_app(tmp_path, test)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/nowhere"])
def test_openai_routes_that_do_not_exist_answer_in_the_openai_error_shape(tmp_path, path):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        r = await client.post(path, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code in (400, 404)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        if path == "/v1/chat/completions":  # m is a one-shot model: the answer names its route
            assert r.status_code == 400 and "/v2/models/m/infer" in error["message"]
        if path == "/v1/completions":  # a completion takes a prompt, not messages
            assert r.status_code == 400 and "no field 'messages'" in error["message"]

    _with_app(tmp_path, test)


def test_the_admin_model_answer_holds_what_describe_shows(tmp_path):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        settings = (await client.get("/admin/models/m")).json()["settings"]
        assert settings["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert settings["outputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert settings["max_batch_size"] == 1 and settings["max_queue"] == 2
        assert settings["on_unmeetable"] == "best_effort" and settings["device"] == "auto"
        assert settings["keepalive_hot_s"] == 300.0 and settings["options"] == {}

    _with_app(tmp_path, test)


def test_prometheus_scrapes_metrics_with_the_metrics_key_that_opens_nothing_else(tmp_path):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        key_file = tmp_path / "metrics.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        scraper = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        r = await client.get("/metrics", headers=scraper)
        assert r.status_code == 200 and "nv_inference_request_success" in r.text
        for method, path in (("GET", "/admin/models"), ("GET", "/admin/status"), ("POST", "/v2/models/m/infer")):
            refused = await client.request(method, path, headers=scraper, json=_json_request())
            assert refused.status_code == 403 and "metrics key" in refused.json()["error"], path
        nobody = await client.get("/metrics", headers={"Authorization": "Bearer ember_nothing"})
        assert nobody.status_code == 401

    _with_app(tmp_path, test)


def test_a_removed_models_series_leave_metrics(tmp_path):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        assert (await client.post("/v2/models/m/infer", json=_json_request())).status_code == 200
        before = (await client.get("/metrics")).text
        assert 'nv_inference_request_duration_us{model="m",version="1"}' in before
        assert (await client.delete("/admin/models/m")).status_code == 200
        after = (await client.get("/metrics")).text
        assert 'model="m"' not in after

    _with_app(tmp_path, test)


def test_the_admin_api_changes_a_models_slo_and_keepalives_in_place(tmp_path):
    async def test(client: httpx.AsyncClient, clock: VirtualClock) -> None:
        r = await client.patch(
            "/admin/models/m", json={"slo_ms": 250, "keepalive_hot_s": 30, "on_unmeetable": "refuse"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["slo_ms"] == 250 and r.json()["version"] == 1
        for body, words in [
            ({"slo_ms": 0}, "slo_ms"),
            ({"slo_mss": 5}, "slo_mss"),
            ([1], "JSON object"),
            ({}, "nothing to change"),
        ]:
            bad = await client.patch("/admin/models/m", json=body)
            assert bad.status_code == 400 and words in bad.json()["error"], bad.text
        assert (await client.patch("/admin/models/nope", json={"slo_ms": 5})).status_code == 404
        assert (await client.get("/admin/models/m")).json()["slo_ms"] == 250

    _with_app(tmp_path, test)
