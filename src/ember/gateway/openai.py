"""The OpenAI-compatible routes: ``POST /v1/embeddings``, ``GET /v1/models``, and (from
:mod:`ember.gateway.chat`) ``POST /v1/chat/completions`` and ``POST /v1/completions``.

A model fits ``/v1/embeddings`` when it declares ``task = "embeddings"``: one BYTES input of texts
and one FP32 output of shape (-1, dim). Both ``encoding_format`` values work (``float``, and
``base64``, which the official client asks for by default). ``usage`` counts whitespace-separated
words, not the model's tokens: the gateway never runs the tokenizer.
"""

from __future__ import annotations

import base64
from typing import Any, cast

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ember.errors import InvalidInput
from ember.gateway import auth, chat
from ember.gateway.completions import BadParameter
from ember.gateway.edge import read_json
from ember.gateway.streams import Generates
from ember.service import EmberService

__all__ = ["routes"]

MAX_TEXTS = 2048
MAX_TEXT_CHARS = 1_000_000


def routes(service: EmberService) -> list[Route]:
    async def embeddings(request: Request) -> Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise InvalidInput('the body must be a JSON object like {"model": "...", "input": ["text", ...]}')
        name = body.get("model")
        if not isinstance(name, str):
            raise InvalidInput("'model' must be the name of a deployed embedding model (GET /v1/models lists them)")
        name = auth.qualified(request, name)
        d = service.deployment(name)
        auth.check_model(request, name, d.tenant)
        if d.generative:
            raise BadParameter(
                f"model '{name}' is a generative model, not an embedding model; "
                "call it on /v1/chat/completions or /v1/completions",
                "model",
            )
        if d.metadata.task != "embeddings":
            raise InvalidInput(f"model '{name}' is not an embedding model; use /v2/models/{name}/infer")
        texts = _texts(body.get("input"))
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise InvalidInput(f"encoding_format must be 'float' or 'base64', not {fmt!r}")
        dimensions = body.get("dimensions")
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)):
            raise InvalidInput("'dimensions' must be an integer")
        (text_input,) = d.metadata.inputs
        (vector_output,) = d.metadata.outputs
        if len(texts) > d.max_batch_size:
            raise InvalidInput(
                f"{len(texts)} inputs in one request; model '{name}' takes at most {d.max_batch_size}: split it"
            )
        array = np.empty(len(texts), dtype=object)
        array[:] = [t.encode("utf-8") for t in texts]
        outputs = await service.infer(name, {text_input.name: array})
        vectors = np.asarray(outputs[vector_output.name], dtype=np.float32)
        if dimensions is not None:
            if not 0 < dimensions <= vectors.shape[1]:
                raise InvalidInput(f"'dimensions' must be between 1 and {vectors.shape[1]} for model '{name}'")
            vectors = vectors[:, :dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        words = sum(len(t.split()) for t in texts)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": _encode(v, fmt)} for i, v in enumerate(vectors)
                ],
                "model": name,
                "usage": {"prompt_tokens": words, "total_tokens": words},
            }
        )

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": m.name, "object": "model", "created": int(m.created_at), "owned_by": "ember"}
                    for m in service.models()
                    if auth.visible(request, m.tenant)
                ],
            }
        )

    async def model(request: Request) -> Response:
        m = service.info(request.path_params["name"])
        return JSONResponse({"id": m.name, "object": "model", "created": int(m.created_at), "owned_by": "ember"})

    return [
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        *chat.routes(cast(Generates, service), service.clock),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name}", model, methods=["GET"]),
    ]


def _texts(raw: Any) -> list[str]:
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidInput("'input' must be a string or a non-empty list of strings (token arrays are not supported)")
    if len(texts) > MAX_TEXTS:
        raise InvalidInput(f"'input' has {len(texts)} strings; the limit is {MAX_TEXTS}")
    for t in texts:
        if len(t) > MAX_TEXT_CHARS:
            raise InvalidInput(f"an input string has {len(t)} characters; the limit is {MAX_TEXT_CHARS}")
    return texts


def _encode(vector: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
