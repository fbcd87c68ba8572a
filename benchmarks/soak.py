"""Soak: a mixed workload under random faults, then ten times the capacity; every request is counted.

    python benchmarks/soak.py [--duration-s 120] [--rate 40] [--fault-every-s 4] [--overload-s 15]
                              [--overload-factor 10] [--seed 0] [--json out.json]

Claim (issue 5): whatever happens, every request Ember accepted gets an answer, a result or a clear
error. **Lost** (no HTTP answer at all: the connection broke or the client's 60 s timeout passed)
must be 0; the script exits 1 otherwise.

* **Server.** ``ember serve --workers 2 --batch-timeout-s 3 --worker-memory-mb 1200`` (and the
  default spare worker).
* **Models.** ``steady`` (sleepy, 5 ms a batch, up to 8 rows), ``linear`` (examples/linear.py),
  ``faulty`` (raises on a marker row), ``hangs`` (never returns on a marker row), ``leaks`` (keeps
  16 MiB more after every batch) and ``churn`` (sleepy with 1 s / 2 s keep-alives, so it falls to the
  warm and cool tiers between requests and is promoted again).
* **Mixed phase.** Open-loop Poisson arrivals at ``--rate`` across the models. Every
  ``--fault-every-s`` one fault at random: SIGKILL a worker; a poisoned request (the model raises);
  a request that hangs its worker until the batch timeout; ``unload`` of ``steady`` (the next
  request brings it back); a two-second burst at ten times the rate onto ``steady``.
* **Overload phase.** ``slow`` (sleepy, 50 ms a batch, one row a batch, queue of 8, SLO 1 s). Its
  capacity is measured closed-loop, then it is offered ``--overload-factor`` times that, open-loop,
  for ``--overload-s``. Reported: what was served and refused, whether the admitted requests met
  their SLO, how fast refusals came back, and the gateway's memory before and after.

Answers are checked: a 200 must carry the request's own values back. Refusals (429/503) must carry
``Retry-After``; they and failures are counted by the ``Ember-Error`` header. Expected failures
(the poisoned and hanging requests, which the script sends on purpose) are counted apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c
import httpx

MODELS = c.ROOT / "tests" / "integration" / "models"
CLIENT_TIMEOUT_S = 60.0
SLOW_SLO_MS = 1000
FAULTS = ("kill-worker", "poison", "hang", "unload", "burst")


@dataclass
class Tally:
    """What happened to every request of one phase."""

    sent: int = 0
    answered: int = 0
    succeeded: int = 0
    wrong: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    refused_without_retry_after: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    failed_examples: dict[str, str] = field(default_factory=dict)
    expected_failures: int = 0
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    ok_latencies_s: list[float] = field(default_factory=list)
    refused_latencies_s: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "succeeded": self.succeeded,
            "wrong_answers": self.wrong,
            "refused": dict(self.refused),
            "refused_without_retry_after": self.refused_without_retry_after,
            "failed": dict(self.failed),
            "failed_examples": self.failed_examples,
            "expected_failures": self.expected_failures,
            "lost": self.lost,
            "lost_examples": self.lost_examples[:5],
            "ok_p50_ms": 1000 * c.percentile(self.ok_latencies_s, 50),
            "ok_p99_ms": 1000 * c.percentile(self.ok_latencies_s, 99),
            "refused_p99_ms": 1000 * c.percentile(self.refused_latencies_s, 99),
        }


def infer_body(value: float, columns: int = 1, datatype: str = "INT64") -> dict[str, Any]:
    data: list[float] = [value] * columns
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": [1, columns], "data": data}]}


async def send(
    client: httpx.AsyncClient,
    tally: Tally,
    model: str,
    body: dict[str, Any],
    expect: list[float] | None,
    injected: bool,
) -> float | None:
    """One request, counted; returns its latency when it succeeded."""
    tally.sent += 1
    start = time.perf_counter()
    try:
        response = await client.post(f"/v2/models/{model}/infer", json=body)
    except httpx.HTTPError as exc:
        tally.lost += 1
        tally.lost_examples.append(f"{model}: {type(exc).__name__}: {exc}")
        return None
    elapsed = time.perf_counter() - start
    tally.answered += 1
    reason = f"{response.status_code} {response.headers.get('ember-error', '?')}"
    if response.status_code == 200:
        (output,) = response.json()["outputs"]
        if expect is not None and output["data"] != expect:
            tally.wrong += 1
        tally.succeeded += 1
        tally.ok_latencies_s.append(elapsed)
        return elapsed
    if response.status_code in (429, 503):
        tally.refused[reason] += 1
        tally.refused_latencies_s.append(elapsed)
        if "retry-after" not in response.headers:
            tally.refused_without_retry_after += 1
    elif injected:
        tally.expected_failures += 1
    else:
        tally.failed[reason] += 1
        tally.failed_examples.setdefault(f"{model} {reason}", response.text[:300])
    return None


class Traffic:
    """Open-loop Poisson arrivals; every request is a task that is awaited before the phase ends."""

    def __init__(self, client: httpx.AsyncClient, tally: Tally, rng: random.Random) -> None:
        self.client = client
        self.tally = tally
        self.rng = rng
        self.tasks: set[asyncio.Task[float | None]] = set()
        self.counter = 0

    def fire(self, model: str, body: dict[str, Any], expect: list[float] | None, injected: bool = False) -> None:
        task = asyncio.create_task(send(self.client, self.tally, model, body, expect, injected))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def fire_mixed(self) -> None:
        self.counter += 1
        v = self.counter % 1000 + 1
        pick = self.rng.random()
        if pick < 0.55:
            self.fire("steady", infer_body(v), [v])
        elif pick < 0.75:
            self.fire("linear", infer_body(0.5, 16, "FP32"), None)
        elif pick < 0.85:
            self.fire("faulty", infer_body(float(v), 4, "FP32"), [2.0 * v] * 4)
        elif pick < 0.90:
            self.fire("hangs", infer_body(v), [v])
        elif pick < 0.95:
            self.fire("leaks", infer_body(v), [v])
        else:
            self.fire("churn", infer_body(v), [v])

    async def poisson(self, rate: float, seconds: float, fire: Any) -> None:
        end = time.perf_counter() + seconds
        next_at = time.perf_counter()
        while True:
            next_at += self.rng.expovariate(rate)
            if next_at >= end:
                return
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            fire()

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks))


async def inject(fault: str, server: c.Server, traffic: Traffic, rate: float, rng: random.Random) -> str:
    admin = traffic.client
    if fault == "kill-worker":
        workers = (await admin.get("/admin/status")).json()["workers"]["workers"]
        pids = [w["pid"] for w in workers if w["alive"] and w["pid"]]
        if not pids:
            return "kill-worker: no live worker"
        victim = rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        return f"kill-worker {victim}"
    if fault == "poison":
        traffic.fire("faulty", infer_body(-999.0, 4, "FP32"), None, injected=True)
        return "poison faulty"
    if fault == "hang":
        traffic.fire("hangs", infer_body(-1), None, injected=True)
        return "hang hangs"
    if fault == "unload":
        await admin.post("/v2/repository/models/steady/unload", json={})
        return "unload steady"
    v = 7
    await traffic.poisson(10 * rate, 2.0, lambda: traffic.fire("steady", infer_body(v), [v]))
    return "burst steady x10"


async def slo_counts(client: httpx.AsyncClient, model: str) -> tuple[int, int]:
    """(answered within the SLO, answered) for ``model``, from the server's own counts."""
    info = (await client.get(f"/admin/models/{model}")).json()
    answered = int(info["succeeded"]) + int(info["failed"])
    return round((info["slo_attainment"] or 0.0) * answered), answered


