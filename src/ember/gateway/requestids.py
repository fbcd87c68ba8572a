"""The outermost middleware: every request's id, returned in ``X-Request-Id``, and its log line.

``ember.requestlog`` says how the id is chosen and what the line holds.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.clock import Clock
from ember.requestlog import RequestLog, RequestRecord, current, request_id

__all__ = ["RequestIds"]

#: Paths whose requests are not logged: the dashboard reading, scrapers and health checks.
_QUIET_PREFIXES = ("/static/", "/v2/health/")
_QUIET_PATHS = frozenset({"/", "/metrics", "/admin/dashboard", "/admin/usage", "/favicon.ico"})


class RequestIds:
    def __init__(self, app: ASGIApp, clock: Clock, log: RequestLog | None) -> None:
        self.app = app
        self.clock = clock
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in (b"x-request-id", b"traceparent") and name not in given:
                given[name] = value.decode("latin-1")
        rid = request_id(given.get(b"x-request-id"), given.get(b"traceparent"))
        record = RequestRecord(rid, scope["method"], scope["path"], self.clock.now())
        header = (b"x-request-id", rid.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = current.set(record)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current.reset(token)
            if self.log is not None and not _quiet(record.path):
                self.log.write(record.line(self.clock.wall(), self.clock.now() - record.started))


def _quiet(path: str) -> bool:
    return path in _QUIET_PATHS or path.startswith(_QUIET_PREFIXES)
