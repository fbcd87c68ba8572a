"""The state layer: the builders of the policies' inputs, and folding a runner's measurements."""

from __future__ import annotations

import math

import pytest

from ember.policies import Bandwidths, IdleHistogram, LatencyModel, Tier
from ember.state import Hosted, Measured, ModelState, RunnerStatistics, fold, model_view, start_delay_s, worker_view


def test_the_start_delay_is_the_rest_of_a_load_or_a_whole_load_and_waits_for_a_free_instance():
    assert start_delay_s(10.0, load_s=2.0) == 2.0
    assert start_delay_s(10.0, load_s=2.0, loading_until=10.5) == pytest.approx(0.5)
    assert start_delay_s(10.0, loading_until=9.0) == 0.0  # an instance is up
    assert start_delay_s(10.0, busy_until=10.25) == pytest.approx(0.25)
    assert start_delay_s(10.0, load_s=1.0, busy_until=10.25) == 1.0


def test_a_busy_model_has_no_idle_time_and_a_hot_one_is_reloaded_from_warm():
    latency = LatencyModel().observe_load(Tier.WARM, 0.3).observe_load(Tier.COOL, 2.0)
    kw = dict(keepalive_hot_s=60.0, keepalive_warm_s=600.0, histogram=IdleHistogram(), latency=latency,
              model_bytes=1 << 20, bandwidths=Bandwidths(), prewarmed=False)  # fmt: skip
    hot = model_view("m", Tier.HOT, 12.0, False, **kw)  # type: ignore[arg-type]
    assert (hot.idle_s, hot.load_s) == (12.0, pytest.approx(0.3))
    assert model_view("m", Tier.HOT, 12.0, True, **kw).idle_s == 0.0  # type: ignore[arg-type]
    assert model_view("m", Tier.COOL, 12.0, False, **kw).load_s == pytest.approx(2.0)  # type: ignore[arg-type]


def test_a_worker_view_adds_up_what_it_hosts():
    hosted = (Hosted("a", 100, "acme", 0.1, 0.02, 0.3), Hosted("b", 50, "acme", 0.5, 0.2, 0.1))
    view = worker_view("w0", "cpu", hosted, capacity_bytes=1000, tenants_seen=("zed",), warm_model="c")
    assert view.models == ("a", "b") and view.bytes_loaded == 150 and view.free_bytes == 850
    assert view.tenants == {"acme", "zed"} and view.warm_models == ("c",)
    assert view.utilization == pytest.approx(0.4)
    assert (view.shortest_slo_s, view.longest_batch_s) == (0.1, 0.2)
    empty = worker_view("w1", "cpu", ())
    assert (empty.shortest_slo_s, empty.longest_batch_s, empty.models) == (math.inf, 0.0, ())


def test_folding_takes_the_gaps_the_arrivals_and_the_runners_latency_model():
    state = ModelState(name="m", prewarmed=True, rate_since=0.0)
    latency = LatencyModel().observe_batch(1, 0.01)
    stats = RunnerStatistics(requests=20, last_active=9.5, latency=latency)
    after = fold(state, Measured(idle_gaps=(4.0,)), stats, now=10.0)
    assert after.histogram.total == 1 and not after.prewarmed  # a new busy period began
    assert after.latency is latency and after.last_active == 9.5
    assert after.arrival_rate == pytest.approx(0.3 * 2.0)
    assert (after.requests_seen, after.rate_since) == (20, 10.0)
    assert fold(after, Measured(), stats, now=10.0) == after  # no time passed, nothing measured
    assert state.histogram.total == 0  # a fold returns a new value


def test_a_generative_model_scales_by_output_tokens_within_its_tpot():
    from ember.config import Deployment, ModelMetadata
    from ember.generation import GenerationInfo
    from ember.state import GenerationStatistics, scale_view

    meta = ModelMetadata((), (), 1, "generate", 1 << 20, GenerationInfo(2048, 1024, 1000))
    d = Deployment(
        name="llm", version=1, model_ref="x", options={}, metadata=meta, slo_ms=100.0, max_batch_size=1,
        max_batch_wait_ms=0.0, keepalive_hot_s=60.0, keepalive_warm_s=600.0, max_queue=16, device="cpu",
        max_instances=4, tpot_slo_ms=80.0, max_num_seqs=8,
    )  # fmt: skip
    steps = LatencyModel().observe_batch(8, 0.02)
    stats = RunnerStatistics(succeeded=10, latency=steps, generation=GenerationStatistics(generation_tokens=500))
    view = scale_view(d, stats, arrival_rate=2.0, current=1)
    assert view.arrival_rate == pytest.approx(100.0)  # 2 requests/s x 50 tokens each
    assert (view.slo_s, view.max_batch_size, view.max_instances) == (pytest.approx(0.08), 8, 4)
    one_shot = scale_view(d, RunnerStatistics(), arrival_rate=2.0, current=1)
    assert (one_shot.arrival_rate, one_shot.slo_s, one_shot.max_batch_size) == (2.0, pytest.approx(0.1), 1)
