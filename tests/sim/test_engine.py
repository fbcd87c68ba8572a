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

    Demotion happens on the first control tick at or after K idle seconds, so the effective keep-alive
    is K + U * tick with U uniform on [0, 1): the expectation is exp(-rate K) (1 - exp(-rate tick)) / (rate tick).
    Service and load take 1 ms, against gaps of tens of seconds.
    """
    scenario = parse_scenario(
        KNOWN.format(seed=5, tick=tick, rate=rate, keepalive=keepalive, duration=500 / rate / 0.1), HERE
    )
    result = run_policy_set(scenario, "classic_faas", {"keepalive_s": keepalive}, scenario.workload())
    n = len(result.latencies_s)
    observed = result.cold_starts["cool"] / n
    expected = math.exp(-rate * keepalive) * (1 - math.exp(-rate * tick)) / (rate * tick)
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert n > 4000
    assert abs(observed - expected) < 4 * sigma, (observed, expected, sigma)
