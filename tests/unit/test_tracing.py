"""OpenTelemetry spans per request: gateway -> queue -> batch, children of the caller's traceparent."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from ember.clock import VirtualClock
from ember.config import DeploySpec
from ember.gateway.app import build_app
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, LatencyProfile, run_in_virtual_time
from ember.tracing import Tracer

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="needs opentelemetry-sdk (the test extra)")
memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
export = pytest.importorskip("opentelemetry.sdk.trace.export")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}]}


def test_a_request_gives_three_nested_spans_under_the_caller_s_trace(tmp_path: Path) -> None:
    exporter = memory.InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    model = tmp_path / "model.py"
    model.write_text("class M: ...\n")

    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(clock, profile=LatencyProfile(base_s=0.25, load_s=0.5))
        options = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm")
        async with EmberService(options, clock=clock, backend=backend) as service:
            await service.deploy(DeploySpec(source=f"{model}:M", name="m", on_unmeetable="best_effort"))
            service.tracer = Tracer(provider.get_tracer("test"))
            transport = httpx.ASGITransport(app=build_app(service, manage_lifetime=False))
            key = (tmp_path / "home" / "admin.key").read_text().strip()
            headers = {"Authorization": f"Bearer {key}", "traceparent": f"00-{TRACE_ID}-{PARENT}-01"}
            async with httpx.AsyncClient(transport=transport, base_url="http://ember", headers=headers) as client:
                r = await client.post("/v2/models/m/infer", json=BODY)
                assert r.status_code == 200
                assert (await client.get("/admin/models")).status_code == 200  # no model: no spans

    run_in_virtual_time(main)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"ember.request", "ember.queue", "ember.batch"}
    request, queue, batch = spans["ember.request"], spans["ember.queue"], spans["ember.batch"]
    assert format(request.context.trace_id, "032x") == TRACE_ID
    assert request.parent is not None and format(request.parent.span_id, "016x") == PARENT
    assert queue.parent.span_id == request.context.span_id == batch.parent.span_id
    assert request.attributes["ember.model"] == "m" and request.attributes["http.response.status_code"] == 200
    assert batch.attributes["ember.batch_size"] == 1
    assert batch.end_time - batch.start_time == 250_000_000  # the fake's 0.25 s batch
    assert request.start_time <= queue.start_time <= queue.end_time <= batch.start_time <= request.end_time