def gateway_rss_mib(server: c.Server) -> float:
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def mixed_phase(server: c.Server, args: argparse.Namespace) -> tuple[Tally, list[str]]:
    rng = random.Random(args.seed)
    tally = Tally()
    faults: list[str] = []
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        traffic = Traffic(client, tally, rng)

        async def faults_loop() -> None:
            end = time.perf_counter() + args.duration_s
            while time.perf_counter() + args.fault_every_s < end:
                await asyncio.sleep(args.fault_every_s)
                fault = rng.choice(FAULTS)
                faults.append(await inject(fault, server, traffic, args.rate, rng))

        await asyncio.gather(traffic.poisson(args.rate, args.duration_s, traffic.fire_mixed), faults_loop())
        await traffic.drain()
    return tally, faults


class RawSender:
    """Open-loop requests over a pool of keep-alive connections, with prepared bytes: a client light
    enough to offer ten times a model's capacity from this machine without queueing on its own side."""

    def __init__(self, port: int, raw: bytes, tally: Tally, expect: list[float]) -> None:
        self.port = port
        self.raw = raw
        self.tally = tally
        self.expect = expect
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def fire(self) -> None:
        task = asyncio.create_task(self._one())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self) -> None:
        tally = self.tally
        tally.sent += 1
        start = time.perf_counter()
        try:
            reader, writer = await self._connection()
            writer.write(self.raw)
            status, headers, body = await asyncio.wait_for(c.read_answer(reader), CLIENT_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            tally.lost += 1
            tally.lost_examples.append(f"slow: {type(exc).__name__}: {exc}")
            return
        elapsed = time.perf_counter() - start
        self.idle.append((reader, writer, time.perf_counter()))
        tally.answered += 1
        if status == 200:
            tally.succeeded += 1
            tally.ok_latencies_s.append(elapsed)
            if json.loads(body)["outputs"][0]["data"] != self.expect:
                tally.wrong += 1
        elif status in (429, 503):
            tally.refused[f"{status} {headers.get('ember-error', '?')}"] += 1
            tally.refused_latencies_s.append(elapsed)
            tally.refused_without_retry_after += "retry-after" not in headers
        else:
            tally.failed[f"{status} {headers.get('ember-error', '?')}"] += 1
            tally.failed_examples.setdefault(f"slow {status}", body[:300].decode(errors="replace"))

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An idle keep-alive connection, or a new one. Like any HTTP client, it does not reuse one
        that has been idle long enough for the server to close it (uvicorn's keep-alive is 5 s)."""
        while self.idle:
            reader, writer, last_used = self.idle.pop()
            if time.perf_counter() - last_used < 4.0 and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks))
        for _, writer, _ in self.idle:
            writer.close()


