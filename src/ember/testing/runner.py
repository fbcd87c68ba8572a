"""A stand-in for a model's runner, for tests of the controller alone.

The controller asks a runner only what it publishes (``statistics()``, ``drain()``, the latency
model) and tells it of loads (``instance_loaded``, ``observe_load``): :class:`FakeRunner` answers
with what a test sets and records what it is told, so a controller test states the measurements
it means instead of producing them through requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ember.config import Deployment
from ember.policies.latency import LatencyModel
from ember.policies.tiers import Tier
from ember.state import Measured, RunnerStatistics

__all__ = ["FakeRunner"]


@dataclass
class FakeRunner:
    """A runner whose statistics and measurements the test sets (``arrive``, ``idle_gap``, ``ran``)."""

    deployment: Deployment
    stats: RunnerStatistics = field(default_factory=RunnerStatistics)
    latency: LatencyModel = field(default_factory=LatencyModel)
    #: Instances the controller reported loaded, and the loads it measured (tier, seconds).
    loaded: list[str] = field(default_factory=list)
    loads: list[tuple[Tier, float]] = field(default_factory=list)
    _gaps: list[float] = field(default_factory=list)
    _busy_s: dict[str, float] = field(default_factory=dict)

    def arrive(self, count: int, at: float) -> None:
        """``count`` requests arrived, the last at ``at``."""
        self.stats = replace(self.stats, requests=self.stats.requests + count, last_active=at)

    def idle_gap(self, seconds: float) -> None:
        """An idle period of ``seconds`` ended."""
        self._gaps.append(seconds)

    def ran(self, worker_id: str, seconds: float) -> None:
        """Its batches took ``seconds`` of ``worker_id``'s device."""
        self._busy_s[worker_id] = self._busy_s.get(worker_id, 0.0) + seconds

    def statistics(self) -> RunnerStatistics:
        return replace(self.stats, latency=self.latency)

    def drain(self) -> Measured:
        measured = Measured(tuple(self._gaps), self._busy_s)
        self._gaps, self._busy_s = [], {}
        return measured

    def instance_loaded(self, instance_id: str) -> None:
        self.loaded.append(instance_id)

    def observe_load(self, tier: Tier, seconds: float) -> None:
        self.loads.append((tier, seconds))
        self.latency = self.latency.observe_load(tier, seconds)
