"""The dashboard's data (``GET /admin/dashboard``) and usage, scoped by key, on fake workers in virtual time.

The page itself is tested in a real browser (``tests/integration/test_dashboard_browser.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from ember.auth.keys import Role
from ember.clock import VirtualClock
from ember.config import DeploySpec
from ember.gateway.app import build_app
from ember.gateway.dashboard import STEP_S, series
from ember.requestlog import RECENT, Recent, RecentRequests, RequestRecord
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, LatencyProfile, run_in_virtual_time

BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}]}
Test = Callable[[httpx.AsyncClient, dict[str, str], EmberService], Awaitable[None]]


def _with_app(tmp_path: Path, test: Test) -> None:
    model = tmp_path / "model.py"
    model.write_text("class M: ...\n")

    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(clock, size=2, profile=LatencyProfile(base_s=0.25, load_s=0.5))
        options = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm")
        async with EmberService(options, clock=clock, backend=backend) as service:
            for name, tenant in (("m", None), ("acme+n", "acme")):
                spec = DeploySpec(source=f"{model}:M", name=name, tenant=tenant, on_unmeetable="best_effort")
                await service.deploy(spec)
            app = build_app(service, manage_lifetime=False)
            keys = {
                "admin": (tmp_path / "home" / "admin.key").read_text().strip(),
                "acme": app.state.guard.create_key(Role.INVOKER, "acme").secret,
            }
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ember") as client:
                await test(client, keys, service)

    run_in_virtual_time(main)


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_tenant_key_sees_its_own_models_usage_and_no_cluster(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, keys: dict[str, str], service: EmberService) -> None:
        for key in keys.values():
            r = await client.post("/v2/models/m/infer" if key == keys["admin"] else "/v2/models/n/infer", json=BODY,
                                  headers=_as(key))  # fmt: skip
            assert r.status_code == 200, r.text
        admin = (await client.get("/admin/dashboard", headers=_as(keys["admin"]))).json()
        assert [m["name"] for m in admin["models"]] == ["acme+n", "m"]
        assert admin["cluster"] is not None and len(admin["cluster"]["workers"]) == 2
        assert {row["model"] for row in admin["usage"]["models"]} == {"m", "acme+n"}
        (m,) = [m for m in admin["models"] if m["name"] == "m"]
        assert sum(x for x in m["series"]["rps"] if x) == 1 / STEP_S
        assert m["tiers"][-1][1] == "hot"

        acme = (await client.get("/admin/dashboard", headers=_as(keys["acme"]))).json()
        assert [m["name"] for m in acme["models"]] == ["acme+n"]
        assert acme["cluster"] is None and acme["tenant"] == "acme"
        assert [row["model"] for row in acme["usage"]["models"]] == ["acme+n"]
        usage = await client.get("/admin/usage", headers=_as(keys["acme"]))
        assert [t["tenant"] for t in usage.json()["tenants"]] == ["acme"]
        other = await client.get("/admin/usage", params={"tenant": "default"}, headers=_as(keys["acme"]))
        assert other.status_code == 403
        assert (await client.get("/admin/status", headers=_as(keys["acme"]))).status_code == 403

    _with_app(tmp_path, test)


def test_errors_reach_the_dashboard_of_their_tenant_alone(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, keys: dict[str, str], service: EmberService) -> None:
        bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1.0] * 3}]}
        r = await client.post("/v2/models/m/infer", json=bad, headers={**_as(keys["admin"]), "X-Request-Id": "e1"})
        assert r.status_code == 400
        admin = (await client.get("/admin/dashboard", headers=_as(keys["admin"]))).json()
        (error,) = admin["errors"]
        assert error["id"] == "e1" and error["model"] == "m" and error["status"] == 400 and error["error"]
        assert error["reason"] == "InvalidInput"
        acme = (await client.get("/admin/dashboard", headers=_as(keys["acme"]))).json()
        assert acme["errors"] == []

    _with_app(tmp_path, test)


def test_the_page_and_its_static_files_need_no_key_and_nothing_else_is_served(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, keys: dict[str, str], service: EmberService) -> None:
        page = await client.get("/")
        assert page.status_code == 200 and "signin-form" in page.text and "prompt(" not in page.text
        for name in ("dashboard.js", "uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"):
            assert (await client.get(f"/static/{name}")).status_code == 200
        assert (await client.get("/static/..%2f..%2fservice.py")).status_code == 404
        assert (await client.get("/static/index.html.bak")).status_code == 404
        assert (await client.get("/admin/dashboard")).status_code == 401

    _with_app(tmp_path, test)


def test_series_counts_rates_percentiles_and_refusals_per_step() -> None:
    start = 1000.0
    requests = [Recent(start + 1, "a", "m", 200, 0.010 * i) for i in range(1, 11)]
    requests += [
        Recent(start + 6, "b", "m", 429, 0.0, "late", "DeadlineUnmeetable"),
        Recent(start + 7, "c", "m", 200, 0.5),
    ]
    out = series(requests, start, start + 3 * STEP_S, slo_s=0.1, since=start)
    assert out["rps"] == [10 / STEP_S, 2 / STEP_S, 0.0]
    assert out["p50_ms"][0] == 50.0 and out["p99_ms"][0] == 100.0
    assert out["attainment"][:2] == [1.0, 0.0]  # the refusal and the slow answer missed
    assert out["refused"] == [0, 1, 0]
    assert out["refusals"] == [{"DeadlineUnmeetable (429)": 1}]
    before = series([], start, start + 3 * STEP_S, slo_s=0.1, since=start + 2 * STEP_S + 1)
    assert before["rps"] == [None, None, 0.0]


def test_the_ring_of_recent_requests_is_bounded() -> None:
    recent = RecentRequests()
    for i in range(RECENT + 100):
        recent.add(RequestRecord(str(i), "POST", "/", 0.0, status=200, model="m"), float(i), 0.001)
    recent.add(RequestRecord("x", "GET", "/admin/models", 0.0, status=200), 0.0, 0.0)  # no model, no error
    assert len(recent.items) == RECENT and recent.items[-1].id == str(RECENT + 99)
