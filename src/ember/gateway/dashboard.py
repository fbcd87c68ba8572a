"""The dashboard: ``GET /`` (a page, no build step), its static files, and ``GET /admin/dashboard``.

The page (``web/index.html``, ``web/dashboard.js``, ``web/dashboard.css``) charts with uPlot
1.6.32 (MIT, vendored as ``web/uPlot.iife.min.js`` and ``web/uPlot.min.css``, its license beside
them), and polls ``GET /admin/dashboard`` every two seconds. That answer is built from bounded rings
the server keeps anyway (recent requests, tier changes, cold starts: ``EmberService.recent``,
``tier_changes``, ``cold_start_log``), so a page left open does not grow the server's memory, and a
page opened late still sees the last minutes. Any key may read it; a tenant's key sees its tenant's
models, usage and errors alone, and the cluster (workers, devices, the end of each worker's log)
only with an admin key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ember.errors import InvalidInput
from ember.gateway import auth
from ember.gateway.admin import scoped_tenant
from ember.requestlog import Recent
from ember.service import EmberService

__all__ = ["routes", "series"]

WEB = Path(__file__).resolve().parent / "web"
STATIC = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css",
    "uPlot.LICENSE": "text/plain",
}
#: The live charts' window and step, seconds; the cost panel's default window.
WINDOW_S = 300.0
STEP_S = 5.0
COST_WINDOW_S = 3600.0
ERRORS_SHOWN = 20
#: Lines of each worker's log shown (admin keys only: a worker's log may hold what its earlier models printed).
LOG_LINES = 15
LOG_TAIL_BYTES = 16 * 1024


def routes(service: EmberService) -> list[Route]:
    async def page(request: Request) -> Response:
        return FileResponse(WEB / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        media = STATIC.get(name)
        if media is None:
            raise HTTPException(404, f"no static file {name[:60]!r}")
        return FileResponse(WEB / name, media_type=media, headers={"Cache-Control": "max-age=3600"})

    async def data(request: Request) -> Response:
        principal = auth.principal_of(request)
        cost_s = _seconds(request.query_params.get("cost_s"), COST_WINDOW_S)
        now = service.clock.wall()
        models = [m for m in service.models() if principal.sees(m.tenant)]
        names = {m.name for m in models}
        start = now - WINDOW_S
        recent = [r for r in service.recent.items if r.at >= start and r.model in names]
        tiers = [t for t in service.tier_changes if t[1] in names]
        body: dict[str, Any] = {
            "now": now,
            "window_s": WINDOW_S,
            "step_s": STEP_S,
            "tenant": principal.tenant,
            "role": principal.role.value,
            "models": [
                {
                    **m.to_json(),
                    "series": series(
                        [r for r in recent if r.model == m.name], start, now, m.slo_ms / 1000.0, m.created_at
                    ),
                    "tiers": _timeline(m.name, m.tier, tiers, start, m.created_at),
                    "cold_starts": [
                        {"at": at, "tier": tier, "seconds": s}
                        for at, name, tier, s in service.cold_start_log
                        if name == m.name and at >= start
                    ],
                }
                for m in models
            ],
            "errors": [
                {"at": r.at, "id": r.id, "model": r.model, "status": r.status, "reason": r.reason, "error": r.error}
                for r in list(service.recent.items)[::-1]
                if r.status >= 400 and (r.model in names or principal.is_admin)
            ][:ERRORS_SHOWN],
            "usage": await service.usage(now - cost_s, scoped_tenant(request)),
            "cluster": _cluster(service, models) if principal.is_admin else None,
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return [
        Route("/", page, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/admin/dashboard", data, methods=["GET"]),
    ]


def series(requests: list[Recent], start: float, end: float, slo_s: float, since: float = 0.0) -> dict[str, list[Any]]:
    """Per step of :data:`STEP_S` from ``start`` to ``end``: requests per second, p50 and p99 latency of
    the answered ones (ms; None without any), the fraction within ``slo_s``, and refusals (429, 503).
    Steps that ended before ``since`` (the model was not deployed yet) are all None."""
    steps = max(1, math.ceil((end - start) / STEP_S))
    buckets: list[list[Recent]] = [[] for _ in range(steps)]
    for r in requests:
        index = min(steps - 1, max(0, int((r.at - start) // STEP_S)))
        buckets[index].append(r)
    out: dict[str, list[Any]] = {"t": [], "rps": [], "p50_ms": [], "p99_ms": [], "attainment": [], "refused": []}
    for i, bucket in enumerate(buckets):
        if start + (i + 1) * STEP_S < since:
            for name, values in out.items():
                values.append(start + (i + 1) * STEP_S if name == "t" else None)
            continue
        ok = sorted(r.seconds for r in bucket if r.status < 400)
        refused = sum(1 for r in bucket if r.status in (429, 503))
        counted = len(ok) + refused
        out["t"].append(start + (i + 1) * STEP_S)
        out["rps"].append(len(bucket) / STEP_S)
        out["p50_ms"].append(_percentile(ok, 0.50))
        out["p99_ms"].append(_percentile(ok, 0.99))
        met = sum(1 for s in ok if s <= slo_s)
        out["attainment"].append(met / counted if counted else None)
        out["refused"].append(refused)
    out["refusals"] = [_refusals(requests)]
    return out


def _refusals(requests: list[Recent]) -> dict[str, int]:
    """Refusals and errors by reason: the error's class and status, like ``DeadlineUnmeetable (429)``."""
    reasons: dict[str, int] = {}
    for r in requests:
        if r.status >= 400:
            reason = f"{r.reason or 'error'} ({r.status})"
            reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def _percentile(sorted_s: list[float], q: float) -> float | None:
    if not sorted_s:
        return None
    return round(1000.0 * sorted_s[min(len(sorted_s) - 1, math.ceil(q * len(sorted_s)) - 1)], 3)


