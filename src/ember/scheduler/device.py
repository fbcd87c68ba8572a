"""One device, several models: which model's batch a worker runs next.

A worker runs one batch at a time. When several models are hot on it, each model's runner asks
:meth:`DeviceArbiter.slot` for the device before it sends a batch, offering the batch as a
``policies.Candidate`` (earliest deadline, predicted run time, swap-in cost). While the device is
busy, offers wait; when it frees, the device policy (``policies.LatestStartFirst`` by default)
picks the next one. A model alone on its worker never waits here: the slot is free whenever its own
previous batch is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ember.clock import Clock
from ember.policies.devices import Candidate, DeviceScheduler

__all__ = ["DeviceArbiter"]


class DeviceArbiter:
    def __init__(self, policy: DeviceScheduler, clock: Clock) -> None:
        self._policy = policy
        self._clock = clock
        self._busy: set[str] = set()
        self._waiting: dict[str, list[tuple[Candidate, asyncio.Future[None]]]] = {}

    @asynccontextmanager
    async def slot(self, worker_id: str, candidate: Candidate) -> AsyncIterator[None]:
        """Hold ``worker_id``'s device while the body sends ``candidate``'s batch and waits for it."""
        waiting = self._waiting.setdefault(worker_id, [])
        if worker_id in self._busy or waiting:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (candidate, granted)
            waiting.append(entry)
            try:
                await granted
            except asyncio.CancelledError:
                if entry in waiting:
                    waiting.remove(entry)
                elif granted.done() and not granted.cancelled():
                    self._release(worker_id)  # granted, then cancelled before it ran: pass it on
                raise
        else:
            self._busy.add(worker_id)
        try:
            yield
        finally:
            self._release(worker_id)

    def waiting(self, worker_id: str) -> int:
        """Batches waiting for ``worker_id``'s device."""
        return len(self._waiting.get(worker_id, ()))

    def _release(self, worker_id: str) -> None:
        waiting = self._waiting.get(worker_id)
        if not waiting:
            self._busy.discard(worker_id)
            return
        chosen = self._policy.choose(self._clock.now(), tuple(c for c, _ in waiting))
        index = next((i for i, (c, _) in enumerate(waiting) if c is chosen), 0)
        _, granted = waiting.pop(index)
        granted.set_result(None)  # the device stays busy: it passes to the chosen batch
