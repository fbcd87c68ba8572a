"""Billing: host memory held by warm copies and bytes moved by loads, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.sim.engine import RunResult
from ember.sim.runner import run_policy_set
from ember.sim.scenario import parse_scenario
from ember.sim.workload import Workload

HERE = Path(__file__).resolve().parent

TWO = """
name: two
seed: 1
duration_s: 100
tick_s: 1
start_warm: {start_warm}
cluster: {{nodes: 1, devices_per_node: 2, host_memory_gb: 10}}
models:
  - name: fn
    count: 2
    weights_gb: 0.5
    slo_ms: 60000
    max_batch_size: 1
    service: {{kind: constant, mean_ms: 1000}}
    cold_start: {{kind: constant, mean_ms: 2000}}
workload:
  synthetic: {{total_rate_per_s: 1, mix: {{poisson: 1}}}}
policy_sets:
  - {{name: ember, options: {{keepalive_hot_s: 5, keepalive_warm_s: 100000}}}}
  - {{name: classic_faas, options: {{keepalive_s: 5}}}}
"""


def _run(name: str, start_warm: bool) -> RunResult:
    scenario = parse_scenario(TWO.format(start_warm=str(start_warm).lower()), HERE)
    trace = Workload([10.0, 20.0, 40.0, 60.0], [0, 1, 0, 1], [1, 1, 1, 1])
    options = dict(scenario.policy_sets)[name]
    return run_policy_set(scenario, name, options, trace, record_events=True)


def _loads(result: RunResult) -> list[tuple[float, str, str]]:
    return [(e[0], e[2].split("#")[0], e[4]) for e in result.events if e[1] == "load"]


def test_warm_copies_held_from_the_start_are_billed_for_the_whole_run() -> None:
    """Both models sit in host memory from 0 s to 100 s: 2 x 0.5 GB x 100 s; every load comes from there."""
    result = _run("ember", start_warm=True)
    loads = _loads(result)
    assert [source for _, _, source in loads] == ["warm"] * len(loads)
    assert len(loads) >= 2
    assert result.host_memory_gb_seconds == pytest.approx(2 * 0.5 * 100)
    assert result.bytes_loaded == len(loads) * 500_000_000
    assert result.bytes_loaded_from_disk == 0


def test_a_warm_copy_is_billed_from_the_first_load_that_brought_it_from_disk() -> None:
    """Nothing in host memory at first: each model's copy arrives with its first load (from disk) and stays."""
    result = _run("ember", start_warm=False)
    loads = _loads(result)
    first = {name: t for t, name, _ in reversed(loads)}
    assert sorted(first.values()) == [10.0, 20.0]
    assert result.host_memory_gb_seconds == pytest.approx(0.5 * (100 - 10) + 0.5 * (100 - 20))
    assert result.bytes_loaded == len(loads) * 500_000_000
    assert result.bytes_loaded_from_disk == sum(1 for *_, s in loads if s == "cool") * 500_000_000
    assert result.bytes_loaded_from_disk >= 2 * 500_000_000


def test_a_set_without_a_warm_tier_holds_no_host_memory_and_loads_everything_from_disk() -> None:
    result = _run("classic_faas", start_warm=True)
    assert result.host_memory_gb_seconds == 0.0
    assert result.bytes_loaded == result.bytes_loaded_from_disk == 4 * 500_000_000  # keep-alive 5 s < every gap
