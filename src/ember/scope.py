"""A scope that owns background tasks: none is fired and forgotten, and none fails unseen.

DESIGN.md principle 4: every background task belongs to an object with a lifetime. An object that
starts tasks (a promotion, an added instance, a runner's loop) starts them in its
:class:`TaskScope`; the scope keeps each until it ends, logs a failure the moment it happens (an
``EmberError`` as a warning with its message, anything else as an error with its traceback), and
``aclose()`` cancels what still runs and waits for it, as the owner stops. Callers that await a task
still see its result or error; the log is for the ones nobody awaits (a pre-warm, a move).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from ember.errors import EmberError

__all__ = ["TaskScope"]

T = TypeVar("T")


class TaskScope:
    """The background tasks of one owner; ``log`` is where their failures are reported."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Run ``coro`` as a task of this scope."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"cannot start {name}: its scope is closed")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()  # retrieved here, so asyncio never warns that nobody did
        if isinstance(error, EmberError):
            self._log.warning("%s failed: %s", task.get_name(), error.message)
        elif error is not None:
            self._log.error("%s failed", task.get_name(), exc_info=error)

    async def aclose(self) -> None:
        """Cancel every task still running and wait until all have ended; no task starts after."""
        self._closed = True
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
