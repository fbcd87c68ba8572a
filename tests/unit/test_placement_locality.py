"""Placement across nodes that each keep a store: warm there first, then cool there, then elsewhere;
and the node-to-node copy in a cold start's predicted time."""

from __future__ import annotations

import pytest

from ember.policies.placement import (
    MemoryAwarePlacement,
    PlacementRequest,
    TenantIsolated,
    WorkerView,
    locality,
    transfer_s,
)
from ember.state import worker_view


def _view(wid: str, *, warm: str | None = None, cool: str | None = None, free: int = 10_000) -> WorkerView:
    return worker_view(wid, "cpu", (), capacity_bytes=free, warm_model=warm, cool_model=cool)


def test_warm_node_beats_cool_node_beats_a_node_without_the_weights() -> None:
    placement = MemoryAwarePlacement()
    request = PlacementRequest(model="m", bytes=1_000)
    elsewhere, cool, warm = _view("a", free=1_000), _view("b", cool="m"), _view("c", warm="m")
    assert placement.choose(request, (elsewhere, cool, warm)) == "c"
    assert placement.choose(request, (elsewhere, cool)) == "b"
    # Without the weights anywhere, memory decides as on one machine (the tightest fit).
    assert placement.choose(request, (_view("a", free=5_000), _view("b", free=2_000))) == "b"
    assert TenantIsolated(placement).choose(request, (elsewhere, cool, warm)) == "c"


def test_locality_ranks_where_the_weights_are() -> None:
    assert [locality("m", v) for v in (_view("a", warm="m"), _view("b", cool="m"), _view("c"))] == [0, 1, 2]
    assert locality("m", _view("a", warm="other")) == 2


def test_a_busy_warm_node_does_not_win_over_time_to_spare() -> None:
    """Locality comes after time to spare: a saturated device is not chosen for its warm weights."""
    placement = MemoryAwarePlacement()
    busy = _view("a", warm="m")
    busy = WorkerView(**{**busy.__dict__, "utilization": 0.95})
    assert placement.choose(PlacementRequest(model="m", bytes=1_000, demand=0.1), (busy, _view("b"))) == "b"


def test_transfer_time_is_bytes_over_the_link() -> None:
    assert transfer_s(2_500_000_000, 1.25e9) == pytest.approx(2.0)
    assert transfer_s(0, 1.0e9, setup_s=0.01) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        transfer_s(1, 0.0)