async def overload_phase(server: c.Server, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed + 1)
    body = json.dumps(infer_body(3)).encode()
    raw = c.http_request("127.0.0.1", server.port, "POST", "/v2/models/slow/infer", body, "application/json")
    # Capacity: closed loop, as many in flight as the queue holds.
    probe = await c.run_load("127.0.0.1", server.port, raw, 4, 4.0, 10**6)
    capacity = probe.rps
    offered = args.overload_factor * capacity
    async with httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT_S) as admin:
        rss_before = gateway_rss_mib(server)
        met_before, answered_before = await slo_counts(admin, "slow")
        tally = Tally()
        sender = RawSender(server.port, raw, tally, [3])
        traffic = Traffic(admin, tally, rng)
        start = time.perf_counter()
        await traffic.poisson(offered, args.overload_s, sender.fire)
        await sender.drain()
        seconds = time.perf_counter() - start
        rss_after = gateway_rss_mib(server)
        met_after, answered_after = await slo_counts(admin, "slow")
    met = sum(1 for s in tally.ok_latencies_s if s <= SLOW_SLO_MS / 1000)
    return {
        "capacity_rps": capacity,
        "offered_rps": offered,
        "factor": args.overload_factor,
        "served_rps": tally.succeeded / seconds,
        # As the client saw it (its own queueing on this 2-core machine included), and as the server
        # measured it from admission to answer.
        "admitted_slo_attainment_client": met / tally.succeeded if tally.succeeded else float("nan"),
        "admitted_slo_attainment_server": (met_after - met_before) / max(1, answered_after - answered_before),
        "gateway_rss_mib_before": rss_before,
        "gateway_rss_mib_after": rss_after,
        **tally.row(),
    }


