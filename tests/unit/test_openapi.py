"""Ember's own OpenAPI schema: it describes every route, and schemathesis fuzzes each operation.

The server is the real gateway (uvicorn, in a thread) over an :class:`EmberService` on fake workers,
with one model deployed. Every generated case goes out with the admin key (so it reaches the routes
rather than stopping at 401) and must get an answer below 500, within the timeout. Cases are bounded
(``MAX_EXAMPLES`` per operation) so the whole module runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from starlette.routing import Route

from ember.auth.keys import ADMIN_KEY_FILE
from ember.config import DeploySpec
from ember.gateway.app import build_app
from ember.gateway.openapi import SCHEMA
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, LatencyProfile, VirtualClock

MAX_EXAMPLES = 5
CASES: list[int] = []

schema = schemathesis.openapi.from_dict(SCHEMA)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # not the main thread: leave signals alone
        yield


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(url, admin key) of a gateway on fake workers, serving in a background thread."""
    home = tmp_path_factory.mktemp("openapi")
    model = home / "model.py"
    model.write_text("class M: ...\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state: dict[str, object] = {}

    async def serve() -> None:
        from ember.clock import WallClock

        clock = WallClock()
        backend = FakeBackend(clock, profile=LatencyProfile(base_s=0.001, load_s=0.001))
        service = EmberService(ServeOptions(home=home / "home", warm_root=home / "shm"), clock=clock, backend=backend)
        app = build_app(service, manage_lifetime=False)
        async with service:
            await service.deploy(DeploySpec(source=f"{model}:M", name="m"))
            server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
            state["server"] = server
            await server.serve()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # up to 30 s for the service to start
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                break
        thread.join(0.05)
    key = (home / "home" / ADMIN_KEY_FILE).read_text().strip()
    yield url, key
    server = state.get("server")
    if isinstance(server, uvicorn.Server):
        server.should_exit = True
    thread.join(30)
    print(f"\nschemathesis: {len(CASES)} cases, none answered 5xx")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_operation_answers_a_server_error(case, live):
    url, key = live
    response = case.call(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    CASES.append(response.status_code)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"


def test_the_schema_describes_every_route(tmp_path: Path):
    service = EmberService(ServeOptions(home=tmp_path, warm_root=tmp_path / "shm"), backend=FakeBackend(VirtualClock()))
    app = build_app(service, manage_lifetime=False)
    described = {(path, method.upper()) for path, ops in SCHEMA["paths"].items() for method in ops}
    served = {
        (route.path, method)
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method != "HEAD"
    }
    assert served - described == set()
    assert described - served == set()
