"""``ember serve`` killed with SIGKILL: its workers die with it, even one busy in a batch, and a restart
finds the models whose warm copies survived in shared memory warm."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from harness import EXAMPLES, MODELS, SLEEPY, Server, json_request, process_running, served, wait_until


def test_workers_die_with_a_killed_server_and_a_restart_finds_models_warm(tmp_path: Path) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    with served(Server(tmp_path / "home", workers=1)) as server:
        server.deploy(f"{EXAMPLES / 'linear.py'}:Linear", "--name", "keeper")
        assert server.tier("keeper") == "hot"
        # Its gate never opens while the server lives: the batch runs for as long as gate_timeout_s.
        options = ("--option", f"gate_dir={json.dumps(str(gates))}", "--option", "gate_timeout_s=3600")
        server.deploy(f"{MODELS / 'sleepy.py'}:Sleepy", "--name", "held", *SLEEPY, *options)
        workers = server.status()["workers"]
        pids = [int(w["pid"]) for w in [*workers["workers"], *workers.get("spare_workers", [])] if w["pid"]]
        url = f"{server.url}/v2/models/held/infer"
        with ThreadPoolExecutor(max_workers=1) as pool, httpx.Client(timeout=600, headers=server.auth) as http:
            request = pool.submit(http.post, url, json=json_request({"x": np.array([[1]], dtype=np.int64)}))
            wait_until(
                lambda: any(w["in_flight"] for w in server.status()["workers"]["workers"]), 60, "the batch to start"
            )
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGKILL)  # the server alone, not its process group
            server.proc.wait(timeout=60)
            server.proc = None
            try:
                left = wait_until(
                    lambda: not [p for p in pids if process_running(p)] or None, 60, f"workers {pids} to exit"
                )
            finally:
                (gates / "1").touch()
                for pid in pids:  # without the lifeline: do not leave them behind
                    if process_running(pid):
                        os.kill(pid, signal.SIGKILL)
            assert left
            assert isinstance(request.exception(timeout=60), httpx.HTTPError)  # no answer: the server died
        server.start()
        # The warm copies in shared memory outlived the server and check out against the store.
        assert server.tier("keeper") == "warm"
        x = np.ones((1, 16), dtype=np.float32)
        assert server.infer_json("keeper", {"x": x}).status_code == 200
