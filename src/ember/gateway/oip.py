"""Open Inference Protocol v2 over HTTP (KServe v2 / Triton), with the binary tensor extension.

Routes: server metadata and health, model metadata, readiness and config, infer, and the model
repository extension (index, load, unload). In Ember a deployed model is always ready to take
requests: one that is not hot is brought up while its requests wait. ``load`` makes it hot now;
``unload`` demotes it to the cool tier (it stays deployed and callable).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ember import __version__
from ember.errors import InvalidInput, ModelNotFound
from ember.gateway import auth
from ember.gateway.edge import check_inputs, read_body, read_json
from ember.gateway.tensors import encode_infer_response, parse_infer_request
from ember.service import EmberService

__all__ = ["routes"]

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
                "extensions": ["binary_tensor_data", "model_repository"],
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
        d = _deployment(service, request)
        body = await read_body(request)
        header = request.headers.get(HEADER_LENGTH)
        if header is not None and not header.strip().isdigit():
            raise InvalidInput(f"Inference-Header-Content-Length must be a byte count, not {header!r}")
        parsed = parse_infer_request(body, int(header) if header is not None else None)
        check_inputs(d, parsed.inputs)
        unknown = sorted({o.name for o in parsed.outputs or ()} - {t.name for t in d.metadata.outputs})
        if unknown:
            names = ", ".join(t.name for t in d.metadata.outputs)
            raise InvalidInput(f"model '{d.name}' has no output {', '.join(unknown)}; its outputs are {names}")
        outputs = await service.infer(d.name, parsed.inputs, _timeout_s(parsed.parameters))
        payload, header_length = encode_infer_response(d.name, str(d.version), parsed.id, outputs, parsed)
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
        await read_json(request)
        await service.unload(request.path_params["name"])
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


def _deployment(service: EmberService, request: Request) -> Any:
    name = request.path_params["name"]
    d = service.deployment(name)
    version = request.path_params.get("version")
    if version not in (None, "", str(d.version)):
        raise ModelNotFound(f"{name} version {version}")
    return d


def _timeout_s(parameters: dict[str, Any]) -> float | None:
    """Triton's ``timeout`` request parameter is in microseconds."""
    raw = parameters.get("timeout")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw <= 0:
        raise InvalidInput(f"parameter 'timeout' must be a positive number of microseconds, not {raw!r}")
    return float(raw) / 1e6
