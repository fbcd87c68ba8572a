"""Billing: host memory held by warm copies and bytes moved by loads, exactly, and their price in dollars."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.sim.engine import RunResult
from ember.sim.prices import DEFAULT_PRICES, Prices, bill
from ember.sim.report import summarise
from ember.sim.runner import run_policy_set
from ember.sim.scenario import load_scenario, parse_scenario
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
prices: {{gpu_hour_usd: 3.6, host_memory_gb_hour_usd: 0.036}}
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


def test_the_bill_is_gpu_hours_and_host_gb_hours_at_their_prices() -> None:
    """7,200 GPU-seconds at $3.60 an hour is $7.20; 36,000 GB-seconds at $0.036 a GB-hour is $0.36."""
    b = bill(7200.0, 36_000.0, Prices(gpu_hour_usd=3.6, host_memory_gb_hour_usd=0.036))
    assert b.gpu_usd == pytest.approx(7.2)
    assert b.host_memory_usd == pytest.approx(0.36)
    assert b.total_usd == pytest.approx(7.56)


def test_the_report_prices_a_run_with_the_scenarios_prices() -> None:
    """Ember's warm copies sit in pinned memory, with its loader's staging buffers (128 MiB per device)."""
    scenario = parse_scenario(TWO.format(start_warm="true"), HERE)
    result = _run("ember", start_warm=True)
    report = summarise(result, 0.0, None, scenario.prices)
    gpu_usd = result.gpu_seconds / 3600 * 3.6
    pinned_gb_s = 2 * 0.5 * 100 + 2 * (128 << 20) / 1e9 * 100
    host_usd = pinned_gb_s / 3600 * 0.036
    assert report.host_memory_gb_seconds == pytest.approx(100.0)
    assert report.pinned_memory_gb_seconds == pytest.approx(pinned_gb_s)
    assert report.gpu_usd == pytest.approx(gpu_usd)
    assert report.host_memory_usd == report.pinned_memory_usd == pytest.approx(host_usd)
    assert report.usd == pytest.approx(gpu_usd + host_usd)
    assert report.usd_per_million_requests == pytest.approx((gpu_usd + host_usd) / 4 * 1e6)
    assert report.load_gb == pytest.approx(result.bytes_loaded / 1e9)


def test_a_scenario_without_prices_bills_at_the_defaults_the_default_scenario_cites() -> None:
    bare = parse_scenario(TWO.format(start_warm="true").replace(
        "prices: {gpu_hour_usd: 3.6, host_memory_gb_hour_usd: 0.036}\n", ""), HERE)  # fmt: skip
    assert bare.prices == DEFAULT_PRICES == load_scenario("default").prices


def test_pinned_memory_is_priced_apart_from_pageable() -> None:
    """At $0.036 a pinned GB-hour and $0.0036 a pageable one, 36,000 pinned GB-seconds cost $0.36 and
    36,000 pageable ones $0.036; a set without Ember's loader holds no pinned memory."""
    b = bill(0.0, 36_000.0, Prices(host_memory_gb_hour_usd=0.0036, pinned_memory_gb_hour_usd=0.036), 36_000.0)
    assert b.pinned_memory_usd == pytest.approx(0.36)
    assert b.host_memory_usd == pytest.approx(0.396)
    assert b.total_usd == pytest.approx(0.396)
    assert Prices(host_memory_gb_hour_usd=0.01).pinned_gb_hour_usd == 0.01  # by default the same DRAM
    text = TWO.format(start_warm="true").replace("0.036}", "0.036, pinned_memory_gb_hour_usd: 0.072}")
    priced = parse_scenario(text, HERE)
    assert priced.prices.pinned_gb_hour_usd == 0.072
    faas = _run("classic_faas", start_warm=True)
    assert faas.pinned_memory_gb_seconds == faas.pageable_memory_gb_seconds == 0.0


CLASSES = """
name: classes
seed: 1
duration_s: 100
tick_s: 1
start_warm: true
cluster: {nodes: 1, devices_per_node: 1, host_memory_gb: 10}
models:
  - {name: small, count: 2, weights_gb: 0.5, slo_ms: 60000, max_batch_size: 1, service: {mean_ms: 1000}}
  - {name: big, weights_gb: 1.5, slo_ms: 60000, max_batch_size: 1, service: {mean_ms: 1000}}
workload:
  synthetic: {total_rate_per_s: 1}
prices: {gpu_hour_usd: 3.6, host_memory_gb_hour_usd: 0.036}
policy_sets:
  - always_on
"""


def test_the_bill_is_split_per_model_class_by_the_weights_each_keeps_on_the_devices() -> None:
    """Always-on pins 2 x 0.5 GB of ``small`` and 1.5 GB of ``big`` on one device for 100 s: the device's
    $0.10 splits 1.0 : 1.5, and so do its staging buffers; nothing is warm."""
    scenario = parse_scenario(CLASSES, HERE)
    trace = Workload([10.0, 20.0, 30.0], [0, 1, 2], [1, 1, 1])
    result = run_policy_set(scenario, "always_on", {}, trace)
    report = summarise(result, 0.0, None, scenario.prices)
    assert list(report.classes) == ["small", "big"]
    small, big = report.classes["small"], report.classes["big"]
    assert (small.requests, big.requests) == (2, 1)
    assert small.gpu_memory_gb_seconds == pytest.approx(100.0)
    assert big.gpu_memory_gb_seconds == pytest.approx(150.0)
    assert report.gpu_usd == pytest.approx(0.1)
    assert small.gpu_usd == pytest.approx(0.04) and big.gpu_usd == pytest.approx(0.06)
    staging_usd = (128 << 20) / 1e9 * 100 / 3600 * 0.036
    assert small.pinned_memory_usd == pytest.approx(0.4 * staging_usd)
    assert big.pinned_memory_usd == pytest.approx(0.6 * staging_usd)
    assert small.usd + big.usd == pytest.approx(report.usd)
    assert small.usd_per_million_requests == pytest.approx(small.usd / 2 * 1e6)
