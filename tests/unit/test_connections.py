"""The head deadline and the cap on unauthenticated connections, on uvicorn's protocol with fake transports."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from ember.gateway.connections import CONNECTION_SCOPE_KEY, Connections, protocol_factory

HEAD = b"GET /v2/health/live HTTP/1.1\r\nHost: ember\r\n"


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = asyncio.Event()
        self.written = bytearray()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed.is_set()

    def close(self) -> None:
        self.closed.set()

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _connect(guard: Connections) -> tuple[Any, FakeTransport]:
    config = uvicorn.Config(_app, log_level="warning", lifespan="off")
    protocol = protocol_factory(guard)(config, ServerState(), {})
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


def test_a_head_that_does_not_arrive_whole_closes_the_connection() -> None:
    async def main() -> None:
        guard = Connections(head_timeout_s=0.01, max_unauthenticated=8)
        protocol, transport = _connect(guard)
        protocol.data_received(HEAD[:20])
        protocol.data_received(HEAD[20:])  # more of the head does not extend the deadline; no blank line
        await asyncio.wait_for(transport.closed.wait(), timeout=60)
        assert guard.closed_for_head_timeout == 1 and len(guard) == 0

    asyncio.run(main())


def test_past_the_cap_the_longest_waiting_unauthenticated_connection_is_closed() -> None:
    async def main() -> None:
        guard = Connections(head_timeout_s=600, max_unauthenticated=2)
        _, first_transport = _connect(guard)
        keyed, keyed_transport = _connect(guard)
        keyed.data_received(HEAD + b"\r\n")
        assert keyed.scope[CONNECTION_SCOPE_KEY] is keyed
        keyed.authenticated()
        _, second_transport = _connect(guard)
        assert len(guard) == 2 and not first_transport.is_closing()
        _, third_transport = _connect(guard)
        assert first_transport.is_closing() and guard.closed_for_cap == 1
        assert not second_transport.is_closing() and not third_transport.is_closing()
        assert not keyed_transport.is_closing()  # a keyed connection is not counted, even when idle again
        for transport in (first_transport, second_transport, third_transport, keyed_transport):
            transport.close()

    asyncio.run(main())
