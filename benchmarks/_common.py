"""What the benchmarks share: servers run as subprocesses, a keep-alive HTTP/1.1 load generator, tables.

The load generator speaks just enough HTTP/1.1 for the benchmarks: one persistent connection per
concurrent worker, the same prepared request bytes sent again and again, and each answer read by its
status line and ``Content-Length``. It is a closed loop (a worker sends its next request when the
last one is answered) bounded both in requests and in seconds. It is the same client for Ember and
for every baseline, so whatever it costs, it costs both alike.

Every process started here gets ``HF_HUB_OFFLINE=1``: the benchmarks never leave the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # this process, and all it starts
OFFLINE_ENV = dict(os.environ)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- servers ---------------------------------------------------------------------------------------


class Server:
    """A server subprocess (in its own session) whose output goes to ``log_path``; stopped on exit."""

    def __init__(self, args: Sequence[str], log_path: Path, port: int) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=OFFLINE_ENV, start_new_session=True
            )
        finally:
            log.close()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, path: str, timeout_s: float = 120.0) -> None:
        """Poll ``GET path`` until it answers 200; fail with the log's end if the process dies or time runs out."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.args[:4]} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=2.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{self.url}{path} not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, wait, then SIGKILL the server's own process group (it and the workers it started)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def cpu_s(self) -> dict[int, float]:
        """CPU seconds (user + system) used so far by each live process of the server's session."""
        assert self.process is not None
        return session_cpu_s(self.process.pid)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(tail_lines(self.log_path, lines)) or "(empty log)"


def tail_lines(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return [f"(cannot read {path})"]


def session_cpu_s(sid: int) -> dict[int, float]:
    """CPU seconds of every live process in session ``sid`` (a server started in its own session)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = text[text.rfind(")") + 2 :].split()
        # After the command: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime
        if int(fields[3]) == sid:
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return found


LOAD_NOTE = "(this benchmark keeps 1 to 3 processes busy; more than that means other work shared the CPUs)"


def load_average() -> float:
    """The one-minute load average, to tell a quiet machine from a shared one."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def ember_server(
    home: Path,
    port: int,
    workers: int = 1,
    tick_s: float | None = None,
    threads: int | None = None,
    options: Sequence[str] = (),
) -> Server:
    """``python -m ember.cli serve`` on ``port`` with its own ``home``; its log is ``home/serve.log``.

    ``--insecure`` (loopback only): the load generators send no API key. Requests still pass the
    gateway's key check, which lets them through as admin.
    """
    home.mkdir(parents=True, exist_ok=True)
    args = [PYTHON, "-m", "ember.cli", "serve", "--workers", str(workers), "--port", str(port), "--home", str(home)]
    args += ["--insecure"]
    if tick_s is not None:
        args += ["--tick-s", str(tick_s)]
    if threads is not None:
        args += ["--threads", str(threads)]
    return Server([*args, *options], home / "serve.log", port)


# -- the load generator ----------------------------------------------------------------------------


def http_request(
    host: str, port: int, method: str, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None
) -> bytes:
    """A complete HTTP/1.1 keep-alive request, ready to be sent as is."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n{extra}"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("ascii") + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One answer: its status and its body (the body must have a ``Content-Length``); the load
    generator's fast path, which looks at no other header."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise RuntimeError(f"answer without Content-Length: {head[:200]!r}")
    end = lower.index(b"\r\n", at + 2)
    body = await reader.readexactly(int(lower[at + 17 : end]))
    return status, body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer: its status, its headers (lower-case names) and its body (it needs a ``Content-Length``)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    if "content-length" not in headers:
        raise RuntimeError(f"answer without Content-Length: {head[:200]!r}")
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def request_once(host: str, port: int, raw: bytes) -> tuple[int, bytes, float]:
    """Connect, send ``raw``, read the answer, close: (status, body, seconds from connect to answer)."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        status, body = await read_response(reader)
        return status, body, time.perf_counter() - start
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@dataclass
class LoadResult:
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0
    first_error: str = ""

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return 1000.0 * percentile(self.latencies_s, q)


async def run_load(
    host: str, port: int, raw: bytes, concurrency: int, duration_s: float, max_requests: int
) -> LoadResult:
    """``concurrency`` connections sending ``raw`` back to back until ``duration_s`` or ``max_requests``."""
    result = LoadResult(concurrency)
    left = [max_requests]
    connections = [await asyncio.open_connection(host, port) for _ in range(concurrency)]
    start = time.perf_counter()
    stop_at = start + duration_s
    last = [start]

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while left[0] > 0 and time.perf_counter() < stop_at:
            left[0] -= 1
            sent = time.perf_counter()
            writer.write(raw)
            status, body = await read_response(reader)
            done = time.perf_counter()
            last[0] = max(last[0], done)
            if status == 200:
                result.latencies_s.append(done - sent)
            else:
                result.errors += 1
                result.first_error = result.first_error or f"HTTP {status}: {body[:200]!r}"

    try:
        await asyncio.gather(*(worker(r, w) for r, w in connections))
    finally:
        for _, writer in connections:
            writer.close()
    result.elapsed_s = last[0] - start
    return result


def run_async(main: Callable[[], Any]) -> Any:
    """Run a coroutine function on uvloop (as the servers do) when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


# -- figures and reports ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest-rank on the sorted values; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table, columns padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = (c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
    for row in cells[1:]:
        print(line(row))


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        size = abs(value)
        digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 else 3
        return f"{value:,.{digits}f}"
    return str(value)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    mem_gb = float("nan")
    with contextlib.suppress(OSError, ValueError, IndexError):
        for text in Path("/proc/meminfo").read_text().splitlines():
            if text.startswith("MemTotal:"):
                mem_gb = int(text.split()[1]) / 1024**2
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_gb, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
    return info


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Say what is happening, and how long it took."""
    print(f"... {what}", flush=True)
    start = time.perf_counter()
    yield
    print(f"    done in {time.perf_counter() - start:.1f} s", flush=True)
