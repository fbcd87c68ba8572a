"""Models that hang or leak memory, on their own server: each costs only its own requests.

The server runs one worker, so every model shares it, with a 3 s batch timeout and a worker memory
limit. A hung ``predict`` is answered with a clear error when the timeout passes and its worker is
replaced; a batch of another model that waited behind it is retried on the new worker, not failed. A
leaking model's worker is replaced once its memory passes the limit, after answering the batch at
hand. Either way the other models keep serving and every request gets an answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from harness import MODELS, Server, error_of, json_output, served, wait_until

BATCH_TIMEOUT_S = 3
WORKER_MEMORY_MB = 1200
LEAK_MB = 200


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    options = ("--batch-timeout-s", str(BATCH_TIMEOUT_S), "--worker-memory-mb", str(WORKER_MEMORY_MB))
    with served(Server(tmp_path_factory.mktemp("hostile") / "home", workers=1, args=options)) as running:
        # A long SLO: a request that waited behind a hung batch is retried, not refused as late.
        running.deploy(f"{MODELS / 'echo.py'}:Echo", "--name", "bystander", "--slo-ms", "60000")
        yield running


def restarts(server: Server) -> int:
    count: int = server.status()["workers"]["restarts"]
    return count


def worker_logs(server: Server) -> str:
    return "\n".join(path.read_text(errors="replace") for path in sorted((server.home / "logs").glob("worker-*.log")))


def bystander_answers(server: Server) -> None:
    x = np.array([[1.5, -2.0]], dtype=np.float32)
    np.testing.assert_array_equal(json_output(server.infer_json("bystander", {"x": x}), "y"), x)


def test_a_hung_predict_is_answered_and_its_worker_replaced(own: Server) -> None:
    own.deploy(f"{MODELS / 'hostile.py'}:Hangs", "--name", "hangs")
    before = restarts(own)

    with ThreadPoolExecutor(max_workers=1) as pool:
        hanging = pool.submit(own.infer_json, "hangs", {"x": np.array([[-1]], dtype=np.int64)})
        wait_until(lambda: own.model("hangs")["queued"] == 0 and own.model("hangs")["requests"] == 1, 60, "the hang")
        bystander_answers(own)  # queued behind the hung batch on the only worker, then retried
        stuck = hanging.result(timeout=120)

    assert stuck.status_code == 500
    message = error_of(stuck)
    assert "batch timeout" in message and f"{BATCH_TIMEOUT_S} s" in message
    wait_until(lambda: restarts(own) == before + 1 and own.status()["workers"]["ready"] == 1, 120, "a new worker")
    x = np.array([[7]], dtype=np.int64)
    np.testing.assert_array_equal(json_output(own.infer_json("hangs", {"x": x}), "y"), x)  # the model still serves
    bystander_answers(own)
    assert own.model("hangs")["failed"] == 1


def test_a_leaking_model_is_recycled_and_every_request_is_served(own: Server) -> None:
    own.deploy(
        f"{MODELS / 'hostile.py'}:Leaks", "--name", "leaks", "--option", f"leak_mb={LEAK_MB}", "--slo-ms", "60000"
    )
    before = restarts(own)
    # Enough batches to pass the limit from any starting size: each keeps LEAK_MB more.
    sent = WORKER_MEMORY_MB // LEAK_MB + 2
    for i in range(sent):
        x = np.array([[i]], dtype=np.int64)
        np.testing.assert_array_equal(json_output(own.infer_json("leaks", {"x": x}), "y"), x)

    assert restarts(own) >= before + 1
    assert "over the worker limit" in worker_logs(own)
    assert own.model("leaks")["failed"] == 0
    bystander_answers(own)
