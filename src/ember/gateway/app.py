"""The ASGI app: every route, one error mapping, and the service's lifetime.

Parses and validates at the edge, hands work to the :class:`EmberService`, writes the answer. It
never runs model code and never blocks the event loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import cast

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ember.errors import EmberError, InternalError
from ember.gateway import admin, auth, dashboard, generate, keys, oip, openai, openapi
from ember.gateway.edge import error_response
from ember.gateway.requestids import RequestIds
from ember.gateway.streams import Generates
from ember.service import EmberService

__all__ = ["build_app"]

log = logging.getLogger("ember.gateway")


def build_app(service: EmberService, manage_lifetime: bool = True) -> Gateway:
    """The app for ``service``; with ``manage_lifetime`` it starts and stops the service with the app.

    Every request gets its id (:class:`~ember.gateway.requestids.RequestIds`, which also writes the
    request log), then passes :class:`~ember.gateway.auth.AuthMiddleware` (keys, tenants, quotas);
    the first build on a home makes its admin key file. Then ``POST .../infer`` goes straight to
    :func:`oip.serve_infer`, and Starlette serves every other route (and the lifespan). The infer
    route is the hot path: a router, two middlewares and a request and a response object cost about
    as much as the rest of a small request's trip through the gateway.
    """
    guard = auth.Guard(service.registry, service.clock, service.home, insecure=service.options.insecure)

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def ember_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EmberError)
        return error_response(exc, openai=request.url.path.startswith("/v1/"))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = exc.detail if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        if request.url.path.startswith("/v1/"):  # the OpenAI clients read error.message
            body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
            return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        error = InternalError(f"internal error ({type(exc).__name__}); the server log has details")
        return error_response(error, openai=request.url.path.startswith("/v1/"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_lifetime:
            await service.start()
        try:
            yield
        finally:
            if manage_lifetime:
                await service.stop()

    routes = [
        *oip.routes(service),  # first: Starlette tries routes in order, and infer is the hot one
        *generate.routes(cast(Generates, service)),
        *openai.routes(service),
        *dashboard.routes(service),
        Route("/metrics", metrics, methods=["GET"]),
        *admin.routes(service),
        *keys.routes(guard),
        *openapi.routes(),
    ]
    starlette = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={EmberError: ember_error, HTTPException: http_error, Exception: unexpected},
    )
    starlette.state.guard = guard

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            target = oip.infer_target(scope["path"])
            if target is not None:
                try:
                    await oip.serve_infer(service, *target, scope, receive, send)
                except Exception as exc:
                    log.exception("internal error on POST %s", scope["path"])
                    error = InternalError(f"internal error ({type(exc).__name__}); the server log has details")
                    with contextlib.suppress(Exception):  # unless the answer had already begun
                        await error_response(error)(scope, receive, send)
                return
        await starlette(scope, receive, send)

    guarded = auth.AuthMiddleware(dispatch, guard=guard, tenant_of=service.tenant_of)
    return Gateway(RequestIds(guarded, service.clock, service.request_log, service.recent, service.tracer), starlette)


class Gateway:
    """The ASGI app :func:`build_app` makes; ``state`` (``state.guard``) and ``routes`` are the
    Starlette app's."""

    def __init__(self, app: ASGIApp, starlette: Starlette) -> None:
        self._app = app
        self.state: State = starlette.state
        self.routes: list[BaseRoute] = starlette.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)
