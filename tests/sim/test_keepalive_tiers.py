"""Ember's keep-alive in the engine: what stays on the device and in host memory, on hand-checkable traces."""

from __future__ import annotations

from pathlib import Path

from ember.sim.engine import RunResult
from ember.sim.runner import run_policy_set
from ember.sim.scenario import parse_scenario
from ember.sim.workload import Workload

HERE = Path(__file__).resolve().parent

THREE = """
name: three
seed: 1
duration_s: 3000
tick_s: 1
warm_tick_s: 10
start_warm: true
cluster: {{nodes: 1, devices_per_node: 1, host_memory_gb: 100}}
models:
  - {{name: fn, count: 3, weights_gb: {weights_gb}, slo_ms: 1000, max_batch_size: 1, service: {{mean_ms: 100}}}}
workload:
  synthetic: {{total_rate_per_s: 1}}
policy_sets:
  - {{name: ember, options: {{keepalive_hot_s: 5}}}}
"""


def _run(weights_gb: float) -> RunResult:
    """Each of three models called twice, 5 s apart, every 200 s for 3,000 s; the models 30 s apart."""
    scenario = parse_scenario(THREE.format(weights_gb=weights_gb), HERE)
    calls = sorted((10.0 + 30.0 * i + 200.0 * k + pair, i) for k in range(15) for i in range(3) for pair in (0.0, 5.0))
    trace = Workload([t for t, _ in calls], [i for _, i in calls], [1] * len(calls))
    return run_policy_set(scenario, "ember", dict(scenario.policy_sets)["ember"], trace, record_events=True)


def _loads(result: RunResult) -> list[tuple[float, str]]:
    return [(e[0], e[4]) for e in result.events if e[1] == "load"]


def test_models_that_reload_from_warm_within_their_slo_leave_the_device_after_each_call() -> None:
    """0.5 GB loads from host memory in about 9 ms, under a quarter of the 1 s SLO: each model goes back
    to warm 5 s after its second call of a pair though its histogram (idle times of 5 s and 195 s) would
    keep it on the device, so each pair loads once from warm and no tick sees two models loaded."""
    result = _run(0.5)
    assert result.met_slo == 90 and result.refused == 0
    loads = _loads(result)
    assert [source for _, source in loads] == ["warm"] * 45
    assert sorted(t for t, _ in loads) == sorted(10.0 + 30.0 * i + 200.0 * k for k in range(15) for i in range(3))
    assert max(inst for _, inst, _, _ in result.occupancy) == 1
    # A load from disk (0.3 s) would cost the deadline: the warm copies stay the whole run.
    assert result.host_memory_gb_seconds == 3 * 0.5 * 3000
    assert result.bytes_loaded_from_disk == 0


def test_models_whose_warm_load_costs_the_deadline_stay_on_the_device_once_their_histogram_says_so() -> None:
    """20 GB loads from warm in 0.36 s, over a quarter of the SLO: on the fixed 5 s keep-alive each pair
    loads once until ten idle times are counted (five pairs); then the histogram's window (past 195 s)
    keeps each model loaded to the end."""
    result = _run(20.0)
    assert result.met_slo == 90
    loads = _loads(result)
    per_model = [sum(1 for t, _ in loads if round(t - 10.0) % 200 == 30 * i) for i in range(3)]
    assert len(loads) == sum(per_model) and all(5 <= n <= 6 for n in per_model)
    assert all(t < 1300.0 for t, _ in loads)
    assert result.occupancy[-1][1] == 3
