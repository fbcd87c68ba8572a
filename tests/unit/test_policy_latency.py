"""The latency model: windowed high quantiles per batch-size bucket, monotone predictions, load times."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.policies import Bandwidths, LatencyModel, remaining_load_s, warmup_batch_sizes, windowed_quantile
from ember.policies.latency import bucket_of
from ember.policies.tiers import Tier

samples = st.lists(st.tuples(st.integers(1, 300), st.floats(0, 5)), max_size=60)


def _fold(observations: list[tuple[int, float]], model: LatencyModel | None = None) -> LatencyModel:
    model = model or LatencyModel()
    for rows, seconds in observations:
        model = model.observe_batch(rows, seconds)
    return model


def test_buckets_are_powers_of_two():
    assert [bucket_of(r) for r in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [0, 1, 2, 2, 3, 3, 4, 4, 5]


def test_nothing_measured_predicts_the_default():
    assert LatencyModel().predict(8) == 0.0
    assert LatencyModel(default_s=0.2).predict(1) == 0.2
    assert not LatencyModel().known


def test_the_estimate_is_the_windowed_p90_and_ignores_one_outlier():
    model = _fold([(1, 0.010)] * 19 + [(1, 5.0)])
    assert model.predict(1) == pytest.approx(0.010)  # one outlier in 20 stays above the p90 rank
    model = _fold([(1, 0.020)] * 32, model)  # the window forgets the old regime
    assert model.predict(1) == pytest.approx(0.020)


def test_a_bucket_not_measured_borrows_the_next_larger_one_or_extends_the_largest():
    model = _fold([(1, 0.01), (8, 0.04)])
    assert model.predict(2) == pytest.approx(0.04)
    assert model.predict(5) == pytest.approx(0.04)
    # Past every measurement: the line through the two largest measured buckets.
    assert model.predict(16) == pytest.approx(0.04 + 8 * 0.03 / 7)
    # A flat profile stays flat; a single measured size scales with rows.
    assert _fold([(1, 0.05), (2, 0.05), (4, 0.05)]).predict(64) == pytest.approx(0.05)
    assert _fold([(4, 0.02)]).predict(16) == pytest.approx(0.08)


@given(observations=samples, a=st.integers(1, 600), b=st.integers(1, 600))
def test_predictions_never_fall_as_the_batch_grows(observations, a, b):
    model = _fold(observations)
    small, large = sorted((a, b))
    assert model.predict(small) <= model.predict(large)


@given(observations=samples)
def test_a_measured_bucket_predicts_within_its_samples(observations):
    model = _fold(observations)
    for rows, _ in observations:
        in_bucket = [s for r, s in observations if bucket_of(r) == bucket_of(rows)][-model.window :]
        assert model.predict(rows) >= windowed_quantile(tuple(in_bucket), model.quantile) - 1e-12


@given(observations=samples)
def test_folding_is_deterministic(observations):
    assert _fold(observations) == _fold(observations)


def test_bad_measurements_are_ignored_and_bad_settings_refused():
    model = LatencyModel()
    assert model.observe_batch(0, 1.0) == model
    assert model.observe_batch(1, float("nan")) == model
    assert model.observe_load(Tier.HOT, 1.0) == model
    with pytest.raises(ValueError, match="quantile"):
        LatencyModel(quantile=0.0)
    with pytest.raises(ValueError, match="window"):
        LatencyModel(window=0)


def test_load_time_comes_from_bandwidths_until_loads_are_measured():
    bw = Bandwidths(disk_bytes_per_s=1e9, host_to_device_bytes_per_s=4e9, setup_s=0.1)
    model = LatencyModel()
    assert model.predict_load(Tier.HOT, 8_000_000_000, bw) == 0.0
    assert model.predict_load(Tier.WARM, 8_000_000_000, bw) == pytest.approx(0.1 + 2.0)
    assert model.predict_load(Tier.COOL, 8_000_000_000, bw) == pytest.approx(0.1 + 2.0 + 8.0)
    measured = model.observe_load(Tier.WARM, 0.5)
    assert measured.predict_load(Tier.WARM, 8_000_000_000, bw) == 0.5
    assert measured.predict_load(Tier.COOL, 8_000_000_000, bw) == pytest.approx(10.1)


def test_warmup_sweeps_small_powers_of_two():
    assert warmup_batch_sizes(64) == (1, 2, 4, 8)
    assert warmup_batch_sizes(3) == (1, 2, 3)
    assert warmup_batch_sizes(1) == (1,)


@given(observations=samples)
def test_measured_times_survive_a_round_trip_through_json(observations):
    model = _fold(observations).observe_load(Tier.COOL, 0.4).observe_load(Tier.WARM, 0.1)
    restored = LatencyModel().from_json(json.loads(json.dumps(model.to_json())))
    for rows in (1, 2, 3, 7, 64, 300, 600):
        assert restored.predict(rows) == pytest.approx(model.predict(rows))
    assert restored.predict_load(Tier.COOL, 0, Bandwidths()) == pytest.approx(0.4)
    # Their times belonged to another process's clock: restored evidence is due to be checked again.
    assert all(restored.probe_due(rows, 0.0, 10.0, 3) for rows, _ in observations)


def test_damaged_measurements_are_skipped_not_fatal():
    data = {"batches": {"0": [0.01, "x"], "zz": [1.0], "1": "nope"}, "loads": {"lukewarm": [1.0], "warm": [0.2]}}
    model = LatencyModel().from_json(data)
    assert model.predict(1) == pytest.approx(0.01)
    assert model.predict_load(Tier.WARM, 0, Bandwidths()) == pytest.approx(0.2)
    assert LatencyModel().from_json({}) == LatencyModel()


def test_a_refusal_counts_on_the_newest_run_of_its_size_and_never_on_a_guess():
    model = _fold([(1, 0.5)] * 9 + [(1, 0.01)])
    assert model.predict(1) == pytest.approx(0.5)  # the p90 still remembers the slow runs ...
    assert model.admission_s(1) == pytest.approx(0.01)  # ... the newest run says it is fast now
    assert model.admission_s(2) == 0.0  # two rows were never measured
    assert model.observe_refusal(2) == model  # nothing to count a refusal against


def test_evidence_is_due_for_a_check_when_old_or_refused_on_often():
    model = LatencyModel().observe_batch(1, 0.5, at=100.0)
    assert not model.probe_due(1, 105.0, 10.0, 3)
    assert model.probe_due(1, 110.0, 10.0, 3)
    refused = model.observe_refusal(1).observe_refusal(1)
    assert not refused.probe_due(1, 105.0, 10.0, 3)
    assert refused.observe_refusal(1).probe_due(1, 105.0, 10.0, 3)
    assert not refused.observe_refusal(1).observe_batch(1, 0.5, at=106.0).probe_due(1, 107.0, 10.0, 3)


def test_a_load_past_its_prediction_is_expected_to_take_as_long_again():
    assert remaining_load_s(1.0, 0.25) == pytest.approx(0.75)
    assert remaining_load_s(1.0, 1.0) == pytest.approx(1.0)
    assert remaining_load_s(0.05, 5.7) == pytest.approx(5.7)


def test_the_warm_up_shapes_predictions_but_never_justifies_a_refusal():
    model = LatencyModel().observe_batch(1, 0.4, at=0.0, warmup=True)
    assert model.predict(1) == pytest.approx(0.4)
    assert model.admission_s(1) == 0.0 and model.probe_due(1, 0.0, 10.0, 3)
    real = model.observe_batch(1, 0.3, at=1.0)
    assert real.admission_s(1) == pytest.approx(0.3) and not real.probe_due(1, 1.0, 10.0, 3)
