"""Warm path: what Ember adds to a request for a model that is already hot.

    python benchmarks/warm_path.py [--duration-s 5] [--concurrency 1 32] [--json out.json]

Claim (DESIGN.md §3, the gateway <-> worker hop): for a trivial model, Ember adds at most 1 ms to the
median request, and at concurrency 32 it serves at least as many requests per second as a plain
FastAPI + uvicorn server that runs the same model inline.

* Model: ``examples/linear.py:Linear`` (16 -> 16), one row per request, OIP v2 JSON both ways; on the
  CPU, or with ``--device cuda`` on the GPU for both servers (Ember's worker and the baseline's inline
  model), so a batch costs a host -> device copy, the layer and the copy back.
* Baseline: a FastAPI app under uvicorn (uvloop, httptools, log level warning, one process) that
  builds the same layer with the same weights and answers ``POST /v2/models/linear/infer`` in the
  same JSON format by calling the model inline on its event loop. This script is that server when run
  with ``--serve-baseline``.
* Ember: ``python -m ember.cli serve --workers 1`` with the model deployed through ``ember.Client``.
* Client: the keep-alive HTTP/1.1 load generator of ``_common.py``, one connection per concurrent
  request, the same request bytes for both servers. The servers run one at a time: client, gateway,
  worker and baseline would otherwise share the same cores.

Ember's own counters (``/metrics``) then say where its time goes: compute per batch (measured in the
worker), rows per batch, queueing, and what is left for the gateway <-> worker hop.
"""

import argparse
import json
import pickle
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c
import httpx
import numpy as np

MODEL = "linear"
SOURCE = f"{c.ROOT / 'examples' / 'linear.py'}:Linear"
INFER_PATH = f"/v2/models/{MODEL}/infer"
# Ember's counters (Triton's names) read before and after each measurement; a ``_total`` suffix, as
# prometheus_client writes counters, is ignored.
COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_exec_count",
    "nv_inference_count",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_queue_duration_us",
    "ember_request_duration_seconds_sum",
    "ember_request_duration_seconds_count",
)


# -- the baseline server ---------------------------------------------------------------------------


