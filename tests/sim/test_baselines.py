"""The baseline policies keep the rules they are named after."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sim_cases import SMALL

from ember.errors import InvalidInput
from ember.policies import Candidate, LatencyModel, PackByMemory, QueueSnapshot, ScaleState, ScaleView
from ember.policies.baselines import (
    EarliestDeadlineFirst,
    FixedSizeBatcher,
    IdleInstance,
    NewestIdle,
    OngoingRequests,
    PerRequest,
    Pinned,
)
from ember.sim.policysets import build_policy_set
from ember.sim.runner import run_policy_set
from ember.sim.scenario import parse_scenario

HERE = Path(__file__).resolve().parent


def view(queued: int, current: int, max_instances: int = 10) -> ScaleView:
    return ScaleView("m", 0.0, queued, current, 0.1, 8, LatencyModel(), 0, max_instances)


def test_ray_scales_up_from_zero_at_once_and_otherwise_after_its_delay() -> None:
    policy = OngoingRequests()
    assert policy.decide(0.0, view(1, 0), ScaleState())[0] == 1
    count, state = policy.decide(0.0, view(9, 1), ScaleState())
    assert count == 1
    count, state = policy.decide(29.0, view(9, 1), state)
    assert count == 1
    count, state = policy.decide(30.0, view(9, 1), state)
    assert count == 5  # ceil(9 / 2)


def test_ray_scales_down_only_after_ten_minutes_of_less_load() -> None:
    policy = OngoingRequests()
    count, state = policy.decide(0.0, view(0, 3), ScaleState())
    assert count == 3
    count, state = policy.decide(599.0, view(0, 3), state)
    assert count == 3
    assert policy.decide(600.0, view(0, 3), state)[0] == 0


def test_ray_forgets_a_pending_change_when_load_returns() -> None:
    policy = OngoingRequests()
    _, state = policy.decide(0.0, view(0, 2), ScaleState())
    _, state = policy.decide(300.0, view(4, 2), state)  # back to target: the countdown resets
    count, _ = policy.decide(700.0, view(0, 2), state)
    assert count == 2


@given(queued=st.integers(0, 100), current=st.integers(0, 100))
def test_faas_gives_every_request_an_instance_and_never_scales_down(queued: int, current: int) -> None:
    count, _ = PerRequest().decide(0.0, view(queued, current), ScaleState())
    assert count == max(queued, current)


def test_pinned_holds_its_count() -> None:
    assert Pinned(2).decide(0.0, view(0, 0), ScaleState())[0] == 2


def snapshot(now: float, arrivals: list[float], max_batch: int = 4) -> QueueSnapshot:
    return QueueSnapshot(now, tuple((a + 1.0, 1, a) for a in arrivals), True, max_batch)


def test_fixed_size_batching_waits_for_a_full_batch_or_its_timeout() -> None:
    policy = FixedSizeBatcher(max_wait_s=0.01)
    waiting = policy.decide(snapshot(0.004, [0.0, 0.002]))
    assert (waiting.take, waiting.wake_at) == (0, 0.01)
    assert policy.decide(snapshot(0.01, [0.0, 0.002])).take == 2
    assert policy.decide(snapshot(0.001, [0.0, 0.0, 0.0, 0.001])).take == 4
    assert policy.decide(snapshot(0.001, [0.0] * 6)).take == 4


def test_edf_runs_the_batch_due_first() -> None:
    late = Candidate("a", 2.0, 0.01, 0.0, 1)
    soon = Candidate("b", 1.0, 0.5, 0.0, 8)
    assert EarliestDeadlineFirst().choose(0.0, (late, soon)) == soon
    assert EarliestDeadlineFirst().choose(0.0, ()) is None


def test_faas_routes_to_the_newest_idle_instance_as_simfaas_does() -> None:
    old, new, newer = IdleInstance("f#0", 0.0, 50.0), IdleInstance("f#1", 10.0, 40.0), IdleInstance("f#2", 10.0, 5.0)
    assert NewestIdle().choose((old, new)) == "f#1"  # started last, whatever its last use
    assert NewestIdle().choose((new, newer, old)) == "f#1"  # a tie: the first listed (started first)
    assert NewestIdle().choose((old,)) == "f#0"


@pytest.mark.parametrize("policy_set", ["classic_faas", "ray_serve"])
def test_the_baselines_pack_onto_the_first_device_while_it_has_room(policy_set: str) -> None:
    scenario = parse_scenario(SMALL, HERE, origin="small")
    options = dict(scenario.policy_sets)[policy_set]
    assert isinstance(build_policy_set(policy_set, options).placement, PackByMemory)
    run = run_policy_set(scenario, policy_set, options, scenario.workload(), record_events=True)
    devices = [event[3] for event in run.events if event[1] == "load"]
    # The small scenario's 34 models fit one H200's memory, and so do classic FaaS's instances (one per
    # request in flight): the second device is never opened.
    assert len(devices) > 34 and set(devices) == {"n0/cuda:0"}


def test_ray_serve_takes_a_fractional_gpu_per_replica() -> None:
    assert build_policy_set("ray_serve", {"num_gpus": 0.25}).placement == PackByMemory(0.25)
    with pytest.raises(InvalidInput, match="num_gpus"):
        build_policy_set("ray_serve", {"num_gpus": 2.0})
