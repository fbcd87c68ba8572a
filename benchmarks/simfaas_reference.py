"""Classic FaaS in ``ember sim`` against SimFaaS on independent random streams: the statistical error.

    python benchmarks/simfaas_reference.py [--replications 5] [--requests 20000] [--keepalive-s 600]
                                           [--rates 0.002 0.01 0.1 1] [--json out.json]

``tests/sim/test_simfaas.py`` runs both simulators seeded alike (SimFaaS replays Ember's arrivals and
service draws) and finds them equal. This script runs them apart: ``ember sim``'s ``classic_faas``
set with seeds 1..R, and SimFaaS (``pip install simfaas``) on its own Poisson arrivals and numpy
draws with the same seeds, ``--requests`` expected requests per run, one function with SimFaaS's
example parameters (exponential service, 2.016 s warm and 2.163 s cold, a fixed idle timeout). Per
rate it prints each simulator's mean over the replications with its standard error, and their gap
in standard errors of the difference: the agreement a test without common random numbers could
check at that cost. A last column runs ``classic_faas`` with its router taken away (one queue per
model, served by whichever instance frees first, as Ember's own set dispatches): the cold starts
the faithful baseline counts and a shared queue avoids.

Each figure covers its simulator's own run: SimFaaS's ends at the first event past the duration,
Ember's once the last instance has expired (up to one keep-alive later), a bias of order
keep-alive / duration in the mean instance count (0.5 % at 1 request/s and 20,000 requests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from simfaas.ServerlessSimulator import ServerlessSimulator

from ember.sim.engine import Engine
from ember.sim.policysets import build_policy_set
from ember.sim.report import summarise
from ember.sim.scenario import parse_scenario
from ember.testing import SIMFAAS_COLD_S, SIMFAAS_WARM_S, simfaas_scenario

WARM_S, COLD_S = SIMFAAS_WARM_S, SIMFAAS_COLD_S


def ember_run(
    rate: float, duration_s: float, keepalive_s: float, seed: int, shared_queue: bool = False
) -> tuple[float, float, float]:
    """(cold-start probability, mean live instances, CPU seconds) of one ``classic_faas`` run."""
    text = simfaas_scenario(rate, duration_s, keepalive_s, seed)
    s = parse_scenario(text, Path.cwd(), origin="simfaas-reference")
    policies = build_policy_set("classic_faas", {"keepalive_s": keepalive_s})
    if shared_queue:
        policies = dataclasses.replace(policies, router=None)
    engine = Engine(s.cluster, s.models, s.workload(), policies, duration_s=s.duration_s, seed=s.seed,
                    tick_s=s.tick_s, warm_tick_s=s.warm_tick_s)  # fmt: skip
    cpu = time.process_time()
    report = summarise(engine.run(), 0.0, None)
    return report.cold_start_fraction, report.mean_instances, time.process_time() - cpu


def simfaas_run(rate: float, duration_s: float, keepalive_s: float, seed: int) -> tuple[float, float, float]:
    np.random.seed(seed)
    cpu = time.process_time()
    sim = ServerlessSimulator(arrival_rate=rate, warm_service_rate=1 / WARM_S, cold_service_rate=1 / COLD_S,
                              expiration_threshold=keepalive_s, max_time=duration_s)  # fmt: skip
    sim.generate_trace()
    result = sim.get_result_dict()
    return result["prob_cold"], result["inst_count_avg"], time.process_time() - cpu


def summary(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replications", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20_000, help="expected requests per run")
    parser.add_argument("--keepalive-s", type=float, default=600.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.002, 0.01, 0.1, 1.0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for rate in args.rates:
        duration = args.requests / rate
        seeds = range(1, args.replications + 1)
        ember = [ember_run(rate, duration, args.keepalive_s, s) for s in seeds]
        ref = [simfaas_run(rate, duration, args.keepalive_s, s) for s in seeds]
        shared = [ember_run(rate, duration, args.keepalive_s, s, shared_queue=True)[0] for s in seeds]
        row: dict[str, object] = {"rate": rate, "duration_s": duration}
        for k, name in ((0, "p_cold"), (1, "mean_instances")):
            (e, e_se), (r, r_se) = summary([x[k] for x in ember]), summary([x[k] for x in ref])
            row[name] = {"ember": e, "ember_se": e_se, "simfaas": r, "simfaas_se": r_se,
                         "relative_gap": e / r - 1, "gap_in_se": (e - r) / math.hypot(e_se, r_se)}  # fmt: skip
        row["p_cold_shared_queue"] = statistics.fmean(shared)
        row["cpu_s"] = {"ember": sum(x[2] for x in ember), "simfaas": sum(x[2] for x in ref)}
        rows.append(row)
    print(f"{args.replications} replications x {args.requests:,} expected requests per rate, keep-alive"
          f" {args.keepalive_s:g} s; load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| rate /s | what | ember sim (± s.e.) | SimFaaS (± s.e.) | gap | gap / s.e. | shared queue |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    figures = (("p_cold", "cold-start probability", ".5f"), ("mean_instances", "mean instances", ".4f"))
    for row in rows:
        for name, label, fmt in figures:
            f = row[name]
            assert isinstance(f, dict)
            ember = f"{f['ember']:{fmt}} ± {f['ember_se']:{fmt}}"
            ref = f"{f['simfaas']:{fmt}} ± {f['simfaas_se']:{fmt}}"
            shared = f"{row['p_cold_shared_queue']:{fmt}}" if name == "p_cold" else ""
            print(f"| {row['rate']:g} | {label} | {ember} | {ref} | {f['relative_gap']:+.2%} | {f['gap_in_se']:+.1f}"
                  f" | {shared} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
