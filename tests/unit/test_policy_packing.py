"""The baselines' placement: pack by memory (and a fraction of a device per model), fullest first."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.policies import PackByMemory, PlacementRequest, WorkerView


def _worker(wid: str, loaded: int, capacity: int | None = 100, models: int = 0, device: str = "cuda:0") -> WorkerView:
    names = tuple(f"r{i}" for i in range(models))
    return WorkerView(wid, True, device, names, loaded, 0, capacity)


def test_packing_takes_the_tightest_fit_and_leaves_empty_devices_empty():
    workers = (_worker("empty", 0), _worker("half", 50, models=1), _worker("full", 90, models=3))
    assert PackByMemory().choose(PlacementRequest("m", 10), workers) == "full"
    assert PackByMemory().choose(PlacementRequest("m", 20), workers) == "half"
    assert PackByMemory().choose(PlacementRequest("m", 60), workers) == "empty"


def test_packing_breaks_ties_on_more_models_then_the_id():
    workers = (_worker("b", 50, models=1), _worker("a", 50, models=1), _worker("c", 50, models=2))
    assert PackByMemory().choose(PlacementRequest("m", 10), workers) == "c"
    assert PackByMemory().choose(PlacementRequest("m", 10), workers[:2]) == "a"


def test_packing_respects_memory_and_says_none_when_nothing_has_room():
    workers = (_worker("a", 95), _worker("b", 91), _worker("gone", 0, device="cpu"))
    assert PackByMemory().choose(PlacementRequest("m", 10, "cuda"), workers) is None
    assert PackByMemory().choose(PlacementRequest("m", 9, "cuda"), workers) == "b"
    not_ready = (WorkerView("x", False, "cuda:0", (), 0, 0, 100),)
    assert PackByMemory().choose(PlacementRequest("m", 1), not_ready) is None


def test_unknown_capacity_has_room_but_comes_after_known_capacity():
    workers = (_worker("unknown", 0, capacity=None), _worker("known", 0))
    assert PackByMemory().choose(PlacementRequest("m", 10), workers) == "known"
    assert PackByMemory().choose(PlacementRequest("m", 500), workers) == "unknown"


def test_a_gpu_fraction_caps_the_models_per_device():
    workers = (_worker("a", 40, models=4), _worker("b", 10, models=1))
    assert PackByMemory(0.25).choose(PlacementRequest("m", 1), workers) == "b"
    assert PackByMemory(0.2).choose(PlacementRequest("m", 1), workers) == "a"
    assert PackByMemory(0.5).choose(PlacementRequest("m", 1), (_worker("a", 0, models=2),)) is None
    with pytest.raises(ValueError, match="gpu_fraction"):
        PackByMemory(1.5)


@given(
    sizes=st.lists(st.integers(1, 100), min_size=1, max_size=40),
    fraction=st.sampled_from([None, 0.1, 0.25, 0.5, 1.0]),
)
def test_packing_never_overfills_and_opens_a_device_only_when_no_other_has_room(
    sizes: list[int], fraction: float | None
) -> None:
    policy, capacity = PackByMemory(fraction), 100
    slots = len(sizes) if fraction is None else round(1 / fraction)
    loaded = {f"d{i}": [0, 0] for i in range(len(sizes))}  # bytes, models
    for n, size in enumerate(sizes):
        views = tuple(_worker(d, b, capacity, models=k) for d, (b, k) in loaded.items())
        chosen = policy.choose(PlacementRequest(f"m{n}", size), views)
        assert chosen is not None  # one empty device per model is always there
        room = [d for d, (b, k) in loaded.items() if k and b + size <= capacity and k < slots]
        if room:
            assert chosen in room
            left = {d: capacity - loaded[d][0] - size for d in room}
            assert left[chosen] == min(left.values())
        loaded[chosen][0] += size
        loaded[chosen][1] += 1
        assert loaded[chosen][0] <= capacity and loaded[chosen][1] <= slots
