"""A worker killed with SIGKILL mid-batch, on its own server (2 workers and a spare): no request is lost,
and the spare takes the dead worker's place."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from harness import MODELS, SLEEPY, Server, error_of, json_output, json_request, served, wait_until

SENT = 40


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with served(Server(tmp_path_factory.mktemp("faults") / "home", workers=2)) as running:
        yield running


def test_killed_worker_loses_no_request(own: Server, tmp_path: Path) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    own.deploy(
        f"{MODELS / 'sleepy.py'}:Sleepy",
        "--name", "steady", "--max-batch-size", "4", *SLEEPY,
        "--option", f"gate_dir={json.dumps(str(gates))}", "--option", "seconds=0.01",
    )  # fmt: skip
    url = f"{own.url}/v2/models/steady/infer"
    inputs = [np.array([[i]], dtype=np.int64) for i in range(1, SENT + 1)]
    assert len(own.worker_pids()) == 2
    # The spare, started ahead, is the one that takes the dead worker's place.
    (spare,) = wait_until(lambda: own.status()["workers"]["spare_workers"], 120, "the spare worker to start")
    cold_starts = own.model("steady")["cold_starts"]

    with (
        httpx.Client(timeout=180.0, limits=httpx.Limits(max_connections=SENT), headers=own.auth) as http,
        ThreadPoolExecutor(max_workers=SENT) as pool,
    ):
        futures: list[Future[httpx.Response]] = []
        try:
            futures = [pool.submit(http.post, url, json=json_request({"x": x})) for x in inputs]

            def busy_worker() -> int | None:
                """The pid of the worker running a batch, once every request is admitted."""
                if own.model("steady")["requests"] < SENT:
                    return None
                busy = [w["pid"] for w in own.status()["workers"]["workers"] if w["in_flight"] > 0]
                return busy[0] if busy else None

            # Every gate is shut: one batch is held on a worker, the other requests wait in the queue.
            victim = wait_until(busy_worker, 60, "all requests admitted and a batch in flight")
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: own.status()["workers"]["restarts"] >= 1, 60, f"the pool to notice worker {victim} died")
        finally:
            for i in range(1, SENT + 1):
                (gates / str(i)).touch()
        answers: list[httpx.Response | BaseException] = []
        for future in futures:
            try:
                answers.append(future.result(timeout=240))
            except httpx.HTTPError as exc:  # no HTTP answer at all: counted, then reported below
                answers.append(exc)

    unanswered = [a for a in answers if not isinstance(a, httpx.Response)]
    assert not unanswered, f"{len(unanswered)} of {SENT} requests got no HTTP answer: {unanswered[:3]}"
    assert len(answers) == SENT
    ok = 0
    for x, response in zip(inputs, answers, strict=True):
        assert isinstance(response, httpx.Response)
        if response.status_code == 200:
            np.testing.assert_array_equal(json_output(response, "y"), x)  # each answer is its own request's
            ok += 1
        else:
            error_of(response)  # a JSON error with a message
    # One worker died once; the batch it held is retried on a worker that is alive, so all are served.
    assert ok == SENT, f"only {ok} of {SENT} requests succeeded"

    def pool_restored() -> bool:
        workers = own.status()["workers"]
        pids = {w["pid"] for w in workers["workers"] if w["alive"]}
        return workers["ready"] == 2 and len(pids) == 2 and victim not in pids and spare["pid"] in pids

    wait_until(pool_restored, 120, "the pool to be back to 2 ready workers, the spare among them")
    wait_until(lambda: own.status()["workers"]["spares"] == 1, 120, "a new spare")
    x = np.array([[3]], dtype=np.int64)
    np.testing.assert_array_equal(json_output(own.infer_json("steady", {"x": x}), "y"), x)
    after = own.model("steady")
    assert after["failed"] == 0
    assert after["cold_starts"] == cold_starts + 1  # brought up again on a live worker, once
    assert own.status()["workers"]["restarts"] == 1
