"""The v2 infer codec: round-trips for every datatype, interop with tritonclient, malformed bodies."""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.http._utils import _get_inference_request

from ember.errors import InvalidInput
from ember.gateway.tensors import (
    DATATYPES,
    InferRequest,
    Limits,
    RequestedOutput,
    datatype_of,
    encode_infer_request,
    encode_infer_response,
    parse_infer_request,
    parse_infer_response,
)

Array = np.ndarray[Any, Any]
NUMERIC = [name for name in DATATYPES if name != "BYTES"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)


@st.composite
def tensors(draw: st.DrawFn, datatype: str | None = None, utf8: bool = False) -> Array:
    """An array of ``datatype`` (drawn when None); BYTES as object arrays of bytes."""
    datatype = datatype or draw(st.sampled_from(list(DATATYPES)))
    shape = draw(shapes)
    if datatype != "BYTES":
        return draw(hnp.arrays(DATATYPES[datatype], shape))
    elems = st.text(max_size=8).map(str.encode) if utf8 else st.binary(max_size=8)
    flat = draw(st.lists(elems, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return array.reshape(shape)


def as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def assert_same(got: Array, want: Array) -> None:
    """Same datatype, shape and values; NaN equals NaN, str and bytes compare as utf-8."""
    assert got.shape == want.shape
    assert datatype_of(got) == datatype_of(want)
    if want.dtype == object:
        assert [as_bytes(v) for v in got.ravel()] == [as_bytes(v) for v in want.ravel()]
    else:
        assert got.dtype == DATATYPES[datatype_of(want)]
        assert np.array_equal(got, want, equal_nan=want.dtype.kind == "f")


def make_request(inputs: dict[str, Array], binary_output: bool = False, outputs: Any = None) -> InferRequest:
    return InferRequest(id=None, inputs=inputs, outputs=outputs, parameters={}, binary_output=binary_output)


# --- datatypes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DATATYPES))
def test_datatype_of_inverts_datatypes(name: str) -> None:
    assert datatype_of(np.zeros(2, dtype=DATATYPES[name])) == name


def test_datatype_of_maps_strings_and_rejects_the_rest() -> None:
    assert datatype_of(np.array([b"a"])) == "BYTES"
    assert datatype_of(np.array(["a"])) == "BYTES"
    assert datatype_of(np.zeros(2, dtype=">i4")) == "INT32"
    for dtype in (np.complex64, "datetime64[s]", "V4"):
        with pytest.raises(InvalidInput, match="no Open Inference Protocol datatype"):
            datatype_of(np.zeros(2, dtype=dtype))


# --- Ember <-> Ember round-trips ---------------------------------------------------------------------------


@SETTINGS
@given(st.lists(tensors(), min_size=1, max_size=4), st.booleans())
def test_request_round_trip(arrays: list[Array], binary: bool) -> None:
    inputs = {f"in{i}": a for i, a in enumerate(arrays)}
    body, header_length = encode_infer_request(inputs, binary=binary, request_id="r1", parameters={"k": 1})
    request = parse_infer_request(body, header_length)
    assert request.id == "r1"
    assert request.parameters == {"k": 1}
    assert request.binary_output is binary
    assert list(request.inputs) == list(inputs)
    for name, array in inputs.items():
        assert_same(request.inputs[name], array)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("name", list(DATATYPES))
def test_every_datatype_round_trips(name: str, binary: bool) -> None:
    if name == "BYTES":
        array = np.array([[b"", "hé".encode()], [b"x" * 9, b"\xff\x00"]], dtype=object)
    elif name == "BOOL":
        array = np.array([[True, False], [False, True]])
    else:
        info = np.finfo(DATATYPES[name]) if name.startswith("FP") else np.iinfo(DATATYPES[name])
        array = np.array([[info.min, info.max], [0, 1]], dtype=DATATYPES[name])
    for shaped in (array, array[:0], np.zeros((3, 0, 2), array.dtype), array[1, 1, ...]):
        body, header_length = encode_infer_request({"x": shaped}, binary=binary)
        assert_same(parse_infer_request(body, header_length).inputs["x"], shaped)
        response, response_length = encode_infer_response("m", "1", None, {"y": shaped}, make_request({}, binary))
        assert_same(parse_infer_response(response, response_length)["y"], shaped)


@SETTINGS
@given(st.lists(tensors(), min_size=1, max_size=4), st.booleans(), st.data())
def test_response_round_trip(arrays: list[Array], binary_output: bool, data: st.DataObject) -> None:
    outputs = {f"out{i}": a for i, a in enumerate(arrays)}
    per_output = data.draw(st.lists(st.sampled_from([None, True, False]), min_size=len(arrays), max_size=len(arrays)))
    requested = tuple(RequestedOutput(name, b) for name, b in zip(outputs, per_output, strict=True))
    request = make_request({}, binary_output, requested)
    body, header_length = encode_infer_response("m", "1", "abc", outputs, request)
    head = json.loads(body[:header_length])
    assert (head["model_name"], head["model_version"], head["id"]) == ("m", "1", "abc")
    for entry, wanted in zip(head["outputs"], per_output, strict=True):
        array = outputs[entry["name"]]
        is_binary = "binary_data_size" in entry.get("parameters", {})
        not_utf8 = array.dtype == object and not all(_is_utf8(v) for v in array.ravel())
        assert is_binary == (binary_output if wanted is None else wanted) or (not_utf8 and is_binary)
    decoded = parse_infer_response(body, header_length)
    assert list(decoded) == list(outputs)
    for name, array in outputs.items():
        assert_same(decoded[name], array)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_response_is_pure_json_when_nothing_is_binary() -> None:
    body, header_length = encode_infer_response("m", "2", None, {"y": np.arange(3.0)}, make_request({}))
    assert header_length is None
    assert json.loads(body) == {
        "model_name": "m",
        "model_version": "2",
        "outputs": [{"name": "y", "datatype": "FP64", "shape": [3], "data": [0.0, 1.0, 2.0]}],
    }


def test_response_keeps_only_requested_outputs_in_request_order() -> None:
    outputs = {"a": np.arange(2), "b": np.ones(2, np.float32), "c": np.zeros(1, bool)}
    request = make_request({}, True, (RequestedOutput("c", False), RequestedOutput("a", None)))
    body, header_length = encode_infer_response("m", "1", None, outputs, request)
    assert header_length is not None
    head = json.loads(body[:header_length])
    assert [o["name"] for o in head["outputs"]] == ["c", "a"]
    assert head["outputs"][0]["data"] == [False]
    assert head["outputs"][1]["parameters"] == {"binary_data_size": 16}
    assert body[header_length:] == np.arange(2, dtype="<i8").tobytes()


def test_response_rejects_requested_output_the_model_lacks() -> None:
    request = make_request({}, False, (RequestedOutput("nope", None),))
    with pytest.raises(InvalidInput, match=r"nope.*produces only: y"):
        encode_infer_response("m", "1", None, {"y": np.zeros(1)}, request)


def test_non_utf8_bytes_output_is_forced_binary() -> None:
    outputs = {"t": np.array([b"ok"], dtype=object), "raw": np.array([b"\xff\xfe"], dtype=object)}
    body, header_length = encode_infer_response("m", "1", None, outputs, make_request({}))
    assert header_length is not None
    head = json.loads(body[:header_length])
    assert head["outputs"][0]["data"] == ["ok"]
    assert head["outputs"][1]["parameters"] == {"binary_data_size": 6}
    assert body[header_length:] == b"\x02\x00\x00\x00\xff\xfe"


def test_big_endian_and_strided_outputs_are_written_little_endian_row_major() -> None:
    array = np.arange(12, dtype=">i4").reshape(3, 4).T
    body, header_length = encode_infer_response("m", "1", None, {"y": array}, make_request({}, True))
    assert header_length is not None
    assert body[header_length:] == np.ascontiguousarray(array, dtype="<i4").tobytes()
    assert_same(parse_infer_response(body, header_length)["y"], array)


def test_str_and_fixed_width_bytes_arrays_encode_as_bytes() -> None:
    body, header_length = encode_infer_request({"s": np.array(["ab", "é"]), "b": np.array([b"xy", b"z"])})
    inputs = parse_infer_request(body, header_length).inputs
    assert inputs["s"].tolist() == [b"ab", "é".encode()]
    assert inputs["b"].tolist() == [b"xy", b"z"]


# --- JSON request forms ------------------------------------------------------------------------------------


def _json_request(*tensors: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(tensors), **extra}).encode()


def test_nested_data_scalars_and_request_fields() -> None:
    body = _json_request(
        {"name": "x", "datatype": "INT16", "shape": [2, 2], "data": [[1, -2], [3, 4]]},
        {"name": "s", "datatype": "BYTES", "shape": [], "data": "hé"},
        {"name": "f", "datatype": "FP16", "shape": [3], "data": [1, 0.5, 65504]},
        id="7",
        outputs=[{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        parameters={"binary_data_output": True, "priority": 2},
    )
    request = parse_infer_request(body, None)
    assert request.id == "7"
    assert request.binary_output is True
    assert request.parameters == {"priority": 2}
    assert request.outputs == (RequestedOutput("y", True), RequestedOutput("z", None))
    assert_same(request.inputs["x"], np.array([[1, -2], [3, 4]], dtype=np.int16))
    assert_same(request.inputs["s"], np.array("hé".encode(), dtype=object))
    assert_same(request.inputs["f"], np.array([1, 0.5, 65504], dtype=np.float16))


def test_json_floats_round_to_the_narrow_type_and_only_finite_overflow_is_refused() -> None:
    # 65519 rounds down to FP16's largest value, 65520 rounds up to infinity; NaN and infinities (as
    # Python's json writes them) pass as they are.
    body = b'{"inputs": [{"name": "f", "datatype": "FP16", "shape": [4], "data": [65519, NaN, -Infinity, 1e-9]}]}'
    assert_same(parse_infer_request(body, None).inputs["f"], np.array([65504, np.nan, -np.inf, 0], dtype=np.float16))
    for value in (65520, -1e300):
        with pytest.raises(InvalidInput, match="out of range for FP16"):
            parse_infer_request(_json_request({"name": "f", "datatype": "FP16", "shape": [1], "data": [value]}), None)


def test_a_response_with_non_finite_floats_stays_readable() -> None:
    outputs = {"y": np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32)}
    body, header_length = encode_infer_response("m", "1", None, outputs, make_request({}))
    assert header_length is None
    assert_same(parse_infer_response(body, None)["y"], outputs["y"])


def test_binary_inputs_decode_from_after_the_header() -> None:
    header = json.dumps(
        {
            "inputs": [
                {"name": "a", "datatype": "UINT16", "shape": [2], "parameters": {"binary_data_size": 4}},
                {"name": "j", "datatype": "BOOL", "shape": [1], "data": [True]},
                {"name": "b", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 11}},
            ]
        }
    ).encode()
    blob = struct.pack("<HH", 1, 65535) + struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0)
    request = parse_infer_request(header + blob, len(header))
    assert_same(request.inputs["a"], np.array([1, 65535], dtype=np.uint16))
    assert_same(request.inputs["j"], np.array([True]))
    assert request.inputs["b"].tolist() == [b"abc", b""]
    assert request.outputs is None
    assert request.binary_output is False


