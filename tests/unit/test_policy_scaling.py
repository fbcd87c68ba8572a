"""Autoscaler, placement, eviction and device scheduling: invariants and known answers."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.policies import (
    Candidate,
    EvictionCandidate,
    ExpectedCostEviction,
    LatencyModel,
    LatestStartFirst,
    LeastLoaded,
    LruEviction,
    MemoryAwarePlacement,
    Move,
    PlacementRequest,
    Resident,
    ScaleState,
    ScaleView,
    SloAutoscaler,
    WorkerView,
    device_share,
    instance_capacity,
    reuse_probability,
)


def _latency(base_s: float, per_row_s: float) -> LatencyModel:
    model = LatencyModel()
    for rows in (1, 2, 4, 8, 16, 32):
        model = model.observe_batch(rows, base_s + per_row_s * rows)
    return model


def _scale_view(rate: float, current: int, latency: LatencyModel, queued: int = 0) -> ScaleView:
    return ScaleView("m", rate, queued, current, 0.1, 32, latency, min_instances=0, max_instances=50)


# -- autoscaler ---------------------------------------------------------------------------------------


def test_capacity_known_answer():
    # 10 ms + 1 ms/row; half of a 100 ms SLO is 50 ms: 32 rows take 42 ms -> 32 / 0.042 per second.
    assert instance_capacity(_latency(0.010, 0.001), 0.1, 32, 0.5) == pytest.approx(32 / 0.042)
    # Even one row misses the budget: capacity of one-row batches.
    assert instance_capacity(_latency(0.2, 0.0), 0.1, 32, 0.5) == pytest.approx(5.0)


def test_scale_up_is_immediate_from_zero():
    scaler = SloAutoscaler()
    count, _ = scaler.decide(0.0, _scale_view(0.0, 0, _latency(0.01, 0.0), queued=1), ScaleState())
    assert count == 1
    count, _ = scaler.decide(0.0, _scale_view(5000.0, 1, _latency(0.01, 0.001)), ScaleState())
    assert count == math.ceil(5000.0 / (32 / 0.042 * 0.7))


@given(
    rate=st.floats(0, 20_000),
    noise=st.lists(st.floats(-0.05, 0.05), min_size=5, max_size=60),
    base=st.floats(0.001, 0.05),
    per_row=st.floats(0, 0.002),
)
def test_no_flapping_under_steady_load(rate, noise, base, per_row):
    """Under a steady rate (a few percent of noise) the count never goes down and up again."""
    scaler = SloAutoscaler(downscale_delay_s=30.0)
    latency = _latency(base, per_row)
    state = ScaleState()
    current = 0
    counts = []
    for tick, jitter in enumerate(noise):
        current, state = scaler.decide(float(tick), _scale_view(rate * (1 + jitter), current, latency), state)
        counts.append(current)
    changes = [b - a for a, b in itertools.pairwise(counts) if b != a]
    assert all(c > 0 for c in changes)  # it may climb to the noise's peak; it never falls back


@given(rates=st.lists(st.floats(0, 5000), min_size=1, max_size=40), delay=st.floats(1, 100))
def test_scale_down_waits_for_the_delay_and_never_drops_below_what_was_wanted(rates, delay):
    scaler = SloAutoscaler(downscale_delay_s=delay)
    latency = _latency(0.01, 0.001)
    state, current = ScaleState(), 0
    history: list[tuple[float, int]] = []
    for tick, rate in enumerate(rates):
        now = float(tick)
        view = _scale_view(rate, current, latency)
        want = scaler.wanted(view)
        history.append((now, scaler.wanted(view, scaler.downscale_utilization)))
        new, state = scaler.decide(now, view, state)
        assert new >= want
        if new < current:
            window = [w for t, w in history if t >= now - delay]
            assert all(w < current for w in window)  # wanted fewer for the whole delay
            assert all(w <= new for w in window)  # and drops no lower than the most it wanted
        current = new


# -- placement ----------------------------------------------------------------------------------------


def _worker(wid: str, loaded: int = 0, capacity: int | None = None, warm: tuple[str, ...] = (), **kw: object):
    fields = {"ready": True, "device": "cuda:0", "models": (), "bytes_loaded": loaded, "in_flight": 0}
    fields.update(kw)
    return WorkerView(wid, capacity_bytes=capacity, warm_models=warm, **fields)  # type: ignore[arg-type]


def test_placement_prefers_warm_weights_then_the_tightest_fit():
    workers = (_worker("a", 0, 100), _worker("b", 60, 100), _worker("c", 90, 100))
    request = PlacementRequest("m", 30, "cuda")
    assert MemoryAwarePlacement().choose(request, workers) == "b"  # c is too full, b fits tightest
    warm = (*workers, _worker("d", 0, 100, warm=("m",)))
    assert MemoryAwarePlacement().choose(request, warm) == "d"
    assert MemoryAwarePlacement().choose(PlacementRequest("m", 200, "cuda"), workers) is None


@given(
    loads=st.lists(st.tuples(st.integers(0, 100), st.booleans(), st.booleans()), min_size=1, max_size=8),
    size=st.integers(0, 100),
)
def test_placement_only_picks_ready_workers_with_room(loads, size):
    workers = tuple(_worker(f"w{i}", used, 100, ready=ready) for i, (used, ready, _) in enumerate(loads))
    choice = MemoryAwarePlacement().choose(PlacementRequest("m", size, "auto"), workers)
    fits = [w for w in workers if w.ready and 100 - w.bytes_loaded >= size]
    if not fits:
        assert choice is None
    else:
        chosen = next(w for w in workers if w.id == choice)
        assert chosen in fits
        assert 100 - chosen.bytes_loaded == min(100 - w.bytes_loaded for w in fits)


def test_placement_packs_by_time_as_well_as_memory():
    # b fits tightest in memory but its device is busy 60% of the time: a model needing 20% more
    # would push it past 70%, so the next tightest with time to spare (a, idle) gets it.
    workers = (_worker("a", 0, 100), _worker("b", 60, 100, utilization=0.6), _worker("c", 50, 100, utilization=0.3))
    placement = MemoryAwarePlacement(max_utilization=0.7)
    assert placement.choose(PlacementRequest("m", 30, "cuda", demand=0.2), workers) == "c"
    assert placement.choose(PlacementRequest("m", 30, "cuda", demand=0.05), workers) == "b"  # still room: pack
    # nobody has time to spare: the least utilized that fits in memory
    busy = (_worker("x", 0, 100, utilization=0.9), _worker("y", 60, 100, utilization=0.8))
    assert placement.choose(PlacementRequest("m", 30, "cuda", demand=0.2), busy) == "y"


@given(
    loads=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 100)), min_size=1, max_size=8),
    demand=st.floats(0.0, 1.0),
)
def test_placement_fills_no_device_past_max_utilization_while_one_has_time(loads, demand):
    workers = tuple(_worker(f"w{i}", used, 100, utilization=u) for i, (u, used) in enumerate(loads))
    placement = MemoryAwarePlacement()
    choice = placement.choose(PlacementRequest("m", 0, "auto", demand=demand), workers)
    chosen = next(w for w in workers if w.id == choice)
    if any(w.utilization + demand <= placement.max_utilization for w in workers):
        assert chosen.utilization + demand <= placement.max_utilization + 1e-12
    else:
        assert chosen.utilization == min(w.utilization for w in workers)


def test_placement_keeps_long_batches_away_from_short_slos_while_a_device_has_time():
    # "vision" holds 100 ms-SLO models with 6 ms batches; "empty" holds nothing; both have time.
    vision = _worker("vision", 50, 100, utilization=0.2, shortest_slo_s=0.1, longest_batch_s=0.006)
    empty = _worker("empty", 0, 100)
    placement = MemoryAwarePlacement()
    llm_request = PlacementRequest("llm", 30, "cuda", slo_s=1.0, batch_s=0.175)
    resnet_request = PlacementRequest("resnet", 30, "cuda", slo_s=0.1, batch_s=0.006)
    # a 175 ms batch would hold the device past a quarter of their SLO: it goes to the empty one
    assert placement.choose(llm_request, (vision, empty)) == "empty"
    # another vision model packs with them (tightest fit)
    assert placement.choose(resnet_request, (vision, empty)) == "vision"
    # and a short-SLO model stays off a device whose residents run long batches
    llm = _worker("llm", 50, 100, utilization=0.2, shortest_slo_s=1.0, longest_batch_s=0.175)
    assert placement.choose(resnet_request, (llm, empty)) == "empty"
    # when nothing else fits, sharing beats not placing at all
    assert placement.choose(llm_request, (vision,)) == "vision"


def _device(wid: str, *shares: float, capacity: int = 100, movable: bool = True) -> WorkerView:
    residents = tuple(Resident(f"{wid}-m{i}", 10, share, movable) for i, share in enumerate(shares))
    return _worker(
        wid,
        10 * len(shares),
        capacity,
        models=tuple(r.model for r in residents),
        utilization=sum(shares),
        residents=residents,
    )


def test_moves_relieve_an_overloaded_device_busiest_first_and_keep_its_busiest_model():
    hot = _device("hot", 0.5, 0.3, 0.15, 0.05)  # 1.0 busy: above high (0.85)
    idle, half = _device("idle"), _device("half", 0.5)
    moves = MemoryAwarePlacement().moves((hot, idle, half))
    # keep the 0.5 model; move 0.3 (1.0 -> 0.7, within max_utilization): one move is enough
    assert moves == (Move("hot-m1", "hot", "idle"),)  # half has no time for 0.3 more (0.5 + 0.3 > 0.7)


def test_moves_count_the_moves_already_planned():
    hot = _device("hot", 0.4, 0.3, 0.3, 0.3)  # 1.3
    moves = MemoryAwarePlacement().moves((hot, _device("a", 0.3), _device("b")))
    destinations = [m.destination for m in moves]
    # two 0.3 models leave (1.3 -> 0.7); a can take one (0.3 + 0.3 <= 0.7), not two: b gets the other
    assert sorted(destinations) == ["a", "b"]
    assert all(m.source == "hot" for m in moves)


def test_moves_leave_a_lone_model_unmoved_and_never_move_onto_an_overloaded_device():
    lone = _device("lone", 1.0)
    assert MemoryAwarePlacement().moves((lone, _device("idle"))) == ()
    both_hot = (_device("p", 0.5, 0.45), _device("q", 0.5, 0.45))
    assert MemoryAwarePlacement().moves(both_hot) == ()
    pinned = _device("pinned", 0.5, 0.45, movable=False)
    assert MemoryAwarePlacement().moves((pinned, _device("idle"))) == ()


def test_device_share_batches_as_the_rate_needs():
    latency = LatencyModel()
    for rows, seconds in ((1, 0.010), (2, 0.010), (4, 0.012), (8, 0.016)):
        latency = latency.observe_batch(rows, seconds)
    assert device_share(0.0, latency, 8) == 0.0
    assert abs(device_share(50.0, latency, 8) - 0.5) < 1e-9  # 50 batches of 1 a second, 10 ms each
    assert abs(device_share(150.0, latency, 8) - 150 * 0.010 / 2) < 1e-9  # pairs keep up: 0.75
    assert device_share(10_000.0, latency, 8) == 1.0  # nothing keeps up


def test_least_loaded_baseline_spreads_and_matches_the_device():
    workers = (_worker("a", 100), _worker("b", 10), _worker("c", 0, ready=False))
    assert LeastLoaded().choose(PlacementRequest("m", 5, "auto"), workers) == "b"
    assert LeastLoaded().choose(PlacementRequest("m", 5, "cuda:1"), workers) is None
    assert LeastLoaded().choose(PlacementRequest("m", 5, "cpu"), workers) is None


# -- eviction -----------------------------------------------------------------------------------------


def test_eviction_keeps_the_model_that_is_expensive_to_reload_and_likely_to_return():
    frequent_big = EvictionCandidate("big", 100, reload_s=5.0, arrival_rate=1.0, last_used=0.0)
    rare_small = EvictionCandidate("rare", 100, reload_s=0.5, arrival_rate=0.001, last_used=10.0)
    assert ExpectedCostEviction().choose(100, (frequent_big, rare_small)) == ("rare",)
    assert LruEviction().choose(100, (frequent_big, rare_small)) == ("big",)


@given(
    candidates=st.lists(
        st.builds(
            EvictionCandidate,
            name=st.text("abcdef", min_size=1, max_size=3),
            bytes=st.integers(1, 100),
            reload_s=st.floats(0, 10),
            arrival_rate=st.floats(0, 10),
            last_used=st.floats(0, 100),
            busy=st.booleans(),
        ),
        max_size=10,
        unique_by=lambda c: c.name,
    ),
    need=st.integers(0, 400),
)
def test_eviction_frees_enough_or_nothing_and_never_a_busy_model(candidates, need):
    for policy in (ExpectedCostEviction(), LruEviction()):
        chosen = policy.choose(need, tuple(candidates))
        by_name = {c.name: c for c in candidates}
        assert len(set(chosen)) == len(chosen)
        assert not any(by_name[n].busy for n in chosen)
        freed = sum(by_name[n].bytes for n in chosen)
        idle_bytes = sum(c.bytes for c in candidates if not c.busy)
        if need <= 0:
            assert chosen == ()
        elif idle_bytes >= need:
            assert freed >= need
            assert freed - by_name[chosen[-1]].bytes < need  # no more than needed
        else:
            assert chosen == ()


def test_reuse_probability_known_answer():
    assert reuse_probability(0.1, 10.0) == pytest.approx(1 - math.exp(-1))
    assert reuse_probability(0.0, 10.0) == 0.0


# -- device scheduling --------------------------------------------------------------------------------


def test_device_runs_the_least_slack_first_counting_the_swap():
    resident = Candidate("a", earliest_deadline=0.100, run_s=0.010, swap_in_s=0.0, requests=4)
    swapped = Candidate("b", earliest_deadline=0.080, run_s=0.010, swap_in_s=0.050, requests=1)
    # b must start by 20 ms (its swap counts), a by 90 ms: b first.
    assert LatestStartFirst().choose(0.0, (resident, swapped)) == swapped
    # At 30 ms b can no longer make it; a can.
    assert LatestStartFirst().choose(0.030, (resident, swapped)) == resident
    assert LatestStartFirst().choose(0.0, ()) is None


@given(
    cands=st.lists(
        st.builds(
            Candidate,
            model=st.sampled_from("abcdefgh"),
            earliest_deadline=st.floats(0, 1),
            run_s=st.floats(0, 0.1),
            swap_in_s=st.floats(0, 0.5),
            requests=st.integers(1, 32),
        ),
        min_size=1,
        max_size=8,
    ),
    now=st.floats(0, 1),
)
def test_device_choice_is_feasible_whenever_a_feasible_batch_exists(cands, now):
    choice = LatestStartFirst().choose(now, tuple(cands))
    assert choice in cands
    feasible = [c for c in cands if c.latest_start >= now]
    if feasible:
        assert choice.latest_start >= now
        assert choice.latest_start == min(c.latest_start for c in feasible)


def test_autoscaler_settings_are_checked():
    with pytest.raises(ValueError, match="downscale_utilization"):
        SloAutoscaler(target_utilization=0.5, downscale_utilization=0.7)
