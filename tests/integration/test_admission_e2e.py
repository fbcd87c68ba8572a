"""Admission on a real ``ember serve``: learning never locks a model out, and the quick start works on a
busy host.

- A model whose first three ``predict`` calls take 3x its SLO (the deploy-time warm-up sees them)
  answers at least 90% of spaced calls afterwards, with the default settings; without a warm-up
  the slow calls hit real requests, and refusals stay few and end.
- ``ember update`` changes a deployed model's SLO in place.
- The quick-start flow (``ember serve --deploy examples/minilm.py:MiniLM``, the ``curl`` it prints and
  the README's two-text request) works first time while other processes keep every core busy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from harness import MODELS, REPO, Server, child_env, json_output, served, smollm2_gguf, wait_until

FIRST_SLOW = f"{MODELS / 'first_slow.py'}:FirstSlow"
#: Spaced calls: each finds the model idle, as a user's occasional request does.
CALLS, GAP_S = 40, 0.1


def _spaced_calls(server: Server, name: str) -> list[int]:
    statuses = []
    for i in range(CALLS):
        x = np.array([[i]], dtype=np.int64)
        response = server.infer_json(name, {"x": x})
        statuses.append(response.status_code)
        if response.status_code == 200:
            np.testing.assert_array_equal(json_output(response, "y"), x)
        else:
            assert response.status_code == 429, response.text
        time.sleep(GAP_S)
    return statuses


def test_a_model_slow_at_first_answers_nine_in_ten_spaced_calls_after_it(server: Server) -> None:
    server.deploy(FIRST_SLOW, "--name", "first-slow")  # every default: SLO 100 ms, warm-up on, refuse
    statuses = _spaced_calls(server, "first-slow")
    assert statuses.count(200) >= 0.9 * CALLS, statuses


def test_without_a_warm_up_the_slow_calls_are_probes_and_refusals_stay_few(server: Server) -> None:
    # The three slow calls are real requests now: the first after the load is not counted, each slow
    # one measured is followed by at most PROBE_AFTER_REFUSALS (3) refusals, then a probe; after the
    # first fast probe every call is admitted.
    server.deploy(FIRST_SLOW, "--name", "first-slow-cold", "--no-warmup")
    statuses = _spaced_calls(server, "first-slow-cold")
    assert statuses.count(429) <= 6, statuses
    assert 429 not in statuses[12:], statuses


def test_ember_update_changes_the_slo_in_place(server: Server) -> None:
    server.deploy(FIRST_SLOW, "--name", "first-slow-update", "--option", "slow_calls=0")
    before = server.model("first-slow-update")
    done = server.cli("update", "first-slow-update", "--slo-ms", "750", "--keepalive-hot-s", "120")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "SLO 750 ms" in done.stdout
    after = server.model("first-slow-update")
    assert after["slo_ms"] == 750 and after["version"] == before["version"] and after["tier"] == "hot"
    bad = server.cli("update", "first-slow-update", "--slo-ms", "0")
    assert bad.returncode != 0


@pytest.fixture
def cpu_hog() -> Iterator[None]:
    """Two busy processes per core for the test's whole length: a loaded host."""
    spin = "import itertools\nfor _ in itertools.count(): pass\n"
    hogs = [
        subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.DEVNULL, start_new_session=True)
        for _ in range(2 * (os.cpu_count() or 2))
    ]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _readme_curl(home: Path, port: int) -> str:
    """The README's quick-start ``curl`` (two texts), pointed at this server and its home."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"```bash\n(curl -s localhost:8000/v1/embeddings.*?)\n```", readme, re.DOTALL)
    assert match, "the README's quick-start curl is missing"
    return match.group(1).replace("localhost:8000", f"127.0.0.1:{port}").replace("~/.ember", str(home))


def _curl(command: str) -> tuple[int, str]:
    """Run a printed ``curl`` as a user pastes it, adding only ``-w`` to see the status."""
    done = subprocess.run(
        ["bash", "-c", command.replace("curl -s ", "curl -s -w '\\n%{http_code}' ", 1)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=child_env(),
    )
    body, _, status = done.stdout.rpartition("\n")
    return int(status or 0), body


def test_the_quick_start_works_first_time_beside_a_cpu_hog(tmp_path: Path, cpu_hog: None) -> None:
    home = tmp_path / "home"
    # What scripts/quickstart.sh runs, after its install step: serve, deploying MiniLM.
    quick = Server(home, args=("--deploy", "examples/minilm.py:MiniLM"))
    with served(quick):
        printed = wait_until(
            lambda: re.search(r"^\s*(curl -s .*)$", quick.log_path.read_text(errors="replace"), re.MULTILINE),
            600,
            "the quick start to print its curl",
            interval_s=0.5,
        )
        status, body = _curl(printed.group(1))
        assert status == 200, f"{status} {body}\n{quick.log_tail()}"
        assert len(_embeddings(body)) == 1
        status, body = _curl(_readme_curl(home, quick.port))
        assert status == 200, f"{status} {body}\n{quick.log_tail()}"
        assert len(_embeddings(body)) == 2


def _embeddings(body: str) -> list[list[float]]:
    import json

    data = json.loads(body)["data"]
    assert all(len(item["embedding"]) == 384 for item in data)
    return [item["embedding"] for item in data]


def test_the_chat_quick_start_answers_its_printed_curl_beside_a_cpu_hog(tmp_path: Path, cpu_hog: None) -> None:
    home = tmp_path / "home"
    # What `scripts/quickstart.sh chat` runs, after its install step: serve, deploying SmolLM2's GGUF.
    quick = Server(home, args=("--deploy", f"smollm2={smollm2_gguf()}"))
    with served(quick):
        printed = wait_until(
            lambda: re.search(r"^\s*(curl -s .*)$", quick.log_path.read_text(errors="replace"), re.MULTILINE),
            600,
            "the chat quick start to print its curl",
            interval_s=0.5,
        )
        assert "/v1/chat/completions" in printed.group(1)
        status, body = _curl(printed.group(1))
        assert status == 200, f"{status} {body}\n{quick.log_tail()}"
        import json

        (choice,) = json.loads(body)["choices"]
        assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
