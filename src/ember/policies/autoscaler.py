"""Autoscaler: how many instances of each model.

Decision rule of :class:`SloAutoscaler`, per model:

1. *Capacity of one instance*: the largest batch size ``b`` (a power of two, at most
   ``max_batch_size``) whose predicted latency fits in ``slo_fraction`` of the SLO (the rest is
   left to queueing) serves ``b / predict(b)`` requests per second. If even ``b = 1`` does not fit,
   ``b = 1``.
2. *Wanted*: ``ceil(arrival_rate / (capacity * target_utilization))``, at least 1 while requests are
   queued or arriving, within ``[min_instances, max_instances]``.
3. *Hysteresis*: scale up at once (from zero too: the first request does not wait for a tick).
   Scale down only when even the count wanted at the lower ``downscale_utilization`` is below the
   current one, and has stayed below it for ``downscale_delay_s``; then to the highest such count
   seen during that time. The gap between the two utilizations is a dead band: a load steady within
   it (noise of a few percent) only ever scales up, never down and up again.

State (:class:`ScaleState`) is the policy's own memory: since when the wanted count has been below
the current one, and the highest count wanted since. The caller keeps it and passes it back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ember.policies.latency import LatencyModel

__all__ = ["Autoscaler", "ScaleState", "ScaleView", "SloAutoscaler", "instance_capacity"]


@dataclass(frozen=True)
class ScaleView:
    name: str
    #: Requests per second arriving (measured by the caller over a recent window).
    arrival_rate: float
    #: Requests queued or running now.
    queued: int
    current: int
    slo_s: float
    max_batch_size: int
    latency: LatencyModel
    min_instances: int = 0
    max_instances: int = 1


@dataclass(frozen=True)
class ScaleState:
    #: Since when the wanted count has stayed below the current one; None: it has not.
    below_since: float | None = None
    #: The highest count wanted since ``below_since``.
    highest_wanted: int = 0


class Autoscaler(Protocol):
    def decide(self, now: float, view: ScaleView, state: ScaleState) -> tuple[int, ScaleState]: ...


def instance_capacity(latency: LatencyModel, slo_s: float, max_batch_size: int, slo_fraction: float) -> float:
    """Requests per second one instance serves with batches that fit ``slo_fraction`` of the SLO."""
    budget = slo_s * slo_fraction
    best = 1
    size = 2
    while size <= max_batch_size and latency.predict(size) <= budget:
        best = size
        size *= 2
    seconds = latency.predict(best)
    return math.inf if seconds <= 0 else best / seconds


@dataclass(frozen=True)
class SloAutoscaler:
    target_utilization: float = 0.7
    downscale_utilization: float = 0.5
    slo_fraction: float = 0.5
    downscale_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.downscale_utilization <= self.target_utilization <= 1:
            raise ValueError(
                f"need 0 < downscale_utilization ({self.downscale_utilization}) <= target_utilization "
                f"({self.target_utilization}) <= 1"
            )

    def wanted(self, view: ScaleView, utilization: float | None = None) -> int:
        """The instances ``view``'s load needs at ``utilization`` (default: the target), before hysteresis."""
        target = self.target_utilization if utilization is None else utilization
        capacity = instance_capacity(view.latency, view.slo_s, view.max_batch_size, self.slo_fraction)
        need = 0 if math.isinf(capacity) else math.ceil(view.arrival_rate / (capacity * target))
        if view.arrival_rate > 0 or view.queued > 0:
            need = max(need, 1)
        return min(max(need, view.min_instances), view.max_instances)

    def decide(self, now: float, view: ScaleView, state: ScaleState) -> tuple[int, ScaleState]:
        want = self.wanted(view)
        if want >= view.current:
            return want, ScaleState()
        want = self.wanted(view, self.downscale_utilization)
        if want >= view.current:
            return view.current, ScaleState()
        if state.below_since is None:
            return view.current, ScaleState(now, want)
        highest = max(state.highest_wanted, want)
        if now - state.below_since >= self.downscale_delay_s:
            return highest, ScaleState()
        return view.current, ScaleState(state.below_since, highest)
