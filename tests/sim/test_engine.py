"""The engine: repeatable to the bit, every request answered once, and a known answer it must reproduce."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from sim_cases import SMALL

from ember.sim.engine import RunResult
from ember.sim.report import summarise
from ember.sim.runner import run_policy_set
from ember.sim.scenario import Scenario, parse_scenario
from ember.sim.workload import Workload

HERE = Path(__file__).resolve().parent
SETS = ("always_on", "classic_faas", "ray_serve", "ember")


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return parse_scenario(SMALL, HERE, origin="small")


@pytest.fixture(scope="module")
def runs(scenario: Scenario) -> dict[str, RunResult]:
    workload = scenario.workload()
    return {
        name: run_policy_set(scenario, name, opts, workload, record_events=True) for name, opts in scenario.policy_sets
    }


@pytest.mark.parametrize("policy_set", SETS)
def test_a_run_is_bit_for_bit_repeatable(scenario: Scenario, runs: dict[str, RunResult], policy_set: str) -> None:
    again = run_policy_set(scenario, policy_set, dict(scenario.policy_sets)[policy_set], scenario.workload(), True)
    first = runs[policy_set]
    assert len(first.events) > 100
    assert first.events == again.events
    assert first.latencies_s == again.latencies_s
    assert (first.gpu_seconds, first.cold_starts, first.refused) == (
        again.gpu_seconds,
        again.cold_starts,
        again.refused,
    )


def test_another_seed_gives_another_run(scenario: Scenario, runs: dict[str, RunResult]) -> None:
    other = dataclasses.replace(scenario, seed=scenario.seed + 1)
    b = run_policy_set(other, "ember", dict(other.policy_sets)["ember"], other.workload(), record_events=True)
    assert runs["ember"].events != b.events


def test_every_request_is_answered_exactly_once(scenario: Scenario, runs: dict[str, RunResult]) -> None:
    n = len(scenario.workload())
    for name, result in runs.items():
        assert len(result.latencies_s) + result.refused == n, name
        assert min(result.latencies_s) > 0, name
        assert result.met_slo <= len(result.latencies_s)
        assert sum(result.missed.values()) == len(result.latencies_s) - result.met_slo


def test_always_on_never_cold_starts_and_holds_every_device(scenario: Scenario, runs: dict[str, RunResult]) -> None:
    result = runs["always_on"]
    assert sum(result.cold_starts.values()) == 0
    assert result.gpu_seconds == pytest.approx(scenario.cluster.num_devices * result.duration_s)


def test_only_a_set_with_a_warm_tier_starts_from_host_memory(runs: dict[str, RunResult]) -> None:
    assert runs["classic_faas"].cold_starts["warm"] == runs["ray_serve"].cold_starts["warm"] == 0
    assert runs["classic_faas"].cold_starts["cool"] > 0
    assert runs["ember"].cold_starts["warm"] > 0


def test_the_report_prices_each_set_against_always_on(runs: dict[str, RunResult]) -> None:
    base = runs["always_on"].gpu_seconds
    for name, result in runs.items():
        report = summarise(result, 1.0, base)
        assert report.gpu_seconds_vs_always_on == pytest.approx(result.gpu_seconds / base)
        assert 0 <= report.slo_attainment <= 1
        assert report.requests == len(result.latencies_s) + result.refused, name
    ember = summarise(runs["ember"], 1.0, base)
    assert ember.gpu_seconds_vs_always_on is not None and ember.gpu_seconds_vs_always_on < 1


KNOWN = """
name: known-answer
seed: {seed}
duration_s: {duration}
tick_s: {tick}
cluster: {{nodes: 1, devices_per_node: 1}}
models:
  - name: fn
    weights_gb: 0.5
    slo_ms: 1000
    max_batch_size: 1
    service: {{kind: constant, mean_ms: 1}}
    cold_start: {{kind: constant, mean_ms: 1}}
workload:
  synthetic: {{total_rate_per_s: {rate}, mix: {{poisson: 1}}}}
policy_sets:
  - {{name: classic_faas, options: {{keepalive_s: {keepalive}}}}}
