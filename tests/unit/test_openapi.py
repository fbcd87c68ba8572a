"""Ember's own OpenAPI schema: it describes every route, and schemathesis fuzzes each operation.

The server is the real gateway (uvicorn, in a thread) over an :class:`EmberService` on fake workers,
with one model deployed. Every generated case goes out with the admin key (so it reaches the routes
rather than stopping at 401) and must get an answer below 500, within the timeout. Cases are bounded
(``MAX_EXAMPLES`` per operation) so the whole module runs in well under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from starlette.routing import Route
from threaded_gateway import gateway_in_thread

from ember.config import DeploySpec
from ember.gateway.app import build_app
from ember.gateway.openapi import SCHEMA
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, VirtualClock

MAX_EXAMPLES = 5
CASES: list[int] = []

schema = schemathesis.openapi.from_dict(SCHEMA)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(url, admin key) of a gateway on fake workers, serving in a background thread."""
    home = tmp_path_factory.mktemp("openapi")
    model = home / "model.py"
    model.write_text("class M: ...\n")

    async def prepare(service: EmberService, backend: FakeBackend) -> None:
        await service.deploy(DeploySpec(source=f"{model}:M", name="m"))

    with gateway_in_thread(home, prepare) as served:
        yield served
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
