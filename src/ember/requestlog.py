"""Request ids and the request log: one JSON line per request, in ``HOME/logs/requests.jsonl``.

Each request gets an id: its ``X-Request-Id`` header when that is sane (1-128 visible ASCII
characters), else the trace id of its W3C ``traceparent`` header, else a fresh one. The gateway
returns it in ``X-Request-Id`` (``ember.gateway.requestids``) and, unless the log is off
(``ember serve --no-request-log``), writes a line when the answer is done::

    {"ts": 1764800000.123, "id": "...", "method": "POST", "path": "/v2/models/m/infer", "status": 200,
     "model": "m", "tenant": "default", "queue_ms": 0.4, "compute_ms": 3.1, "batch": 4,
     "cold_start": "warm", "error": null, "total_ms": 5.2}

``model`` to ``cold_start`` are set as the request passes the service and the model's runner, through
:data:`current` (a context variable the request's task carries); ``cold_start`` is the tier the
model was in when the request arrived, when that was not hot; ``error`` the class of the error
answered (the ``Ember-Error`` header), if any. The file rotates at
:data:`MAX_BYTES`, keeping :data:`BACKUPS` old files. Requests that only read the dashboard
(``GET /``, its static files and data, ``/metrics``, health checks) are not logged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import re
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BACKUPS",
    "MAX_BYTES",
    "RECENT",
    "REQUEST_LOG",
    "Recent",
    "RecentRequests",
    "RequestLog",
    "RequestRecord",
    "current",
    "request_id",
]

#: The file's name under ``HOME/logs``.
REQUEST_LOG = "requests.jsonl"
MAX_BYTES = 16 << 20
BACKUPS = 4

_SANE_ID = re.compile(r"[\x21-\x7e]{1,128}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


@dataclass
class RequestRecord:
    """What one request's log line says; the service and runner fill in the model's part."""

    id: str
    method: str
    path: str
    started: float
    status: int = 0
    model: str | None = None
    tenant: str | None = None
    queue_s: float | None = None
    compute_s: float | None = None
    batch: int | None = None
    cold_start: str | None = None
    #: The error's class when the answer is an error (the ``Ember-Error`` header): the refusal's reason.
    error: str | None = None
    #: When the model's runner admitted it (the clock's ``now``, as ``started``), for tracing.
    queued_at: float | None = None

    def line(self, ts: float, total_s: float) -> dict[str, Any]:
        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1000.0, 3)

        return {
            "ts": round(ts, 3),
            "id": self.id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "model": self.model,
            "tenant": self.tenant,
            "queue_ms": ms(self.queue_s),
            "compute_ms": ms(self.compute_s),
            "batch": self.batch,
            "cold_start": self.cold_start,
            "error": self.error,
            "total_ms": ms(total_s),
        }


#: The record of the request the running task serves, if any.
current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("ember_request", default=None)


def request_id(x_request_id: str | None, traceparent: str | None) -> str:
    """The id a request goes by: its own sane ``X-Request-Id``, its trace id, or a fresh one."""
    if x_request_id is not None and _SANE_ID.fullmatch(x_request_id):
        return x_request_id
    if traceparent is not None:
        match = _TRACEPARENT.fullmatch(traceparent.strip().lower())
        if match and match.group(1) != "0" * 32:
            return match.group(1)
    return uuid.uuid4().hex


#: Requests :class:`RecentRequests` keeps (the dashboard's rates and latencies come from them).
RECENT = 8192


@dataclass(frozen=True)
class Recent:
    """One finished request, as the dashboard sees it: when it ended (wall-clock), model, status,
    seconds from arrival to answer, and the error it got (empty when it succeeded)."""

    at: float
    id: str
    model: str | None
    status: int
    seconds: float
    error: str = ""
    #: The error's class (``DeadlineUnmeetable``, ``Overloaded``, ``QuotaExceeded``, ...), or None.
    reason: str | None = None


class RecentRequests:
    """The last :data:`RECENT` requests that named a model or failed, in a ring: bounded memory however
    long the server runs."""

    def __init__(self, size: int = RECENT) -> None:
        self.items: deque[Recent] = deque(maxlen=size)

    def add(self, record: RequestRecord, at: float, seconds: float, error: str = "") -> None:
        if record.model is not None or record.status >= 400:
            self.items.append(Recent(at, record.id, record.model, record.status, seconds, error, record.error))


class RequestLog:
    """The rotating JSON-lines file; ``write`` appends one request's line."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, line: dict[str, Any]) -> None:
        record = logging.LogRecord("ember.requests", logging.INFO, "", 0, json.dumps(line), None, None)
        self._handler.handle(record)

    def close(self) -> None:
        self._handler.close()
