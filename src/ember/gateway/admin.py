"""The admin API the CLI speaks: deploy (with progress), list, inspect, remove, load, unload, status, usage.

``POST /admin/models`` takes the model as a package (``Content-Type: application/x-tar``, the
deployment as JSON in the ``Ember-Deploy`` header; see ``ember.packaging``), or, from admin keys
only, a JSON deployment whose source is a path or module on the server. It streams
newline-delimited JSON progress events while the model is imported into the store and first loaded;
the last line is ``{"stage": "done", "model": {...}}`` or ``{"stage": "error", "status": N, "error":
"..."}``. A refusal before the import begins (a bad deployment, a quota) is a plain error answer.

``PATCH /admin/models/{name}`` changes a deployed model's SLO, keep-alives or on-unmeetable mode in
place (``{"slo_ms": 250}``; fields as ``ember.config.UpdateSpec``), without a redeploy or a reload;
it answers the model as ``GET`` does.

``GET /admin/usage?since=SECONDS&tenant=T`` answers metered usage (``ember.metering.report``); a
tenant's key sees its own tenant's alone.

``POST /admin/models/{name}/unload?tier=warm|cool`` demotes a model off the device: to warm (its
weights stay in host memory) or to cool (the default; local disk only). Options are query
parameters, as ``?load=false`` on deploy.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ember.clock import Clock, run_blocking
from ember.cluster.channel import storage_full
from ember.config import DeploySpec, UpdateSpec, validation_message
from ember.errors import EmberError, Forbidden, InternalError, InvalidInput
from ember.gateway import auth
from ember.gateway.edge import BODY_TIMEOUT_S, BodyTimeout, PayloadTooLarge, check_declared_length, read_json
from ember.packaging import MAX_PACKAGE_BYTES, PACKAGE_MEDIA_TYPE, SPEC_HEADER, PackageError, check_inside, unpack
from ember.service import EmberService

__all__ = ["routes"]

log = logging.getLogger("ember.gateway")


def parse_spec(body: Any, package: Path | None = None) -> DeploySpec:
    """The deployment in ``body``; with ``package``, its source is inside that unpacked upload."""
    if not isinstance(body, dict):
        raise InvalidInput('the deployment must be a JSON object like {"source": "examples/minilm.py:MiniLM"}')
    if "package" in body:
        raise InvalidInput("'package' is set by the server for an uploaded model; leave it out")
    if package is not None:
        source = body.get("source")
        if not isinstance(source, str):
            raise InvalidInput("a packaged deploy needs a source inside the package, like model.py:Model")
        try:
            check_inside(package, source)
        except PackageError as exc:
            raise InvalidInput(str(exc)) from exc
        body = {**body, "package": str(package)}
    try:
        return DeploySpec.model_validate(body)
    except ValidationError as exc:
        raise InvalidInput(f"invalid deployment: {validation_message(exc, DeploySpec.model_fields)}") from exc
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc


def scoped_tenant(request: Request) -> str | None:
    """The tenant a tenant-scoped read is about: the caller's own, or for admin keys ``?tenant=`` (None: all)."""
    asked = request.query_params.get("tenant") or None
    own = auth.principal_of(request).tenant
    if own is None:
        return asked
    if asked is not None and asked != own:
        raise Forbidden(f"this key belongs to tenant '{own}' and sees its usage alone; leave out ?tenant=")
    return own


def _since(request: Request) -> float | None:
    text = request.query_params.get("since")
    if text is None or text == "":
        return None
    try:
        since = float(text)
    except ValueError:
        what = f"?since= takes wall-clock seconds since the epoch, like 1764800000; not {text[:40]!r}"
        raise InvalidInput(what) from None
    if since != since or since in (float("inf"), float("-inf")):
        raise InvalidInput("?since= must be a finite number of seconds since the epoch")
    return since


def _spec_header(request: Request) -> Any:
    text = request.headers.get(SPEC_HEADER)
    if text is None:
        raise InvalidInput(f"a packaged deploy carries its deployment as JSON in the {SPEC_HEADER} header")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"the {SPEC_HEADER} header is not valid JSON: {exc}") from exc


async def receive_package(request: Request, folder: Path, clock: Clock) -> Path:
    """Write the uploaded package under ``folder`` and unpack it; returns the folder it unpacked into."""
    check_declared_length(request.headers.get("content-length"), MAX_PACKAGE_BYTES)
    tar_file = folder / "package.tar"
    try:
        await _write_package(request, tar_file)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise storage_full(str(exc)) from exc
    root = folder / "root"
    root.mkdir()
    try:
        await run_blocking(clock, unpack, tar_file, root)
    except PackageError as exc:
        raise InvalidInput(str(exc)) from exc
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise storage_full(str(exc)) from exc
    finally:
        tar_file.unlink(missing_ok=True)
    return root


