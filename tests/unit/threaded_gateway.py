"""Ember's gateway under uvicorn in a background thread, over an :class:`EmberService` on fake workers:
for tests whose client is synchronous (the ``openai`` client, schemathesis, ``ember invoke``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import uvicorn

from ember.auth.keys import ADMIN_KEY_FILE
from ember.clock import WallClock
from ember.gateway.app import build_app
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, LatencyProfile

__all__ = ["gateway_in_thread"]

#: How long the service may take to answer its readiness check.
READY_TIMEOUT_S = 30.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # not the main thread: leave signals alone
        yield


@contextlib.contextmanager
def gateway_in_thread(
    home: Path, prepare: Callable[[EmberService, FakeBackend], Awaitable[None]]
) -> Iterator[tuple[str, str]]:
    """``(url, admin key)`` of a gateway serving on a free loopback port once ``prepare`` (deploys,
    patches) has run on its started service; stopped when the block ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state: dict[str, object] = {}

    async def serve() -> None:
        clock = WallClock()
        backend = FakeBackend(clock, profile=LatencyProfile(base_s=0.001, load_s=0.001))
        service = EmberService(ServeOptions(home=home / "home", warm_root=home / "shm"), clock=clock, backend=backend)
        app = build_app(service, manage_lifetime=False)
        async with service:
            await prepare(service, backend)
            server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
            state["server"] = server
            await server.serve()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        ready = False
        for _ in range(int(READY_TIMEOUT_S / 0.05)):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                    ready = True
                    break
            thread.join(0.05)
        assert ready, f"the gateway in a thread did not answer its readiness check within {READY_TIMEOUT_S:.0f} s"
        yield url, (home / "home" / ADMIN_KEY_FILE).read_text().strip()
    finally:
        server = state.get("server")
        if isinstance(server, uvicorn.Server):
            server.should_exit = True
        thread.join(30)
