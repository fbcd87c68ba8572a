"""Simulator fidelity: one seeded trace through a real ``ember serve`` on CPU and through ``ember.sim``.

    python benchmarks/fidelity.py [--case mixed|tight] [--duration-s 90] [--seed 4] [--json PATH]

Two cases, each of three small models sharing one worker, a 0.1 s controller tick and short
keep-alives:

* ``mixed`` (keep-alives hot 2 s, warm 6 s): tests/integration/models/sleepy.py with 20 ms (SLO
  100 ms) and 50 ms (SLO 600 ms) of fixed compute per batch, and examples/linear.py (SLO 250 ms).
  Poisson arrivals for the 20 ms model, a burst plus sparse arrivals for the 50 ms one, and Poisson
  for the linear layer with an idle gap in the middle longer than both keep-alives, so loads from
  the warm and the cool tier happen on the real server. Both sides meet nearly every SLO.
* ``tight`` (keep-alives hot 1 s, warm 2 s): SLOs that a real server misses on purpose. ``tight``
  is the 20 ms sleeper with a 50 ms SLO, so a request that waits behind another model's batch on the
  shared worker misses; ``overload`` is the 50 ms sleeper (SLO 150 ms, at most 2 rows a batch, so
  about 35 requests/s) hit by bursts of 50 requests/s, whose excess is refused (429); ``cold`` is a
  model of 128 MiB of weights (tests/integration/models/heavy.py) with a 100 ms SLO, shorter than
  its load from cool: sparse arrivals, so after each idle time longer than both keep-alives its
  next request is refused or late.

1. Profile: on separate deployments of the same models, time hot requests of 1 and ``max_batch_size``
   rows (client time; the compute and the admission-to-answer time the server counted for them) and
   loads from each tier (``/admin/models/NAME/load`` after the model left the device), then demote
   them to cool. The trace's deployments are others, so they start with empty idle-time histograms
   as in the engine.
2. Replay the trace open loop (each request sent at its time, whatever the answers before it did)
   against fresh deployments demoted to cool; a request meets its SLO if the client had its answer
   within the SLO; a 429 is a refusal (a miss).
3. Simulate the same trace with the ``ember`` policy set, calibrated with the profile
   (``ember.sim.measured``), and print both side by side with the gap, overall and per model.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
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
from ember.sim.measured import MeasuredModel, MeasuredProfile, Outcome, by_model, gap, simulate
from ember.sim.workload import Workload

SLEEPY = f"{ROOT / 'tests' / 'integration' / 'models' / 'sleepy.py'}:Sleepy"
LINEAR = f"{ROOT / 'examples' / 'linear.py'}:Linear"
SIZED = f"{ROOT / 'tests' / 'integration' / 'models' / 'heavy.py'}:Sized"
TICK_S = 0.1


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
        if self.source == SIZED:
            return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 4], "data": [0.5] * (4 * rows)}]}
        return {"inputs": [{"name": "x", "datatype": "INT64", "shape": [rows, 1], "data": list(range(rows))}]}


#: Per model, its arrival times (seconds), from the trace's duration and a seeded generator.
Arrivals = Callable[[float, np.random.Generator], list[list[float]]]


@dataclass(frozen=True)
class Scenario:
    name: str
    models: tuple[ModelCase, ...]
    keepalive_hot_s: float
    keepalive_warm_s: float
    arrivals: Arrivals

    def trace(self, duration_s: float, seed: int) -> list[tuple[float, int]]:
        """``(seconds, model index)`` in time order, a pure function of ``duration_s`` and ``seed``."""
        per_model = self.arrivals(duration_s, np.random.default_rng(seed))
        return sorted((t, i) for i, times in enumerate(per_model) for t in times)


def _poisson(rng: np.random.Generator, rate: float, start: float, end: float) -> list[float]:
    n = int(rng.poisson(rate * (end - start)))
    return sorted(rng.uniform(start, end, size=n).tolist())


def _mixed(d: float, rng: np.random.Generator) -> list[list[float]]:
    steady = _poisson(rng, 2.0, 0.0, d)
    burst_at = 0.4 * d
    bursty = [*_poisson(rng, 0.15, 0.0, d), *_poisson(rng, 25.0, burst_at, burst_at + 1.0)]
    gap_from, gap_to = 0.3 * d, 0.3 * d + MIXED_KEEPALIVE_S[0] + MIXED_KEEPALIVE_S[1] + 4.0
    linear = [*_poisson(rng, 1.0, 0.0, gap_from), *_poisson(rng, 1.0, gap_to, d)]
    return [steady, bursty, linear]


def _tight(d: float, rng: np.random.Generator) -> list[list[float]]:
    tight = _poisson(rng, 3.0, 0.0, d)
    overload = _poisson(rng, 0.3, 0.0, d)
    for at in (0.3 * d, 0.7 * d):  # one-second bursts past the model's capacity
        overload += _poisson(rng, 50.0, at, at + 1.0)
    cold = _poisson(rng, 0.4, 0.0, d)
    return [tight, sorted(overload), cold]


MIXED_KEEPALIVE_S = (2.0, 6.0)
CASES = (
    ModelCase("steady", SLEEPY, 100.0, 4, (("seconds", 0.02),)),
    ModelCase("bursty", SLEEPY, 600.0, 8, (("seconds", 0.05),)),
    ModelCase("linear", LINEAR, 250.0, 8),
)
MIXED = Scenario("mixed", CASES, *MIXED_KEEPALIVE_S, _mixed)
TIGHT = Scenario(
    "tight",
    (
        ModelCase("tight", SLEEPY, 50.0, 4, (("seconds", 0.02),)),
        ModelCase("overload", SLEEPY, 150.0, 2, (("seconds", 0.05),)),
        ModelCase("cold", SIZED, 100.0, 4, (("mb", 128),)),
    ),
    1.0,
    2.0,
    _tight,
)
SCENARIOS = {s.name: s for s in (MIXED, TIGHT)}


def make_trace(duration_s: float, seed: int, scenario: Scenario = MIXED) -> list[tuple[float, int]]:
    return scenario.trace(duration_s, seed)


def workload_of(trace: list[tuple[float, int]]) -> Workload:
    return Workload([t for t, _ in trace], [i for _, i in trace], [1] * len(trace))


# -- the real server -------------------------------------------------------------------------------


def deploy(client: Client, case: ModelCase, name: str, scenario: Scenario, **extra: Any) -> dict[str, Any]:
    return client.deploy(
        case.source, name=name, slo_ms=case.slo_ms, max_batch_size=case.max_batch_size,
        keepalive_hot_s=scenario.keepalive_hot_s, keepalive_warm_s=scenario.keepalive_warm_s,
        options=dict(case.options) or None, **extra,
    )  # fmt: skip


def wait_tier(client: Client, name: str, tier: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while (now := client.model(name)["tier"]) != tier:
        if not seen or seen[-1] != now:
            seen.append(now)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{name} not {tier} after {timeout_s:g} s; tiers seen meanwhile: {seen}; now: {client.model(name)}"
            )
        time.sleep(0.05)


def server_counters(url: str, name: str) -> tuple[float, float, float, float]:
    """``(batches, compute seconds, requests, request seconds)`` the server has counted for ``name`` so far.

    Request seconds run from admission to answer, inside the server: a lone request's, less its
    batch's compute, is the worker hop and the scheduler's turn-around, which hold the worker.
    """
    counts = dict.fromkeys(("batches", "compute", "requests", "seconds"), 0.0)
    wanted = {
        "nv_inference_exec_count": "batches",
        "nv_inference_compute_infer_duration_us": "compute",
        "ember_request_duration_seconds_count": "requests",
        "ember_request_duration_seconds_sum": "seconds",
    }
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            # The parser reads the Triton counters (no ``_total`` on the wire) as ``NAME_total``.
            key = wanted.get(sample.name.removesuffix("_total"))
            if key is not None and sample.labels.get("model") == name:
                counts[key] += sample.value
    return counts["batches"], counts["compute"] / 1e6, counts["requests"], counts["seconds"]


def profile(url: str, scenario: Scenario = MIXED, repeats: int = 3) -> MeasuredProfile:
    """Measure hot batch times and per-tier load times on deployments of their own, then leave them cool.

    They are demoted, not removed: removing a model while a control tick demotes it ends the server's
    control loop (``Controller.demote`` then asks for the removed model's tier), and nothing is ever
    demoted again. A cool model costs the trace nothing.
    """
    measured: list[MeasuredModel] = []
    with Client(url) as client, httpx.Client(timeout=120) as http:
        for case in scenario.models:
            name = f"profile-{case.name}"
            info = deploy(client, case, name, scenario)
            batch_s: list[tuple[int, float]] = []
            compute_s: list[tuple[int, float]] = []
            dispatch: list[float] = []
            for rows in sorted({1, case.max_batch_size}):
                # The first request may pay a lazy import: neither timed nor counted.
                http.post(f"{url}/v2/models/{name}/infer", json=case.body(rows)).raise_for_status()
                before = server_counters(url, name)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    r = http.post(f"{url}/v2/models/{name}/infer", json=case.body(rows))
                    times.append(time.perf_counter() - start)
                    r.raise_for_status()
                batches, compute, requests, seconds = (
                    a - b for a, b in zip(server_counters(url, name), before, strict=True)
                )
                batch_s.append((rows, statistics.median(times)))
                compute_s.append((rows, compute / max(1.0, batches)))
                dispatch.append(max(0.0, seconds / max(1.0, requests) - compute_s[-1][1]))
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
            client.unload(name)
            measured.append(
                MeasuredModel(
                    case.name,
                    case.slo_ms / 1000,
                    case.max_batch_size,
                    int(info["bytes"]),
                    tuple(batch_s),
                    statistics.median(warm),
                    statistics.median(cool),
                    tuple(compute_s),
                    statistics.median(dispatch),
                )
            )
    return MeasuredProfile(tuple(measured), 1, TICK_S, scenario.keepalive_hot_s, scenario.keepalive_warm_s)


def loads_by_tier(url: str, names: set[str]) -> dict[str, dict[str, int]]:
    """Per model in ``names``, its loads so far by the tier they started from."""
    counts: dict[str, dict[str, int]] = {name: {"warm": 0, "cool": 0} for name in names}
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            model = sample.labels.get("model")
            if sample.name == "ember_cold_starts_total" and model in counts:
                tier = sample.labels.get("tier", "")
                counts[model][tier] = counts[model].get(tier, 0) + int(sample.value)
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


def replay(url: str, trace: list[tuple[float, int]], scenario: Scenario = MIXED) -> tuple[Outcome, dict[str, Outcome]]:
    """Deploy the scenario's models afresh, demote them to cool, replay ``trace``: the real side's
    outcome, overall and per model."""
    cases = scenario.models
    names = {c.name for c in cases}
    with Client(url) as client:
        for case in cases:
            deploy(client, case, case.name, scenario)
            client.unload(case.name)
        before = loads_by_tier(url, names)
        answers = asyncio.run(_replay(url, trace, cases))
        after = loads_by_tier(url, names)
        batches = [int(server_counters(url, c.name)[0]) for c in cases]
    latencies: list[list[float]] = [[] for _ in cases]
    met, refused = [0] * len(cases), [0] * len(cases)
    for (status, seconds), (_, i) in zip(answers, trace, strict=True):
        if status == 429:
            refused[i] += 1
            continue
        if status != 200:
            raise RuntimeError(f"request to {cases[i].name} answered {status}")
        latencies[i].append(seconds)
        met[i] += seconds <= cases[i].slo_ms / 1000
    loads = {c.name: {k: after[c.name][k] - before[c.name][k] for k in ("warm", "cool")} for c in cases}
    per_model = {
        c.name: Outcome.of(latencies[i], met[i], refused[i], loads[c.name], batches[i]) for i, c in enumerate(cases)
    }
    total_loads = {k: sum(v[k] for v in loads.values()) for k in ("warm", "cool")}
    every = [s for seen in latencies for s in seen]
    return Outcome.of(every, sum(met), sum(refused), total_loads, sum(batches)), per_model


# -- report ----------------------------------------------------------------------------------------


def compare(real: Outcome, sim: Outcome, real_by: dict[str, Outcome], sim_by: dict[str, Outcome]) -> None:
    g = gap(real, sim)
    rows = [
        (model, side, o.requests, o.refused, o.late, f"{100 * o.slo_attainment:.1f}%", o.p50_ms, o.p99_ms,
         o.batches, o.loads["warm"], o.loads["cool"])
        for model, pair in (("all", (real, sim)), *((n, (real_by[n], sim_by[n])) for n in real_by))
        for side, o in zip(("real", "sim"), pair, strict=True)
    ]  # fmt: skip
    print_table(
        (
            "model",
            "side",
            "requests",
            "refused",
            "late",
            "SLO met",
            "p50 ms",
            "p99 ms",
            "batches",
            "loads warm",
            "loads cool",
        ),
        rows,
    )
    print(f"\ngap: attainment {100 * g.attainment_abs:.1f} points; p99 sim/real {g.p99_ratio:.2f}; "
          f"p50 sim/real {g.p50_ratio:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(SCENARIOS), default="mixed")
    parser.add_argument("--duration-s", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--home", type=Path, default=Path("/tmp/ember-fidelity"))
    args = parser.parse_args()
    scenario = SCENARIOS[args.case]
    trace = scenario.trace(args.duration_s, args.seed)
    print(f"case {scenario.name}: {len(trace)} requests over {args.duration_s:g} s (seed {args.seed}); "
          f"load average {load_average()}")  # fmt: skip
    port = free_port()
    with ember_server(args.home / str(port), port, workers=1, tick_s=TICK_S) as server:
        with step("starting ember serve (1 worker)"):
            server.wait_ready("/v2/health/ready")
        with step("profiling the models (batch and load times)"):
            measured = profile(server.url, scenario)
        for m in measured.models:
            batches = ", ".join(
                f"{r} rows {1000 * s:.1f} ms (compute {1000 * c:.1f})"
                for (r, s), (_, c) in zip(m.batch_s, m.compute_s, strict=True)
            )
            print(
                f"    {m.name}: {batches}; dispatch {1000 * m.dispatch_s:.1f} ms; "
                f"overhead {1000 * m.overhead_s:.1f} ms; "
                f"load warm {1000 * m.load_s_warm:.0f} ms, cool {1000 * m.load_s_cool:.0f} ms"
            )
        with step("replaying the trace against the real server"):
            real, real_by = replay(server.url, trace, scenario)
    load = load_average()
    sim, result = simulate(measured, workload_of(trace), args.duration_s, seed=args.seed)
    sim_by = by_model(measured, result)
    print(f"\nload average after the run: {load}\n")
    compare(real, sim, real_by, sim_by)
    write_json(args.json, {
        "benchmark": "fidelity", "case": scenario.name, "machine": machine(), "load_average": load,
        "seed": args.seed, "duration_s": args.duration_s, "profile": measured.to_json(), "real": asdict(real),
        "sim": asdict(sim), "gap": asdict(gap(real, sim)),
        "by_model": {n: {"real": asdict(real_by[n]), "sim": asdict(sim_by[n])} for n in real_by},
    })  # fmt: skip


if __name__ == "__main__":
    main()
