"""Classic FaaS against SimFaaS, the reference simulator of the published FaaS performance model.

SimFaaS (Mahmoudi and Khazaei, ``pip install simfaas``) simulates one function under Poisson
arrivals: an arrival takes the newest idle instance (warm: a draw of the warm service time), or
else starts an instance that serves it (cold: one draw of the cold service time); an instance
idle for the expiration threshold after its last departure goes. ``ember sim``'s ``classic_faas``
set runs the same parameters: the scenario below gives the cold request its own service-time
distribution (``cold_service``), and enough devices that every instance runs on one of its own.

Both simulators are seeded alike (common random numbers): SimFaaS replays Ember's arrival times
and draws its warm and cold service times from a ``random.Random`` with the engine's seed, as the
engine does, one draw per request in arrival order. The two then see the same requests and the
same draws, so any difference comes from the models. Independent streams would need millions of
requests per rate to resolve the goals' 5 % and 2 %: at 10,000 requests the cold-start
probability at 0.01 requests/s differs by up to 18 % between seeds, and the mean instance count
by 1-2 % (docs/benchmarks.md, "Classic FaaS against SimFaaS").
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ember.sim.report import summarise
from ember.sim.runner import run_policy_set
from ember.sim.scenario import parse_scenario
from ember.testing import SIMFAAS_COLD_S, SIMFAAS_WARM_S, simfaas_scenario

simfaas = pytest.importorskip("simfaas.ServerlessSimulator")
sim_process = pytest.importorskip("simfaas.SimProcess")

HERE = Path(__file__).resolve().parent
KEEPALIVE_S = 600.0  # SimFaaS's example, with its warm and cold means (AWS Lambda measurements)


class Replay(sim_process.SimProcess):
    """Inter-arrival times that put SimFaaS's arrivals on Ember's (to the last bit or one off), then ``end``."""

    def __init__(self, times: list[float], end: float) -> None:
        super().__init__()
        self.times, self.end, self.next, self.t = times, end, 0, 0.0

    def generate_trace(self) -> float:
        target = self.times[self.next] if self.next < len(self.times) else self.end
        self.next += 1
        gap = target - self.t
        self.t += gap  # as SimFaaS adds it: the next gap corrects any rounding
        return gap


class Exponential(sim_process.SimProcess):
    """Exponential draws from a shared ``random.Random``, computed as the engine computes them."""

    def __init__(self, rng: random.Random, mean_s: float) -> None:
        super().__init__()
        self.rng, self.mean_s = rng, mean_s

    def generate_trace(self) -> float:
        return self.rng.expovariate(1.0) * self.mean_s


@pytest.mark.parametrize(("rate", "duration_s"), [(0.002, 2e6), (0.01, 1e6), (0.1, 1e5), (1.0, 2e4)])
def test_classic_faas_matches_simfaas(rate: float, duration_s: float) -> None:
    seed = 3
    text = simfaas_scenario(rate, duration_s, KEEPALIVE_S, seed)
    scenario = parse_scenario(text, HERE, origin="simfaas")
    workload = scenario.workload()
    result = run_policy_set(scenario, "classic_faas", {"keepalive_s": KEEPALIVE_S}, workload)
    ember = summarise(result, 0.0, None)
    end = result.duration_s  # the last instance's expiry, after the last request

    rng = random.Random(seed)
    sim = simfaas.ServerlessSimulator(
        arrival_process=Replay(list(workload.times), end + 1.0),
        warm_service_process=Exponential(rng, SIMFAAS_WARM_S),
        cold_service_process=Exponential(rng, SIMFAAS_COLD_S),
        expiration_threshold=KEEPALIVE_S,
        max_time=end + 1.0,
    )
    sim.generate_trace()
    # SimFaaS stops at the first event past max_time: the replay's last "arrival", at end + 1, found no
    # instance left and was counted as a cold request. Leave it out.
    assert sim.total_req_count == len(workload) + 1
    requests, cold = sim.total_req_count - 1, sim.total_cold_count - 1
    # Its time-average instance count, over Ember's window [0, end] (nothing lives after it).
    area = sum(
        count * (min(t1, end) - min(t0, end))
        for t0, t1, count in zip(sim.hist_times, sim.hist_times[1:], sim.hist_server_count, strict=False)
    )
    simfaas_cold, simfaas_instances = cold / requests, area / end

    assert ember.requests == requests and result.refused == 0
    assert ember.cold_start_fraction == pytest.approx(simfaas_cold, rel=0.05)
    assert ember.mean_instances == pytest.approx(simfaas_instances, rel=0.02)
    # Seeded alike, the two make every decision alike: the same requests are cold, and the pools
    # of instances differ only by the rounding of SimFaaS's clock (t + (event - t)).
    assert sum(result.cold_starts.values()) == cold
    assert ember.mean_instances == pytest.approx(simfaas_instances, rel=1e-9)
    assert cold > 10  # every rate has cold starts to count (about 30 at 1 request/s)
