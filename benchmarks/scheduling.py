"""Scheduling cost: what the SLO engine adds to each request in the scheduler, against the plain EDF batcher.

    python benchmarks/scheduling.py [--requests 20000] [--concurrency 1 32] [--rounds 3] [--json out.json]

Claim: the SLO-aware path (admission check against the latency model, ``SloBatcher`` with refusal,
the latency model folded per batch) costs the gateway's event loop only a few microseconds per
request more than the simple policy it replaced (``DeadlineBatcher``, no admission check).

* Both run in this process on the real event loop and the wall clock, through the same
  ``ModelRunner`` (queue, metrics, accounting) and a ``FakeWorker`` whose batches take no time, so
  what is measured is the scheduler itself: submit, queue, decide, dispatch, answer.
* ``concurrency`` callers each submit their next request as soon as the last one is answered; at 1
  every batch has one row, at 32 batches fill up to the fake model's 8 rows.
* The two variants alternate in rounds, so both see the same background load; the ratio is the figure
  to read.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import _common as c
import numpy as np

from ember.api import TensorSpec
from ember.clock import WallClock
from ember.config import Deployment, ModelMetadata
from ember.errors import DeadlineUnmeetable
from ember.metrics import Metrics
from ember.policies import BatchPolicy, DeadlineBatcher, SloBatcher
from ember.scheduler import ModelRunner
from ember.testing import FakeWorker, LatencyProfile

KEY = "m@1"


class _Promoter:
    """The runner's view of the controller: one instance, always hot."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker

    async def ensure_hot(self, name: str) -> FakeWorker:
        return self.worker

    def hot_instances(self, name: str) -> tuple[FakeWorker, ...]:
        return (self.worker,)

    def start_delay_s(self, name: str) -> float:
        return 0.0

    def prewarm(self, name: str) -> None:
        return None

    def lost_instance(self, name: str, worker: Any) -> None:
        return None


def _deployment(on_unmeetable: str) -> Deployment:
    spec = (TensorSpec("x", "FP32", (-1, 4)),)
    return Deployment(
        name="m",
        version=1,
        model_ref="fake:M",
        options={},
        metadata=ModelMetadata(spec, spec, 8, None, 64),
        slo_ms=100.0,
        max_batch_size=8,
        max_batch_wait_ms=0.0,
        keepalive_hot_s=300.0,
        keepalive_warm_s=3600.0,
        max_queue=1024,
        device="cpu",
        on_unmeetable="refuse" if on_unmeetable == "refuse" else "best_effort",
    )


async def _run(policy: BatchPolicy, on_unmeetable: str, requests: int, concurrency: int) -> dict[str, float]:
    clock = WallClock()
    worker = FakeWorker("w0", clock, LatencyProfile(base_s=0.0, load_s=0.0))
    worker.loaded.add(KEY)
    runner = ModelRunner(_deployment(on_unmeetable), clock, policy, _Promoter(worker), Metrics())
    runner.start()
    x = {"x": np.ones((1, 4), dtype=np.float32)}
    per_caller = requests // concurrency
    refused = 0

    async def caller() -> None:
        nonlocal refused
        for _ in range(per_caller):
            try:
                await runner.submit(x)
            except DeadlineUnmeetable:
                refused += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    await runner.stop(DeadlineUnmeetable("benchmark over"))
    done = per_caller * concurrency
    stats = runner.statistics()
    return {
        "us_per_request": 1e6 * seconds / done,
        "rows_per_batch": stats.rows / max(stats.batches, 1),
        "refused": float(refused),
    }


VARIANTS: dict[str, tuple[BatchPolicy, str]] = {
    "ember (SloBatcher, refuse)": (SloBatcher("refuse"), "refuse"),
    "baseline (DeadlineBatcher)": (DeadlineBatcher(), "best_effort"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for concurrency in args.concurrency:
        cell = results.setdefault(str(concurrency), {name: [] for name in VARIANTS})
        for round_ in range(args.rounds):
            order = list(VARIANTS.items())
            if round_ % 2:
                order.reverse()
            for name, (policy, mode) in order:
                cell[name].append(asyncio.run(_run(policy, mode, args.requests, concurrency)))

    rows = []
    summary: dict[str, Any] = {"machine": c.machine(), "load_average": c.load_average(), "cells": {}}
    for concurrency, cell in results.items():
        med = {name: statistics.median(r["us_per_request"] for r in runs) for name, runs in cell.items()}
        ember, base = med["ember (SloBatcher, refuse)"], med["baseline (DeadlineBatcher)"]
        for name, runs in cell.items():
            rows.append(
                [
                    concurrency,
                    name,
                    f"{med[name]:.1f}",
                    f"{statistics.median(r['rows_per_batch'] for r in runs):.2f}",
                    int(sum(r["refused"] for r in runs)),
                ]
            )
        rows.append([concurrency, "ratio ember / baseline", f"{ember / base:.2f}", "", ""])
        summary["cells"][concurrency] = {"us_per_request": med, "ratio": ember / base, "runs": cell}
    c.print_table(["concurrency", "variant", "µs / request (median)", "rows / batch", "refused"], rows)
    print(f"load average {summary['load_average']:.2f}")
    c.write_json(args.json, summary)


if __name__ == "__main__":
    main()
