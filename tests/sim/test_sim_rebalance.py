"""Placement by device time: models packed by memory alone onto one device are moved off it once measured."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ember.sim.engine import Engine, RunResult
from ember.sim.policysets import build_policy_set
from ember.sim.scenario import Scenario, parse_scenario

HERE = Path(__file__).resolve().parent

# 40 small models whose first requests come within a second: memory alone fits them all on one
# device, whose time they need about twice over (ResNet-50 takes 5.7 ms a batch on an H200).
BUSY = """
name: busy
seed: 11
duration_s: 300
tick_s: 5
warm_tick_s: 60
cluster: {nodes: 1, devices_per_node: 4, host_memory_gb: 100}
models:
  - {name: resnet, count: 40, profile: resnet50, slo_ms: 100, max_batch_size: 32}
workload:
  synthetic: {total_rate_per_s: 500, zipf_s: 0.5, mix: {poisson: 1}}
policy_sets:
  - {name: ember, options: {keepalive_hot_s: 600}}
"""


def _run(scenario: Scenario, rebalance: bool) -> RunResult:
    name, options = scenario.policy_sets[0]
    policies = build_policy_set(name, options)
    if not rebalance:
        policies = dataclasses.replace(policies, rebalance=None)
    engine = Engine(
        scenario.cluster, scenario.models, scenario.workload(), policies, duration_s=scenario.duration_s,
        seed=scenario.seed, tick_s=scenario.tick_s, warm_tick_s=scenario.warm_tick_s, record_events=True,
    )  # fmt: skip
    return engine.run()


def _attainment(result: RunResult) -> float:
    return result.met_slo / (len(result.latencies_s) + result.refused)


def test_an_overloaded_device_sheds_models_to_idle_ones_and_meets_the_slo() -> None:
    scenario = parse_scenario(BUSY, HERE, origin="busy")
    packed, moved = _run(scenario, rebalance=False), _run(scenario, rebalance=True)
    # Without moves the first device keeps every model it took in the first second, and cannot keep up.
    assert sum(1 for e in packed.events if e[1] == "load" and e[3] == "n0/cuda:0") >= 40
    assert _attainment(packed) < 0.9
    # With them, models leave the overloaded device for others at the first tick that measures it,
    # and the SLO is met.
    moves = [e for e in moved.events if e[1] == "move"]
    assert moves and moves[0][0] == scenario.tick_s
    assert all(source != target for _, _, _, source, target in moves)
    assert len({e[3] for e in moved.events if e[1] == "load"}) == 4
    assert _attainment(moved) > 0.99
    # A move drops the instance it replaces once the new one is ready, and loses no request.
    demoted = {e[2] for e in moved.events if e[1] == "demote"}
    assert {key for _, _, key, _, _ in moves} <= demoted
    assert len(moved.latencies_s) + moved.refused == len(scenario.workload())


# One node of 4 devices: 30 vision models (100 ms SLO, ~6 ms batches) and 6 language models whose
# requests run 16 decode steps (~180 ms, SLO 2 s), all placed in the first seconds.
MIXED = """
name: mixed
seed: 5
duration_s: 600
tick_s: 5
warm_tick_s: 60
cluster: {nodes: 1, devices_per_node: 4, host_memory_gb: 100}
models:
  - {name: resnet, count: 30, profile: resnet50, slo_ms: 100, max_batch_size: 32}
  - {name: llama, count: 6, profile: llama1b_decode, work_per_request: 16, slo_ms: 2000, max_batch_size: 8}
workload:
  synthetic: {total_rate_per_s: 40, zipf_s: 0.5, mix: {poisson: 1}}
policy_sets:
  - {name: ember, options: {keepalive_hot_s: 600}}
"""


def test_long_batches_get_devices_of_their_own_and_short_slos_are_met() -> None:
    scenario = parse_scenario(MIXED, HERE, origin="mixed")
    result = _run(scenario, rebalance=True)
    hosts: dict[str, set[str]] = {}
    for event in result.events:
        if event[1] == "load":
            hosts.setdefault(event[2].split("-")[0], set()).add(event[3])
    assert hosts["resnet"].isdisjoint(hosts["llama"])
    assert _attainment(result) > 0.99
