"""The baselines Ember is compared against, as pure policies over the same snapshots as Ember's own.

They follow the rules of every policy (no I/O, no clock, no logging) and implement the protocols of
``ember.policies`` (``Autoscaler``, ``BatchPolicy``, ``DeviceScheduler``), so the simulator drives
either set with one loop:

* **always-on**: :class:`Pinned` instances, never demoted.
* **classic FaaS** (AWS Lambda; the analytical model of Mahmoudi and Khazaei and its simulator
  SimFaaS): one request per instance (:class:`PerRequest`), no batching, a fixed keep-alive after an
  instance's last use. A request goes to the idle instance :class:`NewestIdle` picks, as SimFaaS
  routes it; when none is idle it starts an instance of its own and is served cold by it.
* **Ray-Serve-like**: the ongoing-requests autoscaler with Ray Serve's default delays
  (:class:`OngoingRequests`), fixed-size batching with a fixed wait (:class:`FixedSizeBatcher`, as
  ``@serve.batch``), and least-recently-used eviction of models multiplexed on a replica
  (``ember.policies.LruEviction``).

:class:`EarliestDeadlineFirst` is the plain device scheduler: the batch due first runs first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ember.policies.autoscaler import ScaleState, ScaleView
from ember.policies.batching import BatchDecision, QueueSnapshot, fill
from ember.policies.devices import Candidate

__all__ = [
    "DelayState",
    "EarliestDeadlineFirst",
    "FixedSizeBatcher",
    "IdleInstance",
    "NewestIdle",
    "OngoingRequests",
    "PerRequest",
    "Pinned",
    "Router",
]


@dataclass(frozen=True)
class Pinned:
    """Always-on: ``count`` instances, whatever the load."""

    count: int = 1

    def decide(self, now: float, view: ScaleView, state: ScaleState) -> tuple[int, ScaleState]:
        return self.count, state


@dataclass(frozen=True)
class PerRequest:
    """Classic FaaS: one instance per request queued or running, started at once; only keep-alive scales down."""

    def decide(self, now: float, view: ScaleView, state: ScaleState) -> tuple[int, ScaleState]:
        return max(view.current, view.queued), state


@dataclass(frozen=True)
class IdleInstance:
    """An instance with nothing queued or running, as a router sees it."""

    name: str
    #: When it was started (its cold start began), in the loop's seconds.
    started_s: float
    #: When it last finished a request.
    last_used_s: float


class Router(Protocol):
    """Which idle instance serves the next request of a model (FaaS: one request per instance)."""

    def choose(self, idle: tuple[IdleInstance, ...]) -> str:
        """The name of one of ``idle`` (never empty)."""
        ...


@dataclass(frozen=True)
class NewestIdle:
    """SimFaaS's choice: the idle instance started last (the first of them, on a tie).

    Sending work to the newest instance leaves the older ones idle, so they reach their keep-alive
    and go: the pool shrinks back after a burst.
    """

    def choose(self, idle: tuple[IdleInstance, ...]) -> str:
        return max(idle, key=lambda x: x.started_s).name


@dataclass(frozen=True)
class DelayState(ScaleState):
    """:class:`OngoingRequests`' memory: since when it has wanted more, or fewer, instances."""

    upscale_since: float | None = None
    downscale_since: float | None = None


@dataclass(frozen=True)
class OngoingRequests:
    """Ray Serve's default autoscaling policy: ``ceil(ongoing / target)`` replicas, after a delay.

    Defaults are Ray Serve's (``target_ongoing_requests=2``, ``upscale_delay_s=30``,
    ``downscale_delay_s=600``), with ``min_replicas=0``. From zero replicas the first request scales
    to one at once (Ray's cold-start fast path). Ray averages the metric over ``look_back_period_s``;
    this reads the current value (``view.queued``: requests queued or running), which reacts no later.
    """

    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    def decide(self, now: float, view: ScaleView, state: ScaleState) -> tuple[int, ScaleState]:
        want = min(view.max_instances, math.ceil(view.queued / self.target_ongoing_requests))
        if view.current == 0 and view.queued > 0:
            return 1, DelayState()
        prior = state if isinstance(state, DelayState) else DelayState()
        if want > view.current:
            since = prior.upscale_since if prior.upscale_since is not None else now
            if now - since >= self.upscale_delay_s:
                return want, DelayState()
            return view.current, DelayState(upscale_since=since)
        if want < view.current:
            since = prior.downscale_since if prior.downscale_since is not None else now
            if now - since >= self.downscale_delay_s:
                return want, DelayState()
            return view.current, DelayState(downscale_since=since)
        return view.current, DelayState()


@dataclass(frozen=True)
class FixedSizeBatcher:
    """``@serve.batch``: send ``max_batch_size`` rows, or what is queued once the oldest waited ``max_wait_s``.

    Deadlines play no part: requests go in arrival order and nothing is refused.
    """

    max_wait_s: float = 0.01

    def decide(self, snapshot: QueueSnapshot) -> BatchDecision:
        if not snapshot.queued or not snapshot.instance_idle:
            return BatchDecision(0)
        take, rows = fill(snapshot)
        oldest = min(arrival for _, _, arrival in snapshot.queued)
        due = oldest + self.max_wait_s
        if rows >= snapshot.max_batch_size or take < len(snapshot.queued) or snapshot.now >= due:
            return BatchDecision(take)
        return BatchDecision(0, due)


@dataclass(frozen=True)
class EarliestDeadlineFirst:
    """Run the candidate batch whose earliest deadline comes first (ties: the model's name)."""

    def choose(self, now: float, candidates: tuple[Candidate, ...]) -> Candidate | None:
        if not candidates:
            return None
        return min(candidates, key=lambda c: (c.earliest_deadline, c.model))
