"""Simulator fidelity: one seeded trace through a real ``ember serve`` on CPU and through ``ember.sim``.

    python benchmarks/fidelity.py [--duration-s 90] [--seed 4] [--json PATH]

Three small models share one worker: tests/integration/models/sleepy.py with 20 ms (SLO 100 ms) and
50 ms (SLO 600 ms) of fixed compute per batch, and examples/linear.py (SLO 250 ms); short keep-alives
(hot 2 s, warm 6 s) and a 0.1 s controller tick. The trace: Poisson arrivals for the 20 ms model,
a burst plus sparse arrivals for the 50 ms one, and Poisson for the linear layer with an idle gap in
the middle longer than both keep-alives, so loads from the warm and the cool tier happen on the real server.

1. Profile: on separate deployments of the same models, time hot requests of 1 and ``max_batch_size``
   rows and loads from each tier (``/admin/models/NAME/load`` after the model left the device), then
   remove them, so the trace's deployments start with empty idle-time histograms as in the engine.
2. Replay the trace open loop (each request sent at its time, whatever the answers before it did)
   against fresh deployments demoted to cool; a request meets its SLO if the client had its answer
   within the SLO; a 429 is a refusal (a miss).
3. Simulate the same trace with the ``ember`` policy set, calibrated with the profile
   (``ember.sim.measured``), and print both side by side with the gap.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    ROOT,
    ember_server,
    free_port,
    load_average,
    machine,
    print_table,
    step,
    write_json,
)

from ember.client import Client
from ember.sim.measured import MeasuredModel, MeasuredProfile, Outcome, gap, simulate
from ember.sim.workload import Workload

SLEEPY = f"{ROOT / 'tests' / 'integration' / 'models' / 'sleepy.py'}:Sleepy"
LINEAR = f"{ROOT / 'examples' / 'linear.py'}:Linear"
TICK_S = 0.1
KEEPALIVE_HOT_S = 2.0
KEEPALIVE_WARM_S = 6.0


@dataclass(frozen=True)
class ModelCase:
    name: str
    source: str
    slo_ms: float
    max_batch_size: int
    options: tuple[tuple[str, Any], ...] = ()

    def body(self, rows: int) -> dict[str, Any]:
        if self.source == LINEAR:
            return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 16], "data": [0.5] * (16 * rows)}]}
        return {"inputs": [{"name": "x", "datatype": "INT64", "shape": [rows, 1], "data": list(range(rows))}]}


CASES = (
    ModelCase("steady", SLEEPY, 100.0, 4, (("seconds", 0.02),)),
    ModelCase("bursty", SLEEPY, 600.0, 8, (("seconds", 0.05),)),
    ModelCase("linear", LINEAR, 250.0, 8),
)


def make_trace(duration_s: float, seed: int) -> list[tuple[float, int]]:
    """``(seconds, case index)`` in time order, a pure function of ``duration_s`` and ``seed``."""
    rng = np.random.default_rng(seed)
    d = duration_s

    def poisson(rate: float, start: float, end: float) -> list[float]:
        n = int(rng.poisson(rate * (end - start)))
        return sorted(rng.uniform(start, end, size=n).tolist())

    steady = poisson(2.0, 0.0, d)
    burst_at = 0.4 * d
    bursty = [*poisson(0.15, 0.0, d), *poisson(25.0, burst_at, burst_at + 1.0)]
    gap_from, gap_to = 0.3 * d, 0.3 * d + KEEPALIVE_HOT_S + KEEPALIVE_WARM_S + 4.0
    linear = [*poisson(1.0, 0.0, gap_from), *poisson(1.0, gap_to, d)]
    arrivals = [(t, 0) for t in steady] + [(t, 1) for t in bursty] + [(t, 2) for t in linear]
    return sorted(arrivals)


def workload_of(trace: list[tuple[float, int]]) -> Workload:
    return Workload([t for t, _ in trace], [i for _, i in trace], [1] * len(trace))


# -- the real server -------------------------------------------------------------------------------


def deploy(client: Client, case: ModelCase, name: str) -> dict[str, Any]:
    return client.deploy(
        case.source, name=name, slo_ms=case.slo_ms, max_batch_size=case.max_batch_size,
        keepalive_hot_s=KEEPALIVE_HOT_S, keepalive_warm_s=KEEPALIVE_WARM_S, options=dict(case.options) or None,
    )  # fmt: skip


def wait_tier(client: Client, name: str, tier: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while (now := client.model(name)["tier"]) != tier:
        if not seen or seen[-1] != now:
            seen.append(now)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not {tier} after {timeout_s:g} s; tiers seen meanwhile: {seen}")
        time.sleep(0.05)


def profile(url: str, cases: tuple[ModelCase, ...] = CASES, repeats: int = 3) -> MeasuredProfile:
    """Measure hot batch times and per-tier load times on deployments of their own, then remove them."""
    measured: list[MeasuredModel] = []
    with Client(url) as client, httpx.Client(timeout=120) as http:
        for case in cases:
            name = f"profile-{case.name}"
            info = deploy(client, case, name)
            batch_s: list[tuple[int, float]] = []
            for rows in sorted({1, case.max_batch_size}):
                times = []
                for _ in range(repeats + 1):  # the first one may pay a lazy import; dropped
                    start = time.perf_counter()
                    r = http.post(f"{url}/v2/models/{name}/infer", json=case.body(rows))
                    times.append(time.perf_counter() - start)
                    r.raise_for_status()
                batch_s.append((rows, statistics.median(times[1:])))
            cool, warm = [], []
            for _ in range(repeats):
                client.unload(name)
                cool.append(float(client.load(name)["last_cold_start"]["seconds"]))
                # A request restarts the idle clock: without it the model, idle since long before the
                # load, leaves hot and warm at the next two ticks, too fast to be seen warm.
                http.post(f"{url}/v2/models/{name}/infer", json=case.body(1)).raise_for_status()
                wait_tier(client, name, "warm", 30)
                shown = client.load(name)["last_cold_start"]
                assert shown["tier"] == "warm", shown
                warm.append(float(shown["seconds"]))
            client.remove(name)
            measured.append(
                MeasuredModel(
                    case.name,
                    case.slo_ms / 1000,
                    case.max_batch_size,
                    int(info["bytes"]),
                    tuple(batch_s),
                    statistics.median(warm),
                    statistics.median(cool),
                )
            )
    return MeasuredProfile(tuple(measured), 1, TICK_S, KEEPALIVE_HOT_S, KEEPALIVE_WARM_S)


def loads_by_tier(url: str, names: set[str]) -> dict[str, int]:
    counts = {"warm": 0, "cool": 0}
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ember_cold_starts_total" and sample.labels.get("model") in names:
                tier = sample.labels.get("tier", "")
                counts[tier] = counts.get(tier, 0) + int(sample.value)
    return counts


async def _replay(url: str, trace: list[tuple[float, int]], cases: tuple[ModelCase, ...]) -> list[tuple[int, float]]:
    """Send every request at its time; ``(status, seconds)`` per request, in trace order."""
    bodies = [case.body(1) for case in cases]
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()

        async def one(at: float, i: int) -> tuple[int, float]:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            sent = time.perf_counter()
            r = await http.post(f"{url}/v2/models/{cases[i].name}/infer", json=bodies[i])
            return r.status_code, time.perf_counter() - sent

        return list(await asyncio.gather(*(one(t, i) for t, i in trace)))


def replay(url: str, trace: list[tuple[float, int]], cases: tuple[ModelCase, ...] = CASES) -> Outcome:
    """Deploy ``cases`` afresh, demote them to cool, replay ``trace``: the real side's outcome."""
    names = {c.name for c in cases}
    with Client(url) as client:
        for case in cases:
            deploy(client, case, case.name)
            client.unload(case.name)
        before = loads_by_tier(url, names)
        answers = asyncio.run(_replay(url, trace, cases))
        after = loads_by_tier(url, names)
    latencies, met, refused = [], 0, 0
    for (status, seconds), (_, i) in zip(answers, trace, strict=True):
        if status == 429:
            refused += 1
            continue
        if status != 200:
            raise RuntimeError(f"request to {cases[i].name} answered {status}")
        latencies.append(seconds)
        met += seconds <= cases[i].slo_ms / 1000
    return Outcome.of(latencies, met, refused, {k: after.get(k, 0) - before.get(k, 0) for k in ("warm", "cool")})


