"""The per-request cost of the key check: the gateway's ASGI stack with and without ``AuthMiddleware``.

    python benchmarks/auth_overhead.py [--requests 20000] [--repeat 5] [--json out.json]

Claim (issue 5): authenticating a request (SHA-256 of the presented key, a dict lookup, the path's
tenant check and a token bucket) costs a few microseconds, small beside the request it guards.

Both sides run in this process, on one event loop, against the same trivial Starlette app, calling it
directly as ASGI (no sockets, so the difference is the middleware alone):

* baseline: the app; a request to ``/v2/models/m/infer`` with an ``Authorization`` header.
* Ember: the same app behind ``AuthMiddleware`` with a live invoker key of the model's tenant
  (so the path's model name is rewritten into the tenant's namespace, ``m`` to ``acme+m``), and
  that tenant under a rate quota (so the bucket is taken on every request; the rate is too high
  to refuse any).

Printed: microseconds per request for each, the difference (the auth cost) and the ratio, from the
best of ``--repeat`` rounds and from their medians.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ember.auth.keys import Role
from ember.auth.quota import TenantQuota
from ember.clock import WallClock
from ember.gateway.auth import AuthMiddleware, Guard
from ember.registry import Registry


def build(home: Path) -> tuple[Any, Any, str]:
    async def infer(request: Request) -> Response:
        return Response(b"{}", media_type="application/json")

    app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])
    guard = Guard(Registry(home / "registry.sqlite"), WallClock(), home)
    key = guard.create_key(Role.INVOKER, "acme").secret
    guard.set_quota(TenantQuota("acme", rate_per_s=1e12, burst=10**9))
    guarded = AuthMiddleware(app, guard=guard, tenant_of=lambda name: "acme" if name == "acme+m" else None)
    return app, guarded, key


async def measure(app: Any, key: str, requests: int) -> tuple[float, int]:
    """Seconds per request, and the last status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v2/models/m/infer",
        "raw_path": b"/v2/models/m/infer",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"python-httpx/0.28"),
            (b"content-type", b"application/json"),
            (b"content-length", b"2"),
            (b"authorization", f"Bearer {key}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    start = time.perf_counter()
    for _ in range(requests):
        await app(dict(scope), receive, send)
    return (time.perf_counter() - start) / requests, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="requests per round and side")
    parser.add_argument("--repeat", type=int, default=9, help="rounds, interleaved")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        app, guarded, key = build(Path(tmp))

        async def run() -> tuple[list[float], list[float]]:
            base: list[float] = []
            auth: list[float] = []
            for _ in range(args.repeat):  # interleaved, so drift in the machine's load hits both sides
                seconds, status = await measure(app, key, args.requests)
                assert status == 200, status
                base.append(seconds)
                seconds, status = await measure(guarded, key, args.requests)
                assert status == 200, status
                auth.append(seconds)
            return base, auth

        base, auth = asyncio.run(run())
    base_us, auth_us = 1e6 * min(base), 1e6 * min(auth)
    c.print_table(
        ["side", "us/request (best)", "us/request (median)"],
        [
            ["baseline: app alone", f"{base_us:.2f}", f"{1e6 * c.median(base):.2f}"],
            ["Ember: app behind AuthMiddleware", f"{auth_us:.2f}", f"{1e6 * c.median(auth):.2f}"],
        ],
    )
    base_median_us, auth_median_us = 1e6 * c.median(base), 1e6 * c.median(auth)
    print(f"auth cost, best rounds: {auth_us - base_us:.2f} us per request; ratio {auth_us / base_us:.3f}")
    print(
        f"auth cost, median rounds: {auth_median_us - base_median_us:.2f} us per request; "
        f"ratio {auth_median_us / base_median_us:.3f}"
    )
    print(f"one-minute load average: {c.load_average():.2f}")
    c.write_json(
        args.json,
        {
            "machine": c.machine(),
            "requests": args.requests,
            "repeat": args.repeat,
            "baseline_us": base_us,
            "ember_us": auth_us,
            "auth_cost_us": auth_us - base_us,
            "ratio": auth_us / base_us,
            "baseline_median_us": base_median_us,
            "ember_median_us": auth_median_us,
            "auth_cost_median_us": auth_median_us - base_median_us,
            "load_average": c.load_average(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
