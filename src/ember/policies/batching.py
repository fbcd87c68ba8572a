"""Batching: which of a model's queued requests to send now, which to refuse, or how long to wait.

The scheduler hands the policy a :class:`QueueSnapshot` (the queue in earliest-deadline-first
order, what the latency model predicts, and how long before a batch could start: a load when the
model is not hot) and gets back a :class:`BatchDecision`.

Decision rule of :class:`SloBatcher`:

1. A request is *meetable* if, served alone, it finishes by its deadline by what a refusal may count
   on: ``now + start_delay_s + admission_s(rows) <= deadline`` (``LatencyModel.admission_s``: the
   lower of the prediction and the newest measurement of that size; nothing for a size never
   measured). With ``on_unmeetable="refuse"`` an unmeetable request is refused at once (a hard
   deadline, the caller's own timeout, always is); with ``"best_effort"`` it is served, late. A
   request admitted as a *probe* is never refused by prediction.
2. The batch is the longest EDF prefix (at most ``max_batch_size`` rows) such that every meetable
   request in it still finishes by its deadline when the whole prefix runs as one batch. Predicted
   latency does not fall as a batch grows and deadlines rise along the prefix, so the first prefix
   that breaks a deadline ends the search: one pass, at most ``max_batch_size`` steps.
3. With ``max_wait_s > 0`` a batch that is not full may wait for more requests, up to
   ``max_wait_s`` after its oldest arrival, and never past the last moment it still meets every
   deadline in it.

As time passes with the same queue, the conditions of rules 1 and 2 only turn from met to unmet, so
the decision holds until the first that does: the decision says when (``valid_until``), and a caller
asked about many models at once (the simulator's devices) keeps it until the queue changes or then.

:func:`admission` is rule 1 for one arriving request: the check the scheduler runs at admission, so
an unmeetable request is refused before it is queued. It never locks a model out: a request that
only its speed would refuse (the newest run of its size missed the budget even without waiting) is
served as a *probe* when an instance is idle and that evidence is due to be checked again: its size
was never measured, its newest run is ``probe_after_s`` old, or ``probe_after_refusals`` requests
were refused on it since. So a model whose real speed meets its SLO is served again after at most
that many refusals, whatever its history; one that truly misses it answers one request in
``probe_after_refusals + 1`` late, and refuses the rest at once. A refusal says when the same
request is predicted to be admitted (``retry_after_s``), and whether only a new measurement can
change the answer (``too_slow``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ember.policies.latency import LatencyModel

__all__ = [
    "Admission",
    "BatchDecision",
    "BatchPolicy",
    "DeadlineBatcher",
    "OnUnmeetable",
    "QueueSnapshot",
    "SloBatcher",
    "admission",
    "admits",
]

OnUnmeetable = Literal["refuse", "best_effort"]
Verdict = Literal["admit", "probe", "refuse"]

#: A refusal by speed alone is checked again (a probe, when an instance is idle) once the newest
#: measurement of that size is this old ...
PROBE_AFTER_S = 10.0
#: ... or once this many requests were refused on it.
PROBE_AFTER_REFUSALS = 3


@dataclass(frozen=True)
class QueueSnapshot:
    now: float
    #: Queued requests in earliest-deadline-first order: (deadline, rows, arrival).
    queued: tuple[tuple[float, int, float], ...]
    #: Whether an instance can take a batch now.
    instance_idle: bool
    max_batch_size: int
    #: Predicts seconds per batch of ``rows``; an empty model predicts ``default_s`` (0: optimistic).
    latency: LatencyModel = field(default_factory=LatencyModel)
    #: Seconds before a batch sent now could start running: the predicted load if the model is not hot.
    start_delay_s: float = 0.0
    #: Per queued request, whether its deadline is hard (the caller's timeout); empty: none is.
    hard: tuple[bool, ...] = ()
    #: Per queued request, whether it was admitted as a probe (never refused by prediction); empty: none.
    probes: tuple[bool, ...] = ()


@dataclass(frozen=True)
class BatchDecision:
    #: Send the first ``take`` requests (after removing ``refuse``) as one batch now.
    take: int
    #: Nothing to send: look again at ``wake_at`` (or at the next arrival or completion).
    wake_at: float | None = None
    #: Positions in ``queued`` to refuse now, as unmeetable.
    refuse: tuple[int, ...] = ()
    #: Rows in the batch of ``take`` requests; 0: not counted (count them).
    rows: int = 0
    #: The same snapshot (queue, latency model, delay) asked again before this time gets the same
    #: decision, so a caller may keep it until then; -inf: ask again.
    valid_until: float = -math.inf


class BatchPolicy(Protocol):
    def decide(self, snapshot: QueueSnapshot) -> BatchDecision: ...


@dataclass(frozen=True)
class Admission:
    """What admission decided for one request."""

    verdict: Verdict
    #: For a refusal: seconds after which the same request is predicted to be admitted.
    retry_after_s: float = 0.0
    #: For a refusal: the model's own speed refuses it (its newest run of that size missed the budget
    #: with no wait at all), so waiting changes nothing until it is measured again.
    too_slow: bool = False


def admission(
    now: float,
    deadline: float,
    rows: int,
    latency: LatencyModel,
    start_delay_s: float = 0.0,
    *,
    idle: bool = False,
    probe_after_s: float = PROBE_AFTER_S,
    probe_after_refusals: int = PROBE_AFTER_REFUSALS,
) -> Admission:
    """Admit, probe or refuse a request of ``rows`` due at ``deadline`` (served alone after ``start_delay_s``).

    ``idle``: an instance holds the model and runs nothing, so a probe would start at once.
    """
    run_s = latency.admission_s(rows)
    if now + start_delay_s + run_s <= deadline:
        return Admission("admit")
    if now + run_s <= deadline:  # only the wait is too long, and it shrinks as time passes
        return Admission("refuse", now + start_delay_s + run_s - deadline)
    if idle and latency.probe_due(rows, now, probe_after_s, probe_after_refusals):
        return Admission("probe")
    newest = latency.newest(rows)
    due_in = probe_after_s if newest is None else max(0.0, newest[1] + probe_after_s - now)
    return Admission("refuse", max(start_delay_s, due_in), too_slow=True)


def admits(
    now: float,
    deadline: float,
    rows: int,
    latency: LatencyModel,
    start_delay_s: float = 0.0,
) -> bool:
    """Whether a request of ``rows`` due at ``deadline`` can finish in time if served alone (no probe)."""
    return now + start_delay_s + latency.admission_s(rows) <= deadline


@dataclass(frozen=True)
class SloBatcher:
    """SLO-aware earliest deadline first: the largest batch that keeps every meetable deadline."""

    on_unmeetable: OnUnmeetable = "refuse"
    max_wait_s: float = 0.0

    def decide(self, snapshot: QueueSnapshot) -> BatchDecision:
        queued = snapshot.queued
        if not queued:
            return BatchDecision(0)
        latency = snapshot.latency
        predict = latency.predict
        alone_s = latency.admission_s
        max_rows = snapshot.max_batch_size
        idle = snapshot.instance_idle
        start = snapshot.now + snapshot.start_delay_s
        refuse_all = self.on_unmeetable == "refuse"
        hard = snapshot.hard
        probes = snapshot.probes
        refused: list[int] = []
        take = 0
        rows = 0
        earliest = float("inf")  # the earliest deadline among meetable requests in the batch
        oldest = float("inf")
        stopped = False
        alone_rows, alone = 0, 0.0  # the last request size predicted alone: most requests share one
        turns = math.inf  # the latest start at which every condition met so far is still met
        for index, (deadline, request_rows, arrival) in enumerate(queued):
            if request_rows != alone_rows:
                alone_rows, alone = request_rows, alone_s(request_rows)
            meetable = start + alone <= deadline
            probe = index < len(probes) and probes[index]
            if not meetable and not probe and (refuse_all or (index < len(hard) and hard[index])):
                refused.append(index)
                continue
            if meetable and deadline - alone < turns:
                turns = deadline - alone
            if stopped or not idle:
                continue  # only looking for requests to refuse now
            bound = deadline if meetable and deadline < earliest else earliest
            if take:
                if rows + request_rows > max_rows:
                    stopped = True
                    continue
                together = predict(rows + request_rows)
                if start + together > bound:
                    stopped = True
                    continue
                if bound - together < turns:
                    turns = bound - together
            take += 1
            rows += request_rows
            earliest = bound
            if arrival < oldest:
                oldest = arrival
        refuse = tuple(refused)
        # A nanosecond short of the turn, so float rounding never lets a kept decision outlive it.
        valid_until = turns - snapshot.start_delay_s - 1e-9
        if take == 0:
            return BatchDecision(0, refuse=refuse, valid_until=valid_until)
        full = stopped or rows >= snapshot.max_batch_size
        if full or self.max_wait_s <= 0:
            return BatchDecision(take, refuse=refuse, rows=rows, valid_until=valid_until)
        wake_at = min(oldest + self.max_wait_s, earliest - snapshot.start_delay_s - latency.predict(rows))
        if snapshot.now >= wake_at:
            return BatchDecision(take, refuse=refuse, rows=rows, valid_until=valid_until)
        return BatchDecision(0, wake_at, refuse=refuse, valid_until=min(valid_until, wake_at))


@dataclass(frozen=True)
class DeadlineBatcher:
    """The plain EDF batcher (a baseline): up to ``max_batch_size`` rows, never refuses.

    With ``max_wait_s == 0`` a batch leaves as soon as an instance is idle; a positive ``max_wait_s``
    holds a partial batch up to that long after its oldest arrival, but never past the point where
    the earliest deadline would be missed under the predicted latency of a full batch.
    """

    max_wait_s: float = 0.0

    def decide(self, snapshot: QueueSnapshot) -> BatchDecision:
        if not snapshot.queued or not snapshot.instance_idle:
            return BatchDecision(0)
        take, rows = fill(snapshot)
        full = rows >= snapshot.max_batch_size or take < len(snapshot.queued)
        if full or self.max_wait_s <= 0:
            return BatchDecision(take, rows=rows, valid_until=math.inf)  # time plays no part
        oldest = min(arrival for _, _, arrival in snapshot.queued)
        earliest_deadline = snapshot.queued[0][0]
        predicted = snapshot.latency.predict(snapshot.max_batch_size)
        wake_at = min(oldest + self.max_wait_s, earliest_deadline - snapshot.start_delay_s - predicted)
        if snapshot.now >= wake_at:
            return BatchDecision(take, rows=rows, valid_until=math.inf)
        return BatchDecision(0, wake_at, valid_until=wake_at)


def fill(snapshot: QueueSnapshot) -> tuple[int, int]:
    """``(requests, rows)`` of the longest queue prefix within ``max_batch_size`` rows (at least one
    request, even one larger than the limit)."""
    take, rows = 0, 0
    for _, request_rows, _ in snapshot.queued:
        if take and rows + request_rows > snapshot.max_batch_size:
            break
        take += 1
        rows += request_rows
    return take, rows
