"""Batching: when to dispatch, and how many of the queued requests.

The scheduler hands the policy a :class:`QueueSnapshot` (the queue in deadline order, as
``(deadline, rows)`` pairs, plus what it knows of the instance) and gets back a
:class:`BatchDecision`: take the first ``take`` requests now, or wait until ``wake_at`` (or the next
arrival or completion, whichever comes first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["BatchDecision", "BatchPolicy", "DeadlineBatcher", "QueueSnapshot"]


@dataclass(frozen=True)
class QueueSnapshot:
    now: float
    #: Queued requests in earliest-deadline-first order: (deadline, rows, arrival).
    queued: tuple[tuple[float, int, float], ...]
    #: Whether an instance can take a batch now.
    instance_idle: bool
    max_batch_size: int
    #: Predicted seconds to run a full batch (0 while nothing is known).
    predicted_batch_s: float = 0.0


@dataclass(frozen=True)
class BatchDecision:
    take: int
    wake_at: float | None = None


class BatchPolicy(Protocol):
    def decide(self, snapshot: QueueSnapshot) -> BatchDecision: ...


@dataclass(frozen=True)
class DeadlineBatcher:
    """Earliest deadline first; up to ``max_batch_size`` rows; a wait bounded by the slack.

    With ``max_wait_s == 0`` (the default) a batch leaves as soon as an instance is idle, so batches
    form only while the instance is busy: the lowest latency at light load, full batches at heavy
    load. A positive ``max_wait_s`` holds a partial batch up to that long after its oldest arrival,
    but never past the point where the earliest deadline would be missed.
    """

    max_wait_s: float = 0.0

    def decide(self, snapshot: QueueSnapshot) -> BatchDecision:
        if not snapshot.queued or not snapshot.instance_idle:
            return BatchDecision(0)
        take, rows = 0, 0
        for _, request_rows, _ in snapshot.queued:
            if take and rows + request_rows > snapshot.max_batch_size:
                break
            take += 1
            rows += request_rows
        full = rows >= snapshot.max_batch_size or take < len(snapshot.queued)
        if full or self.max_wait_s <= 0:
            return BatchDecision(take)
        oldest = min(arrival for _, _, arrival in snapshot.queued)
        earliest_deadline = snapshot.queued[0][0]
        wake_at = min(oldest + self.max_wait_s, earliest_deadline - snapshot.predicted_batch_s)
        if snapshot.now >= wake_at:
            return BatchDecision(take)
        return BatchDecision(0, wake_at)
