"""The baselines Ember is compared against, as pure policies over frozen snapshots.

They are written to the same rules as Ember's own policies (no I/O, no clock, no logging) so the
simulator can drive either set with one loop:

* **always-on**: :class:`Pinned` instances, never demoted.
* **classic FaaS** (AWS Lambda; the analytical model of Mahmoudi and Khazaei): one request per
  instance (:class:`PerRequest`), no batching, a fixed keep-alive after an instance's last use.
* **Ray-Serve-like**: the ongoing-requests autoscaler with Ray Serve's default delays
  (:class:`OngoingRequests`), fixed-size batching with a fixed wait (:class:`FixedSizeBatcher`, as
  ``@serve.batch``), and least-recently-used eviction of models multiplexed on a replica
  (:class:`LruEviction`).

:class:`SingleInstance` is the core platform's rule before issue 4 (one instance per model, brought
up by the first request) and stands in wherever a policy set has no autoscaler of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ember.policies.batching import BatchDecision, QueueSnapshot

__all__ = [
    "FixedSizeBatcher",
    "InstanceScaler",
    "LruEviction",
    "OngoingRequests",
    "PerRequest",
    "Pinned",
    "ResidentView",
    "ScaleState",
    "ScaleView",
    "SingleInstance",
    "Victims",
]


@dataclass(frozen=True)
class ScaleView:
    """One model, as an autoscaler sees it."""

    name: str
    now: float
    #: Instances up or coming up.
    instances: int
    #: Requests queued or running.
    ongoing: int


@dataclass(frozen=True)
class ScaleState:
    """An autoscaler's memory between calls: since when it has wanted more, or fewer, instances."""

    upscale_since: float | None = None
    downscale_since: float | None = None


class InstanceScaler(Protocol):
    def decide(self, view: ScaleView, state: ScaleState) -> tuple[int, ScaleState]:
        """How many instances ``view``'s model should have, and the state to pass next time."""
        ...


@dataclass(frozen=True)
class Pinned:
    """Always-on: ``count`` instances, whatever the load."""

    count: int = 1

    def decide(self, view: ScaleView, state: ScaleState) -> tuple[int, ScaleState]:
        return self.count, state


@dataclass(frozen=True)
class SingleInstance:
    """One instance while there is work or until keep-alive takes it; up at once from zero."""

    def decide(self, view: ScaleView, state: ScaleState) -> tuple[int, ScaleState]:
        return max(view.instances, min(1, view.ongoing)), state


@dataclass(frozen=True)
class PerRequest:
    """Classic FaaS: one instance per concurrent request, started at once; only keep-alive scales down."""

    def decide(self, view: ScaleView, state: ScaleState) -> tuple[int, ScaleState]:
        return max(view.instances, view.ongoing), state


@dataclass(frozen=True)
class OngoingRequests:
    """Ray Serve's default autoscaling policy: ``ceil(ongoing / target)`` replicas, after a delay.

    Defaults are Ray Serve's (``target_ongoing_requests=2``, ``upscale_delay_s=30``,
    ``downscale_delay_s=600``), with ``min_replicas=0``. From zero replicas the first request scales
    to one at once (Ray's cold-start fast path). Ray averages the metric over ``look_back_period_s``;
    this reads the current value, which makes it react no later than Ray does.
    """

    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    max_replicas: int = 100

    def decide(self, view: ScaleView, state: ScaleState) -> tuple[int, ScaleState]:
        want = min(self.max_replicas, math.ceil(view.ongoing / self.target_ongoing_requests))
        if view.instances == 0 and view.ongoing > 0:
            return 1, ScaleState()
        if want > view.instances:
            since = state.upscale_since if state.upscale_since is not None else view.now
            if view.now - since >= self.upscale_delay_s:
                return want, ScaleState()
            return view.instances, ScaleState(upscale_since=since)
        if want < view.instances:
            since = state.downscale_since if state.downscale_since is not None else view.now
            if view.now - since >= self.downscale_delay_s:
                return want, ScaleState()
            return view.instances, ScaleState(downscale_since=since)
        return view.instances, ScaleState()


@dataclass(frozen=True)
class FixedSizeBatcher:
    """``@serve.batch``: dispatch ``max_batch_size`` rows, or what is queued once the oldest waited ``max_wait_s``.

    Deadlines play no part: requests go in arrival order and nothing is refused.
    """

    max_wait_s: float = 0.01

    def decide(self, snapshot: QueueSnapshot) -> BatchDecision:
        if not snapshot.queued or not snapshot.instance_idle:
            return BatchDecision(0)
        take, rows = 0, 0
        for _, request_rows, _ in snapshot.queued:
            if take and rows + request_rows > snapshot.max_batch_size:
                break
            take += 1
            rows += request_rows
        oldest = min(arrival for _, _, arrival in snapshot.queued)
        if rows >= snapshot.max_batch_size or take < len(snapshot.queued) or snapshot.now >= oldest + self.max_wait_s:
            return BatchDecision(take)
        return BatchDecision(0, oldest + self.max_wait_s)


@dataclass(frozen=True)
class ResidentView:
    """A model resident on one device, as eviction sees it."""

    name: str
    bytes: int
    #: Seconds since it last ran a batch.
    idle_s: float
    #: Running or about to run: not evictable.
    busy: bool


@dataclass(frozen=True)
class Victims:
    """What to evict, in order; ``enough`` says whether it frees the bytes asked for."""

    names: tuple[str, ...]
    enough: bool


@dataclass(frozen=True)
class LruEviction:
    """Evict the least recently used idle residents until ``need_bytes`` are free."""

    def choose(self, need_bytes: int, residents: tuple[ResidentView, ...]) -> Victims:
        if need_bytes <= 0:
            return Victims((), True)
        freed, out = 0, []
        for r in sorted((r for r in residents if not r.busy), key=lambda r: (-r.idle_s, r.name)):
            out.append(r.name)
            freed += r.bytes
            if freed >= need_bytes:
                return Victims(tuple(out), True)
        return Victims(tuple(out), False)
