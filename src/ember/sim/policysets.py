"""Policy sets: the bundles of decisions the simulator compares on one trace.

Each set names one implementation per decision (batching, device scheduling, keep-alive, placement,
autoscaling, eviction) plus the facts about the platform under it that are not decisions: whether
started runtimes are pooled and weights load through Ember's loader, whether host memory keeps a
warm tier, and whether requests that cannot meet their deadline are refused at admission. The
policies live in ``ember.policies`` (Ember's own and the baselines); the simulator only calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ember.errors import InvalidInput
from ember.policies import (
    Autoscaler,
    BatchPolicy,
    DeadlineBatcher,
    DeviceScheduler,
    Eviction,
    ExpectedCostEviction,
    FixedKeepAlive,
    HybridHistogramKeepAlive,
    KeepAlive,
    LatestStartFirst,
    LeastLoaded,
    LruEviction,
    MemoryAwarePlacement,
    PackByMemory,
    Placement,
    Rebalancer,
    SloAutoscaler,
    SloBatcher,
)
from ember.policies.baselines import (
    EarliestDeadlineFirst,
    FixedSizeBatcher,
    NewestIdle,
    OngoingRequests,
    PerRequest,
    Pinned,
    Router,
)
from ember.sim.cluster import Loader

__all__ = ["PolicySet", "SetName", "build_policy_set"]


class SetName(StrEnum):
    ALWAYS_ON = "always_on"
    CLASSIC_FAAS = "classic_faas"
    RAY_SERVE = "ray_serve"
    EMBER = "ember"


@dataclass(frozen=True)
class PolicySet:
    name: str
    batcher: BatchPolicy
    devices: DeviceScheduler
    #: None: nothing is demoted for being idle (pinned, or left to the autoscaler and eviction).
    keepalive: KeepAlive | None
    placement: Placement
    scaler: Autoscaler
    eviction: Eviction
    loader: Loader
    #: Host memory keeps a demoted model's weights (the warm tier).
    warm_tier: bool
    #: Every model is placed and loaded before the trace starts, and stays.
    pinned: bool = False
    #: Refuse at arrival a request that cannot meet its deadline even alone, or probe (``ember.policies.admission``).
    admission: bool = False
    #: The loop learns online what the policies read: batch and load times (``LatencyModel``) and idle
    #: times (``IdleHistogram``). Sets whose policies ignore both skip the bookkeeping.
    learns: bool = False
    #: Rows per batch; None: each model's own ``max_batch_size``.
    max_batch_size: int | None = None
    keepalive_hot_s: float = 300.0
    keepalive_warm_s: float = 3600.0
    #: Moves models off overloaded devices at each tick; None: nothing moves once placed.
    rebalance: Rebalancer | None = None
    #: FaaS dispatch: each request is bound at arrival to one instance, which holds it until answered
    #: (concurrency one): the idle instance the router picks, or else an instance started for it, which
    #: serves it cold. None: one queue per model, served by whichever of its instances is free first.
    router: Router | None = None
    #: Ask the keep-alive about an idle instance when it goes idle and then at the exact time
    #: ``KeepAlive.recheck_s`` names (an event), not at control ticks; ticks then run every
    #: ``warm_tick_s`` (every ``tick_s`` while a model waits for room). Only for sets without a warm tier.
    exact_keepalive: bool = False

    def __post_init__(self) -> None:
        if self.exact_keepalive and self.warm_tier:
            raise InvalidInput(f"policy set '{self.name}': exact keep-alive events cover the hot tier only")


def build_policy_set(name: str, options: dict[str, float]) -> PolicySet:
    """The named set, with ``options`` applied where the set has such a knob (see ``_OPTIONS``)."""
    try:
        kind = SetName(name)
    except ValueError:
        known = ", ".join(s.value for s in SetName)
        raise InvalidInput(f"unknown policy set '{name}'; choose from: {known}") from None
    unknown = sorted(set(options) - _OPTIONS[kind])
    if unknown:
        raise InvalidInput(f"policy set '{name}' has no option {unknown[0]!r}; it takes {sorted(_OPTIONS[kind])}")
    if any(v < 0 for v in options.values()):
        raise InvalidInput(f"policy set '{name}': options must be >= 0, got {options}")
    edf, lru, spread, pack = EarliestDeadlineFirst(), LruEviction(), LeastLoaded(), PackByMemory()
    if kind is SetName.ALWAYS_ON:
        return PolicySet(name, DeadlineBatcher(), edf, None, spread, Pinned(), lru, Loader.EMBER, warm_tier=False,
                         pinned=True)  # fmt: skip
    if kind is SetName.CLASSIC_FAAS:  # instances share devices by memory, as GPU FaaS offerings do
        keep = options.get("keepalive_s", 600.0)
        return PolicySet(name, DeadlineBatcher(), edf, FixedKeepAlive(), pack, PerRequest(), lru, Loader.PLAIN,
                         warm_tier=False, max_batch_size=1, keepalive_hot_s=keep, keepalive_warm_s=0.0,
                         router=NewestIdle(), exact_keepalive=True)  # fmt: skip
    if kind is SetName.RAY_SERVE:
        batch = int(options.get("max_batch_size", 10))  # @serve.batch's defaults: 10 rows, 10 ms
        if batch < 1:
            raise InvalidInput("ray_serve: max_batch_size must be >= 1")
        gpus = options.get("num_gpus", 0.0)  # a replica's fractional GPU; 0: memory alone packs
        if gpus > 1:
            raise InvalidInput(f"ray_serve: num_gpus must be at most 1, got {gpus}")
        # Ray's scheduler packs replicas by the resources they ask for: memory, and num_gpus when given.
        return PolicySet(name, FixedSizeBatcher(options.get("max_wait_s", 0.01)), edf, None, PackByMemory(gpus or None),
                         OngoingRequests(), lru, Loader.PLAIN, warm_tier=False, max_batch_size=batch)  # fmt: skip
    placement = MemoryAwarePlacement()
    return PolicySet(
        name, SloBatcher("refuse", options.get("max_wait_s", 0.0)), LatestStartFirst(), HybridHistogramKeepAlive(),
        placement, SloAutoscaler(), ExpectedCostEviction(), Loader.EMBER, warm_tier=True,
        admission=True, learns=True,
        keepalive_hot_s=options.get("keepalive_hot_s", 300.0), keepalive_warm_s=options.get("keepalive_warm_s", 3600.0),
        rebalance=placement,
    )  # fmt: skip


_OPTIONS: dict[SetName, frozenset[str]] = {
    SetName.ALWAYS_ON: frozenset(),
    SetName.CLASSIC_FAAS: frozenset({"keepalive_s"}),
    SetName.RAY_SERVE: frozenset({"max_batch_size", "max_wait_s", "num_gpus"}),
    SetName.EMBER: frozenset({"keepalive_hot_s", "keepalive_warm_s", "max_wait_s"}),
}
