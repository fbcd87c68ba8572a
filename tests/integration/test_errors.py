"""Error answers over plain HTTP (httpx): statuses, ``{"error": ...}`` bodies, ``Retry-After``, metrics."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from harness import MODELS, SLEEPY, Server, error_of, json_output, json_request, wait_until
from prometheus_client.parser import text_string_to_metric_families

MARKER = -999.0


class Gates:
    """The gate folder of a Sleepy deployment: a batch holding value V finishes once gate V is open."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def open(self, value: int) -> None:
        (self.folder / str(value)).touch()


@pytest.fixture(scope="module")
def gated(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Gates]:
    """Two Sleepy models that hold every batch until the test opens its gate, and a Faulty one.

    ``sleepy-queue`` takes one request per batch and queues at most one more; ``sleepy-timeout`` has
    the defaults.
    """
    gates = {name: Gates(tmp_path_factory.mktemp(name)) for name in ("sleepy-queue", "sleepy-timeout")}
    sleepy = f"{MODELS / 'sleepy.py'}:Sleepy"
    limits = ("--max-queue", "1", "--max-batch-size", "1", *SLEEPY)
    server.deploy_many(
        {
            "sleepy-queue": (sleepy, "--name", "sleepy-queue", *limits, "--option", gate(gates["sleepy-queue"])),
            "sleepy-timeout": (sleepy, "--name", "sleepy-timeout", *SLEEPY, "--option", gate(gates["sleepy-timeout"])),
            "faulty": (f"{MODELS / 'faulty.py'}:Faulty", "--name", "faulty", "--option", f"marker={MARKER}"),
        }
    )
    return gates


def gate(gates: Gates) -> str:
    return f"gate_dir={json.dumps(str(gates.folder))}"


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=16) as executor:
        yield executor