# -- report ----------------------------------------------------------------------------------------


def compare(real: Outcome, sim: Outcome) -> None:
    g = gap(real, sim)
    rows = [
        (side, o.requests, o.refused, f"{100 * o.slo_attainment:.1f}%", o.p50_ms, o.p99_ms, o.loads["warm"],
         o.loads["cool"])
        for side, o in (("real ember serve", real), ("simulator", sim))
    ]  # fmt: skip
    print_table(("side", "requests", "refused", "SLO met", "p50 ms", "p99 ms", "loads warm", "loads cool"), rows)
    print(f"\ngap: attainment {100 * g.attainment_abs:.1f} points; p99 sim/real {g.p99_ratio:.2f}; "
          f"p50 sim/real {g.p50_ratio:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--home", type=Path, default=Path("/tmp/ember-fidelity"))
    args = parser.parse_args()
    trace = make_trace(args.duration_s, args.seed)
    print(f"trace: {len(trace)} requests over {args.duration_s:g} s (seed {args.seed}); load average {load_average()}")
    port = free_port()
    with ember_server(args.home / str(port), port, workers=1, tick_s=TICK_S) as server:
        with step("starting ember serve (1 worker)"):
            server.wait_ready("/v2/health/ready")
        with step("profiling the models (batch and load times)"):
            measured = profile(server.url)
        for m in measured.models:
            batches = ", ".join(f"{r} rows {1000 * s:.1f} ms" for r, s in m.batch_s)
            print(
                f"    {m.name}: {batches}; load warm {1000 * m.load_s_warm:.0f} ms, cool {1000 * m.load_s_cool:.0f} ms"
            )
        with step("replaying the trace against the real server"):
            real = replay(server.url, trace)
    load = load_average()
    sim, _ = simulate(measured, workload_of(trace), args.duration_s, seed=args.seed)
    print(f"\nload average after the run: {load}\n")
    compare(real, sim)
    g = gap(real, sim)
    write_json(args.json, {
        "benchmark": "fidelity", "machine": machine(), "load_average": load, "seed": args.seed,
        "duration_s": args.duration_s, "profile": measured.to_json(), "real": asdict(real), "sim": asdict(sim),
        "gap": asdict(g),
    })  # fmt: skip


if __name__ == "__main__":
    main()
