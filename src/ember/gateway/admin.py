"""The admin API the CLI speaks: deploy (with progress), list, inspect, remove, load, unload, status.

``POST /admin/models`` streams newline-delimited JSON progress events while the model is imported
into the store and first loaded; the last line is ``{"stage": "done", "model": {...}}`` or
``{"stage": "error", "status": N, "error": "..."}``.

``POST /admin/models/{name}/unload?tier=warm|cool`` demotes a model off the device: to warm (its
weights stay in host memory) or to cool (the default; local disk only). Options are query
parameters, as ``?load=false`` on deploy.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ember.config import DeploySpec
from ember.errors import EmberError, InternalError, InvalidInput
from ember.gateway import auth
from ember.gateway.edge import read_json
from ember.service import EmberService

__all__ = ["routes"]

log = logging.getLogger("ember.gateway")


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


def routes(service: EmberService) -> list[Route]:
    async def deploy(request: Request) -> Response:
        spec, reservation = auth.admit_deploy(request, parse_spec(await read_json(request)), service.models)
        load = request.query_params.get("load", "true") != "false"
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=64)
        on_stored = None if reservation is None else reservation.stored

        async def work() -> None:
            try:
                info = await service.deploy(spec, events.put_nowait, load=load, on_stored=on_stored)
                await events.put({"stage": "done", "model": info.to_json()})
            except EmberError as exc:
                await events.put({"stage": "error", "status": exc.http_status, "error": exc.message})
            except Exception as exc:  # a bug: the stream still ends with an error, and the log has the trace
                log.exception("deploying %s failed", spec.name)
                what = type(exc).__name__
                error = InternalError(f"deploying failed: internal error ({what}); the server log says more")
                await events.put({"stage": "error", "status": error.http_status, "error": error.message})
            finally:
                if reservation is not None:
                    reservation.release()
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
        Route("/admin/models/{name}", remove, methods=["DELETE"]),
        Route("/admin/models/{name}/load", load, methods=["POST"]),
        Route("/admin/models/{name}/unload", unload, methods=["POST"]),
        Route("/admin/status", status, methods=["GET"]),
    ]
