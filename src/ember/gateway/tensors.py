"""Open Inference Protocol v2 (KServe v2 / Triton HTTP) infer codec: JSON tensors and binary tensor data.

A pure codec (numpy, ``orjson`` with the stdlib ``json`` behind it): no web framework, no torch. Byte
formats match ``tritonclient.http``:

* A body is a JSON object, optionally followed by raw tensor bytes. The HTTP header
  ``Inference-Header-Content-Length`` gives the JSON part's length; without it the whole body is JSON.
* A binary tensor has ``parameters.binary_data_size`` instead of ``data``; binary tensors take their
  bytes from after the JSON, in the order they are listed. Fixed-size types are little-endian, row-major;
  BYTES elements are each a little-endian uint32 length followed by that many bytes.
* JSON ``data`` is a flat row-major list or evenly nested lists: BOOL as true/false, BYTES as strings
  (utf-8), numbers range-checked for their datatype.
* Request parameter ``binary_data_output`` asks for every output in binary; an entry in ``outputs`` can
  override it with its own ``parameters.binary_data``.

Binary inputs decode zero-copy (``np.frombuffer``): their arrays are read-only views of the body.
Every malformed body raises :class:`~ember.errors.InvalidInput`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from ember.api import DATATYPES
from ember.errors import InvalidInput

__all__ = [
    "DATATYPES",
    "InferRequest",
    "Limits",
    "RequestedOutput",
    "datatype_of",
    "encode_infer_request",
    "encode_infer_response",
    "json_depth",
    "json_too_deep",
    "parse_infer_request",
    "parse_infer_response",
]

Array = npt.NDArray[Any]

_BY_KIND = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"}
_U32 = struct.Struct("<I")
# The smallest float64 magnitude that rounds to infinity in each narrower float type: its largest
# finite value plus half a unit in the last place.
_OVERFLOW = {
    dt: float(np.finfo(dt).max) + (float(np.finfo(dt).max) - float(np.nextafter(np.finfo(dt).max, dt.type(0)))) / 2
    for dt in (np.dtype("<f2"), np.dtype("<f4"))
}
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype of ``array``: object, bytes and str arrays are ``BYTES``."""
    dt = array.dtype
    if dt.kind in "OSU":
        return "BYTES"
    name = _BY_KIND.get((dt.kind, dt.itemsize))
    if name is None:
        raise InvalidInput(
            f"numpy dtype {dt} has no Open Inference Protocol datatype; use bool, (u)int8-64, "
            "float16/32/64, or an object array of bytes"
        )
    return name


@dataclass(frozen=True)
class Limits:
    """Edge limits on one request: elements per tensor, number of inputs, bytes per BYTES element."""

    max_elements: int = 64 * 1024 * 1024
    max_inputs: int = 64
    max_bytes_element: int = 16 * 1024 * 1024
    max_json_depth: int = 64
    #: Dimensions of one tensor (numpy's own limit is 64; no model takes anywhere near this many).
    max_dims: int = 32


_CLIENT_LIMITS = Limits(max_elements=2**62, max_inputs=2**31, max_bytes_element=2**32, max_json_depth=2**31)

_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))


def json_too_deep(text: bytes, limit: int) -> int | None:
    """The nesting depth of JSON ``text`` if it is over ``limit``, else None.

    Text with no more than ``limit`` opening brackets in all cannot be deeper: that check is two
    ``bytes.count`` calls, so a small request pays next to nothing.
    """
    if text.count(b"[") + text.count(b"{") <= limit:
        return None
    depth = json_depth(text)
    return depth if depth > limit else None