def deploy_all(url: str) -> None:
    from ember import Client

    sleepy = f"{MODELS / 'sleepy.py'}:Sleepy"
    with Client(url, timeout_s=600) as client:
        client.deploy(sleepy, name="steady", max_batch_size=8, options={"seconds": 0.005})
        client.deploy(f"{c.ROOT / 'examples' / 'linear.py'}:Linear", name="linear")
        client.deploy(f"{MODELS / 'faulty.py'}:Faulty", name="faulty")
        client.deploy(f"{MODELS / 'hostile.py'}:Hangs", name="hangs")
        client.deploy(f"{MODELS / 'hostile.py'}:Leaks", name="leaks", options={"leak_mb": 16})
        client.deploy(sleepy, name="churn", keepalive_hot_s=1, keepalive_warm_s=2)
        client.deploy(sleepy, name="slow", max_batch_size=1, max_queue=8, slo_ms=SLOW_SLO_MS, options={"seconds": 0.05})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second in the mixed phase")
    parser.add_argument("--fault-every-s", type=float, default=4.0)
    parser.add_argument("--overload-s", type=float, default=15.0)
    parser.add_argument("--overload-factor", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="ember-soak-"))
    options = ("--batch-timeout-s", "3", "--worker-memory-mb", "1200", "--tick-s", "0.5")
    server = c.ember_server(scratch / "home", c.free_port(), workers=2, options=options)
    with server:
        with c.step("starting Ember (2 workers) and deploying 7 models"):
            server.wait_ready("/v2/health/ready")
            deploy_all(server.url)
        mixed_step = (
            f"mixed phase: {args.rate:g} req/s for {args.duration_s:g} s, a fault each {args.fault_every_s:g} s"
        )
        with c.step(mixed_step):
            mixed, faults = asyncio.run(mixed_phase(server, args))
        with c.step(f"overload phase: {args.overload_factor:g}x capacity for {args.overload_s:g} s"):
            overload = c.run_async(lambda: overload_phase(server, args))
        status = httpx.get(server.url + "/admin/status", timeout=30).json()

    results = {
        "machine": c.machine(),
        "args": vars(args) | {"json": str(args.json)},
        "mixed": mixed.row() | {"faults": Counter(f.split()[0] for f in faults), "fault_log": faults},
        "overload": overload,
        "worker_restarts": status["workers"]["restarts"],
    }
    report(results)
    c.write_json(args.json, results)
    lost = mixed.lost + overload["lost"]
    if lost:
        raise SystemExit(f"LOST {lost} requests: {mixed.lost_examples[:3]} {overload['lost_examples'][:3]}")


def report(results: dict[str, Any]) -> None:
    mixed, overload = results["mixed"], results["overload"]
    print("\nSoak: every request sent, and what became of it")
    rows = []
    for phase, r in (("mixed + faults", mixed), ("overload", overload)):
        rows.append(
            [
                phase,
                r["sent"],
                r["answered"],
                r["succeeded"],
                r["wrong_answers"],
                sum(r["refused"].values()),
                sum(r["failed"].values()),
                r["expected_failures"],
                r["lost"],
            ]
        )
    c.print_table(
        ["phase", "sent", "answered", "succeeded", "wrong", "refused", "failed", "expected failures", "lost"], rows
    )
    print(f"\nfaults injected: {dict(mixed['faults'])}; worker restarts: {results['worker_restarts']}")
    for phase, r in (("mixed", mixed), ("overload", overload)):
        print(f"{phase}: refused by reason {r['refused']}; failed by reason {r['failed']}")
        for what, text in r["failed_examples"].items():
            print(f"    e.g. {what}: {text}")
        print(
            f"{phase}: ok p50 {r['ok_p50_ms']:.1f} ms, p99 {r['ok_p99_ms']:.1f} ms; refusals p99 "
            f"{r['refused_p99_ms']:.1f} ms; refusals without Retry-After: {r['refused_without_retry_after']}"
        )
    print(
        f"\noverload: capacity {overload['capacity_rps']:.1f} req/s, offered {overload['offered_rps']:.1f} req/s "
        f"({overload['factor']:g}x), served {overload['served_rps']:.1f} req/s; admitted requests within their "
        f"{SLOW_SLO_MS} ms SLO: {100 * overload['admitted_slo_attainment_server']:.2f}% as the server measured, "
        f"{100 * overload['admitted_slo_attainment_client']:.2f}% as this client saw; gateway memory "
        f"{overload['gateway_rss_mib_before']:.0f} -> {overload['gateway_rss_mib_after']:.0f} MiB"
    )
    print(json.dumps({"lost": mixed["lost"] + overload["lost"]}))


if __name__ == "__main__":
    main()
