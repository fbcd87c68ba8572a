"""Scenarios: the built-in ones load, and a bad file is refused with the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from sim_cases import SMALL

from ember.errors import InvalidInput
from ember.sim.policysets import build_policy_set
from ember.sim.scenario import BUILTIN_SCENARIOS, load_scenario, parse_scenario

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("name", BUILTIN_SCENARIOS)
def test_every_built_in_scenario_loads(name: str) -> None:
    s = load_scenario(name)
    assert s.models and s.policy_sets
    for set_name, options in s.policy_sets:
        build_policy_set(set_name, options)


def test_the_default_scenario_is_the_goal_s_size() -> None:
    s = load_scenario("default")
    assert len(s.models) >= 1000
    assert s.cluster.num_devices == 8
    assert s.duration_s == 86_400
    assert {n for n, _ in s.policy_sets} == {"always_on", "classic_faas", "ray_serve", "ember"}


def test_a_scenario_file_loads_by_path_with_its_trace_beside_it(tmp_path: Path) -> None:
    (tmp_path / "trace.csv").write_text("time_s,model\n0.5,a\n1.0,b\n")
    (tmp_path / "s.yaml").write_text(
        "name: t\nduration_s: 10\nmodels:\n  - {name: a, profile: resnet50, slo_ms: 50}\n"
        "  - {name: b, profile: bert_base, slo_ms: 50}\n"
        "workload: {trace: {path: trace.csv}}\npolicy_sets: [ember]\n"
    )
    s = load_scenario(tmp_path / "s.yaml")
    w = s.workload()
    assert w.models == [0, 1]
    assert s.models[0].weights_bytes == 2 * 25_600_000  # fp16 ResNet-50 from the calibration


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("duration_s: 900", "duration_s: -1"), r"duration_s must be greater than 0 \(got -1\)"),
        (("seed: 3", "seed: 3\nsurprise: 1"), r"there is no field 'surprise'"),
        (("profile: resnet50", "profile: vgg"), r"unknown latency profile 'vgg'"),
        (("slo_ms: 100, service", "slo_ms: 0, service"), r"models.0.slo_ms"),
        (("  synthetic:", "  trace: {path: x.csv}\n  synthetic:"), r"exactly one of workload.synthetic"),
        (("  - ray_serve", "  - lambda"), r"policy_sets.2"),
        (("{keepalive_s: 60}", "{keepalive_hot_s: 60}"), r"classic_faas' has no option 'keepalive_hot_s'"),
        (("  - ray_serve", "  - ray_serve\n  - ray_serve"), r"each policy set may appear once"),
        (("seed: 3", "seed: [3"), r"not valid YAML"),
        (("slo_ms: 1000}", "slo_ms: 1000, cold_service: {kind: exponential}}"), r"cold_service needs mean_ms"),
        (
            ("slo_ms: 1000}", "slo_ms: 1000, cold_start: {mean_ms: 5}, cold_service: {mean_ms: 5}}"),
            r"give cold_start \(the load\) or cold_service",
        ),
    ],
)
def test_a_bad_scenario_names_the_field(change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in SMALL
    text = SMALL.replace(old, new, 1)
    with pytest.raises(InvalidInput, match=message):
        s = parse_scenario(text, HERE, origin="bad")
        for name, options in s.policy_sets:
            build_policy_set(name, options)


def test_a_missing_scenario_lists_the_built_in_ones(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="built-in scenarios: default, faas_single, large"):
        load_scenario(tmp_path / "nope.yaml")


def test_a_model_larger_than_a_device_is_refused() -> None:
    from ember.sim.runner import run_policy_set

    s = parse_scenario(SMALL.replace("devices_per_node: 2", "devices_per_node: 2, device_memory_gb: 1"), HERE)
    with pytest.raises(InvalidInput, match=r"model 'llama-0000' .* does not fit a device of 1.0 GB"):
        run_policy_set(s, "ember", {}, s.workload())


def test_always_on_refuses_models_that_do_not_fit() -> None:
    from ember.sim.runner import run_policy_set

    text = SMALL.replace("devices_per_node: 2", "devices_per_node: 1, device_memory_gb: 3")
    s = parse_scenario(text, HERE)
    with pytest.raises(InvalidInput, match="always-on cannot pin"):
        run_policy_set(s, "always_on", {}, s.workload())