# --- interop with tritonclient -----------------------------------------------------------------------------


def _triton_input(name: str, array: Array, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), datatype_of(array))
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


@SETTINGS
@given(st.lists(st.tuples(tensors(utf8=True), st.booleans()), min_size=1, max_size=4), st.data())
def test_parses_tritonclient_requests(pairs: list[tuple[Array, bool]], data: st.DataObject) -> None:
    wanted = data.draw(st.sampled_from([None, [("o1", True)], [("o1", False), ("o2", True)]]))
    inputs = [_triton_input(f"in{i}", a, b) for i, (a, b) in enumerate(pairs)]
    outputs = [httpclient.InferRequestedOutput(n, binary_data=b) for n, b in wanted] if wanted else None
    body, json_size = _get_inference_request(
        inputs=inputs,
        request_id="req",
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters={"custom": "x"},
    )
    request = parse_infer_request(body, json_size)
    assert request.id == "req"
    assert request.parameters == {"custom": "x"}
    assert request.binary_output is (wanted is None)
    assert request.outputs == (None if wanted is None else tuple(RequestedOutput(n, b) for n, b in wanted))
    for i, (array, _) in enumerate(pairs):
        assert_same(request.inputs[f"in{i}"], array)


@SETTINGS
@given(st.lists(tensors(), min_size=1, max_size=4), st.booleans())
def test_tritonclient_parses_responses(arrays: list[Array], binary: bool) -> None:
    outputs = {f"out{i}": a for i, a in enumerate(arrays)}
    body, header_length = encode_infer_response("m", "1", "id9", outputs, make_request({}, binary))
    result = httpclient.InferResult.from_response_body(body, verbose=False, header_length=header_length)
    assert result.get_response()["id"] == "id9"
    for name, array in outputs.items():
        assert_same(result.as_numpy(name), array)


