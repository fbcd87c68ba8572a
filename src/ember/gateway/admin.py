"""The admin API the CLI speaks: deploy (with progress), list, inspect, remove, load, unload, status.

``POST /admin/models`` streams newline-delimited JSON progress events while the model is imported
into the store and first loaded; the last line is ``{"stage": "done", "model": {...}}`` or
``{"stage": "error", "status": N, "error": "..."}``.

``PATCH /admin/models/{name}`` changes a deployed model's SLO, keep-alives or on-unmeetable mode in
place (``{"slo_ms": 250}``; fields as ``ember.config.UpdateSpec``), without a redeploy or a reload;
it answers the model as ``GET`` does.

``POST /admin/models/{name}/unload?tier=warm|cool`` demotes a model off the device: to warm (its
weights stay in host memory) or to cool (the default; local disk only). Options are query
parameters, as ``?load=false`` on deploy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ember.config import DeploySpec, UpdateSpec
from ember.errors import EmberError, InvalidInput
from ember.gateway import auth
from ember.gateway.edge import read_json
from ember.service import EmberService

__all__ = ["routes"]


def parse_spec(body: Any) -> DeploySpec:
    if not isinstance(body, dict):
        raise InvalidInput('the body must be a JSON object like {"source": "examples/minilm.py:MiniLM"}')
    try:
        return DeploySpec.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"invalid deployment: {problems}") from exc
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc


def parse_update(body: Any) -> UpdateSpec:
    if not isinstance(body, dict):
        raise InvalidInput('the body must be a JSON object like {"slo_ms": 250}')
    try:
        return UpdateSpec.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'update'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(
            f"invalid update: {problems}; the fields are slo_ms, keepalive_hot_s, keepalive_warm_s, on_unmeetable"
        ) from exc


def routes(service: EmberService) -> list[Route]:
    async def deploy(request: Request) -> Response:
        spec = auth.admit_deploy(request, parse_spec(await read_json(request)), service.models())
        load = request.query_params.get("load", "true") != "false"
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=64)

        async def work() -> None:
            try:
                info = await service.deploy(spec, events.put_nowait, load=load)
                await events.put({"stage": "done", "model": info.to_json()})
            except EmberError as exc:
                await events.put({"stage": "error", "status": exc.http_status, "error": exc.message})
            finally:
                await events.put(None)

        async def stream() -> AsyncIterator[bytes]:
            task = asyncio.create_task(work(), name=f"ember-deploy-{spec.name}")
            try:
                while (event := await events.get()) is not None:
                    yield (json.dumps(event) + "\n").encode()
            finally:
                if not task.done():
                    task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def list_models(request: Request) -> Response:
        return JSONResponse([m.to_json() for m in service.models() if auth.visible(request, m.tenant)])

    async def get_model(request: Request) -> Response:
        return JSONResponse(service.info(request.path_params["name"]).to_json())

    async def update(request: Request) -> Response:
        name = request.path_params["name"]
        info = await service.update(name, parse_update(await read_json(request)))
        return JSONResponse(info.to_json())

    async def remove(request: Request) -> Response:
        name = request.path_params["name"]
        await service.remove(name)
        return JSONResponse({"removed": name})

    async def load(request: Request) -> Response:
        name = request.path_params["name"]
        await service.load(name)
        return JSONResponse(service.info(name).to_json())

    async def unload(request: Request) -> Response:
        name = request.path_params["name"]
        await service.unload(name, request.query_params.get("tier", "cool"))
        return JSONResponse(service.info(name).to_json())

    async def status(request: Request) -> Response:
        return JSONResponse(service.status())

    return [
        Route("/admin/models", list_models, methods=["GET"]),
        Route("/admin/models", deploy, methods=["POST"]),
        Route("/admin/models/{name}", get_model, methods=["GET"]),
        Route("/admin/models/{name}", update, methods=["PATCH"]),
        Route("/admin/models/{name}", remove, methods=["DELETE"]),
        Route("/admin/models/{name}/load", load, methods=["POST"]),
        Route("/admin/models/{name}/unload", unload, methods=["POST"]),
        Route("/admin/status", status, methods=["GET"]),
    ]
