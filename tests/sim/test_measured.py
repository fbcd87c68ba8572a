"""The simulator calibrated from a measured profile (``ember.sim.measured``), and the engine's tick grid."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from ember.errors import InvalidInput
from ember.sim.measured import (
    MeasuredModel,
    MeasuredProfile,
    Outcome,
    by_model,
    gap,
    measured_calibration,
    simulate,
)
from ember.sim.workload import Workload


def _profile(tick_s: float = 0.1) -> MeasuredProfile:
    model = MeasuredModel("m", 0.1, 4, 1000, ((1, 0.02), (4, 0.02)), load_s_warm=0.01, load_s_cool=0.03)
    return MeasuredProfile((model,), workers=1, tick_s=tick_s, keepalive_hot_s=2.0, keepalive_warm_s=6.0)


def test_a_profile_round_trips_through_json() -> None:
    profile = _profile()
    assert MeasuredProfile.from_json(profile.to_json()) == profile


def test_a_profile_missing_a_figure_is_refused_with_invalid_input() -> None:
    raw = _profile().to_json()
    del raw["models"][0]["load_s_cool"]
    with pytest.raises(InvalidInput, match="load_s_cool"):
        MeasuredProfile.from_json(raw)


def test_loads_take_the_measured_seconds_per_tier() -> None:
    import random

    cluster, (spec,) = measured_calibration(_profile())
    rng = random.Random(0)
    from ember.sim.cluster import Loader

    assert cluster.load_s(spec, True, Loader.EMBER, rng) == 0.01
    assert cluster.load_s(spec, False, Loader.EMBER, rng) == 0.03
    assert cluster.num_devices == 1


def test_known_answer_cold_warm_and_hot_requests() -> None:
    """Requests at 0, 1, 5 and 20 s; keep-alive hot 2 s, warm 6 s, tick 0.1 s, load warm 10 ms, cool 30 ms.

    0 s: cool load (30 ms) + batch (20 ms) = 50 ms. 1 s: hot, 20 ms. 5 s: idle 4 s > 2 s, so warm:
    10 + 20 = 30 ms. 20 s: idle 15 s > 2 + 6 s, but a load from cool (30 ms) takes more than a quarter
    of the 100 ms SLO, so the keep-alive kept the warm copy: 30 ms again. With a 200 ms SLO the load
    from cool is cheap and the copy goes after 2 + 6 s: cool again, 50 ms. All within the SLO.
    """
    workload = Workload([0.0, 1.0, 5.0, 20.0], [0, 0, 0, 0], [1, 1, 1, 1])
    outcome, _ = simulate(_profile(), workload, duration_s=25.0)
    assert outcome.requests == 4 and outcome.refused == 0 and outcome.slo_attainment == 1.0
    assert outcome.loads == {"warm": 2, "cool": 1}
    assert outcome.p50_ms == pytest.approx(30.0)  # of 20, 30, 30, 50
    lax = _profile()
    lax = replace(lax, models=(replace(lax.models[0], slo_s=0.2),))
    outcome, _ = simulate(lax, workload, duration_s=25.0)
    assert outcome.slo_attainment == 1.0
    assert outcome.loads == {"warm": 1, "cool": 2}
    assert outcome.p50_ms == pytest.approx(40.0)  # of 20, 30, 50, 50


def test_a_tick_that_does_not_divide_time_exactly_still_advances() -> None:
    """tick_s = 0.1: floor(4.3 / 0.1) is 42, so a naive next tick lands at 4.3 again, for ever."""
    workload = Workload([0.0, 4.3, 4.35], [0, 0, 0], [1, 1, 1])
    outcome, result = simulate(_profile(0.1), workload, duration_s=10.0)
    assert outcome.served == 3
    assert result.duration_s == pytest.approx(10.0, abs=1.0)


def test_outcome_and_gap() -> None:
    real = Outcome.of([0.01, 0.02, 0.2], met=2, refused=1, loads={"cool": 3})
    sim = Outcome.of([0.01, 0.02, 0.1], met=3, refused=0, loads={"warm": 1})
    assert real.requests == 4 and real.slo_attainment == 0.5 and real.loads == {"warm": 0, "cool": 3}
    assert sim.requests == 3 and sim.slo_attainment == 1.0
    g = gap(real, sim)
    assert g.attainment_abs == 0.5
    assert g.p99_ratio < 1 and g.p50_ratio == pytest.approx(1.0)
    assert math.isnan(gap(Outcome.of([], 0, 2, {}), sim).p99_ratio)


def _timed_profile() -> MeasuredProfile:
    """One model whose client sees 30 ms for a batch the worker computes in 20 ms, 2 ms of it the hop."""
    model = MeasuredModel(
        "m", 0.1, 4, 1000, ((1, 0.03), (4, 0.03)), load_s_warm=0.01, load_s_cool=0.03,
        compute_s=((1, 0.02), (4, 0.02)), dispatch_s=0.002,
    )  # fmt: skip
    return MeasuredProfile((model,), workers=1, tick_s=0.1, keepalive_hot_s=2.0, keepalive_warm_s=6.0)


def test_with_compute_times_the_device_runs_compute_plus_dispatch_and_the_rest_is_overhead() -> None:
    (model,) = _timed_profile().models
    assert model.device_s == ((1, pytest.approx(0.022)), (4, pytest.approx(0.022)))
    assert model.overhead_s == pytest.approx(0.008)
    _, (spec,) = measured_calibration(_timed_profile())
    assert spec.curve.batch_s(1) == pytest.approx(0.022)
    (old,) = _profile().models  # no compute times: the client time is the device time, no overhead
    assert old.device_s == old.batch_s and old.overhead_s == 0.0


def test_a_timed_profile_round_trips_and_refuses_compute_times_at_other_rows() -> None:
    profile = _timed_profile()
    assert MeasuredProfile.from_json(profile.to_json()) == profile
    with pytest.raises(InvalidInput, match="same row counts"):
        MeasuredModel("m", 0.1, 4, 1000, ((1, 0.03),), 0.01, 0.03, compute_s=((2, 0.02),))
    with pytest.raises(InvalidInput, match="dispatch_s"):
        MeasuredModel("m", 0.1, 4, 1000, ((1, 0.03),), 0.01, 0.03, compute_s=((1, 0.02),), dispatch_s=-1.0)


def test_the_overhead_is_added_to_every_latency_and_decides_the_slo() -> None:
    """A request at 0 s starts the model from cool (30 ms, past its 25 ms SLO: refused once loaded), then
    hot ones at 0.5 s steps: the engine serves each in 22 ms, the client would see 30 ms.

    The engine alone meets every hot request; with the overhead none is met.
    """
    (model,) = _timed_profile().models
    profile = MeasuredProfile((replace(model, slo_s=0.025),), 1, 0.1, 2.0, 6.0)
    workload = Workload([0.0, 1.0, 1.5, 2.0, 2.5], [0] * 5, [1] * 5)
    outcome, result = simulate(profile, workload, 5.0)
    assert result.met_slo == 4  # the engine's own count, before the overhead
    assert outcome.requests == 5 and outcome.served == 4 and outcome.refused == 1
    assert outcome.slo_attainment == 0.0 and outcome.late == 4
    assert outcome.p50_ms == pytest.approx(30.0)


def test_by_model_splits_served_late_refused_batches_and_loads_per_model() -> None:
    fast = MeasuredModel("fast", 0.1, 4, 1000, ((1, 0.02),), 0.01, 0.03)
    slow = MeasuredModel("slow", 0.03, 1, 1000, ((1, 0.05),), 0.01, 0.03)  # a 50 ms batch, a 30 ms SLO
    profile = MeasuredProfile((fast, slow), 1, 0.1, 2.0, 6.0)
    workload = Workload([0.0, 0.5, 1.0, 1.2], [0, 1, 0, 1], [1, 1, 1, 1])
    overall, result = simulate(profile, workload, 5.0)
    per = by_model(profile, result)
    assert per["fast"].requests == 2 and per["fast"].slo_attainment == 1.0 and per["fast"].batches == 2
    assert per["slow"].requests == 2 and per["slow"].slo_attainment == 0.0
    assert per["slow"].refused + per["slow"].late == 2
    assert per["fast"].loads["cool"] == 1 and per["slow"].loads["cool"] >= 1
    assert overall.requests == sum(o.requests for o in per.values())
    assert overall.refused == sum(o.refused for o in per.values()) == result.refused
    assert overall.served == sum(o.served for o in per.values()) == len(result.latencies_s)