@SETTINGS
@given(st.lists(tensors(utf8=True), min_size=1, max_size=3), st.booleans())
def test_ember_client_request_matches_tritonclient_bytes(arrays: list[Array], binary: bool) -> None:
    """Ember's client encoder writes the same binary bytes as tritonclient, and both parse alike."""
    inputs = {f"in{i}": a for i, a in enumerate(arrays)}
    ours, our_length = encode_infer_request(inputs, binary=binary)
    theirs, their_length = _get_inference_request(
        [_triton_input(n, a, binary) for n, a in inputs.items()], "", None, 0, False, False, 0, None, None
    )
    assert (our_length is None) == (their_length is None)
    assert ours[our_length or len(ours) :] == theirs[their_length or len(theirs) :]
    ours_parsed = parse_infer_request(ours, our_length)
    theirs_parsed = parse_infer_request(theirs, their_length)
    for name in inputs:
        assert_same(ours_parsed.inputs[name], theirs_parsed.inputs[name])


def test_tritonclient_classification_is_rejected() -> None:
    body, json_size = _get_inference_request(
        [_triton_input("x", np.zeros(2, np.float32), True)],
        "",
        [httpclient.InferRequestedOutput("y", class_count=3)],
        0,
        False,
        False,
        0,
        None,
        None,
    )
    with pytest.raises(InvalidInput, match="classification"):
        parse_infer_request(body, json_size)


