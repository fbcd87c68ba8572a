"""A bounded queue of one model's requests, earliest deadline first."""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

from ember.api import Arrays
from ember.errors import Overloaded

__all__ = ["ModelQueue", "Pending"]


@dataclass(eq=False)
class Pending:
    """One admitted request, from admission until it is answered."""

    inputs: Arrays
    rows: int
    arrival: float
    #: When the answer is due: arrival + SLO, or the request's own timeout.
    deadline: float
    #: Set when the caller gave a timeout: past it the request is refused, not served.
    hard: bool
    future: asyncio.Future[Arrays]
    retried: bool = False
    #: Admitted as a probe (``ember.policies.admission``): served even if predicted late, to measure it.
    probe: bool = False
    dispatched_at: float = 0.0
    #: In a queue's heap and not answered yet: what counts against the queue's capacity.
    queued: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answered(self) -> bool:
        return self.future.done()


class ModelQueue:
    def __init__(self, model: str, capacity: int) -> None:
        self.model = model
        self.capacity = capacity
        self._heap: list[tuple[float, int, Pending]] = []
        self._seq = itertools.count()
        self._live = 0
        self.changed = asyncio.Event()

    def __len__(self) -> int:
        """Requests waiting and not yet answered (a timed-out or abandoned one no longer counts)."""
        return self._live

    def put(self, pending: Pending) -> None:
        if self._live >= self.capacity:
            raise Overloaded(
                f"model '{self.model}' has {self._live} requests queued (its limit, --max-queue); "
                "retry after the Retry-After delay or deploy it with a larger --max-queue",
                retry_after_s=1.0,
            )
        self._push(pending)

    def requeue(self, pending: Pending) -> None:
        """Put back a request that was dispatched and must run again; never refused."""
        self._push(pending)

    def view(self, limit: int) -> tuple[tuple[float, int, float], ...]:
        """The first ``limit`` live requests as (deadline, rows, arrival), in deadline order."""
        return tuple((p.deadline, p.rows, p.arrival) for p in self.peek(limit))

    def peek(self, limit: int) -> list[Pending]:
        """The first ``limit`` live requests, in deadline order, left in the queue."""
        self._drop_answered()
        return [p for _, _, p in heapq.nsmallest(limit, self._heap)]

    def remove(self, requests: list[Pending]) -> None:
        """Take ``requests`` out of the queue (the caller answers them); O(n), for rare refusals."""
        if not requests:
            return
        gone = {id(p) for p in requests}
        for pending in requests:
            self._leave(pending)
        self._heap = [entry for entry in self._heap if id(entry[2]) not in gone]
        heapq.heapify(self._heap)

    def take(self, count: int) -> list[Pending]:
        taken: list[Pending] = []
        while self._heap and len(taken) < count:
            _, _, pending = heapq.heappop(self._heap)
            self._leave(pending)
            if not pending.answered:
                taken.append(pending)
        return taken

    def drain(self) -> list[Pending]:
        taken = [p for _, _, p in self._heap if not p.answered]
        for _, _, pending in self._heap:
            self._leave(pending)
        self._heap.clear()
        return taken

    def _push(self, pending: Pending) -> None:
        if not pending.queued:
            pending.queued = True
            self._live += 1
        pending.future.add_done_callback(functools.partial(self._answered, pending))
        heapq.heappush(self._heap, (pending.deadline, next(self._seq), pending))
        if len(self._heap) > 2 * self.capacity:  # answered entries wait for their turn; cap them
            self._drop_answered()
        self.changed.set()

    def _answered(self, pending: Pending, future: asyncio.Future[Arrays]) -> None:
        self._leave(pending)

    def _leave(self, pending: Pending) -> None:
        if pending.queued:
            pending.queued = False
            self._live -= 1

    def _drop_answered(self) -> None:
        if any(p.answered for _, _, p in self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].answered]
            heapq.heapify(self._heap)
