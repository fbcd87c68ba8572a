"""The outermost middleware: every request's id, returned in ``X-Request-Id``, and its log line.

``ember.requestlog`` says how the id is chosen and what the line holds.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.clock import Clock
from ember.requestlog import RecentRequests, RequestLog, RequestRecord, current, request_id
from ember.tracing import Tracer

__all__ = ["RequestIds"]

#: Bytes of an error answer's body kept, for the dashboard's recent errors.
ERROR_BYTES = 512

#: Paths whose requests are not logged: the dashboard reading, scrapers and health checks.
_QUIET_PREFIXES = ("/static/", "/v2/health/")
_QUIET_PATHS = frozenset({"/", "/metrics", "/admin/dashboard", "/admin/usage", "/favicon.ico"})


class RequestIds:
    def __init__(
        self, app: ASGIApp, clock: Clock, log: RequestLog | None, recent: RecentRequests, tracer: Tracer | None = None
    ) -> None:
        self.app = app
        self.clock = clock
        self.log = log
        self.recent = recent
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in (b"x-request-id", b"traceparent", b"tracestate") and name not in given:
                given[name] = value.decode("latin-1")
        rid = request_id(given.get(b"x-request-id"), given.get(b"traceparent"))
        record = RequestRecord(rid, scope["method"], scope["path"], self.clock.now())
        header = (b"x-request-id", rid.encode("latin-1"))
        error = bytearray()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
                for name, value in message.get("headers", ()):
                    if name.lower() == b"ember-error":
                        record.error = value.decode("latin-1")
                message["headers"] = [*message.get("headers", ()), header]
            elif message["type"] == "http.response.body" and record.status >= 400 and len(error) < ERROR_BYTES:
                error.extend(message.get("body", b"")[: ERROR_BYTES - len(error)])
            await send(message)

        token = current.set(record)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current.reset(token)
            if record.model is None:  # refused before the service saw it: the name in the (rewritten) path
                record.model = _model_of(scope["path"])
            if not _quiet(record.path):
                at, seconds = self.clock.wall(), self.clock.now() - record.started
                self.recent.add(record, at, seconds, _message(bytes(error)))  # error: the body's message
                if self.log is not None:
                    self.log.write(record.line(at, seconds))
                if self.tracer is not None and record.model is not None:
                    self.tracer.record({k.decode(): v for k, v in given.items()}, record, at, seconds)


def _message(body: bytes) -> str:
    """The ``error`` of an error answer's JSON body (``error.message`` in OpenAI's shape), else its text."""
    if not body:
        return ""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:200]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error if error is not None else parsed)[:200]


def _model_of(path: str) -> str | None:
    parts = path.split("/")
    if len(parts) > 3 and parts[1] == "v2" and parts[2] == "models" and parts[3]:
        return parts[3]
    return None


def _quiet(path: str) -> bool:
    return path in _QUIET_PATHS or path.startswith(_QUIET_PREFIXES)