# --- malformed input ---------------------------------------------------------------------------------------

_X = {"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2]}


def _binary(size: int, shape: list[int], datatype: str = "FP32") -> dict[str, Any]:
    return {"name": "b", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


def _with_blob(blob: bytes, *tensors: dict[str, Any], header_length: int | None = None) -> tuple[bytes, int | None]:
    header = _json_request(*tensors)
    return header + blob, len(header) if header_length is None else header_length


MALFORMED: list[tuple[str, bytes, int | None, str]] = [
    ("bad json", b'{"inputs": [', None, "not valid JSON"),
    ("not utf-8", b'{"inputs": "\xff"}', None, "not valid JSON"),
    ("non-object body", b"[1, 2]", None, "must be a JSON object"),
    ("no inputs", b"{}", None, "non-empty list"),
    ("empty inputs", _json_request(), None, "non-empty list"),
    ("input not an object", b'{"inputs": [3]}', None, "inputs[0] must be a JSON object"),
    (
        "missing name",
        _json_request({"datatype": "INT32", "shape": [1], "data": [1]}),
        None,
        "non-empty string",
    ),
    ("unknown datatype", _json_request({**_X, "datatype": "BF16"}), None, "unsupported datatype 'BF16'"),
    ("negative shape", _json_request({**_X, "shape": [-2]}), None, "non-negative integers"),
    ("float shape", _json_request({**_X, "shape": [2.0]}), None, "non-negative integers"),
    ("too few elements", _json_request({**_X, "data": [1]}), None, "1 data elements but its shape needs 2"),
    ("too many elements", _json_request({**_X, "data": [1, 2, 3]}), None, "3 data elements"),
    ("ragged nesting", _json_request({**_X, "data": [[1], 2]}), None, "mixes nested lists"),
    ("duplicate names", _json_request(_X, _X), None, "more than once"),
    ("no data", _json_request({"name": "x", "datatype": "INT32", "shape": [1]}), None, "neither 'data'"),
    ("uint8 300", _json_request({**_X, "datatype": "UINT8", "data": [1, 300]}), None, "300 is out of range"),
    ("uint8 -1", _json_request({**_X, "datatype": "UINT8", "data": [-1, 0]}), None, "-1 is out of range"),
    ("int64 huge", _json_request({**_X, "datatype": "INT64", "data": [2**63, 0]}), None, "out of range"),
    ("int32 1.5", _json_request({**_X, "data": [1.5, 2]}), None, "must be integers"),
    ("int32 bool", _json_request({**_X, "data": [True, 2]}), None, "must be integers"),
    ("fp32 overflow", _json_request({**_X, "datatype": "FP32", "data": [1e39, 0]}), None, "out of range"),
    ("fp16 string", _json_request({**_X, "datatype": "FP16", "data": ["1", 0]}), None, "must be numbers"),
    ("bool as int", _json_request({**_X, "datatype": "BOOL", "data": [1, 0]}), None, "true/false"),
    (
        "bytes as number",
        _json_request({**_X, "datatype": "BYTES", "data": ["a", 2]}),
        None,
        "must be strings",
    ),
    ("bad id", _json_request(_X, id=5), None, "'id' must be a string"),
    ("bad parameters", _json_request(_X, parameters=[1]), None, "must be a JSON object"),
    (
        "bad binary_data_output",
        _json_request(_X, parameters={"binary_data_output": 1}),
        None,
        "true or false",
    ),
    ("bad outputs", _json_request(_X, outputs={"name": "y"}), None, "'outputs' must be a list"),
    (
        "dup outputs",
        _json_request(_X, outputs=[{"name": "y"}, {"name": "y"}]),
        None,
        "requested more than once",
    ),
    (
        "bad binary_data",
        _json_request(_X, outputs=[{"name": "y", "parameters": {"binary_data": "y"}}]),
        None,
        "true",
    ),
    (
        "shared memory",
        _json_request({**_X, "parameters": {"shared_memory_region": "r"}}),
        None,
        "shared memory",
    ),
    ("data and binary", _json_request({**_X, "parameters": {"binary_data_size": 8}}), None, "both 'data'"),
    ("binary without header", _json_request(_binary(8, [2])), None, "no Inference-Header-Content-Length"),
    ("header beyond body", b'{"inputs": []}', 99, "the body has only 14 bytes"),
    ("negative header", b'{"inputs": []}', -1, "non-negative integer"),
    *[
        (name, *_with_blob(blob, *tensors), message)
        for name, blob, tensors, message in [
            ("size too small", b"\0" * 4, [_binary(4, [2])], "take 8 bytes"),
            ("size too large", b"\0" * 12, [_binary(12, [2])], "take 8 bytes"),
            ("missing binary bytes", b"\0" * 4, [_binary(8, [2])], "only 4 binary bytes remain"),
            ("leftover binary bytes", b"\0" * 9, [_binary(8, [2])], "1 bytes after the JSON header"),
            ("bytes negative size", b"", [_binary(-1, [0])], "non-negative integer"),
            ("bool byte 2", b"\x02", [_binary(1, [1], "BOOL")], "0 or 1"),
            ("bytes short prefix", b"\x01\0", [_binary(2, [1], "BYTES")], "only 0 of its 1 BYTES elements"),
            ("bytes element overrun", b"\x05\0\0\0ab", [_binary(6, [1], "BYTES")], "claims 5 bytes"),
            ("bytes leftover", b"\x01\0\0\0ab", [_binary(6, [1], "BYTES")], "1 bytes left over"),
        ]
    ],
    ("header cuts json", *_with_blob(b"", _X, header_length=10), "not valid JSON"),
]


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_requests_are_invalid_input(body: bytes, header_length: int | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        parse_infer_request(body, header_length)


def test_limits() -> None:
    tiny = Limits(max_elements=4, max_inputs=1, max_bytes_element=3)
    with pytest.raises(InvalidInput, match="over the limit of 4 elements"):
        parse_infer_request(_json_request({**_X, "shape": [5], "data": [0] * 5}), None, tiny)
    with pytest.raises(InvalidInput, match="over the limit of 4 elements"):
        parse_infer_request(_json_request({**_X, "shape": [0, 10**12], "data": []}), None, tiny)
    with pytest.raises(InvalidInput, match="2 inputs, over the limit of 1"):
        parse_infer_request(_json_request(_X, {**_X, "name": "y"}), None, tiny)
    with pytest.raises(InvalidInput, match="over 3 bytes"):
        parse_infer_request(
            _json_request({"name": "s", "datatype": "BYTES", "shape": [1], "data": ["abcd"]}), None, tiny
        )
    body, header_length = encode_infer_request({"s": np.array([b"abcd"], dtype=object)})
    with pytest.raises(InvalidInput, match="4 bytes, over the limit of 3"):
        parse_infer_request(body, header_length, tiny)
    assert parse_infer_request(_json_request({**_X, "shape": [4], "data": [0] * 4}), None, tiny).inputs["x"].size == 4


def test_encoders_reject_bad_values() -> None:
    with pytest.raises(InvalidInput, match="holds a int"):
        encode_infer_request({"x": np.array([1, b"a"], dtype=object)})
    with pytest.raises(InvalidInput, match="no Open Inference Protocol datatype"):
        encode_infer_response("m", "1", None, {"y": np.zeros(1, np.complex64)}, make_request({}))
    with pytest.raises(InvalidInput, match="use binary="):
        encode_infer_request({"x": np.zeros(1)}, parameters={"binary_data_output": False})
    with pytest.raises(InvalidInput, match="at least one input"):
        encode_infer_request({})


def test_parse_infer_response_reports_server_errors_and_bad_bodies() -> None:
    with pytest.raises(InvalidInput, match="answered with an error: boom"):
        parse_infer_response(b'{"error": "boom"}', None)
    with pytest.raises(InvalidInput, match="needs 'outputs'"):
        parse_infer_response(b'{"model_name": "m"}', None)
    header = json.dumps({"outputs": [_binary(8, [2])]}).encode()
    with pytest.raises(InvalidInput, match="only 4 binary bytes remain"):
        parse_infer_response(header + b"abcd", len(header))
