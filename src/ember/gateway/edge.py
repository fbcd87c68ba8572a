"""What every route shares at the edge: reading bodies within limits, checking inputs against the
model's declared tensors, and turning Ember's errors into HTTP answers."""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ember.config import Deployment
from ember.errors import EmberError, InvalidInput, Refused, TooLarge
from ember.gateway.tensors import DATATYPES, json_too_deep

__all__ = ["MAX_BODY_BYTES", "MAX_JSON_DEPTH", "check_inputs", "error_response", "read_body", "read_json"]

MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_JSON_DEPTH = 64


class PayloadTooLarge(TooLarge):
    http_status = 413


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_response(error: EmberError, openai: bool = False) -> Response:
    """``{"error": message}``; on the OpenAI routes, the OpenAI client's error object instead."""
    headers = {"Retry-After": error.retry_after_header} if isinstance(error, Refused) else None
    body: dict[str, object] = dict(error.to_json())
    if openai:
        body = {
            "error": {
                "message": error.message,
                "type": _OPENAI_TYPES.get(error.http_status, "server_error"),
                "param": None,
                "code": type(error).__name__,
            }
        }
    return JSONResponse(body, status_code=error.http_status, headers=headers)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} bytes: send smaller requests")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes: send smaller requests")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported: use gzip, deflate or none")
    return _inflate(body, encoding, limit)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the {encoding} body could not be decompressed: {exc}") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"the decompressed body is over the limit of {limit} bytes")
    return out


async def read_json(request: Request, limit: int = 16 * 1024 * 1024) -> Any:
    body = await read_body(request, limit)
    depth = json_too_deep(body, MAX_JSON_DEPTH)
    if depth is not None:
        raise InvalidInput(f"the body nests {depth} levels deep; the limit is {MAX_JSON_DEPTH} levels of JSON nesting")
    try:
        return json.loads(body) if body else None
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from exc


def check_inputs(deployment: Deployment, inputs: Mapping[str, np.ndarray]) -> int:
    """Check inputs against the model's declared tensors; returns the number of rows."""
    declared = {t.name: t for t in deployment.metadata.inputs}
    missing = sorted(set(declared) - set(inputs))
    unknown = sorted(set(inputs) - set(declared))
    if missing or unknown:
        expected = ", ".join(f"{t.name} ({t.datatype} {list(t.shape)})" for t in declared.values())
        raise InvalidInput(
            f"model '{deployment.name}' takes inputs {expected}; "
            + (f"missing: {', '.join(missing)}. " if missing else "")
            + (f"unknown: {', '.join(unknown)}." if unknown else "")
        )
    rows: int | None = None
    for name, array in inputs.items():
        spec = declared[name]
        if array.dtype != DATATYPES[spec.datatype] and not (spec.datatype == "BYTES" and array.dtype == object):
            raise InvalidInput(f"input '{name}' must be {spec.datatype}, not {_datatype_name(array)}")
        if array.ndim != len(spec.shape) or any(
            want != -1 and have != want for have, want in zip(array.shape[1:], spec.shape[1:], strict=False)
        ):
            raise InvalidInput(f"input '{name}' has shape {list(array.shape)}; the model takes {list(spec.shape)}")
        n = int(array.shape[0])
        if rows is None:
            rows = n
        elif n != rows:
            raise InvalidInput(f"inputs disagree on the batch size (first dimension): {rows} and {n}")
    if not rows:
        raise InvalidInput("the request has no rows: the first dimension of every input must be at least 1")
    if rows > deployment.max_batch_size:
        raise InvalidInput(
            f"the request has {rows} rows; model '{deployment.name}' takes at most {deployment.max_batch_size} "
            "per request: split it"
        )
    return rows


def _datatype_name(array: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype:
            return name
    return str(array.dtype)
