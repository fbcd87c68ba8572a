"""The engine: repeatable to the bit, every request answered once, and a known answer it must reproduce."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from ember.sim.runner import run_policy_set, run_scenario
from ember.sim.scenario import Scenario, parse_scenario

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("policy_set", ["always_on", "classic_faas", "ray_serve", "ember"])
def test_a_run_is_bit_for_bit_repeatable(small: Scenario, policy_set: str) -> None:
    options = dict(small.policy_sets)[policy_set]
    first = run_policy_set(small, policy_set, options, small.workload(), record_events=True)
    second = run_policy_set(small, policy_set, options, small.workload(), record_events=True)
    assert len(first.events) > 100
    assert first.events == second.events
    assert first.latencies_s == second.latencies_s
    assert (first.gpu_seconds, first.cold_starts) == (second.gpu_seconds, second.cold_starts)


def test_another_seed_gives_another_run(small: Scenario) -> None:
    options = dict(small.policy_sets)["ember"]
    other = dataclasses.replace(small, seed=small.seed + 1)
    a = run_policy_set(small, "ember", options, small.workload(), record_events=True)
    b = run_policy_set(other, "ember", options, other.workload(), record_events=True)
    assert a.events != b.events


def test_every_request_is_answered_exactly_once(small: Scenario) -> None:
    workload = small.workload()
    for name, options in small.policy_sets:
        result = run_policy_set(small, name, options, workload)
        assert len(result.latencies_s) + result.refused == len(workload), name
        assert min(result.latencies_s) > 0, name
        assert result.met_slo <= len(result.latencies_s)


def test_always_on_never_cold_starts_and_holds_every_device(small: Scenario) -> None:
    result = run_policy_set(small, "always_on", {}, small.workload())
    assert sum(result.cold_starts.values()) == 0
    assert result.gpu_seconds == pytest.approx(small.cluster.num_devices * result.duration_s)


def test_the_report_prices_each_set_against_always_on(small: Scenario) -> None:
    reports = {r.policy_set: r for r in run_scenario(small)}
    assert reports["always_on"].gpu_seconds_vs_always_on == pytest.approx(1.0)
    ember = reports["ember"]
    assert ember.gpu_seconds_vs_always_on is not None
    assert ember.gpu_seconds_vs_always_on == pytest.approx(ember.gpu_seconds / reports["always_on"].gpu_seconds)
    assert all(0 <= r.slo_attainment <= 1 for r in reports.values())
    assert reports["classic_faas"].cold_starts_warm == 0  # no warm tier under a plain function


KNOWN = """
name: known-answer
seed: {seed}
duration_s: 120000
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


@pytest.mark.parametrize(("rate", "keepalive", "tick"), [(0.05, 20.0, 1.0), (0.1, 5.0, 0.25)])
def test_poisson_arrivals_with_a_fixed_keepalive_cold_start_as_the_formula_says(
    rate: float, keepalive: float, tick: float
) -> None:
    """A request is cold when the gap since the last one exceeds the keep-alive: probability exp(-rate * K).

    Demotion happens on the first control tick at or after K idle seconds, so the effective keep-alive
    is K + U * tick with U uniform on [0, 1): the expectation is exp(-rate K) (1 - exp(-rate tick)) / (rate tick).
    Service and load take 1 ms, against gaps of tens of seconds.
    """
    scenario = parse_scenario(KNOWN.format(seed=5, tick=tick, rate=rate, keepalive=keepalive), HERE)
    result = run_policy_set(scenario, "classic_faas", {"keepalive_s": keepalive}, scenario.workload())
    n = len(result.latencies_s)
    observed = result.cold_starts["cool"] / n
    expected = math.exp(-rate * keepalive) * (1 - math.exp(-rate * tick)) / (rate * tick)
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert n > 4000
    assert abs(observed - expected) < 4 * sigma, (observed, expected, sigma)