def _timeline(
    name: str, tier_now: str, changes: list[tuple[float, str, str]], start: float, since: float
) -> list[list[Any]]:
    """``[[from, tier], ...]`` covering the window: the tier at its start, then each change in it; the
    time before the model was deployed (``since``) is ``"none"``."""
    before = [tier for at, model, tier in changes if model == name and at < start]
    inside = [[at, tier] for at, model, tier in changes if model == name and at >= start]
    first = before[-1] if before else (inside[0][1] if inside else tier_now)
    if since > start:
        return [[start, "none"], [since, first], *inside]
    return [[start, first], *inside]


def _cluster(service: EmberService, models: list[Any]) -> dict[str, Any]:
    status = service.status()
    resident: dict[str, list[dict[str, Any]]] = {}
    for m in models:
        for worker in service.controller.hot_instances(m.name):
            resident.setdefault(worker.id, []).append({"model": m.name, "bytes": m.bytes, "tenant": m.tenant})
    pids = {str(w.get("id")): w.get("pid") for w in status["workers"].get("workers", [])}
    logs = service.home / "logs"
    workers = []
    for w in service.backend.workers():
        held = resident.get(w.id, [])
        workers.append(
            {
                "id": w.id,
                "pid": pids.get(w.id),
                "device": w.device,
                "alive": w.alive,
                "in_flight": w.in_flight,
                "models": held,
                "weights_bytes": sum(h["bytes"] for h in held),
                "log_tail": _tail(logs / f"worker-{w.id.removeprefix('w')}.log", LOG_LINES),
            }
        )
    return {
        "workers": workers,
        "ready": status["workers"].get("ready"),
        "size": status["workers"].get("size"),
        "device_memory_bytes": service.options.device_memory_bytes,
        "store": status["store"],
    }


def _tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of ``path`` (read from its last :data:`LOG_TAIL_BYTES`); none if it is absent."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, 2)
            file.seek(max(0, size - LOG_TAIL_BYTES))
            data = file.read()
    except OSError:
        return []
    return [line.decode("utf-8", "replace")[:300] for line in data.splitlines()[-lines:]]


def _seconds(text: str | None, default: float) -> float:
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"cost_s takes seconds, like 3600; not {text[:40]!r}") from None
    if not 0 < value < math.inf:
        raise InvalidInput("cost_s must be a positive number of seconds")
    return value
