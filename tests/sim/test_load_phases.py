"""Loads in two phases: a plain function's process start overlaps other loads; only copies share the host link."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ember.sim.cluster import Loader
from ember.sim.engine import RunResult
from ember.sim.runner import run_policy_set
from ember.sim.scenario import parse_scenario
from ember.sim.workload import Workload

HERE = Path(__file__).resolve().parent

TWO = """
name: two-plain
seed: 1
duration_s: 60
cluster: {nodes: 1, devices_per_node: 1, host_memory_gb: 10}
models:
  - {name: fn, count: 2, weights_gb: 2.0, slo_ms: 60000, max_batch_size: 1, service: {mean_ms: 100}}
workload:
  synthetic: {total_rate_per_s: 1}
policy_sets:
  - {name: classic_faas, options: {keepalive_s: 600}}
  - {name: ember, options: {keepalive_hot_s: 600}}
"""


def _run(name: str) -> tuple[RunResult, float, float]:
    """Both models called at 0 s, on one device: (result, process start, one copy) in seconds."""
    scenario = parse_scenario(TWO, HERE)
    cal = scenario.cluster.calibration
    trace = Workload([0.0, 0.0], [0, 1], [1, 1])
    result = run_policy_set(scenario, name, dict(scenario.policy_sets)[name], trace, record_events=True)
    return result, cal.runtime_start_s, 2e9 / cal.torch_load_bytes_per_s


def test_two_plain_loads_start_their_processes_together_and_copy_one_after_the_other() -> None:
    """Process start 4.4 s, copy 1.8 s (2 GB at torch.load's 1.1 GB/s): ready at start + copy and at
    start + 2 copies, not at twice the whole load."""
    result, start, copy = _run("classic_faas")
    ready = sorted(e[5] for e in result.events if e[1] == "load")
    assert ready == pytest.approx([start + copy, start + 2 * copy])
    served = sorted(e[0] for e in result.events if e[1] == "batch")
    assert served == pytest.approx([start + copy, start + 2 * copy])


def test_ember_loads_have_no_process_start_and_copy_one_after_the_other() -> None:
    """Ember's runtimes are started already: the two cool loads are two copies in a row."""
    result, _, _ = _run("ember")
    scenario = parse_scenario(TWO, HERE)
    copy = 2e9 / scenario.cluster.calibration.disk_to_device_bytes_per_s
    ready = sorted(e[5] for e in result.events if e[1] == "load")
    assert ready == pytest.approx([copy, 2 * copy])


def test_the_phases_add_up_to_the_load_time() -> None:
    scenario = parse_scenario(TWO, HERE)
    cluster, spec = scenario.cluster, scenario.models[0]
    cal = cluster.calibration
    assert cluster.load_phases(spec, False, Loader.PLAIN, random.Random(0)) == (
        cal.runtime_start_s,
        pytest.approx(2e9 / cal.torch_load_bytes_per_s),
    )
    for warm in (True, False):
        start, copy = cluster.load_phases(spec, warm, Loader.EMBER, random.Random(0))
        assert start == 0.0 and copy == cluster.load_s(spec, warm, Loader.EMBER, random.Random(0))