def rows(*values: int) -> dict[str, np.ndarray]:
    return {"x": np.array([[v] for v in values], dtype=np.int64)}


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = server.http.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if there are none)."""
    return sum(v for (n, have), v in samples.items() if n == name and set(labels.items()) <= set(have))


# -- 404 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/models/no-such-model/infer"),
        ("GET", "/v2/models/no-such-model"),
        ("GET", "/v2/models/no-such-model/config"),
        ("GET", "/admin/models/no-such-model"),
        ("DELETE", "/admin/models/no-such-model"),
    ],
)
def test_unknown_model_is_404_with_error_body(server: Server, method: str, path: str) -> None:
    response = server.http.request(method, f"{server.url}{path}", json=json_request(rows(1)))
    assert response.status_code == 404
    assert "no-such-model" in error_of(response)


def test_unknown_version_is_404(server: Server, linear: str) -> None:
    version = server.model(linear)["version"]
    good = server.http.get(f"{server.url}/v2/models/{linear}/versions/{version}")
    assert good.status_code == 200
    response = server.http.get(f"{server.url}/v2/models/{linear}/versions/{version + 100}")
    assert response.status_code == 404
    assert f"version {version + 100}" in error_of(response)


def test_unknown_route_is_404_with_error_body(server: Server) -> None:
    response = server.http.get(f"{server.url}/v2/no/such/route")
    assert response.status_code == 404
    assert "/v2/no/such/route" in error_of(response)


# -- 400 ----------------------------------------------------------------------------------------------


def linear_json(name: str = "x", datatype: str = "FP32", shape: tuple[int, ...] = (1, 16)) -> bytes:
    count = int(np.prod(shape))
    data: list[Any] = [0.5] * count if datatype.startswith("FP") else [1] * count
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": data}]}).encode()


def linear_binary(header: str | None = None) -> tuple[bytes, dict[str, str]]:
    """One row for Linear as binary data; ``header`` overrides the true Inference-Header-Content-Length."""
    blob = np.zeros((1, 16), dtype=np.float32).tobytes()
    x = {"name": "x", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": len(blob)}}
    head = json.dumps({"inputs": [x]}).encode()
    length = str(len(head)) if header is None else header
    return head + blob, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": length}


JSON_HEADERS = {"Content-Type": "application/json"}

BAD_REQUESTS: dict[str, Callable[[int], tuple[bytes, dict[str, str], list[str]]]] = {
    # name: max_batch_size -> (body, headers, fragments the message must contain)
    "malformed-json": lambda _: (b'{"inputs": [{"name": "x",', JSON_HEADERS, ["not valid JSON"]),
    "not-an-object": lambda _: (b"[1, 2, 3]", JSON_HEADERS, ["JSON object"]),
    "no-inputs": lambda _: (b'{"inputs": []}', JSON_HEADERS, ["inputs"]),
    "wrong-input-name": lambda _: (linear_json(name="z"), JSON_HEADERS, ["unknown: z", "missing: x", "FP32"]),
    "wrong-datatype": lambda _: (linear_json(datatype="INT32"), JSON_HEADERS, ["'x'", "must be FP32", "INT32"]),
    "unsupported-datatype": lambda _: (linear_json(datatype="FP8"), JSON_HEADERS, ["unsupported datatype", "FP8"]),
    "wrong-shape": lambda _: (linear_json(shape=(1, 15)), JSON_HEADERS, ["shape [1, 15]", "[-1, 16]"]),
    "data-does-not-fit-shape": lambda _: (
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 15}]}).encode(),
        JSON_HEADERS,
        ["15 data elements", "16"],
    ),
    "zero-rows": lambda _: (linear_json(shape=(0, 16)), JSON_HEADERS, ["no rows"]),
    "too-many-rows": lambda most: (
        linear_json(shape=(most + 1, 16)),
        JSON_HEADERS,
        [f"{most + 1} rows", f"at most {most}"],
    ),
    "header-not-a-number": lambda _: (*linear_binary("abc"), ["Inference-Header-Content-Length", "'abc'"]),
    "header-past-the-body": lambda _: (*linear_binary("100000"), ["Inference-Header-Content-Length is 100000"]),
    "header-too-short": lambda _: (*linear_binary("10"), ["not valid JSON"]),
    "bad-timeout": lambda _: (
        json.dumps({**json.loads(linear_json()), "parameters": {"timeout": -5}}).encode(),
        JSON_HEADERS,
        ["timeout", "-5"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_400_naming_the_problem(server: Server, linear: str, case: str) -> None:
    most = int(server.get_json(f"/v2/models/{linear}/config")["max_batch_size"])
    body, headers, fragments = BAD_REQUESTS[case](most)
    before = server.model(linear)["requests"]
    response = server.http.post(f"{server.url}/v2/models/{linear}/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    message = error_of(response)
    for fragment in fragments:
        assert fragment in message
    assert server.model(linear)["requests"] == before  # refused at the edge: never admitted


def test_well_formed_binary_request_is_served(server: Server, linear: str) -> None:
    """The control for the malformed ones above: the same body with the true header length is served."""
    body, headers = linear_binary()
    response = server.http.post(f"{server.url}/v2/models/{linear}/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text


def test_unknown_requested_output_is_400(server: Server, linear: str) -> None:
    body = {**json_request({"x": np.ones((1, 16), dtype=np.float32)}), "outputs": [{"name": "nope"}]}
    response = server.http.post(f"{server.url}/v2/models/{linear}/infer", json=body)
    assert response.status_code == 400
    message = error_of(response)
    assert "nope" in message and "outputs are y" in message


def test_gzip_body_is_accepted(server: Server, linear: str) -> None:
    x = np.random.default_rng(4).standard_normal((2, 16)).astype(np.float32)
    plain = server.infer_json(linear, {"x": x})
    packed = gzip.compress(json.dumps(json_request({"x": x})).encode())
    response = server.http.post(
        f"{server.url}/v2/models/{linear}/infer",
        content=packed,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    np.testing.assert_array_equal(json_output(response, "y"), json_output(plain, "y"))
    broken = server.http.post(
        f"{server.url}/v2/models/{linear}/infer",
        content=packed[:-8] + b"garbage!",
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert broken.status_code == 400
    assert "gzip" in error_of(broken)


# -- 503 / 429: refused, with Retry-After -------------------------------------------------------------


def assert_retry_after(response: httpx.Response) -> None:
    value = response.headers.get("retry-after")
    assert value is not None and value.isdigit() and int(value) >= 1, response.headers


def test_full_queue_is_refused_with_503_and_none_lost(
    server: Server, gated: dict[str, Gates], pool: ThreadPoolExecutor
) -> None:
    name, sent = "sleepy-queue", 10
    url = f"{server.url}/v2/models/{name}/infer"
    futures: list[Future[httpx.Response]] = []
    try:
        futures = [pool.submit(server.http.post, url, json=json_request(rows(1))) for _ in range(sent)]
        # Gate 1 shut: one request runs, at most one waits (--max-queue 1); every other one is refused now.
        wait_until(
            lambda: sum(f.done() for f in futures) >= sent - 2, 60, "the refusals of the requests over the limit"
        )
    finally:
        gated[name].open(1)
    responses = [f.result(timeout=120) for f in futures]
    assert len(responses) == sent

    refused = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert len(refused) >= sent - 2
    assert len(refused) + len(served) == sent, [r.status_code for r in responses]
    for response in refused:
        assert_retry_after(response)
        assert "--max-queue" in error_of(response)
    for response in served:
        np.testing.assert_array_equal(json_output(response, "y"), rows(1)["x"])


def test_timeout_shorter_than_the_backlog_is_429(
    server: Server, gated: dict[str, Gates], pool: ThreadPoolExecutor
) -> None:
    name = "sleepy-timeout"
    before = server.model(name)
    blocker: Future[httpx.Response] | None = None
    try:
        blocker = pool.submit(server.infer_json, name, rows(2))

        def running() -> bool:
            now = server.model(name)
            return now["requests"] == before["requests"] + 1 and now["queued"] == 0

        wait_until(running, 60, f"the blocking request to run on {name}")
        # Its own deadline (Triton's timeout, in microseconds) passes while gate 2 holds the instance.
        response = server.infer_json(name, rows(3), parameters={"timeout": 200_000})
        assert response.status_code == 429, response.text
        assert_retry_after(response)
        assert "timeout" in error_of(response)
        assert not blocker.done()
    finally:
        gated[name].open(2)
    assert blocker is not None
    answered = blocker.result(timeout=120)
    np.testing.assert_array_equal(json_output(answered, "y"), rows(2)["x"])


def test_timed_out_request_does_not_hold_a_queue_slot(
    server: Server, gated: dict[str, Gates], pool: ThreadPoolExecutor
) -> None:
    name = "sleepy-queue"  # --max-queue 1 --max-batch-size 1
    before = server.model(name)
    blocker: Future[httpx.Response] | None = None
    follower: Future[httpx.Response] | None = None
    try:
        blocker = pool.submit(server.infer_json, name, rows(4))

        def running() -> bool:
            now = server.model(name)
            return now["requests"] == before["requests"] + 1 and now["queued"] == 0

        wait_until(running, 60, f"the blocking request to run on {name}")
        expired = server.infer_json(name, rows(4), parameters={"timeout": 100_000})
        assert expired.status_code == 429, expired.text
        # The one queue slot is free again: the expired request is answered and gone.
        follower = pool.submit(server.infer_json, name, rows(4))
        wait_until(
            lambda: follower.done() or server.model(name)["requests"] == before["requests"] + 3,
            60,
            "the next request to be admitted or refused",
        )
        assert not follower.done(), follower.result().text
    finally:
        gated[name].open(4)
    assert blocker is not None and follower is not None
    for future in (blocker, follower):
        np.testing.assert_array_equal(json_output(future.result(timeout=120), "y"), rows(4)["x"])


def test_timeout_long_enough_is_served(server: Server, linear: str) -> None:
    x = np.ones((2, 16), dtype=np.float32)
    response = server.infer_json(linear, {"x": x}, parameters={"timeout": 60_000_000})
    assert json_output(response, "y").shape == (2, 16)


# -- 500: the model's own error -----------------------------------------------------------------------


def test_model_error_is_500_and_the_server_keeps_serving(server: Server, gated: dict[str, Gates], linear: str) -> None:
    poisoned = np.full((1, 4), MARKER, dtype=np.float32)
    response = server.infer_json("faulty", {"x": poisoned})
    assert response.status_code == 500
    message = error_of(response)
    assert "poisoned input" in message
    assert "ValueError" in message

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(json_output(server.infer_json("faulty", {"x": x}), "y"), 2 * x)
    y = json_output(server.infer_json(linear, {"x": np.ones((1, 16), dtype=np.float32)}), "y")
    assert y.shape == (1, 16)
    faulty = server.model("faulty")
    assert faulty["failed"] >= 1
    assert faulty["succeeded"] >= 1


# -- /metrics -----------------------------------------------------------------------------------------


def test_metrics_count_requests_and_cold_starts(server: Server, gated: dict[str, Gates], linear: str) -> None:
    before = scrape(server)
    x = np.ones((3, 16), dtype=np.float32)
    for _ in range(4):
        assert server.infer_json(linear, {"x": x}).status_code == 200
    assert server.infer_json("faulty", {"x": np.full((1, 4), MARKER, dtype=np.float32)}).status_code == 500
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("nv_inference_request_success_total", model=linear) == 4
    assert delta("nv_inference_count_total", model=linear) == 12  # rows: 4 requests of 3
    assert delta("nv_inference_request_failure_total", model="faulty", reason="ModelFailed") == 1
    assert delta("nv_inference_request_success_total", model="faulty") == 0
    assert metric(after, "ember_cold_starts_total", model=linear) >= 1
    assert metric(after, "ember_cold_starts_total", model=linear) == server.model(linear)["cold_starts"]
