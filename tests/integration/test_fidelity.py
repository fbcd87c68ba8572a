"""Simulator fidelity: seeded 20 s traces through a real ``ember serve`` and through ``ember.sim``.

The simulator is calibrated with what this very server measured (client, compute and in-server
times of hot batches, load times per tier; ``ember.sim.measured``), then both sides take the same
trace (``benchmarks/fidelity.py``), in two cases on one worker:

* ``mixed`` (Poisson, a burst, an idle gap longer than both keep-alives): both sides meet nearly
  every SLO. About 95 requests, so one request is about 1 point of attainment; the real side runs
  on a shared 2-core host where anything else the machine does can delay a request, which the
  simulator does not model. We allow 10 points of attainment (a handful of requests) and a p99
  within a factor of two either way (the p99 of 95 requests is its one or two slowest: cold loads
  and queueing in the burst, priced from a profile of two samples per figure). The loads from cool
  are deterministic in the trace, so both sides must agree on them within one.
* ``tight``: SLOs the real server misses on purpose (a 50 ms SLO behind other models' 50 ms
  batches, bursts past a model's capacity, a load from cool longer than the SLO), so a simulator
  that predicted 100 % would fail: the real side must miss at least 10 % of about 180 requests
  (admission that never locks a model out serves more of this trace than the server it was first
  measured on: 83 to 86 % met on this host, where the refusals of the overloaded model and the cool
  load past its SLO keep it well below 100 %).
  The tolerance is wider here, and says why. This check found two differences between the server
  and the engine that cost the simulator 10 to 20 points of optimism, both since fixed in the
  server (a refused head of the queue no longer shrinks the batch behind it; a model promoted
  because a request was refused is no longer demoted at the next tick). What remains is the
  server fixing a batch's contents before its shared worker is free, where the engine decides when
  the device frees: the server serves more requests late under overload (20 against 3 in one run).
  Measured gaps since the fixes: 10 points on this 20 s trace, 5.6 on the 90 s one. We allow 25
  points overall, for a shared host whose load slows only the real side. The model the remaining
  difference barely touches (``tight``) must agree within 15 points; the overloaded one must stay
  in the real side's direction (the simulator may not be more pessimistic than the server by more
  than 5 points).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import pytest
from harness import REPO, Server, served

sys.path.insert(0, str(REPO / "benchmarks"))
import fidelity

from ember.sim.measured import Outcome, by_model, gap, simulate

DURATION_S = 20.0
SEED = 4
P99_RATIO_BOUNDS = (0.5, 2.0)


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("fidelity") / "home"
    # --insecure (loopback): the benchmark's clients send no API key, as against its own server.
    with served(Server(home, workers=1, tick_s=fidelity.TICK_S, args=("--insecure",))) as running:
        yield running


def _run(url: str, scenario: fidelity.Scenario) -> tuple[Outcome, Outcome, dict[str, Outcome], dict[str, Outcome], str]:
    trace = scenario.trace(DURATION_S, SEED)
    assert trace == scenario.trace(DURATION_S, SEED)  # seeded: the same trace every run
    measured = fidelity.profile(url, scenario, repeats=2)
    real, real_by = fidelity.replay(url, trace, scenario)
    sim, result = simulate(measured, fidelity.workload_of(trace), DURATION_S, seed=SEED)
    sim_by = by_model(measured, result)
    lines = [f"real {real}", f"sim  {sim}", f"gap  {gap(real, sim)}"]
    lines += [f"{name}: real {real_by[name]}\n{name}: sim  {sim_by[name]}" for name in real_by]
    assert real.requests == sim.requests == len(trace), "\n".join(lines)
    assert real.served > 0 and sim.served > 0, "\n".join(lines)
    return real, sim, real_by, sim_by, "\n".join(lines)


def test_the_simulator_calibrated_by_the_server_predicts_its_attainment_and_p99(own: Server) -> None:
    real, sim, _, _, report = _run(own.url, fidelity.MIXED)
    g = gap(real, sim)
    assert g.attainment_abs <= 0.10, report
    assert math.isfinite(g.p99_ratio) and P99_RATIO_BOUNDS[0] <= g.p99_ratio <= P99_RATIO_BOUNDS[1], report
    assert real.loads["cool"] >= len(fidelity.MIXED.models), report  # every model starts cool
    assert abs(real.loads["cool"] - sim.loads["cool"]) <= 1, report


def test_on_slos_the_server_misses_the_simulator_predicts_a_low_attainment_too(own: Server) -> None:
    real, sim, real_by, sim_by, report = _run(own.url, fidelity.TIGHT)
    # Discriminating: the server misses a substantial share, and the simulator must see it too.
    assert real.slo_attainment <= 0.90 and real.refused > 0, report
    assert sim.slo_attainment <= 0.90 and sim.refused > 0, report
    assert gap(real, sim).attainment_abs <= 0.25, report
    assert abs(real_by["tight"].slo_attainment - sim_by["tight"].slo_attainment) <= 0.15, report
    assert sim_by["overload"].slo_attainment >= real_by["overload"].slo_attainment - 0.05, report
    assert real_by["overload"].refused > 0 and sim_by["overload"].refused > 0, report
    g = gap(real, sim)
    assert math.isfinite(g.p99_ratio) and P99_RATIO_BOUNDS[0] <= g.p99_ratio <= P99_RATIO_BOUNDS[1], report
