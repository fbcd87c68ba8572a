"""Simulator speed: simulated requests per minute of one core, beside an asyncio virtual-time baseline.

    python benchmarks/sim_speed.py [--models 100] [--rate 500] [--duration-s 600] [--baseline-requests 20000]
                                   [--faas-rate 0.01] [--faas-requests 100000] [--json out.json]

Claims (issues 4 and 11): the simulator runs at least one million simulated requests per minute on
one core, with Ember's policies on the throughput scenario and with classic FaaS on one sparse model.

* **Ember's engine** runs the throughput scenario below (``--models`` models on 8 simulated H200s,
  Poisson traffic at ``--rate`` requests per second in all, Zipf popularity) with the always-on and
  the Ember policy sets; the figure is requests over the engine's wall time (workload generation
  excluded). The process is single-threaded: the figure divides by its CPU time (``time.process_time``),
  which is one core's work however busy the machine is; wall time is printed beside it.
* **One sparse FaaS model** (``FAAS_SCENARIO``): one function under classic FaaS, Poisson arrivals at
  ``--faas-rate`` requests per second for ``--faas-requests`` expected requests, SimFaaS's service
  times (exponential, 2.016 s warm, 2.163 s cold) and a 600 s keep-alive, so an instance lives
  through most gaps: the cost per request is the loop's, not the batches'.
* **Baseline**: the obvious way to simulate with Ember's own pieces: one asyncio task per request on
  ``ember.testing``'s ``VirtualClock`` with autojump (sleep to the arrival, hold the model's
  lock for the service time, record the latency), over the first ``--baseline-requests`` requests
  of the same workload. It models far less (no batching, no policies), so it is an upper bound on
  that approach's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ember.clock import VirtualClock, WallClock
from ember.sim.runner import run_policy_set
from ember.sim.scenario import Scenario, parse_scenario
from ember.sim.workload import Workload
from ember.testing import run_in_virtual_time

SCENARIO = """
name: throughput
seed: 1
duration_s: {duration}
tick_s: 5
warm_tick_s: 60
cluster: {{nodes: 1, devices_per_node: 8}}
models:
  - {{name: resnet, count: {half}, profile: resnet50, slo_ms: 100, max_batch_size: 32}}
  - {{name: bert, count: {half}, profile: bert_base, slo_ms: 100, max_batch_size: 64}}
workload:
  synthetic: {{total_rate_per_s: {rate}, zipf_s: 1.0, mix: {{poisson: 1}}}}
policy_sets:
  - always_on
  - {{name: ember, options: {{keepalive_hot_s: 60, keepalive_warm_s: 3600}}}}
"""

FAAS_SCENARIO = """
name: faas-sparse
seed: 1
duration_s: {duration}
tick_s: 1
warm_tick_s: 60
cluster: {{nodes: 1, devices_per_node: 8}}
models:
  - name: fn
    weights_gb: 0.5
    slo_ms: 60000
    max_batch_size: 1
    service: {{kind: exponential, mean_ms: 2016}}
    cold_service: {{kind: exponential, mean_ms: 2163}}
workload:
  synthetic: {{total_rate_per_s: {rate}, mix: {{poisson: 1}}}}
policy_sets:
  - {{name: classic_faas, options: {{keepalive_s: 600}}}}
"""


def engine_rows(scenario: Scenario, workload: Workload, label: str) -> list[dict[str, Any]]:
    """Run every policy set of ``scenario`` on ``workload``: one row per set."""
    wall = WallClock()
    rows = []
    for name, options in scenario.policy_sets:
        start, cpu = wall.now(), time.process_time()
        result = run_policy_set(scenario, name, options, workload)
        seconds, cpu_s = wall.now() - start, time.process_time() - cpu
        served = len(result.latencies_s) + result.refused
        rows.append({"what": f"engine, {name}{label}", "requests": served, "wall_s": seconds, "cpu_s": cpu_s,
                     "per_min": served / cpu_s * 60, "slo_attainment": result.met_slo / served})  # fmt: skip
    return rows


def asyncio_baseline(workload: Workload, service_s: list[float], limit: int) -> tuple[int, float, float]:
    times, models = workload.times[:limit], workload.models[:limit]

    async def main(clock: VirtualClock) -> int:
        locks: dict[int, asyncio.Lock] = {}
        latencies: list[float] = []

        async def request(t: float, m: int) -> None:
            await clock.sleep(t - clock.now())
            lock = locks.setdefault(m, asyncio.Lock())
            async with lock:
                await clock.sleep(service_s[m])
            latencies.append(clock.now() - t)

        await asyncio.gather(*(request(t, m) for t, m in zip(times, models, strict=True)))
        return len(latencies)

    start, cpu = WallClock().now(), time.process_time()
    done = run_in_virtual_time(main)
    return done, WallClock().now() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second, all models together")
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--baseline-requests", type=int, default=20_000)
    parser.add_argument("--faas-rate", type=float, default=0.01, help="the sparse FaaS model's requests per second")
    parser.add_argument("--faas-requests", type=int, default=100_000, help="expected requests of the FaaS model")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    text = SCENARIO.format(duration=args.duration_s, half=max(1, args.models // 2), rate=args.rate)
    scenario = parse_scenario(text, Path.cwd(), origin="throughput")
    workload = scenario.workload()
    rows = engine_rows(scenario, workload, "")
    faas_text = FAAS_SCENARIO.format(duration=args.faas_requests / args.faas_rate, rate=args.faas_rate)
    faas = parse_scenario(faas_text, Path.cwd(), origin="faas-sparse")
    rows += engine_rows(faas, faas.workload(), f" (one model, {args.faas_rate:g} requests/s)")
    service_s = [m.curve.batch_s(1) for m in scenario.models]
    done, seconds, cpu_s = asyncio_baseline(workload, service_s, args.baseline_requests)
    base = {"what": "baseline: asyncio tasks on VirtualClock", "requests": done, "wall_s": seconds, "cpu_s": cpu_s,
            "per_min": done / cpu_s * 60}  # fmt: skip
    print(f"{len(workload):,} requests, {args.models} models, 8 simulated H200s, {args.duration_s:.0f} s simulated;"
          f" load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| run | requests | wall s | CPU s | simulated requests / CPU-minute | vs baseline | vs 1M/min goal |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in [*rows, base]:
        ratio = row["per_min"] / base["per_min"]
        cells = [row["what"], f"{row['requests']:,}", f"{row['wall_s']:.2f}", f"{row['cpu_s']:.2f}",
                 f"{row['per_min']:,.0f}", f"{ratio:.1f}x", f"{row['per_min'] / 1e6:.2f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    if args.json:
        body = {
            "scenario": text,
            "faas_scenario": faas_text,
            "load_average": os.getloadavg()[0],
            "runs": rows,
            "baseline": base,
        }
        args.json.write_text(json.dumps(body, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
