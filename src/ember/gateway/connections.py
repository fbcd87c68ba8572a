"""Connections that hold file descriptors without sending a request: a deadline on every request head,
and a cap on connections that have not shown a valid key.

uvicorn keeps a connection open for as long as its client sends nothing before the first request, or
a header line at a time; a few hundred such sockets use up a server's file descriptors, and then no
request gets in, an admin's included. :class:`GuardedProtocol` (uvicorn's httptools protocol with two
rules added) closes them:

* **A head deadline.** A connection's request head (request line and headers) must arrive whole within
  :data:`HEAD_TIMEOUT_S` of the moment the server starts waiting for it: when the connection is made,
  and again after each answer on a kept-alive connection. Sending part of it does not extend the time.
* **A cap on unauthenticated connections.** A connection counts as unauthenticated until a request on
  it shows a valid key (the auth middleware calls :meth:`GuardedProtocol.authenticated`). When more
  than ``max_unauthenticated`` of them wait for a request head, the one that has waited longest is
  closed. A client that sends its request as soon as it connects (every real one) is never the oldest,
  so a flood of idle connections cannot keep keyed clients out; and since the cap is well under the
  process's descriptor limit (:func:`default_max_unauthenticated`), the flood cannot use them all up.

The middleware finds the connection under ``scope["ember.connection"]``.
"""

from __future__ import annotations

import asyncio
import resource
from collections import OrderedDict
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

__all__ = [
    "CONNECTION_SCOPE_KEY",
    "HEAD_TIMEOUT_S",
    "Connections",
    "GuardedProtocol",
    "default_max_unauthenticated",
    "protocol_factory",
]

#: Seconds a request head has to arrive, counted from when the server starts waiting for it.
HEAD_TIMEOUT_S = 5.0
#: Where a request's scope holds its connection (a :class:`GuardedProtocol`).
CONNECTION_SCOPE_KEY = "ember.connection"


def default_max_unauthenticated() -> int:
    """A quarter of the process's file descriptor limit (at least 16): the rest stays for keyed
    clients, workers, the registry and the store."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, int(soft) // 4)


class Connections:
    """The unauthenticated connections waiting for a request head, oldest first, and the limits."""

    def __init__(self, head_timeout_s: float = HEAD_TIMEOUT_S, max_unauthenticated: int | None = None) -> None:
        self.head_timeout_s = head_timeout_s
        self.max_unauthenticated = default_max_unauthenticated() if max_unauthenticated is None else max_unauthenticated
        self._waiting: OrderedDict[GuardedProtocol, None] = OrderedDict()
        #: Connections closed by each rule, for tests and logs.
        self.closed_for_head_timeout = 0
        self.closed_for_cap = 0

    def wait(self, connection: GuardedProtocol) -> None:
        self._waiting[connection] = None
        self._waiting.move_to_end(connection)
        while len(self._waiting) > self.max_unauthenticated:
            oldest, _ = self._waiting.popitem(last=False)
            self.closed_for_cap += 1
            oldest.close()

    def discard(self, connection: GuardedProtocol) -> None:
        self._waiting.pop(connection, None)

    def __len__(self) -> int:
        return len(self._waiting)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a head deadline and the unauthenticated cap (see the module)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        guard: Connections,
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._authenticated = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        super().on_headers_complete()
        self.scope[CONNECTION_SCOPE_KEY] = self  # type: ignore[literal-required]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._wait_for_head()

    def authenticated(self) -> None:
        """A request on this connection showed a valid key: the cap no longer applies to it."""
        self._authenticated = True
        self._guard.discard(self)

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def _wait_for_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self._guard.head_timeout_s, self._head_timed_out)
        if not self._authenticated:
            self._guard.wait(self)

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._guard.discard(self)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._guard.discard(self)
        self._guard.closed_for_head_timeout += 1
        self.close()


def protocol_factory(guard: Connections) -> type[GuardedProtocol]:
    """The protocol class to hand ``uvicorn.Config(http=...)``: :class:`GuardedProtocol` bound to ``guard``."""

    class Bound(GuardedProtocol):
        def __init__(
            self,
            config: Config,
            server_state: ServerState,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            super().__init__(config, server_state, app_state, guard, _loop)

    return Bound
