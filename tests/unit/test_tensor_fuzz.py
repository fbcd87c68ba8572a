"""Hostile bodies for the binary tensor parser: whatever arrives, the answer is a result or InvalidInput.

Three kinds of input: raw bytes; well-formed JSON heads with wrong values in every field, followed by
random binary data; and valid requests with their bytes mutated. ``json_depth`` is checked against
the real nesting of random JSON.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.errors import InvalidInput
from ember.gateway.tensors import (
    DATATYPES,
    InferRequest,
    Limits,
    encode_infer_request,
    json_depth,
    json_too_deep,
    parse_infer_request,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Small limits, so hypothesis reaches them.
LIMITS = Limits(max_elements=4096, max_inputs=8, max_bytes_element=256, max_json_depth=16)


def parse(body: bytes, header_length: int | None) -> InferRequest | None:
    """The parse result, or None for InvalidInput; any other exception fails the test."""
    try:
        parsed = parse_infer_request(body, header_length, LIMITS)
    except InvalidInput as exc:
        assert exc.message.strip()
        return None
    for name, array in parsed.inputs.items():
        assert isinstance(array, np.ndarray), name
        assert array.size <= LIMITS.max_elements
    assert len(parsed.inputs) <= LIMITS.max_inputs
    return parsed


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20,
)

shapes = st.one_of(
    st.lists(st.integers(min_value=0, max_value=5), max_size=4),
    st.lists(st.integers(min_value=-3, max_value=2**40), max_size=6),
    json_values,
)
tensor_specs = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.sampled_from(["x", "y", ""]), json_values),
        "datatype": st.one_of(st.sampled_from(sorted(DATATYPES)), json_values),
        "shape": shapes,
        "data": json_values,
        "parameters": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "binary_data_size": st.one_of(st.integers(min_value=-4, max_value=300), json_values),
                    "shared_memory_region": st.text(max_size=4),
                },
            ),
            json_values,
        ),
    },
)
heads = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(tensor_specs, max_size=4), json_values)},
    optional={
        "id": json_values,
        "parameters": st.one_of(
            st.fixed_dictionaries({}, optional={"binary_data_output": json_values, "timeout": json_values}),
            json_values,
        ),
        "outputs": st.one_of(
            st.lists(st.fixed_dictionaries({"name": json_values}, optional={"parameters": json_values}), max_size=3),
            json_values,
        ),
    },
)


@SETTINGS
@given(st.binary(max_size=512), st.one_of(st.none(), st.integers(min_value=-4, max_value=600)))
def test_raw_bytes_never_crash_the_parser(body: bytes, header_length: int | None) -> None:
    parse(body, header_length)


@SETTINGS
@given(heads, st.binary(max_size=256), st.booleans())
def test_json_heads_with_wrong_values_and_random_binary_data(head: dict[str, Any], tail: bytes, split: bool) -> None:
    text = json.dumps(head).encode()
    parse(text + tail, len(text) if split else None)


@SETTINGS
@given(
    st.sampled_from(sorted(DATATYPES)),
    st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=3),
    st.booleans(),
    st.data(),
)
def test_valid_requests_with_mutated_bytes(datatype: str, shape: list[int], binary: bool, data: st.DataObject) -> None:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        array = np.array([b"ab"] * count, dtype=object).reshape(shape)
    else:
        array = np.zeros(shape, dtype=DATATYPES[datatype])
    body, header_length = encode_infer_request({"x": array}, binary=binary)
    assert parse(body, header_length) is not None  # unmutated, it parses
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        if not mutated:
            break
        where = data.draw(st.integers(min_value=0, max_value=len(mutated) - 1))
        action = data.draw(st.sampled_from(["flip", "drop", "insert"]))
        if action == "flip":
            mutated[where] = data.draw(st.integers(min_value=0, max_value=255))
        elif action == "drop":
            del mutated[where]
        else:
            mutated[where:where] = data.draw(st.binary(min_size=1, max_size=4))
    length = header_length
    if length is not None and data.draw(st.booleans()):
        length = data.draw(st.integers(min_value=0, max_value=len(mutated) + 2))
    parse(bytes(mutated), length)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@SETTINGS
@given(json_values, st.booleans())
def test_json_depth_counts_real_nesting_whatever_the_strings_hold(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert json_depth(text) == _depth(value)
    assert json_too_deep(text, 2) == (_depth(value) if _depth(value) > 2 else None)


@SETTINGS
@given(st.integers(min_value=17, max_value=5000), st.sampled_from(["[", '{"a":']))
def test_deep_json_is_refused_naming_the_limit(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    body = ('{"inputs": ' + opener * depth + "1" + closer * depth + "}").encode()
    try:
        parse_infer_request(body, None, LIMITS)
    except InvalidInput as exc:
        assert f"nests {depth + 1} levels deep; the limit is 16" in exc.message
    else:
        raise AssertionError("a body nested past the limit was parsed")
