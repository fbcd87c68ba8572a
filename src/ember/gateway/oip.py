"""Open Inference Protocol v2 over HTTP (KServe v2 / Triton), with the binary tensor extension.

Routes: server metadata and health, model metadata, readiness and config, infer, and the model
repository extension (index, load, unload). Generative models answer on the generate extension
(:mod:`ember.gateway.generate`), not on infer. In Ember a deployed model is always ready to take
requests: one that is not hot is brought up while its requests wait. ``load`` makes it hot now;
``unload`` demotes it to the cool tier (it stays deployed and callable), or to the warm tier with
Triton's request parameters: ``{"parameters": {"tier": "warm"}}``.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ember import __version__
from ember.config import Deployment
from ember.errors import EmberError, InvalidInput, ModelNotFound
from ember.gateway import auth
from ember.gateway.edge import ClientGone, check_inputs, error_response, read_body, read_json, receive_body
from ember.gateway.tensors import encode_infer_response, parse_infer_request
from ember.service import EmberService, generate_routes

__all__ = ["infer_target", "routes", "serve_infer"]

HEADER_LENGTH = "inference-header-content-length"

_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "BYTES": "TYPE_STRING",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    **{f"INT{n}": f"TYPE_INT{n}" for n in (8, 16, 32, 64)},
    **{f"UINT{n}": f"TYPE_UINT{n}" for n in (8, 16, 32, 64)},
}


def routes(service: EmberService) -> list[Route]:
    async def server_metadata(request: Request) -> Response:
        return JSONResponse(
            {
                "name": "ember",
                "version": __version__,
                "extensions": ["binary_tensor_data", "model_repository", "generate"],
            }
        )

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)

    async def model_metadata(request: Request) -> Response:
        d = _deployment(service, request)
        return JSONResponse(
            {
                "name": d.name,
                "versions": [str(d.version)],
                "platform": "ember",
                "inputs": [t.to_json() for t in d.metadata.inputs],
                "outputs": [t.to_json() for t in d.metadata.outputs],
            }
        )

    async def model_ready(request: Request) -> Response:
        d = _deployment(service, request)
        return JSONResponse({"name": d.name, "ready": True, "tier": service.controller.tier(d.name).value})

    async def model_config(request: Request) -> Response:
        d = _deployment(service, request)

        def tensor(t: Any) -> dict[str, Any]:
            return {"name": t.name, "data_type": _TRITON_TYPES[t.datatype], "dims": list(t.shape[1:])}

        return JSONResponse(
            {
                "name": d.name,
                "platform": "ember",
                "backend": "ember",
                "version_policy": {"latest": {"num_versions": 1}},
                "max_batch_size": d.max_batch_size,
                "input": [tensor(t) for t in d.metadata.inputs],
                "output": [tensor(t) for t in d.metadata.outputs],
                "dynamic_batching": {"max_queue_delay_microseconds": int(d.max_batch_wait_ms * 1000)},
                "parameters": {
                    "slo_ms": {"string_value": str(d.slo_ms)},
                    "keepalive_hot_s": {"string_value": str(d.keepalive_hot_s)},
                    "keepalive_warm_s": {"string_value": str(d.keepalive_warm_s)},
                },
            }
        )

    async def infer(request: Request) -> Response:
        body = await read_body(request)
        name, version = request.path_params["name"], request.path_params.get("version")
        payload, header_length = await _infer(service, name, version, body, request.headers.get(HEADER_LENGTH))
        if header_length is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_length)},
        )

    async def repository_index(request: Request) -> Response:
        await read_json(request)
        return JSONResponse(
            [
                {"name": m.name, "version": str(m.version), "state": "READY", "reason": ""}
                for m in service.models()
                if auth.visible(request, m.tenant)
            ]
        )

    async def repository_load(request: Request) -> Response:
        await read_json(request)
        await service.load(request.path_params["name"])
        return JSONResponse({})

    async def repository_unload(request: Request) -> Response:
        tier = _unload_tier(await read_json(request))
        await service.unload(request.path_params["name"], tier)
        return JSONResponse({})

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    return [
        Route(f"{model}/infer", infer, methods=["POST"]),
        Route(f"{versioned}/infer", infer, methods=["POST"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route(model, model_metadata, methods=["GET"]),
        Route(versioned, model_metadata, methods=["GET"]),
        Route(f"{model}/ready", model_ready, methods=["GET"]),
        Route(f"{versioned}/ready", model_ready, methods=["GET"]),
        Route(f"{model}/config", model_config, methods=["GET"]),
        Route(f"{versioned}/config", model_config, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
    ]


def _unload_tier(body: Any) -> str:
    """The tier an unload names in its body (``{"parameters": {"tier": "warm"}}``); cool by default.

    Other parameters (tritonclient sends ``unload_dependents``) are accepted and mean nothing here."""
    if body is None:
        return "cool"
    parameters = body.get("parameters", {}) if isinstance(body, dict) else None
    if not isinstance(parameters, dict):
        raise InvalidInput('the body must be a JSON object like {"parameters": {"tier": "warm"}}, or empty')
    tier = parameters.get("tier", "cool")
    if not isinstance(tier, str):
        raise InvalidInput('the parameter "tier" must be a string: "warm" or "cool"')
    return tier


def infer_target(path: str) -> tuple[str, str | None] | None:
    """``(model, version)`` if ``path`` is an infer route (``/v2/models/{name}[/versions/{v}]/infer``)."""
    if not (path.startswith("/v2/models/") and path.endswith("/infer")):
        return None
    parts = path[11:-6].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None


async def serve_infer(
    service: EmberService, model: str, version: str | None, scope: Scope, receive: Receive, send: Send
) -> None:
    """The infer route as a raw ASGI handler: the hot path, without a router, middleware or objects per
    request. Errors are answered as the app's handlers would."""
    declared = encoding = header = None
    for key, value in scope["headers"]:
        if key == b"content-length":
            declared = value.decode("latin-1")
        elif key == b"content-encoding":
            encoding = value.decode("latin-1")
        elif key == b"inference-header-content-length":
            header = value.decode("latin-1")
    try:
        body = await receive_body(receive, declared, encoding or "")
        payload, header_length = await _infer(service, model, version, body, header)
    except ClientGone:
        return
    except EmberError as exc:
        await error_response(exc)(scope, receive, send)
        return
    headers = [(b"content-length", b"%d" % len(payload))]
    if header_length is None:
        headers.append((b"content-type", b"application/json"))
    else:
        headers.append((b"content-type", b"application/octet-stream"))
        headers.append((b"inference-header-content-length", b"%d" % header_length))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _infer(
    service: EmberService, name: str, version: str | None, body: bytes, header: str | None
) -> tuple[bytes, int | None]:
    """Parse, check, run and encode one infer request: ``(body, json_header_length)``."""
    d = _checked_deployment(service, name, version)
    if d.generative:  # before its (empty) inputs are checked: name the routes it answers
        raise generate_routes(d.name)
    if header is not None and not header.strip().isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length must be a byte count, not {header!r}")
    parsed = parse_infer_request(body, int(header) if header is not None else None)
    check_inputs(d, parsed.inputs)
    unknown = sorted({o.name for o in parsed.outputs or ()} - {t.name for t in d.metadata.outputs})
    if unknown:
        names = ", ".join(t.name for t in d.metadata.outputs)
        raise InvalidInput(f"model '{d.name}' has no output {', '.join(unknown)}; its outputs are {names}")
    outputs = await service.infer(d.name, parsed.inputs, _timeout_s(parsed.parameters))
    return encode_infer_response(d.name, str(d.version), parsed.id, outputs, parsed)


def _deployment(service: EmberService, request: Request) -> Any:
    return _checked_deployment(service, request.path_params["name"], request.path_params.get("version"))


def _checked_deployment(service: EmberService, name: str, version: str | None) -> Deployment:
    d = service.deployment(name)
    if version not in (None, "", str(d.version)):
        raise ModelNotFound(f"{name} version {version}")
    return d


def _timeout_s(parameters: dict[str, Any]) -> float | None:
    """Triton's ``timeout`` request parameter is in microseconds."""
    raw = parameters.get("timeout")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) or raw <= 0:
        raise InvalidInput(f"parameter 'timeout' must be a positive, finite number of microseconds, not {raw!r}")
    return float(raw) / 1e6
