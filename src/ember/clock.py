"""Time, injected.

Nothing in Ember reads the time except through a :class:`Clock`. Production uses
:class:`WallClock`; tests and the simulator use :class:`VirtualClock`, whose time moves only when
it is told to (``advance``) or, with ``autojump``, straight to the next deadline when every task waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar, runtime_checkable

__all__ = ["Clock", "VirtualClock", "WallClock", "run_blocking"]

T = TypeVar("T")


@runtime_checkable
class Clock(Protocol):
    """Monotonic seconds, and a way to wait on them."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def wall(self) -> float:
        """Seconds since the epoch, for timestamps shown to people and stored on disk."""
        ...


class WallClock:
    """The real clock."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def wall(self) -> float:
        return time.time()


class VirtualClock:
    """A clock that moves only when told.

    ``advance(dt)`` moves time forward and wakes every sleeper whose deadline has come.
    With ``autojump=True``, a background ``run_autojump`` task jumps to the next sleeper's deadline
    whenever the event loop has nothing else to do, so async code runs in virtual time.
    """

    def __init__(self, start: float = 0.0, epoch: float = 1_700_000_000.0) -> None:
        self._now = start
        self._epoch = epoch - start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._holds = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """While held, autojump does not move time: real work (a thread) is under way."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._epoch + self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and wake the sleepers that are due."""
        if seconds < 0:
            raise ValueError(f"time cannot go backwards (advance({seconds}))")
        self._now += seconds
        self._wake_due()

    def next_deadline(self) -> float | None:
        self._drop_cancelled()
        return self._sleepers[0][0] if self._sleepers else None

    async def run_autojump(self, idle_rounds: int = 20) -> None:
        """Jump to the next deadline whenever the loop goes idle; run as a background task."""
        while True:
            for _ in range(idle_rounds):
                await asyncio.sleep(0)
            if self._holds:
                await asyncio.sleep(0.001)  # clock-ok: real time passes while a thread works
                continue
            deadline = self.next_deadline()
            if deadline is not None and deadline > self._now:
                self.advance(deadline - self._now)
            elif deadline is not None:
                self._wake_due()

    def _drop_cancelled(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)

    def _wake_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)


async def run_blocking(clock: Clock, fn: Callable[..., T], *args: object) -> T:
    """Run blocking ``fn(*args)`` in a thread; a virtual clock stands still meanwhile."""
    hold = clock.hold() if isinstance(clock, VirtualClock) else contextlib.nullcontext()
    with hold:
        return await asyncio.to_thread(fn, *args)
