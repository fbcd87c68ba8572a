"""What every route shares at the edge: reading bodies within limits, checking inputs against the
model's declared tensors, and turning Ember's errors into HTTP answers."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from ember.config import Deployment
from ember.errors import EmberError, InvalidInput, Refused, TooLarge
from ember.gateway.tensors import DATATYPES, json_too_deep

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "ClientGone",
    "check_inputs",
    "decode_body",
    "error_response",
    "openai_error",
    "read_body",
    "read_json",
    "receive_body",
]

MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_JSON_DEPTH = 64


#: A body must arrive whole within this many seconds of its request head: a client that withholds or
#: trickles it holds a connection and the bytes so far, and is cut off with 408.
BODY_TIMEOUT_S = 30.0


class PayloadTooLarge(TooLarge):
    http_status = 413


class BodyTimeout(InvalidInput):
    http_status = 408


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_response(error: EmberError, openai: bool = False) -> Response:
    """``{"error": message}``; on the OpenAI routes, the OpenAI client's error object instead.

    The ``Ember-Error`` header names the error's class, so that clients and dashboards can count
    refusals and failures by reason without parsing messages; a refusal carries ``Retry-After``.
    """
    headers = {"Ember-Error": type(error).__name__}
    if isinstance(error, Refused):
        headers["Retry-After"] = error.retry_after_header
    body: dict[str, object] = dict(error.to_json())
    if openai:
        body = openai_error(error)
    return JSONResponse(body, status_code=error.http_status, headers=headers)


def openai_error(error: EmberError) -> dict[str, object]:
    """The error object the OpenAI clients read: ``{"error": {"message", "type", "param", "code"}}``."""
    return {
        "error": {
            "message": error.message,
            "type": _OPENAI_TYPES.get(error.http_status, "server_error"),
            "param": getattr(error, "param", None),  # BadParameter names the field
            "code": type(error).__name__,
        }
    }


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    headers = request.headers
    try:
        return await receive_body(
            request.receive, headers.get("content-length"), headers.get("content-encoding", ""), limit
        )
    except ClientGone:
        raise ClientDisconnect from None


async def receive_body(receive: Receive, declared: str | None, encoding: str, limit: int = MAX_BODY_BYTES) -> bytes:
    """:func:`read_body` for a raw ASGI handler; raises :class:`ClientGone` if the client hangs up."""
    check_declared_length(declared, limit)
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):  # clock-ok: a bound on a real socket
            body = await _whole_body(receive, limit)
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive within {BODY_TIMEOUT_S:g} s; send it faster, or smaller"
        ) from None
    if len(body) > limit:
        raise _over_limit(limit)
    return decode_body(body, encoding, limit)


async def _whole_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _over_limit(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunk if len(chunks) == 1 else b"".join(chunks)


class ClientGone(Exception):
    """The client closed the connection before its request arrived whole: there is nobody to answer."""


def check_declared_length(declared: str | None, limit: int) -> None:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} bytes: send smaller requests")


def _over_limit(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the body is over the limit of {limit} bytes: send smaller requests")


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent, or inflated from gzip or deflate within ``limit``."""
    encoding = encoding.strip().lower()
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
        if deployment.metadata.task == "embeddings" and spec.datatype == "BYTES":
            _check_texts(deployment.name, name, array)
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


def _check_texts(model: str, name: str, array: np.ndarray) -> None:
    """An embedding model's BYTES input holds texts: every element must be UTF-8."""
    for i, item in enumerate(array.reshape(-1).tolist()):
        if isinstance(item, bytes | bytearray):
            try:
                item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(
                    f"input '{name}' element {i} is not UTF-8 text ({exc.reason} at byte {exc.start}); model "
                    f"'{model}' embeds texts: send them UTF-8 encoded"
                ) from None


def _datatype_name(array: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype:
            return name
    return str(array.dtype)
