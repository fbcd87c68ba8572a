"""``GET /openapi.json``: Ember's HTTP API as an OpenAPI 3.0 document, written by hand.

The gateway is raw Starlette on its hot paths, so nothing derives a schema from the code; this one is
kept beside the routes and checked against them (``tests/unit/test_openapi.py`` fuzzes every
operation with schemathesis and requires each route to be described). It describes what a client
may send; answers are ``application/json`` unless said otherwise, errors ``{"error": "..."}`` (on
``/v1/`` routes, OpenAI's ``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ember import __version__
from ember.auth.keys import Role
from ember.config import NAME_PATTERN, QUALIFIED_PATTERN
from ember.gateway.tensors import DATATYPES

__all__ = ["SCHEMA", "routes"]

_NAME = {"type": "string", "pattern": f"^(?:{NAME_PATTERN.pattern}|{QUALIFIED_PATTERN.pattern})$"}
_ERROR = {
    "description": "an error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    *,
    body: dict[str, Any] | None = None,
    params: Sequence[str] = (),
    query: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": p, "in": "path", "required": True, "schema": _NAME if p == "name" else {"type": "string"}}
        for p in params
    ]
    parameters += list(query)
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK"}, "default": _ERROR},
    }
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    return op


_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": list(DATATYPES)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {},
        "parameters": {"type": "object"},
    },
}
_INFER = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": _TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
    },
}
_EMBEDDINGS = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string"},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        "dimensions": {"type": "integer"},
    },
}
_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]}
_SAMPLING = {
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
    "seed": {"type": "integer"},
    "stop": _STOP,
    "stream": {"type": "boolean"},
}
_OPENAI_SAMPLING = {
    "model": {"type": "string"},
    **_SAMPLING,
    "n": {"type": "integer", "minimum": 1, "maximum": 8},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
        "additionalProperties": False,
    },
    "user": {"type": "string"},
    "ignore_eos": {"type": "boolean"},
}
_CHAT = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        **_OPENAI_SAMPLING,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"type": "string", "enum": ["system", "user", "assistant", "developer", "tool"]},
                    "content": {
                        "oneOf": [
                            {"type": "string"},
                            {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["type", "text"],
                                    "properties": {
                                        "type": {"type": "string", "enum": ["text"]},
                                        "text": {"type": "string"},
                                    },
                                },
                            },
                        ]
                    },
                    "tool_call_id": {"type": "string"},
                },
            },
        },
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    },
}
_COMPLETION = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **_OPENAI_SAMPLING,
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 8}]},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
    },
}
_GENERATE = {
    "type": "object",
    "required": ["text_input"],
    "properties": {
        "text_input": {"type": "string"},
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {
                **_SAMPLING,
                "stop_words": _STOP,
                "ignore_eos": {"type": "boolean"},
                "exclude_input_in_output": {"type": "boolean"},
            },
        },
    },
}
_UPDATE = {
    "type": "object",
    "properties": {
        "slo_ms": {"type": "number"},
        "keepalive_hot_s": {"type": "number"},
        "keepalive_warm_s": {"type": "number"},
        "on_unmeetable": {"type": "string", "enum": ["refuse", "best_effort"]},
    },
    "additionalProperties": False,
}

_DEPLOY = {
    "type": "object",
    "required": ["source"],
    "properties": {
        "source": {"type": "string"},
        "name": _NAME,
        "kind": {"type": "string", "enum": ["class", "hf", "exported", "torchscript"]},
        "tenant": {"type": "string"},
        "slo_ms": {"type": "number"},
        "max_batch_size": {"type": "integer"},
        "max_batch_wait_ms": {"type": "number"},
        "keepalive_hot_s": {"type": "number"},
        "keepalive_warm_s": {"type": "number"},
        "max_queue": {"type": "integer"},
        "device": {"type": "string"},
        "options": {"type": "object"},
    },
}
_KEY = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": [r.value for r in Role]},
        "tenant": {"type": "string"},
        "label": {"type": "string"},
    },
}
_QUOTA = {
    "type": "object",
    "properties": {
        "rate_per_s": {"type": "number", "nullable": True},
        "burst": {"type": "integer", "nullable": True},
        "max_models": {"type": "integer", "nullable": True},
        "max_bytes": {"type": "integer", "nullable": True},
        "max_instances": {"type": "integer", "nullable": True},
    },
}
_EMPTY = {"type": "object"}
_TIER = {"type": "string", "enum": ["cool", "warm"]}
_UNLOAD = {
    "type": "object",
    "properties": {
        "parameters": {
            "type": "object",
            "properties": {"tier": _TIER, "unload_dependents": {"type": "boolean"}},
        }
    },
}


def _model_paths(prefix: str) -> dict[str, Any]:
    params = ["name", "version"] if "{version}" in prefix else ["name"]
    return {
        prefix: {"get": _op("model metadata (inputs, outputs)", params=params)},
        f"{prefix}/ready": {"get": _op("model readiness", params=params)},
        f"{prefix}/config": {"get": _op("Triton-shaped model config", params=params)},
        f"{prefix}/infer": {"post": _op("run one request (JSON or binary tensors)", body=_INFER, params=params)},
        f"{prefix}/generate": {
            "post": _op("Triton's generate extension: text_input -> text_output", body=_GENERATE, params=params)
        },
        f"{prefix}/generate_stream": {
            "post": _op("the same, streamed as server-sent events (text/event-stream)", body=_GENERATE, params=params)
        },
    }


SCHEMA: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Ember",
        "version": __version__,
        "description": "Serverless inference: Open Inference Protocol v2, OpenAI-compatible and admin routes. "
        "Send an API key as 'Authorization: Bearer <key>'.",
    },
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {}}, "required": ["error"]},
        },
    },
    "paths": {
        "/v2": {"get": _op("server metadata")},
        "/v2/health/live": {"get": {**_op("liveness"), "security": []}},
        "/v2/health/ready": {"get": {**_op("readiness"), "security": []}},
        **_model_paths("/v2/models/{name}"),
        **_model_paths("/v2/models/{name}/versions/{version}"),
        "/v2/repository/index": {"post": _op("every model of the caller's tenant", body=_EMPTY)},
        "/v2/repository/models/{name}/load": {"post": _op("make hot now", body=_EMPTY, params=["name"])},
        "/v2/repository/models/{name}/unload": {
            "post": _op("demote to cool, or to parameters.tier (warm, cool)", body=_UNLOAD, params=["name"])
        },
        "/v1/embeddings": {"post": _op("OpenAI embeddings", body=_EMBEDDINGS)},
        "/v1/chat/completions": {
            "post": _op("OpenAI chat completions of a generative model (stream: server-sent events)", body=_CHAT)
        },
        "/v1/completions": {
            "post": _op("OpenAI completions of a generative model (stream: server-sent events)", body=_COMPLETION)
        },
        "/v1/models": {"get": _op("OpenAI model list")},
        "/v1/models/{name}": {"get": _op("one OpenAI model", params=["name"])},
        "/admin/models": {
            "get": _op("the caller's models"),
            "post": _op(
                "deploy (streams NDJSON progress). This JSON body names a source on the server (admin keys "
                "only); `ember deploy` uploads the model instead, as application/x-tar with this JSON in the "
                "Ember-Deploy header",
                body=_DEPLOY,
                query=[{"name": "load", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]}}],
            ),
        },
        "/admin/models/{name}": {
            "get": _op("one model", params=["name"]),
            "patch": _op("change the SLO, keep-alives or on-unmeetable mode in place", body=_UPDATE, params=["name"]),
            "delete": _op("remove", params=["name"]),
        },
        "/admin/models/{name}/load": {"post": _op("make hot now", params=["name"])},
        "/admin/models/{name}/unload": {
            "post": _op(
                "demote to cool, or to ?tier= (warm, cool)",
                params=["name"],
                query=[{"name": "tier", "in": "query", "schema": _TIER}],
            )
        },
        "/admin/status": {"get": _op("workers and store (admin)")},
        "/admin/usage": {
            "get": _op(
                "metered usage per model and tenant, beside always-on (any key; a tenant's sees its own)",
                query=[
                    {"name": "since", "in": "query", "schema": {"type": "number"}},
                    {"name": "tenant", "in": "query", "schema": {"type": "string"}},
                ],
            )
        },
        "/admin/dashboard": {
            "get": _op(
                "what the dashboard draws: per-model series, tiers, cold starts, errors, usage, cluster (admin)",
                query=[{"name": "cost_s", "in": "query", "schema": {"type": "number"}}],
            )
        },
        "/admin/keys": {
            "get": _op(
                "API keys, never their secrets (admin)",
                query=[{"name": "revoked", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]}}],
            ),
            "post": _op("make a key; the answer holds it, once (admin)", body=_KEY),
        },
        "/admin/keys/{key_id}": {"delete": _op("revoke a key (admin)", params=["key_id"])},
        "/admin/tenants": {"get": _op("tenants' quotas (admin)")},
        "/admin/tenants/{tenant}": {"put": _op("set a tenant's quotas (admin)", body=_QUOTA, params=["tenant"])},
        "/metrics": {"get": _op("Prometheus metrics (admin key, or the metrics key of HOME/metrics.key)")},
        "/openapi.json": {"get": {**_op("this document"), "security": []}},
        "/": {"get": {**_op("the live dashboard (HTML; its data calls need a key)"), "security": []}},
        "/static/{name}": {
            "get": {**_op("the dashboard's script, styles and charting library", params=["name"]), "security": []}
        },
    },
}


def routes() -> list[Route]:
    async def schema(request: Request) -> Response:
        return JSONResponse(SCHEMA)

    return [Route("/openapi.json", schema, methods=["GET"])]