def serve_baseline(port: int, device: str = "cpu") -> None:
    """A plain FastAPI app that runs examples/linear.py inline; the uvicorn settings are Ember's.

    (This module has no ``from __future__ import annotations``: FastAPI must see ``Request`` itself.)
    """
    import importlib.util

    import torch
    import uvicorn
    from fastapi import FastAPI, Request, Response

    spec = importlib.util.spec_from_file_location("linear_example", c.ROOT / "examples" / "linear.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Linear()
    target = torch.device(device)
    model.setup({k: v.to(target) for k, v in model.source_weights().items()}, {}, target)

    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post(INFER_PATH)
    async def infer(request: Request) -> Response:
        body = json.loads(await request.body())
        (tensor,) = body["inputs"]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        y = model.predict({"x": x})["y"]
        answer = {
            "model_name": MODEL,
            "model_version": "1",
            "outputs": [{"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}],
        }
        return Response(json.dumps(answer), media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning", lifespan="off")


# -- measuring -------------------------------------------------------------------------------------


def request_body() -> bytes:
    x = [round(0.25 * i - 2.0, 2) for i in range(16)]
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": x}]}).encode()


def answer_of(url: str) -> np.ndarray:
    response = httpx.post(url + INFER_PATH, content=request_body(), headers={"Content-Type": "application/json"})
    response.raise_for_status()
    (output,) = response.json()["outputs"]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def scrape(url: str) -> dict[str, float]:
    """Ember's counters for the model, from ``/metrics``."""
    values = dict.fromkeys(COUNTERS, 0.0)
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, rest = line.partition("{")
        name = name.removesuffix("_total")
        if name in values and f'model="{MODEL}"' in rest:
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


@dataclass
class Cell:
    """One server at one concurrency, pooled over the rounds."""

    server: str
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0
    first_error: str = ""
    round_rps: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0.0))

    def add(self, load: c.LoadResult, cpu_s: dict[str, float], counters: dict[str, float] | None) -> None:
        self.latencies_s += load.latencies_s
        self.seconds += load.elapsed_s
        self.errors += load.errors
        self.first_error = self.first_error or load.first_error
        self.round_rps.append(load.rps)
        for process, seconds in cpu_s.items():
            self.cpu_s[process] = self.cpu_s.get(process, 0.0) + seconds
        for name, delta in (counters or {}).items():
            self.counters[name] += delta

    def row(self) -> dict[str, Any]:
        n = len(self.latencies_s)
        row: dict[str, Any] = {
            "server": self.server,
            "concurrency": self.concurrency,
            "requests": n,
            "errors": self.errors,
            "seconds": self.seconds,
            "rps": n / self.seconds if self.seconds else float("nan"),
            "round_rps": self.round_rps,
            "p50_ms": 1000 * c.percentile(self.latencies_s, 50),
            "p99_ms": 1000 * c.percentile(self.latencies_s, 99),
            "mean_ms": 1000 * sum(self.latencies_s) / max(1, n),
            "cpu_us_per_request": {k: 1e6 * v / max(1, n) for k, v in self.cpu_s.items() if k != "client"},
            "client_cpu_us_per_request": 1e6 * self.cpu_s.get("client", 0.0) / max(1, n),
        }
        if self.errors:
            row["first_error"] = self.first_error
        if self.server == "ember":
            row["inside"] = inside(self.counters)
        return row


def inside(d: dict[str, float]) -> dict[str, float]:
    """Per batch and per request figures from the growth of Ember's counters."""
    batches = d["nv_inference_exec_count"] or float("nan")
    requests = d["ember_request_duration_seconds_count"] or float("nan")
    in_server_us = 1e6 * d["ember_request_duration_seconds_sum"] / requests
    queue_us = d["nv_inference_queue_duration_us"] / requests
    compute_us = d["nv_inference_compute_infer_duration_us"] / batches
    return {
        "batches": d["nv_inference_exec_count"],
        "rows_per_batch": d["nv_inference_count"] / batches,
        "compute_us_per_batch": compute_us,
        "queue_us_per_request": queue_us,
        "in_server_us_per_request": in_server_us,
        # Every request of a batch waits from dispatch to answer for the same round trip; what the
        # worker did not spend computing went on the hop (pickling, the socket, both event loops).
        "hop_us_per_batch": in_server_us - queue_us - compute_us,
    }


def measure_cell(
    server: c.Server, ember: bool, concurrency: int, seconds: float, args: argparse.Namespace
) -> tuple[c.LoadResult, dict[str, float], dict[str, float] | None]:
    """Warm up, then load ``server`` for ``seconds``: the load, CPU by process, and counter growth."""
    raw = c.http_request("127.0.0.1", server.port, "POST", INFER_PATH, request_body(), "application/json")
    c.run_async(lambda: c.run_load("127.0.0.1", server.port, raw, concurrency, args.warmup_s, args.max_requests))
    counters_before = scrape(server.url) if ember else None
    cpu_before = server.cpu_s()
    client_before = time.process_time()
    load: c.LoadResult = c.run_async(
        lambda: c.run_load("127.0.0.1", server.port, raw, concurrency, seconds, args.max_requests)
    )
    client_s = time.process_time() - client_before
    cpu_after = server.cpu_s()
    assert server.process is not None
    cpu: dict[str, float] = {"client": client_s}
    for pid, used in cpu_after.items():
        name = ("gateway" if ember else "server") if pid == server.process.pid else "worker"
        cpu[name] = cpu.get(name, 0.0) + used - cpu_before.get(pid, 0.0)
    counters = None
    if counters_before is not None:
        after = scrape(server.url)
        counters = {k: after[k] - counters_before[k] for k in COUNTERS}
    return load, cpu, counters


async def hop_alone(scratch: Path, iterations: int, batch_sizes: Sequence[int]) -> dict[str, Any]:
    """The gateway <-> worker round trip without HTTP: ``LocalWorker.infer`` timed from the caller, the
    worker's own compute taken out; beside it the floor, a bare socketpair echo between two processes."""
    from ember.cluster.local import LocalBackend
    from ember.worker.protocol import Infer

    backend = LocalBackend(1, scratch / "hop-logs", "cpu", preload=("numpy",))  # Ember's default threads
    await backend.start()
    try:
        (worker,) = backend.workers()
        staging = scratch / "hop-staging"
        staging.mkdir()
        await worker.import_model(SOURCE, {}, str(staging))
        (weights,) = [path for path in staging.iterdir() if path.is_file()]  # beside it: assets/
        await worker.load("linear@1", SOURCE, {}, str(weights), {})
        x = np.asarray(json.loads(request_body())["inputs"][0]["data"], dtype=np.float32).reshape(1, 16)
        rows = []
        for size in batch_sizes:
            requests = [{"x": x.copy()} for _ in range(size)]
            trips: list[float] = []
            hops: list[float] = []
            for i in range(iterations + iterations // 10):  # the first tenth warms up
                start = time.perf_counter()
                batch = await worker.infer("linear@1", requests)
                trip = time.perf_counter() - start
                if i >= iterations // 10:
                    trips.append(trip)
                    hops.append(trip - batch.compute_s)
            rows.append(
                {
                    "requests_per_batch": size,
                    "round_trip_p50_us": 1e6 * c.percentile(trips, 50),
                    "compute_p50_us": 1e6 * (c.percentile(trips, 50) - c.percentile(hops, 50)),
                    "hop_p50_us": 1e6 * c.percentile(hops, 50),
                    "hop_p99_us": 1e6 * c.percentile(hops, 99),
                }
            )
    finally:
        await backend.stop()
    frame = len(pickle.dumps(Infer(1, "linear@1", [{"x": x}]), protocol=5)) + 4
    return {"rows": rows, "floor_p50_us": 1e6 * socket_echo_p50_s(frame, iterations)}


def socket_echo_p50_s(frame_bytes: int, iterations: int) -> float:
    """Median round trip of ``frame_bytes`` through a child process that echoes them (blocking sockets)."""
    parent, child = socket.socketpair()
    code = "import socket,sys\ns=socket.socket(fileno=int(sys.argv[1]))\nwhile d:=s.recv(65536): s.sendall(d)"
    echo = subprocess.Popen([c.PYTHON, "-c", code, str(child.fileno())], pass_fds=(child.fileno(),))
    child.close()
    payload = b"x" * frame_bytes
    trips: list[float] = []
    try:
        for _ in range(iterations + iterations // 10):
            start = time.perf_counter()
            parent.sendall(payload)
            got = 0
            while got < frame_bytes:
                got += len(parent.recv(65536))
            trips.append(time.perf_counter() - start)
    finally:
        parent.close()
        echo.wait(timeout=10)
    return c.percentile(trips[iterations // 10 :], 50)


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Both servers up; each cell measured in ``rounds`` slices, the servers taking turns, never together."""
    baseline_port = c.free_port()
    script = str(Path(__file__).resolve())
    baseline = c.Server(
        [c.PYTHON, script, "--serve-baseline", "--port", str(baseline_port), "--device", args.device],
        scratch / "baseline.log",
        baseline_port,
    )
    ember = c.ember_server(scratch / "ember-home", c.free_port(), workers=1, options=["--device", args.device])
    cells = {(name, conc): Cell(name, conc) for name in ("baseline", "ember") for conc in args.concurrency}
    load_average = [c.load_average()]
    with baseline, ember:
        with c.step("starting the baseline (FastAPI + uvicorn, model inline) and Ember (1 worker)"):
            baseline.wait_ready("/v2/health/ready")
            ember.wait_ready("/v2/health/ready")
            from ember import Client

            with Client(ember.url) as client:
                client.deploy(SOURCE, name=MODEL)
            expected, got = answer_of(baseline.url), answer_of(ember.url)
            if not np.allclose(got, expected, rtol=1e-5, atol=1e-5):
                raise SystemExit(f"Ember and the baseline disagree: {got} vs {expected}")
        slice_s = args.duration_s / args.rounds
        servers = [("baseline", baseline), ("ember", ember)]
        for round_ in range(args.rounds):
            with c.step(f"round {round_ + 1} of {args.rounds}: {slice_s:.2f} s per cell"):
                for conc in args.concurrency:
                    # Alternate who goes first, so that drift in the machine's load hits both alike.
                    for name, server in servers if round_ % 2 == 0 else servers[::-1]:
                        load, cpu, counters = measure_cell(server, name == "ember", conc, slice_s, args)
                        cells[(name, conc)].add(load, cpu, counters)
                        print(
                            f"    {name:>8} c={conc:<3} {load.rps:7.0f} req/s  p50 {load.percentile_ms(50):7.3f} ms"
                            f"  p99 {load.percentile_ms(99):8.3f} ms  errors {load.errors}",
                            flush=True,
                        )
            load_average.append(c.load_average())
    hop: dict[str, Any] = {}
    if args.hop_iterations > 0:
        with c.step(f"the hop alone: {args.hop_iterations} batches per size, no HTTP"):
            hop = c.run_async(lambda: hop_alone(scratch, args.hop_iterations, (1, 32)))
    return {
        "hop_alone": hop,
        "baseline": [cells[("baseline", conc)].row() for conc in args.concurrency],
        "ember": [cells[("ember", conc)].row() for conc in args.concurrency],
        "load_average": load_average,
    }


def report(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [*results["baseline"], *results["ember"]]
    print("\nWarm path: Linear(16, 16), one row per request, OIP v2 JSON, closed loop, rounds pooled")
    c.print_table(
        ["server", "concurrency", "requests", "errors", "req/s", "p50 ms", "p99 ms", "mean ms", "CPU us/req", "client"],
        [
            [
                r["server"],
                r["concurrency"],
                r["requests"],
                r["errors"],
                r["rps"],
                r["p50_ms"],
                r["p99_ms"],
                r["mean_ms"],
                _cpu(r["cpu_us_per_request"]),
                r["client_cpu_us_per_request"],
            ]
            for r in rows
        ],
    )
    ratios: list[dict[str, Any]] = []
    for b, e in zip(results["baseline"], results["ember"], strict=True):
        per_round = [er / br for br, er in zip(b["round_rps"], e["round_rps"], strict=True) if br]
        ratios.append(
            {
                "concurrency": b["concurrency"],
                "added_p50_ms": e["p50_ms"] - b["p50_ms"],
                "added_p99_ms": e["p99_ms"] - b["p99_ms"],
                "p50_ratio": e["p50_ms"] / b["p50_ms"],
                "throughput_ratio": e["rps"] / b["rps"] if b["rps"] else float("nan"),
                "throughput_ratio_per_round": per_round,
                "cpu_ratio": sum(e["cpu_us_per_request"].values()) / max(1e-9, sum(b["cpu_us_per_request"].values())),
            }
        )
    print("\nEmber against the baseline (goal: added p50 <= 1 ms; at c=32, throughput ratio >= 1)")
    c.print_table(
        ["concurrency", "added p50 ms", "added p99 ms", "throughput ratio", "per round", "CPU/req ratio", "goal"],
        [
            [
                r["concurrency"],
                r["added_p50_ms"],
                r["added_p99_ms"],
                r["throughput_ratio"],
                " ".join(f"{x:.2f}" for x in r["throughput_ratio_per_round"]),
                r["cpu_ratio"],
                _goal(r),
            ]
            for r in ratios
        ],
    )
    print("\nInside Ember (from /metrics; hop = in-server - queue - compute, per batch)")
    c.print_table(
        [
            "concurrency",
            "batches",
            "rows/batch",
            "compute us/batch",
            "queue us/req",
            "in-server us/req",
            "hop us/batch",
        ],
        [
            [
                e["concurrency"],
                int(e["inside"]["batches"]),
                e["inside"]["rows_per_batch"],
                e["inside"]["compute_us_per_batch"],
                e["inside"]["queue_us_per_request"],
                e["inside"]["in_server_us_per_request"],
                e["inside"]["hop_us_per_batch"],
            ]
            for e in results["ember"]
        ],
    )
    hop = results["hop_alone"]
    if hop:
        print(
            "\nThe hop alone (LocalWorker.infer from this process, no HTTP, nothing else running;"
            f" floor: a bare socketpair echo between two processes, {hop['floor_p50_us']:.0f} us p50)"
        )
        c.print_table(
            ["requests/batch", "round trip p50 us", "compute p50 us", "hop p50 us", "hop p99 us", "hop / floor"],
            [
                [
                    r["requests_per_batch"],
                    r["round_trip_p50_us"],
                    r["compute_p50_us"],
                    r["hop_p50_us"],
                    r["hop_p99_us"],
                    r["hop_p50_us"] / hop["floor_p50_us"],
                ]
                for r in hop["rows"]
            ],
        )
    averages = " -> ".join(f"{x:.2f}" for x in results["load_average"])
    print(f"\none-minute load average during the run: {averages} {c.LOAD_NOTE}")
    return ratios


def _cpu(per_process: dict[str, float]) -> str:
    parts = [f"{name} {us:.0f}" for name, us in sorted(per_process.items())]
    return " + ".join(parts) if len(parts) > 1 else parts[0] if parts else "-"


def _goal(ratio: dict[str, Any]) -> str:
    latency_ok = ratio["added_p50_ms"] <= 1.0
    if ratio["concurrency"] >= 32:
        throughput_ok = ratio["throughput_ratio"] >= 1.0
        return f"p50 {'met' if latency_ok else 'missed'}, throughput {'met' if throughput_ok else 'missed'}"
    return f"p50 {'met' if latency_ok else 'missed'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=6.0, help="Measured seconds per cell, all rounds.")
    parser.add_argument("--rounds", type=int, default=3, help="Slices per cell, the servers taking turns.")
    parser.add_argument("--warmup-s", type=float, default=0.5, help="Unmeasured seconds before each slice.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="Concurrent connections.")
    parser.add_argument("--max-requests", type=int, default=100_000, help="Most requests per slice.")
    parser.add_argument(
        "--hop-iterations", type=int, default=2000, help="Batches per size for the hop alone (0: skip)."
    )
    parser.add_argument("--device", default="cpu", help="Where both run the model: cpu or cuda (default cpu).")
    parser.add_argument("--json", type=Path, help="Write the figures here.")
    parser.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.port, args.device)
        return
    with tempfile.TemporaryDirectory(prefix="ember-warm-path-") as scratch:
        results = run(args, Path(scratch))
    ratios = report(results)
    c.write_json(
        args.json,
        {
            "benchmark": "warm_path",
            "machine": c.machine(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "serve_baseline", "port")},
            "rows": [*results["baseline"], *results["ember"]],
            "ratios": ratios,
            "hop_alone": results["hop_alone"],
            "load_average": results["load_average"],
        },
    )


if __name__ == "__main__":
    main()