async def _write_package(request: Request, tar_file: Path) -> None:
    size = 0
    chunks = request.stream().__aiter__()
    with tar_file.open("wb") as out:
        while True:
            try:
                async with asyncio.timeout(BODY_TIMEOUT_S):  # clock-ok: a bound on a real socket
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise BodyTimeout(f"the package stopped arriving for {BODY_TIMEOUT_S:g} s; send it again") from None
            size += len(chunk)
            if size > MAX_PACKAGE_BYTES:
                raise PayloadTooLarge(f"the package is over {MAX_PACKAGE_BYTES} bytes; package the model alone")
            out.write(chunk)


class DeployStream(StreamingResponse):
    """The deploy's NDJSON stream; ``finish`` runs once the answer is over, even if it never began."""

    def __init__(self, content: AsyncIterator[bytes], finish: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="application/x-ndjson")
        self._finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._finish()


def parse_update(body: Any) -> UpdateSpec:
    if not isinstance(body, dict):
        raise InvalidInput('the body must be a JSON object like {"slo_ms": 250}')
    try:
        return UpdateSpec.model_validate(body)
    except ValidationError as exc:
        raise InvalidInput(f"invalid update: {validation_message(exc, UpdateSpec.model_fields)}") from exc


def routes(service: EmberService) -> list[Route]:
    async def deploy(request: Request) -> Response:
        """A JSON body names a source on the server (admin keys only); a package body carries the model."""
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != PACKAGE_MEDIA_TYPE:
            if not auth.principal_of(request).is_admin:  # before the source is looked at: no file oracle
                raise Forbidden(
                    "a deploy from a path on the server needs an admin key; `ember deploy SOURCE` (and "
                    "Client.deploy) upload the model from your machine instead"
                )
            return start_deploy(request, parse_spec(await read_json(request)), None)
        body = _spec_header(request)
        folder = service.new_upload_folder()
        try:
            root = await receive_package(request, folder, service.clock)
            return start_deploy(request, parse_spec(body, root), folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def start_deploy(request: Request, parsed: DeploySpec, upload: Path | None) -> Response:
        spec, reservation = auth.admit_deploy(request, parsed, service.models)
        load = request.query_params.get("load", "true") != "false"
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=64)
        on_stored = None if reservation is None else reservation.stored

        async def finish() -> None:  # idempotent: from the work's end, and from the answer's
            if reservation is not None:
                reservation.release()
            if upload is not None:
                await run_blocking(service.clock, shutil.rmtree, upload, True)

        def say(event: dict[str, Any]) -> None:
            # Progress (bytes so far) is lossy: a client reading slowly misses some, never the rest.
            if "bytes" in event and "percent" in event and events.qsize() >= events.maxsize - 8:
                return
            events.put_nowait(event)

        async def work() -> None:
            try:
                info = await service.deploy(spec, say, load=load, on_stored=on_stored)
                await events.put({"stage": "done", "model": info.to_json()})
            except EmberError as exc:
                await events.put({"stage": "error", "status": exc.http_status, "error": exc.message})
            except Exception as exc:  # a bug: the stream still ends with an error, and the log has the trace
                log.exception("deploying %s failed", spec.name)
                what = type(exc).__name__
                error = InternalError(f"deploying failed: internal error ({what}); the server log says more")
                await events.put({"stage": "error", "status": error.http_status, "error": error.message})
            finally:
                await finish()
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

        return DeployStream(stream(), finish)

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

    async def usage(request: Request) -> Response:
        """``?since=`` (wall-clock seconds) and, for admin keys, ``?tenant=``; other keys see their own."""
        return JSONResponse(await service.usage(_since(request), scoped_tenant(request)))

    return [
        Route("/admin/models", list_models, methods=["GET"]),
        Route("/admin/models", deploy, methods=["POST"]),
        Route("/admin/models/{name}", get_model, methods=["GET"]),
        Route("/admin/models/{name}", update, methods=["PATCH"]),
        Route("/admin/models/{name}", remove, methods=["DELETE"]),
        Route("/admin/models/{name}/load", load, methods=["POST"]),
        Route("/admin/models/{name}/unload", unload, methods=["POST"]),
        Route("/admin/status", status, methods=["GET"]),
        Route("/admin/usage", usage, methods=["GET"]),
    ]
