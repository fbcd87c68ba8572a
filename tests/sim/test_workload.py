"""Workloads: the synthetic generator's shape, and trace replay."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import InvalidInput
from ember.sim.workload import Pattern, SyntheticSpec, load_trace, synthetic

HERE = Path(__file__).resolve().parent
DAY = 86_400.0


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    models=st.integers(1, 40),
    rate=st.floats(0.01, 5.0),
    duration=st.floats(10.0, 3600.0),
    max_rows=st.integers(1, 8),
)
def test_arrivals_are_sorted_in_range_and_repeatable(
    seed: int, models: int, rate: float, duration: float, max_rows: int
) -> None:
    spec = SyntheticSpec(rate, max_rows=max_rows)
    w = synthetic(spec, models, duration, seed)
    assert w.times == sorted(w.times)
    assert all(0 <= t < duration for t in w.times)
    assert all(0 <= m < models for m in w.models)
    assert all(1 <= s <= max_rows for s in w.sizes)
    assert len(w.times) == len(w.models) == len(w.sizes)
    assert len(w.patterns) == models
    again = synthetic(spec, models, duration, seed)
    assert (again.times, again.models, again.sizes) == (w.times, w.models, w.sizes)


def test_poisson_traffic_has_the_asked_rate() -> None:
    w = synthetic(SyntheticSpec(20.0, mix=((Pattern.POISSON, 1.0),)), 50, 3600.0, seed=1)
    expected = 20.0 * 3600
    assert abs(len(w) - expected) < 5 * np.sqrt(expected)


def test_popularity_is_heavy_tailed_and_many_models_idle_for_hours() -> None:
    n = 1000
    w = synthetic(SyntheticSpec(6.0, zipf_s=1.3), n, DAY, seed=7)
    counts = Counter(w.models)
    ranked = sorted((counts.get(i, 0) for i in range(n)), reverse=True)
    assert sum(ranked[:10]) > 0.4 * len(w)  # the top 1 % of models take a large share
    times_by_model: dict[int, list[float]] = {}
    for t, m in zip(w.times, w.models, strict=True):
        times_by_model.setdefault(m, []).append(t)
    longest_gap = {m: max(np.diff([0.0, *ts, DAY])) for m, ts in times_by_model.items()}
    idle_for_hours = sum(1 for m in range(n) if longest_gap.get(m, DAY) >= 3 * 3600)
    assert idle_for_hours > 0.25 * n


def test_timer_models_fire_periodically() -> None:
    spec = SyntheticSpec(1.0, mix=((Pattern.TIMER, 1.0),), timer_periods_s=(60.0,))
    w = synthetic(spec, 3, 3600.0, seed=2)
    for model in range(3):
        ts = np.array([t for t, m in zip(w.times, w.models, strict=True) if m == model])
        assert 58 <= len(ts) <= 61
        assert np.all(np.abs(np.diff(ts) - 60.0) < 1.0)


def test_bursty_models_go_silent_between_bursts() -> None:
    spec = SyntheticSpec(1.0, mix=((Pattern.BURSTY, 1.0),), burst_on_s=30.0, burst_off_s=600.0)
    w = synthetic(spec, 1, DAY, seed=4)
    gaps = np.diff(w.times)
    assert abs(len(w) - DAY) < 0.35 * DAY  # the mean rate holds
    assert np.max(gaps) > 600  # long silences
    assert np.median(gaps) < 0.2  # dense bursts: about 21 requests per second while on


def test_diurnal_models_follow_the_day() -> None:
    spec = SyntheticSpec(2.0, mix=((Pattern.DIURNAL, 1.0),), diurnal_amplitude=0.9)
    w = synthetic(spec, 1, DAY, seed=3)
    per_hour = np.bincount((np.array(w.times) // 3600).astype(int), minlength=24)
    assert per_hour.max() > 5 * per_hour.min()


def test_a_bad_spec_is_refused_with_the_reason() -> None:
    with pytest.raises(InvalidInput, match="total_rate_per_s"):
        SyntheticSpec(0.0)
    with pytest.raises(InvalidInput, match="diurnal amplitude"):
        SyntheticSpec(1.0, diurnal_amplitude=2.0)


def test_the_azure_trace_replays_from_time_zero_in_order() -> None:
    w = load_trace(HERE / "azure_conv_400.csv", ["llm"], time_column="TIMESTAMP", model="llm",
                   size_column="GeneratedTokens")  # fmt: skip
    assert len(w) == 400
    assert w.times[0] == 0.0
    assert w.times == sorted(w.times)
    assert 60 < w.times[-1] < 600
    assert set(w.models) == {0}
    assert w.sizes[:3] == [44, 109, 55]


def test_a_multi_model_trace_maps_names_and_sorts(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("time_s,model,rows\n5.0,b,2\n1.5,a,1\n3,b,4\n")
    w = load_trace(path, ["a", "b"], size_column="rows")
    assert w.times == [0.0, 1.5, 3.5]
    assert w.models == [0, 1, 1]
    assert w.sizes == [1, 4, 2]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("time_s,model\n1,zzz\n", "model 'zzz' is not in the scenario"),
        ("time_s,model\nsoon,a\n", "neither seconds nor a date-time"),
        ("when,model\n1,a\n", "no column 'time_s'"),
        ("time_s,model\n", "no rows"),
        ("time_s,model,rows\n1,a,0\n", "size must be >= 1"),
    ],
)
def test_a_bad_trace_names_the_line_and_the_problem(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(body)
    with pytest.raises(InvalidInput, match=message):
        load_trace(path, ["a"], size_column="rows" if "rows" in body else None)
