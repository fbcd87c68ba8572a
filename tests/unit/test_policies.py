"""Invariants of the baseline policies: plain EDF batching, fixed keep-alive, least-loaded placement."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ember.policies import (
    DeadlineBatcher,
    FixedKeepAlive,
    LatencyModel,
    LeastLoaded,
    ModelView,
    PlacementRequest,
    QueueSnapshot,
    TenantIsolated,
    WorkerView,
)
from ember.policies.tiers import Tier

queues = st.lists(st.tuples(st.floats(0, 10), st.integers(1, 8), st.floats(0, 10)), min_size=1, max_size=40).map(
    lambda q: tuple(sorted(q))
)


@given(queue=queues, max_batch=st.integers(1, 32), now=st.floats(0, 20), wait=st.sampled_from([0.0, 0.005, 1.0]))
def test_batcher_takes_a_deadline_ordered_prefix_within_the_batch_size(queue, max_batch, now, wait):
    decision = DeadlineBatcher(max_wait_s=wait).decide(QueueSnapshot(now, queue, True, max_batch))
    assert 0 <= decision.take <= len(queue)
    rows = sum(r for _, r, _ in queue[: decision.take])
    if decision.take > 1:
        assert rows <= max_batch
    if decision.take == 0:
        # Waiting is only allowed for a partial batch, and never past the earliest deadline.
        assert wait > 0
        assert decision.wake_at is not None and decision.wake_at > now
        assert decision.wake_at <= queue[0][0]
        assert sum(r for _, r, _ in queue) < max_batch


@given(queue=queues, max_batch=st.integers(1, 32))
def test_batcher_without_wait_dispatches_at_once_when_idle(queue, max_batch):
    decision = DeadlineBatcher().decide(QueueSnapshot(0.0, queue, True, max_batch))
    assert decision.take >= 1


@given(queue=queues)
def test_batcher_never_dispatches_to_a_busy_instance(queue):
    assert DeadlineBatcher().decide(QueueSnapshot(0.0, queue, False, 8)).take == 0


def test_batcher_fills_a_batch_before_the_wait_runs_out():
    queue = tuple((1.0, 1, 0.0) for _ in range(8))
    assert DeadlineBatcher(max_wait_s=0.5).decide(QueueSnapshot(0.0, queue, True, 8)).take == 8
    partial = queue[:3]
    waiting = DeadlineBatcher(max_wait_s=0.5).decide(QueueSnapshot(0.1, partial, True, 8))
    assert waiting.take == 0 and waiting.wake_at == 0.5
    assert DeadlineBatcher(max_wait_s=0.5).decide(QueueSnapshot(0.5, partial, True, 8)).take == 3


def test_batcher_wait_is_cut_by_the_predicted_latency():
    queue = ((0.3, 1, 0.0),)
    latency = LatencyModel().observe_batch(8, 0.1)
    decision = DeadlineBatcher(max_wait_s=1.0).decide(QueueSnapshot(0.0, queue, True, 8, latency))
    assert decision.wake_at is not None and abs(decision.wake_at - 0.2) < 1e-9


views = st.builds(
    ModelView,
    name=st.sampled_from(["a", "b", "c"]),
    tier=st.sampled_from([Tier.HOT, Tier.WARM, Tier.COOL]),
    idle_s=st.floats(0, 10_000),
    busy=st.booleans(),
    keepalive_hot_s=st.floats(0, 1000),
    keepalive_warm_s=st.floats(0, 5000),
)


@given(models=st.lists(views, max_size=10))
def test_keepalive_demotes_one_tier_after_its_keepalive_and_never_a_busy_model(models):
    demotions = FixedKeepAlive().decide(tuple(models))
    by_name = {}
    for m in models:
        by_name.setdefault(m.name, []).append(m)
    for d in demotions:
        candidates = by_name[d.name]
        assert any(
            not m.busy
            and (
                (m.tier is Tier.HOT and d.to is Tier.WARM and m.idle_s >= m.keepalive_hot_s)
                or (m.tier is Tier.WARM and d.to is Tier.COOL and m.idle_s >= m.keepalive_hot_s + m.keepalive_warm_s)
            )
            for m in candidates
        )
    expected = sum(
        1
        for m in models
        if not m.busy
        and (
            (m.tier is Tier.HOT and m.idle_s >= m.keepalive_hot_s)
            or (m.tier is Tier.WARM and m.idle_s >= m.keepalive_hot_s + m.keepalive_warm_s)
        )
    )
    assert len(demotions) == expected


def test_keepalive_keeps_a_model_hot_within_its_keepalive():
    view = ModelView("m", Tier.HOT, idle_s=299.0, busy=False, keepalive_hot_s=300, keepalive_warm_s=60)
    assert FixedKeepAlive().decide((view,)) == ()


def _worker(wid: str, bytes_loaded: int = 0, ready: bool = True, device: str = "cpu") -> WorkerView:
    return WorkerView(wid, ready, device, (), bytes_loaded, 0)


def test_placement_prefers_the_least_loaded_ready_worker():
    workers = (_worker("a", 100), _worker("b", 10), _worker("c", 0, ready=False))
    assert LeastLoaded().choose(PlacementRequest("m", 5, "auto"), workers) == "b"


def test_placement_matches_the_device_and_says_none_when_nothing_fits():
    workers = (_worker("a", 0, device="cpu"), _worker("g", 50, device="cuda:0"))
    assert LeastLoaded().choose(PlacementRequest("m", 5, "cuda"), workers) == "g"
    assert LeastLoaded().choose(PlacementRequest("m", 5, "cuda:1"), workers) is None
    assert LeastLoaded().choose(PlacementRequest("m", 5, "auto"), (_worker("x", ready=False),)) is None


def test_tenant_isolation_keeps_other_tenants_models_off_a_worker():
    def hosting(wid: str, *tenants: str, bytes_loaded: int = 0) -> WorkerView:
        return WorkerView(
            wid, True, "cpu", tuple(f"m{i}" for i in range(len(tenants))), bytes_loaded, 0, tenants=frozenset(tenants)
        )

    policy = TenantIsolated(LeastLoaded())
    workers = (
        hosting("a", "acme", bytes_loaded=10),
        hosting("b", "globex", bytes_loaded=1),
        hosting("c", bytes_loaded=50),
    )
    acme, initech = PlacementRequest("m", 5, tenant="acme"), PlacementRequest("m", 5, tenant="initech")
    assert LeastLoaded().choose(acme, workers) == "b"  # the least loaded, whoever is there
    assert policy.choose(acme, workers) == "a"  # its own tenant's worker
    assert policy.choose(initech, workers) == "c"  # an empty one
    assert policy.choose(initech, workers[:2]) is None  # none free of others
    assert policy.choose(acme, (workers[0], hosting("c"))) == "c"  # alone, it spreads
    # With another tenant there, acme keeps to its worker and leaves the empty one to newcomers.
    assert policy.choose(acme, (workers[0], workers[1], hosting("c"))) == "a"
    unready = WorkerView("a", False, "cpu", ("m0",), 10, 0, tenants=frozenset({"acme"}))
    assert policy.choose(acme, (unready, workers[1], hosting("c"))) == "c"  # its own is down
