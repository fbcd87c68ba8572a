"""Keep-alive: the hybrid idle-time histogram policy, its fallback and bounds, and the fixed baseline."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.policies import (
    Demotion,
    FixedKeepAlive,
    HybridHistogramKeepAlive,
    IdleHistogram,
    ModelView,
    Prewarm,
)
from ember.policies.tiers import Tier
from ember.testing import poisson_arrivals


def _hist(idle_times: list[float]) -> IdleHistogram:
    hist = IdleHistogram()
    for t in idle_times:
        hist = hist.observe(t)
    return hist


def _view(tier: Tier, idle_s: float, hist: IdleHistogram, **kw: object) -> ModelView:
    fields: dict[str, object] = {"keepalive_hot_s": 300.0, "keepalive_warm_s": 600.0, "histogram": hist}
    fields.update(kw)
    return ModelView("m", tier, idle_s, False, **fields)  # type: ignore[arg-type]


@given(st.lists(st.floats(0, 1e5), max_size=50))
def test_the_histogram_counts_every_idle_time_in_the_right_bin(idle_times):
    hist = _hist(idle_times)
    assert hist.total == len(idle_times) == sum(hist.counts) + hist.out_of_range
    for t in idle_times:
        if t < hist.edge(hist.num_bins - 1):
            upper = hist.percentile(1.0, upper=True)
            assert upper >= min(t, upper)


def test_percentiles_are_bin_edges():
    hist = _hist([60.0] * 99 + [1000.0])
    assert hist.percentile(0.05, upper=False) <= 60.0 < hist.percentile(0.05, upper=True)
    assert hist.percentile(0.99, upper=True) > 60.0
    assert hist.percentile(1.0, upper=True) > 1000.0


@given(
    idle_times=st.lists(st.floats(0, 1e5), max_size=60),
    hot_s=st.floats(0, 1e4),
    lo=st.floats(0.1, 100),
    span=st.floats(0, 1e5),
)
def test_the_keepalive_window_stays_within_its_bounds(idle_times, hot_s, lo, span):
    policy = HybridHistogramKeepAlive(min_keepalive_s=lo, max_keepalive_s=lo + span)
    windows = policy.windows(_view(Tier.HOT, 0.0, _hist(idle_times), keepalive_hot_s=hot_s))
    if windows.from_histogram:
        assert lo <= windows.keepalive_s <= lo + span
        assert 0.0 <= windows.prewarm_s < windows.keepalive_s
    else:
        assert windows.keepalive_s == hot_s and windows.prewarm_s == 0.0


def test_a_histogram_that_is_not_representative_falls_back_to_the_fixed_keepalive():
    policy = HybridHistogramKeepAlive(min_samples=10)
    few = _view(Tier.HOT, 0.0, _hist([5.0] * 9))
    assert not policy.windows(few).from_histogram
    mostly_out = _view(Tier.HOT, 0.0, _hist([5.0] * 10 + [1e9] * 11))
    assert not policy.windows(mostly_out).from_histogram
    assert policy.windows(_view(Tier.HOT, 0.0, _hist([5.0] * 10))).from_histogram


def test_a_model_called_every_few_seconds_stays_hot_just_past_its_longest_gap():
    policy = HybridHistogramKeepAlive()
    hist = _hist([2.0, 3.0, 4.0] * 10)
    w = policy.windows(_view(Tier.HOT, 0.0, hist))
    assert 4.0 < w.keepalive_s < 10.0 and w.prewarm_s == 0.0  # far below the fixed 300 s
    assert policy.decide((_view(Tier.HOT, 3.0, hist),)) == ()
    assert policy.decide((_view(Tier.HOT, w.keepalive_s, hist),)) == (Demotion("m", Tier.WARM),)


def test_a_periodic_model_is_demoted_at_once_and_prewarmed_before_its_next_call():
    policy = HybridHistogramKeepAlive()
    hist = _hist([600.0] * 30)  # a timer every ten minutes
    w = policy.windows(_view(Tier.HOT, 0.0, hist))
    assert 400.0 < w.prewarm_s < 600.0 < w.keepalive_s
    assert policy.decide((_view(Tier.HOT, 1.0, hist, load_s=2.0),)) == (Demotion("m", Tier.WARM),)
    assert policy.decide((_view(Tier.WARM, w.prewarm_s - 3.0, hist, load_s=2.0),)) == ()
    assert policy.decide((_view(Tier.WARM, w.prewarm_s - 2.0, hist, load_s=2.0),)) == (Prewarm("m"),)
    # Once pre-warmed it stays hot until the keep-alive runs out, then leaves.
    assert policy.decide((_view(Tier.HOT, w.prewarm_s - 1.5, hist, load_s=2.0, prewarmed=True),)) == ()
    assert policy.decide((_view(Tier.HOT, w.keepalive_s, hist, prewarmed=True),)) == (Demotion("m", Tier.WARM),)
    assert policy.decide((_view(Tier.WARM, w.keepalive_s + 600.0, hist),)) == (Demotion("m", Tier.COOL),)


views = st.builds(
    ModelView,
    name=st.sampled_from(["a", "b", "c"]),
    tier=st.sampled_from([Tier.HOT, Tier.WARM, Tier.COOL]),
    idle_s=st.floats(0, 10_000),
    busy=st.booleans(),
    keepalive_hot_s=st.floats(0, 1000),
    keepalive_warm_s=st.floats(0, 5000),
    histogram=st.lists(st.floats(0, 3000), max_size=40).map(_hist),
    load_s=st.floats(0, 30),
    prewarmed=st.booleans(),
)


@given(models=st.lists(views, max_size=10))
def test_no_busy_model_is_touched_and_each_action_moves_one_tier(models):
    for policy in (FixedKeepAlive(), HybridHistogramKeepAlive()):
        by_name = {m.name: m for m in models}
        actions = policy.decide(tuple(by_name.values()))
        assert len({a.name for a in actions}) == len(actions)
        for action in actions:
            model = by_name[action.name]
            assert not model.busy
            if isinstance(action, Demotion):
                assert (model.tier, action.to) in ((Tier.HOT, Tier.WARM), (Tier.WARM, Tier.COOL))
            else:
                assert model.tier in (Tier.WARM, Tier.COOL)


@given(model=views)
def test_a_prewarmed_model_is_not_demoted_before_its_keepalive(model):
    policy = HybridHistogramKeepAlive()
    hot = ModelView(**{**model.__dict__, "tier": Tier.HOT, "busy": False, "prewarmed": True})
    demoted = policy.decide((hot,)) != ()
    assert demoted == (hot.idle_s >= policy.windows(hot).keepalive_s)


def test_fixed_keepalive_known_answer_on_a_poisson_model():
    # A Poisson model at rate r with a fixed keep-alive k starts cold when the gap before a request
    # exceeds k: probability exp(-r k).
    rate, keepalive = 0.1, 10.0
    arrivals = poisson_arrivals(rate, 200_000.0, seed=7)
    policy = FixedKeepAlive()
    cold = 0
    for previous, arrival in itertools.pairwise(arrivals):
        view = ModelView("m", Tier.HOT, arrival - previous, False, keepalive, 1e9)
        cold += policy.decide((view,)) == (Demotion("m", Tier.WARM),)
    expected = math.exp(-rate * keepalive)
    assert cold / (len(arrivals) - 1) == pytest.approx(expected, abs=0.01)


@given(
    idle_times=st.lists(st.floats(0, 1e4), max_size=40),
    tier=st.sampled_from([Tier.HOT, Tier.WARM, Tier.COOL]),
    idle=st.floats(0, 2e4),
    later=st.floats(0, 1),
    load_s=st.floats(0, 30),
    prewarmed=st.booleans(),
    fixed=st.booleans(),
)
def test_nothing_new_is_decided_before_recheck_s(idle_times, tier, idle, later, load_s, prewarmed, fixed):
    """A loop may skip a model until ``recheck_s``: until then, its idle time alone changes nothing."""
    policy = FixedKeepAlive() if fixed else HybridHistogramKeepAlive()
    view = _view(tier, idle, _hist(idle_times), load_s=load_s, prewarmed=prewarmed)
    recheck = policy.recheck_s(view)
    assert recheck > idle
    until = min(recheck, idle + 1e5)
    between = idle + later * (until - idle)
    if between < recheck:
        moved = _view(tier, between, view.histogram, load_s=load_s, prewarmed=prewarmed)
        assert [type(a) for a in policy.decide((moved,))] == [type(a) for a in policy.decide((view,))]


def test_recheck_s_is_the_keepalive_for_an_idle_hot_model_and_never_for_a_busy_one():
    assert FixedKeepAlive().recheck_s(_view(Tier.HOT, 10.0, IdleHistogram())) == 300.0
    assert FixedKeepAlive().recheck_s(_view(Tier.WARM, 400.0, IdleHistogram())) == 900.0
    busy = ModelView("m", Tier.HOT, 0.0, True, 300.0, 600.0)
    assert HybridHistogramKeepAlive().recheck_s(busy) == math.inf


def test_a_model_that_reloads_from_warm_within_its_slo_leaves_the_device_after_the_fixed_keepalive():
    """Warm load 0.01 s against a 1 s SLO: a warm start costs no deadline, so the histogram's hour-long
    window (a request an hour) does not keep it on the device, and nothing is pre-warmed."""
    policy = HybridHistogramKeepAlive()
    hist = _hist([3600.0] * 30)
    cheap = policy.windows(_view(Tier.HOT, 0.0, hist, load_s=0.01, slo_s=1.0, keepalive_hot_s=60.0))
    assert cheap.from_histogram and cheap.keepalive_s == 60.0 and cheap.prewarm_s == 0.0
    assert policy.decide((_view(Tier.HOT, 60.0, hist, load_s=0.01, slo_s=1.0, keepalive_hot_s=60.0),)) == (
        Demotion("m", Tier.WARM),
    )
    assert policy.decide((_view(Tier.WARM, 3000.0, hist, load_s=0.01, slo_s=1.0),)) == ()  # no pre-warm
    # A load of 0.3 s is more than a quarter of the SLO: the histogram's windows stand.
    slow = policy.windows(_view(Tier.HOT, 0.0, hist, load_s=0.3, slo_s=1.0, keepalive_hot_s=60.0))
    assert slow.keepalive_s > 3600.0 and slow.prewarm_s > 0.0


def test_a_warm_copy_stays_while_a_load_from_cool_would_cost_the_deadline():
    """Cool load 1.2 s against a 1 s SLO: however long the model idles, it is never demoted to cool."""
    policy = HybridHistogramKeepAlive()
    for hist in (IdleHistogram(), _hist([600.0] * 30)):
        view = _view(Tier.WARM, 1e6, hist, load_s=0.01, slo_s=1.0, cool_load_s=1.2)
        assert policy.windows(view).cool_s == math.inf
        assert policy.decide((view,)) == ()
        assert policy.recheck_s(view) == math.inf


def test_a_model_that_reloads_from_cool_within_its_slo_leaves_host_memory_past_its_idle_times():
    """Cool load 0.1 s against a 1 s SLO: the warm copy goes once idle past the 99th percentile of the
    idle times (with the margin); with too few idle times, after the fixed warm keep-alive."""
    policy = HybridHistogramKeepAlive()
    hist = _hist([600.0] * 30)
    view = _view(Tier.WARM, 0.0, hist, load_s=0.01, slo_s=1.0, cool_load_s=0.1, keepalive_hot_s=60.0)
    w = policy.windows(view)
    assert w.cool_s == pytest.approx(hist.percentile(0.99, upper=True) * 1.1)
    assert 600.0 < w.cool_s < 1000.0
    at = ModelView(**{**view.__dict__, "idle_s": w.cool_s})
    assert policy.decide((at,)) == (Demotion("m", Tier.COOL),)
    few = _view(Tier.WARM, 0.0, _hist([600.0] * 3), load_s=0.01, slo_s=1.0, cool_load_s=0.1, keepalive_hot_s=60.0)
    assert policy.windows(few).cool_s == 60.0 + 600.0
