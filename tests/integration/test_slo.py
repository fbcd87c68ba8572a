"""The SLO engine on a real ``ember serve``: a request predicted to miss its SLO is refused at once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from harness import MODELS, Server, error_of, json_output
from prometheus_client.parser import text_string_to_metric_families

SLOW = f"{MODELS / 'sleepy.py'}:Sleepy"


@pytest.fixture(scope="module")
def slow(server: Server) -> dict[str, str]:
    """Two Sleepy models whose every batch takes 0.3 s, with a 100 ms SLO: refuse, and best effort.

    Each deploy runs the warm-up (the batch size is 1), which shapes predictions but never justifies a
    refusal: the first real request is served and measured.
    """
    common = ("--slo-ms", "100", "--max-batch-size", "1", "--option", "seconds=0.3")
    server.deploy_many(
        {
            "slow-refuse": (SLOW, "--name", "slow-refuse", *common),
            "slow-late": (SLOW, "--name", "slow-late", *common, "--on-unmeetable", "best-effort"),
        }
    )
    return {"refuse": "slow-refuse", "late": "slow-late"}


def _failures(server: Server, model: str, reason: str) -> float:
    text = server.http.get(f"{server.url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "nv_inference_request_failure_total"
                and sample.labels.get("model") == model
                and sample.labels.get("reason") == reason
            ):
                return sample.value
    return 0.0


def test_an_unmeetable_slo_is_refused_at_once_with_429_and_retry_after(server: Server, slow: dict[str, str]) -> None:
    name = slow["refuse"]
    before = server.model(name)
    x = np.array([[7]], dtype=np.int64)
    measured = server.infer_json(name, {"x": x})  # the first real request of its size: served, late
    assert measured.status_code == 200, measured.text
    response = server.infer_json(name, {"x": x})
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["retry-after"]) <= 10  # when it is measured again, not "1" for ever
    message = error_of(response)
    assert "SLO (100 ms)" in message and "best-effort" in message and "--slo-ms" in message
    after = server.model(name)
    assert after["requests"] == before["requests"] + 2 and after["failed"] == before["failed"] + 1
    assert _failures(server, name, "DeadlineUnmeetable") >= 1


def test_best_effort_serves_the_same_request_late(server: Server, slow: dict[str, str]) -> None:
    name = slow["late"]
    x = np.array([[9]], dtype=np.int64)
    response = server.infer_json(name, {"x": x})
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(json_output(response, "y"), x)
    shown = server.model(name)
    assert shown["slo_attainment"] == 0.0  # served, but past its SLO


def test_a_timeout_shorter_than_the_measured_latency_is_refused_even_in_best_effort(
    server: Server, slow: dict[str, str]
) -> None:
    name = slow["late"]
    x = np.array([[3]], dtype=np.int64)
    response = server.infer_json(name, {"x": x}, parameters={"timeout": 50_000})  # 50 ms, in microseconds
    assert response.status_code == 429, response.text
    assert "timeout" in error_of(response)
    assert json.loads(response.text).keys() == {"error"}