"""


@pytest.mark.parametrize(("rate", "keepalive", "tick"), [(0.05, 20.0, 1.0), (0.1, 5.0, 0.5)])
def test_poisson_arrivals_with_a_fixed_keepalive_cold_start_as_the_formula_says(
    rate: float, keepalive: float, tick: float
) -> None:
    """A request is cold when the gap since the last one exceeds the keep-alive: probability exp(-rate * K).

    The instance goes at exactly K idle seconds after its last request (an event, whatever the tick);
    service and load take 1 ms, against gaps of tens of seconds.
    """
    scenario = parse_scenario(
        KNOWN.format(seed=5, tick=tick, rate=rate, keepalive=keepalive, duration=500 / rate / 0.1), HERE
    )
    result = run_policy_set(scenario, "classic_faas", {"keepalive_s": keepalive}, scenario.workload())
    n = len(result.latencies_s)
    observed = result.cold_starts["cool"] / n
    expected = math.exp(-rate * keepalive)
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert n > 4000
    assert abs(observed - expected) < 4 * sigma, (observed, expected, sigma)


FAAS = """
name: faas
seed: 1
duration_s: 100
tick_s: 7
cluster: {nodes: 1, devices_per_node: 4}
models:
  - name: fn
    weights_gb: 0.5
    slo_ms: 60000
    max_batch_size: 1
    service: {kind: constant, mean_ms: 1000}
    cold_start: {kind: constant, mean_ms: 10000}
workload:
  synthetic: {total_rate_per_s: 1, mix: {poisson: 1}}
policy_sets:
  - {name: classic_faas, options: {keepalive_s: 30}}
"""


def _faas_run(text: str, times: list[float]) -> RunResult:
    scenario = parse_scenario(text, HERE)
    trace = Workload(times, [0] * len(times), [1] * len(times))
    return run_policy_set(scenario, "classic_faas", {"keepalive_s": 30.0}, trace, record_events=True)


def test_classic_faas_binds_a_request_to_the_instance_it_starts_and_expires_instances_on_time() -> None:
    """Loads take 10 s, requests 1 s, keep-alive 30 s.

    At 10.5 s the only instance serves the first request: the second starts an instance of its own
    and waits for its load (cold, 11 s), though the first instance frees at 11 s. At 12 s the third
    finds that one idle (warm, 1 s). At 25 s both are idle and the fourth goes to the newest, as
    SimFaaS routes. Each instance goes 30 s after its last request, to the event, not on the 7 s tick.
    """
    result = _faas_run(FAAS, [0.0, 10.5, 12.0, 25.0])
    assert result.latencies_s == [11.0, 1.0, 11.0, 1.0]  # in order answered: 11, 13, 21.5, 26 s
    assert result.cold_starts["cool"] == 2
    batches = [(e[0], e[2]) for e in result.events if e[1] == "batch"]
    assert batches == [(10.0, "fn#0"), (12.0, "fn#0"), (20.5, "fn#1"), (25.0, "fn#1")]
    demotions = [(e[0], e[2]) for e in result.events if e[1] == "demote"]
    assert demotions == [(43.0, "fn#0"), (56.0, "fn#1")]
    assert result.instance_seconds == pytest.approx(43.0 + (56.0 - 10.5))


def test_a_cold_service_time_is_the_whole_service_of_the_request_that_started_the_instance() -> None:
    result = _faas_run(FAAS.replace("cold_start:", "cold_service:"), [0.0, 20.0])
    assert result.latencies_s == [10.0, 1.0]  # one draw of the cold service, then a warm request
    assert result.cold_starts["cool"] == 1
    assert [e[1] for e in result.events] == ["load", "ready", "served_cold", "batch", "demote"]


def test_a_faas_request_with_no_room_for_its_own_instance_waits_for_the_first_one_free() -> None:
    """The device holds one instance. The second request finds it busy and no room to start another:
    it waits in the model's queue and runs when the first instance frees (at 11 s, for 1 s)."""
    small = FAAS.replace("devices_per_node: 4}", "devices_per_node: 1, device_memory_gb: 0.6}")
    result = _faas_run(small, [0.0, 5.0])
    assert result.latencies_s == [11.0, 7.0]
    assert [(e[0], e[2]) for e in result.events if e[1] == "batch"] == [(10.0, "fn#0"), (11.0, "fn#0")]
    assert [e[2] for e in result.events if e[1] == "load"] == ["fn#0"]
