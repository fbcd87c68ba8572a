"""What the control loop knows about one model, as one frozen value, and how measurements fold into it.

:class:`ModelState` holds every piece of per-model memory a policy reads: the latency model, the
idle-time histogram, the autoscaler's state, the arrival rate, the last activity, the tenant, and
whether a pre-warm brought it up. :func:`fold` is the one place a tick's measurements (a runner's
:class:`Measured` and its :class:`RunnerStatistics`) become the next state; the loops replace the
value, never edit it.

A runner owns its model's latency model, because admission reads it on every request: the runner
folds each batch, refusal and load into it (``ModelRunner.observe_load`` for the loads the
controller measures), and publishes it in its statistics; :func:`fold` copies it from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from ember.config import Deployment
from ember.policies.autoscaler import ScaleState
from ember.policies.keepalive import IdleHistogram
from ember.policies.latency import LatencyModel
from ember.policies.placement import DEFAULT_TENANT
from ember.policies.tiers import Tier

__all__ = ["RATE_SMOOTHING", "GenerationStatistics", "Measured", "ModelState", "Runner", "RunnerStatistics", "fold"]

#: Weight of the newest tick in the arrival-rate average.
RATE_SMOOTHING = 0.3


@dataclass(frozen=True)
class GenerationStatistics:
    """What a generative model's runner adds to its statistics (``GenerativeRunner.statistics()``)."""

    #: Streams that ended (answered to their end, failed or refused), and of those, the ones whose
    #: first token came within the TTFT objective and whose tokens came within the TPOT objective.
    answered: int = 0
    ttft_met: int = 0
    tpot_met: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    #: Output tokens per second over the last minute.
    tokens_per_s: float = 0.0
    #: Sequences generating now, and requests waiting for a seat.
    running: int = 0
    waiting: int = 0

    @property
    def ttft_attainment(self) -> float | None:
        return self.ttft_met / self.answered if self.answered else None

    @property
    def tpot_attainment(self) -> float | None:
        return self.tpot_met / self.answered if self.answered else None

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "ttft_attainment": self.ttft_attainment,
            "tpot_attainment": self.tpot_attainment,
            "tokens_per_s": self.tokens_per_s,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "running": self.running,
            "waiting": self.waiting,
        }


@dataclass(frozen=True)
class RunnerStatistics:
    """A runner's counters and what it holds now, as an immutable snapshot (``ModelRunner.statistics()``)."""

    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    slo_met: int = 0
    batches: int = 0
    rows: int = 0
    #: When a request last arrived or a batch last ended.
    last_active: float = 0.0
    #: Requests queued, and requests in running batches.
    queued: int = 0
    running: int = 0
    #: The instances (worker ids) running one of its batches now.
    busy_instances: frozenset[str] = frozenset()
    latency: LatencyModel = field(default_factory=LatencyModel)
    #: A generative model's token counters (None for a one-shot model).
    generation: GenerationStatistics | None = None

    @property
    def busy(self) -> bool:
        """Requests queued or running."""
        return bool(self.running or self.queued)

    @property
    def slo_attainment(self) -> float | None:
        answered = self.succeeded + self.failed
        return self.slo_met / answered if answered else None


@dataclass(frozen=True)
class Measured:
    """What a runner measured since it was last drained (``ModelRunner.drain()``)."""

    #: Idle periods that ended (seconds): from the end of one busy period to the next arrival.
    idle_gaps: tuple[float, ...] = ()
    #: Device seconds its batches took, per instance (worker id).
    busy_s: Mapping[str, float] = field(default_factory=dict)


class Runner(Protocol):
    """What a model's runner publishes to the controller (``scheduler.ModelRunner``; in tests
    ``testing.FakeRunner``): its statistics, what it measured, and where it is told of loads."""

    @property
    def deployment(self) -> Deployment: ...

    @property
    def latency(self) -> LatencyModel:
        """The model's latency model as measured so far."""
        ...

    def statistics(self) -> RunnerStatistics: ...

    def drain(self) -> Measured:
        """What was measured since the last drain."""
        ...

    def instance_loaded(self, instance_id: str) -> None: ...

    def observe_load(self, tier: Tier, seconds: float) -> None: ...


@dataclass(frozen=True)
class ModelState:
    """One model as the control loop remembers it between ticks."""

    name: str
    tenant: str = DEFAULT_TENANT
    latency: LatencyModel = field(default_factory=LatencyModel)
    histogram: IdleHistogram = field(default_factory=IdleHistogram)
    scale_state: ScaleState = field(default_factory=ScaleState)
    #: Requests per second, smoothed over ticks (``RATE_SMOOTHING``).
    arrival_rate: float = 0.0
    #: When a request last arrived or a batch last ended.
    last_active: float = 0.0
    #: Whether a pre-warm brought the model up during the current idle period.
    prewarmed: bool = False
    #: The runner's request count at the last fold, and when that was (for the arrival rate).
    requests_seen: int = 0
    rate_since: float = 0.0

    @classmethod
    def of(cls, deployment: Deployment, now: float) -> ModelState:
        return cls(name=deployment.name, tenant=deployment.tenant, last_active=now, rate_since=now)


def fold(state: ModelState, measured: Measured, stats: RunnerStatistics, now: float) -> ModelState:
    """``state`` after a tick that drained ``measured`` and read ``stats``: idle gaps into the histogram
    (a new busy period clears ``prewarmed``), arrivals into the rate, the runner's latency model."""
    histogram = state.histogram
    for gap in measured.idle_gaps:
        histogram = histogram.observe(gap)
    rate, seen, since = state.arrival_rate, state.requests_seen, state.rate_since
    elapsed = now - since
    if elapsed > 0:
        rate += RATE_SMOOTHING * ((stats.requests - seen) / elapsed - rate)
        seen, since = stats.requests, now
    return replace(
        state,
        latency=stats.latency,
        histogram=histogram,
        arrival_rate=rate,
        last_active=stats.last_active,
        prewarmed=state.prewarmed and not measured.idle_gaps,
        requests_seen=seen,
        rate_since=since,
    )
