"""``ember serve --cluster`` on a Ray cluster: Ray's multi-node test cluster on this host, each node
with its own resources. The head has no CPUs for workers (as on a real cluster, where it runs the
gateway): every worker is an actor on another node.

Skipped when Ray is not installed (``pip install 'ember-serve[ray]'``).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from harness import EXAMPLES, HTTP_TIMEOUT_S, REPO, Server, ray_cluster, served, wait_until

pytest.importorskip("ray")
from ray.cluster_utils import Cluster

pytestmark = pytest.mark.ray

MODELS = Path(__file__).parent / "models"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head without worker CPUs and two nodes of one CPU each."""
    with ray_cluster(nodes=2) as running:
        yield running


@pytest.fixture(scope="module")
def server(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("ray") / "home"
    with served(Server(home, workers=1, args=("--cluster", cluster.address))) as running:
        yield running


def _workers(server: Server) -> list[dict[str, Any]]:
    return [w for w in server.status()["workers"]["workers"] if w["alive"]]


def test_workers_are_actors_on_every_node(server: Server, cluster: Cluster) -> None:
    status = server.status()["workers"]
    assert status["backend"] == "ray"
    nodes = {n["id"] for n in status["nodes"] if n["alive"] and n["workers"]}
    assert len(nodes) == 2, status
    assert {w["node"] for w in _workers(server)} == nodes
    shown = server.cli("status")
    assert shown.returncode == 0, shown.stderr
    assert "ray backend" in shown.stdout and shown.stdout.count("node ") >= 3, shown.stdout


def test_deploy_and_infer_through_oip_and_openai(server: Server) -> None:
    server.deploy(EXAMPLES / "linear.py:Linear")
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    response = server.infer_json("linear", {"x": x})
    assert response.status_code == 200, response.text
    assert np.asarray(response.json()["outputs"][0]["data"]).reshape(2, 16).shape == (2, 16)

    server.deploy(MODELS / "tiny_embed.py:TinyEmbed", "--name", "tiny")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=120.0) as client:
        answer = client.embeddings.create(model="tiny", input=["hello", "a cluster of nodes"])
    vectors = np.array([d.embedding for d in answer.data])
    assert vectors.shape == (2, 8)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    hosting = [w for w in _workers(server) if w["models"]]
    assert hosting, _workers(server)


def _in_flight_on(server: Server, key_prefix: str) -> int:
    return sum(w["in_flight"] for w in _workers(server) if any(m.startswith(key_prefix) for m in w["models"]))


def test_a_generative_model_streams_from_a_worker_actor(server: Server) -> None:
    """The worker actor runs the step loop and streams each step's tokens back over its connection;
    a client that hangs up mid-stream leaves nothing running there."""
    server.deploy(EXAMPLES / "byte_bigram.py:ByteBigram", "--name", "bigram", "--option", "step_delay_s=0.002")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=120.0) as client:
        whole = client.completions.create(model="bigram", prompt="Hello", max_tokens=64, temperature=0)
        assert whole.choices[0].text == "Hi, Ember!" and whole.choices[0].finish_reason == "stop"
        stream = client.completions.create(model="bigram", prompt="Hello", max_tokens=64, temperature=0, stream=True)
        pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 1, pieces  # streamed, not answered at once
    assert "".join(pieces) == "Hi, Ember!"
    assert [w for w in _workers(server) if any(m.startswith("bigram@") for m in w["models"])], _workers(server)

    body = {"model": "bigram", "prompt": "a", "max_tokens": 1_000_000, "stream": True, "ignore_eos": True}
    with server.http.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        for _ in range(50):
            assert '"finish_reason":null' in next(events)
        assert _in_flight_on(server, "bigram@") == 1
    wait_until(lambda: _in_flight_on(server, "bigram@") == 0, 30.0, "the cut stream's sequence to stop")
    assert server.model("bigram")["tier"] == "hot"


def test_node_removed_under_load_answers_every_request(server: Server, cluster: Cluster) -> None:
    """A node that leaves takes its worker with it; every request sent meanwhile is answered (served,
    or a clear error), none hangs, and the model is served again from the other node."""
    cluster.add_node(num_cpus=1)
    wait_until(lambda: len(_workers(server)) == 3, 120.0, "the new node's worker to join the pool")
    server.deploy(MODELS / "sleepy.py:Sleepy", "--option", "seconds=0.02", "--on-unmeetable", "best-effort")
    one = {"x": np.array([[1]], dtype=np.int64)}
    assert server.infer_json("sleepy", one).status_code == 200
    (host,) = [w for w in _workers(server) if any(m.startswith("sleepy@") for m in w["models"])]
    victim = next(node for node in cluster.list_all_nodes() if node.node_id == host["node"])
    assert not victim.head

    answered: list[httpx.Response | Exception] = []
    stop = threading.Event()

    def hammer(n: int) -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT_S, headers={"Authorization": f"Bearer {server.key}"}) as http:
            while not stop.is_set():
                body = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 1], "data": [n]}]}
                try:
                    answered.append(http.post(f"{server.url}/v2/models/sleepy/infer", json=body))
                except httpx.HTTPError as exc:  # a hang would end here, after HTTP_TIMEOUT_S
                    answered.append(exc)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(hammer, n) for n in range(8)]
        wait_until(lambda: len(answered) >= 40, 120.0, "requests served before the node leaves")
        cluster.remove_node(victim)
        wait_until(lambda: host["id"] not in {w["id"] for w in _workers(server)}, 60.0, "the worker to be lost")
        served_before = len(answered)
        wait_until(lambda: len(answered) >= served_before + 40, 120.0, "requests served after the node left")
        stop.set()
        for each in clients:
            each.result()

    failures = [a for a in answered if isinstance(a, Exception)]
    assert not failures, failures[:3]
    statuses = [a.status_code for a in answered if isinstance(a, httpx.Response)]
    bad = [a for a in answered if isinstance(a, httpx.Response) and a.status_code != 200]
    for response in bad:  # a clear error that says what happened, never a bare failure
        assert response.status_code in (500, 503), response.text
        assert len(response.json()["error"]) > 20, response.text
    assert statuses.count(200) >= 80, statuses
    assert server.infer_json("sleepy", one).status_code == 200
    assert victim.node_id not in {w["node"] for w in _workers(server)}


def test_unreachable_cluster_fails_clearly(tmp_path: Path) -> None:
    import subprocess
    import sys

    from harness import child_env, free_port

    command = [sys.executable, "-m", "ember.cli", "serve", "--home", str(tmp_path / "home")]
    command += ["--port", str(free_port()), "--cluster", f"127.0.0.1:{free_port()}"]
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "cannot reach the Ray cluster" in done.stdout + done.stderr, done.stdout + done.stderr
