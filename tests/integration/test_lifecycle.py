"""A model's life on its own server (1 worker, 0.2 s ticks): keep-alive demotion, promotion, restart."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from harness import EXAMPLES, MODELS, SLEEPY, Server, json_output, linear_weights, served, wait_until


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with served(Server(tmp_path_factory.mktemp("lifecycle") / "home", workers=1, tick_s=0.2)) as running:
        yield running


def ls_json(server: Server) -> dict[str, dict[str, object]]:
    done = server.cli("ls", "--json")
    assert done.returncode == 0, done.stderr
    return {m["name"]: m for m in json.loads(done.stdout)}


def test_keepalive_demotes_hot_warm_cool_and_a_request_promotes(own: Server, tmp_path: Path) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    own.deploy(
        f"{MODELS / 'sleepy.py'}:Sleepy",
        "--name", "brief",
        "--keepalive-hot-s", "1", "--keepalive-warm-s", "1",
        *SLEEPY,
        "--option", f"gate_dir={json.dumps(str(gates))}",
    )  # fmt: skip
    assert own.tier("brief") == "hot"
    wait_until(lambda: own.tier("brief") == "warm", 30, "brief to be demoted to warm")
    wait_until(lambda: own.tier("brief") == "cool", 30, "brief to be demoted to cool")
    assert own.status()["store"]["warm"]["models"] == 0
    cold_starts = own.model("brief")["cold_starts"]

    x = np.array([[5]], dtype=np.int64)
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            request = pool.submit(own.infer_json, "brief", {"x": x})
            # The request brought the model up from cool; gate 5 holds its batch, so it stays busy (and hot).
            wait_until(
                lambda: own.model("brief")["cold_starts"] == cold_starts + 1, 60, "the cold start caused by the request"
            )
            shown = ls_json(own)["brief"]
            assert shown["tier"] == "hot"
            assert shown["last_cold_start"]["tier"] == "cool"  # type: ignore[index]
            assert not request.done()
        finally:
            (gates / "5").touch()
        response = request.result(timeout=120)
    np.testing.assert_array_equal(json_output(response, "y"), x)


def test_sigterm_finishes_in_flight_work_and_a_restart_keeps_deployments(own: Server, tmp_path: Path) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    own.deploy(EXAMPLES / "linear.py:Linear", "--name", "keeper")
    own.deploy(
        f"{MODELS / 'sleepy.py'}:Sleepy", "--name", "held", *SLEEPY, "--option", f"gate_dir={json.dumps(str(gates))}"
    )
    before = ls_json(own)
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    answer = json_output(own.infer_json("keeper", {"x": x}), "y")

    held = np.array([[6]], dtype=np.int64)
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            request = pool.submit(own.infer_json, "held", {"x": held})
            wait_until(lambda: own.model("held")["requests"] == 1, 60, "the held request to be admitted")
            own.terminate()
            wait_until(lambda: not own.accepting(), 60, "the server to stop taking connections after SIGTERM")
            assert not request.done()
        finally:
            (gates / "6").touch()
        response = request.result(timeout=120)
    # Shutting down waited for the request that was running: it got its answer.
    np.testing.assert_array_equal(json_output(response, "y"), held)
    assert own.stop() == 0

    own.start()
    after = ls_json(own)
    assert sorted(after) == sorted(before)
    for name in before:
        assert after[name]["version"] == before[name]["version"]
        assert after[name]["source"] == before[name]["source"]
        assert after[name]["tier"] != "hot"  # nothing is on a device after a restart
    again = json_output(own.infer_json("keeper", {"x": x}), "y")
    np.testing.assert_array_equal(again, answer)
    weight, bias = linear_weights()
    np.testing.assert_allclose(again, x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    assert own.tier("keeper") == "hot"