def json_depth(text: bytes) -> int:
    """How deep the arrays and objects of JSON ``text`` nest, counted without parsing it (C speed).

    Drops escaped quotes, keeps only brackets and quotes, then counts brackets outside strings. On
    malformed JSON the count may be off; the parser rejects such text anyway.
    """
    # Escaped backslashes first, then escaped quotes: what is left of '"' opens or closes a string.
    unescaped = text.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in text else text
    marks = unescaped.translate(None, _NOT_STRUCTURE)
    if b"[" not in marks and b"{" not in marks:
        return 0
    outside = b"".join(marks.split(b'"')[::2])
    if not outside:
        return 0
    codes = np.frombuffer(outside, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


@dataclass(frozen=True)
class RequestedOutput:
    """An entry of the request's ``outputs``; ``binary`` None means "use the request's default"."""

    name: str
    binary: bool | None


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer request. BYTES inputs are object arrays of ``bytes``."""

    id: str | None
    inputs: dict[str, Array]
    outputs: tuple[RequestedOutput, ...] | None
    parameters: dict[str, object]
    binary_output: bool


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_names(types: Iterable[type]) -> str:
    return ", ".join(sorted({_JSON_TYPES.get(t, "null" if t is type(None) else t.__name__) for t in types}))


def _load_json(
    body: bytes, header_length: int | None, what: str, max_depth: int = Limits.max_json_depth
) -> tuple[dict[str, Any], int]:
    """Parse the JSON part; returns it and the offset where binary tensor data starts."""
    end = len(body)
    if header_length is not None:
        if isinstance(header_length, bool) or not isinstance(header_length, int) or header_length < 0:
            raise InvalidInput(
                f"Inference-Header-Content-Length must be a non-negative integer, got {_show(header_length)}"
            )
        if header_length > end:
            raise InvalidInput(
                f"Inference-Header-Content-Length is {header_length} but the body has only {end} bytes; "
                "it must be the length of the JSON part at the start of the body"
            )
        end = header_length
    text = body if end == len(body) else body[:end]
    depth = json_too_deep(text, max_depth)
    if depth is not None:
        raise InvalidInput(f"the {what} nests {depth} levels deep; the limit is {max_depth} levels of JSON nesting")
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        # orjson takes strict JSON only. The stdlib also takes what Python clients write (NaN,
        # Infinity, integers wider than 64 bits, UTF-16) and, when it fails too, says where.
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InvalidInput(
                f"the {what} is not valid JSON ({e}); send a JSON object, followed by binary tensor data "
                "only when Inference-Header-Content-Length says where the JSON ends"
            ) from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"the {what} must be a JSON object, got a JSON {_json_names([type(obj)])}")
    return obj, end


def _parameters(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    raw = obj.get("parameters")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where} 'parameters' must be a JSON object, got {_show(raw)}")
    return dict(raw)


def _shape(raw: object, where: str, limits: Limits) -> tuple[tuple[int, ...], int]:
    if not isinstance(raw, list) or not all(type(d) is int and d >= 0 for d in raw):
        raise InvalidInput(f"{where} needs 'shape' as a list of non-negative integers, got {_show(raw)}")
    if len(raw) > limits.max_dims:
        raise InvalidInput(f"{where} has {len(raw)} dimensions, over the limit of {limits.max_dims}; check its shape")
    shape = tuple(raw)
    count = math.prod(shape)
    if count > limits.max_elements or any(d > limits.max_elements for d in shape):
        raise InvalidInput(
            f"{where} has shape {list(shape)} ({count} elements), over the limit of {limits.max_elements} "
            "elements per tensor; split the work into smaller requests"
        )
    return shape, count


def _flatten(data: object, where: str) -> tuple[list[Any], set[type]]:
    """Flatten a flat or evenly nested list (or a lone scalar) into a row-major list, with its types."""
    flat: list[Any] = data if isinstance(data, list) else [data]
    while True:
        types = set(map(type, flat))
        if list not in types:
            return flat, types
        if len(types) != 1:
            raise InvalidInput(
                f"{where} 'data' mixes nested lists and scalars; send a flat row-major list or evenly nested lists"
            )
        flat = list(chain.from_iterable(flat))


def _object_array(items: list[bytes]) -> Array:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _from_json(data: object, datatype: str, count: int, where: str, limits: Limits) -> Array:
    dtype = DATATYPES[datatype]
    flat, types = _flatten(data, where)
    if len(flat) != count:
        raise InvalidInput(f"{where} has {len(flat)} data elements but its shape needs {count}")
    kind = dtype.kind
    if kind == "b":
        if not types <= {bool}:
            raise InvalidInput(f"{where} is BOOL; its data must be true/false, got {_json_names(types)}")
        return np.array(flat, dtype=dtype)
    if kind in "iu":
        if not types <= {int}:
            raise InvalidInput(f"{where} is {datatype}; its data must be integers, got {_json_names(types)}")
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            bad = min(flat) if min(flat) < info.min else max(flat)
            raise InvalidInput(
                f"{where}: value {bad} is out of range for {datatype} [{info.min}, {info.max}]; use a wider datatype"
            )
        return np.array(flat, dtype=dtype)
    if kind == "f":
        if not types <= {int, float}:
            raise InvalidInput(f"{where} is {datatype}; its data must be numbers, got {_json_names(types)}")
        try:
            wide = np.array(flat, dtype=np.float64)
        except OverflowError:
            raise InvalidInput(f"{where}: an integer is too large for {datatype}") from None
        if dtype.itemsize == 8:
            return wide
        # A finite value that would round to infinity in the narrow type is out of range (NaN and
        # infinities pass as they are); checking first keeps the cast free of overflow warnings.
        over = np.abs(wide) >= _OVERFLOW[dtype]
        if over.any() and np.isfinite(wide[over]).any():
            raise InvalidInput(
                f"{where}: a value is out of range for {datatype} (max {float(np.finfo(dtype).max)}); "
                "use a wider datatype"
            )
        return wide.astype(dtype)
    if not types <= {str}:
        raise InvalidInput(f"{where} is BYTES; its data must be strings, got {_json_names(types)}")
    try:
        items = [s.encode() for s in flat]
    except UnicodeEncodeError:
        raise InvalidInput(f"{where} holds a string that is not valid unicode; send it as binary data") from None
    if items and max(map(len, items)) > limits.max_bytes_element:
        raise InvalidInput(f"{where} has an element over {limits.max_bytes_element} bytes; send smaller elements")
    return _object_array(items)


def _from_binary(body: bytes, offset: int, size: int, datatype: str, count: int, where: str, limits: Limits) -> Array:
    dtype = DATATYPES[datatype]
    if datatype != "BYTES":
        if size != count * dtype.itemsize:
            raise InvalidInput(
                f"{where} has binary_data_size {size}, but {count} {datatype} elements take "
                f"{count * dtype.itemsize} bytes; the size must match the shape exactly"
            )
        array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        if datatype == "BOOL" and count and int(array.view(np.uint8).max()) > 1:
            raise InvalidInput(f"{where} is BOOL; each binary element must be the byte 0 or 1")
        return array
    end, pos, items = offset + size, offset, []
    for i in range(count):
        if pos + 4 > end:
            raise InvalidInput(
                f"{where}: its binary_data_size {size} holds only {i} of its {count} BYTES elements; "
                "each element is a 4-byte little-endian length followed by that many bytes"
            )
        (length,) = _U32.unpack_from(body, pos)
        if length > limits.max_bytes_element:
            raise InvalidInput(
                f"{where} has an element of {length} bytes, over the limit of {limits.max_bytes_element}"
            )
        pos += 4
        if pos + length > end:
            raise InvalidInput(
                f"{where}: a BYTES element claims {length} bytes but only {end - pos} remain in its "
                f"binary_data_size {size}"
            )
        items.append(body[pos : pos + length])
        pos += length
    if pos != end:
        raise InvalidInput(
            f"{where} has {end - pos} bytes left over in its binary_data_size {size} after its {count} "
            "BYTES elements; the size must match the elements exactly"
        )
    return _object_array(items)


def _decode_tensors(
    raw: list[Any], role: str, body: bytes, offset: int, header_length: int | None, limits: Limits
) -> dict[str, Array]:
    """Decode a list of tensor objects, taking binary data in order from ``offset`` to the body's end."""
    tensors: dict[str, Array] = {}
    for index, spec in enumerate(raw):
        if not isinstance(spec, dict):
            raise InvalidInput(f"{role}s[{index}] must be a JSON object, got {_show(spec)}")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{role}s[{index}] needs a non-empty string 'name', got {_show(name)}")
        where = f"{role} '{name}'"
        if name in tensors:
            raise InvalidInput(f"{where} appears more than once; {role} names must be unique")
        datatype = spec.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise InvalidInput(f"{where} has unsupported datatype {_show(datatype)}; use one of {', '.join(DATATYPES)}")
        shape, count = _shape(spec.get("shape"), where, limits)
        params = _parameters(spec, where)
        if "shared_memory_region" in params:
            raise InvalidInput(f"{where} uses shared memory, which Ember does not support; send the data inline")
        size = params.get("binary_data_size")
        if size is None:
            if "data" not in spec:
                raise InvalidInput(f"{where} has neither 'data' nor parameters.binary_data_size; give one of them")
            array = _from_json(spec["data"], datatype, count, where, limits)
        else:
            if "data" in spec:
                raise InvalidInput(f"{where} has both 'data' and parameters.binary_data_size; give only one")
            if type(size) is not int or size < 0:
                raise InvalidInput(f"{where} binary_data_size must be a non-negative integer, got {_show(size)}")
            if size > len(body) - offset:
                hint = (
                    "no Inference-Header-Content-Length was given, so the body has no binary part"
                    if header_length is None
                    else f"only {len(body) - offset} binary bytes remain after the JSON header"
                )
                raise InvalidInput(
                    f"{where} has binary_data_size {size} but {hint}; the binary_data_size values must add "
                    "up to the bytes after the JSON"
                )
            array = _from_binary(body, offset, size, datatype, count, where, limits)
            offset += size
        tensors[name] = array.reshape(shape)
    if offset != len(body):
        raise InvalidInput(
            f"the body has {len(body) - offset} bytes after the JSON header that no tensor's "
            "binary_data_size accounts for; Inference-Header-Content-Length or the sizes are wrong"
        )
    return tensors


def parse_infer_request(body: bytes, header_length: int | None, limits: Limits = Limits()) -> InferRequest:
    """Parse and validate an infer request body (``header_length``: Inference-Header-Content-Length)."""
    obj, end = _load_json(body, header_length, "request", limits.max_json_depth)
    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"request 'id' must be a string, got {_show(request_id)}")
    parameters = _parameters(obj, "request")
    binary_output = parameters.pop("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidInput(f"parameter binary_data_output must be true or false, got {_show(binary_output)}")
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("the request needs 'inputs', a non-empty list of tensors")
    if len(raw_inputs) > limits.max_inputs:
        raise InvalidInput(f"the request has {len(raw_inputs)} inputs, over the limit of {limits.max_inputs}")
    inputs = _decode_tensors(raw_inputs, "input", body, end, header_length, limits)
    return InferRequest(request_id, inputs, _requested_outputs(obj.get("outputs")), parameters, binary_output)


def _requested_outputs(raw: object) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInput(f"request 'outputs' must be a list of {{'name': ...}} objects, got {_show(raw)}")
    result: dict[str, RequestedOutput] = {}
    for index, spec in enumerate(raw):
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"outputs[{index}] must be an object with a non-empty string 'name'")
        if name in result:
            raise InvalidInput(f"output '{name}' is requested more than once")
        params = _parameters(spec, f"output '{name}'")
        if params.get("classification"):
            raise InvalidInput(
                f"output '{name}' asks for classification, which Ember does not support; "
                "request the raw output and take the top classes on the client"
            )
        if "shared_memory_region" in params:
            raise InvalidInput(f"output '{name}' asks for shared memory, which Ember does not support")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(f"output '{name}' binary_data must be true or false, got {_show(binary)}")
        result[name] = RequestedOutput(name, binary)
    return tuple(result.values()) or None


