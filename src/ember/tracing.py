"""Optional OpenTelemetry spans for each request: gateway -> queue -> batch, off unless configured.

``ember serve --otel`` (with ``pip install 'ember-serve[otel]'``) exports spans over OTLP/HTTP to
where the standard variables say (``OTEL_EXPORTER_OTLP_ENDPOINT``, default
``http://localhost:4318``; ``OTEL_SERVICE_NAME``, default ``ember``). Each request that reached a
model gives three spans, made when its answer is done from what its ``RequestRecord`` measured:
``ember.request`` (the gateway's whole answer; a child of the caller's ``traceparent`` when it sent
one), ``ember.queue`` (admission to dispatch) and ``ember.batch`` (the worker's compute for the
batch it ran in), with the model, tenant, status, batch size and cold-start tier as attributes.
Nothing is imported or built while tracing is off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ember.errors import InvalidInput
from ember.requestlog import RequestRecord

__all__ = ["Tracer", "otlp_tracer"]


class Tracer:
    """Turns a finished request's record into spans on an OpenTelemetry tracer."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import propagate, trace

        self._tracer = tracer
        self._propagate = propagate
        self._trace = trace

    def record(self, headers: Mapping[str, str], record: RequestRecord, end_wall: float, total_s: float) -> None:
        """Spans for ``record``, whose answer ended at wall-clock ``end_wall`` after ``total_s`` seconds."""
        end = int(end_wall * 1e9)
        start = end - int(total_s * 1e9)
        attributes: dict[str, Any] = {
            "ember.request_id": record.id,
            "http.request.method": record.method,
            "url.path": record.path,
            "http.response.status_code": record.status,
        }
        for key, value in (
            ("ember.model", record.model),
            ("ember.tenant", record.tenant),
            ("ember.cold_start", record.cold_start),
            ("ember.error", record.error),
        ):
            if value is not None:
                attributes[key] = value
        parent = self._propagate.extract(dict(headers))
        kind = self._trace.SpanKind.SERVER
        span = self._tracer.start_span(
            "ember.request", context=parent, kind=kind, start_time=start, attributes=attributes
        )
        if record.queued_at is not None and record.queue_s is not None:
            inside = self._trace.set_span_in_context(span)
            queued = start + int((record.queued_at - record.started) * 1e9)
            dispatched = queued + int(record.queue_s * 1e9)
            model = {"ember.model": record.model or ""}
            self._tracer.start_span("ember.queue", context=inside, start_time=queued, attributes=model).end(
                end_time=dispatched
            )
            if record.compute_s is not None:
                batch = {**model, "ember.batch_size": record.batch or 0}
                computed = dispatched + int(record.compute_s * 1e9)
                self._tracer.start_span("ember.batch", context=inside, start_time=dispatched, attributes=batch).end(
                    end_time=min(computed, end)
                )
        span.end(end_time=end)


def otlp_tracer() -> Tracer:
    """A :class:`Tracer` exporting over OTLP/HTTP in batches; InvalidInput when the extra is missing."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise InvalidInput(
            f"--otel needs OpenTelemetry's SDK and OTLP exporter ({exc.name} is missing): "
            "pip install 'ember-serve[otel]'"
        ) from None
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "ember")}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracer(provider.get_tracer("ember"))