def _byte_items(array: Array, where: str) -> list[bytes]:
    items: list[bytes] = []
    for item in array.ravel().tolist():
        if isinstance(item, bytes | bytearray | memoryview):
            items.append(bytes(item))
        elif isinstance(item, str):
            try:
                items.append(item.encode())
            except UnicodeEncodeError:
                raise InvalidInput(f"{where} holds a string that is not valid unicode") from None
        else:
            raise InvalidInput(f"{where} is BYTES but holds a {type(item).__name__}; use bytes or str elements")
    return items


def _encode_tensors(tensors: Iterable[tuple[str, Array, bool]], role: str) -> tuple[list[dict[str, Any]], list[bytes]]:
    """JSON entries and binary blobs (in order); BYTES that are not utf-8 go binary even if JSON was asked."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, raw, binary in tensors:
        array = np.asarray(raw)
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        entries.append(entry)
        if datatype != "BYTES":
            if not binary:
                entry["data"] = array.ravel().tolist()
                continue
            blob = array.astype(DATATYPES[datatype], copy=False).tobytes()
        else:
            items = _byte_items(array, f"{role} '{name}'")
            if not binary:
                try:
                    entry["data"] = [item.decode() for item in items]
                    continue
                except UnicodeDecodeError:
                    pass
            blob = b"".join(chain.from_iterable((_U32.pack(len(item)), item) for item in items))
        entry["parameters"] = {"binary_data_size": len(blob)}
        blobs.append(blob)
    return entries, blobs


def _assemble(head: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int | None]:
    try:
        header = orjson.dumps(head)
    except TypeError:
        header = b"null"
    if b"null" in header:
        # orjson writes NaN and infinities as null and refuses integers wider than 64 bits; the stdlib
        # writes them as Python's clients read them (and a message with a real null comes out the same).
        try:
            header = json.dumps(head, separators=(",", ":")).encode()
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"cannot write the message as JSON ({e}); parameters must be JSON values") from None
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray],
    request: InferRequest,
) -> tuple[bytes, int | None]:
    """Encode a response: ``(body, json_header_length)``; the length is None when nothing is binary."""
    if request.outputs is None:
        chosen = [(name, array, request.binary_output) for name, array in outputs.items()]
    else:
        missing = [r.name for r in request.outputs if r.name not in outputs]
        if missing:
            raise InvalidInput(
                f"the request asks for output(s) {', '.join(missing)}, but model '{model_name}' produces "
                f"only: {', '.join(outputs) or 'nothing'}"
            )
        chosen = [
            (r.name, outputs[r.name], request.binary_output if r.binary is None else r.binary) for r in request.outputs
        ]
    entries, blobs = _encode_tensors(chosen, "output")
    head: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        head["id"] = request_id
    head["outputs"] = entries
    return _assemble(head, blobs)


def encode_infer_request(
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    binary: bool = True,
    request_id: str | None = None,
    parameters: Mapping[str, object] | None = None,
) -> tuple[bytes, int | None]:
    """Encode a request (client side); ``binary`` sends inputs as binary data and asks for binary outputs."""
    if not inputs:
        raise InvalidInput("a request needs at least one input")
    params = dict(parameters or {})
    if "binary_data_output" in params:
        raise InvalidInput("do not pass binary_data_output as a parameter; use binary=True/False")
    head: dict[str, Any] = {} if request_id is None else {"id": request_id}
    head["inputs"], blobs = _encode_tensors(((n, a, binary) for n, a in inputs.items()), "input")
    if outputs:
        head["outputs"] = [{"name": name, "parameters": {"binary_data": binary}} for name in outputs]
    elif binary:
        params["binary_data_output"] = True
    if params:
        head["parameters"] = params
    return _assemble(head, blobs)


def parse_infer_response(body: bytes, header_length: int | None) -> dict[str, Array]:
    """Decode a response body (client side) into arrays of their declared shape; BYTES as ``bytes``."""
    obj, end = _load_json(body, header_length, "response", _CLIENT_LIMITS.max_json_depth)
    raw = obj.get("outputs")
    if raw is None and "error" in obj:
        raise InvalidInput(f"the server answered with an error: {obj['error']}")
    if not isinstance(raw, list):
        raise InvalidInput("the response needs 'outputs', a list of tensors")
    return _decode_tensors(raw, "output", body, end, header_length, _CLIENT_LIMITS)
