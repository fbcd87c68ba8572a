"""The queue's order and capacity: a request answered while waiting frees its place at once."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.errors import Overloaded
from ember.scheduler.queue import ModelQueue, Pending


def _pending(loop: asyncio.AbstractEventLoop, deadline: float) -> Pending:
    return Pending({"x": np.zeros((1, 1))}, 1, 0.0, deadline, False, loop.create_future())


@given(deadlines=st.lists(st.floats(0, 100), min_size=1, max_size=30), take=st.integers(1, 30))
def test_take_returns_the_earliest_deadlines_in_order(deadlines, take):
    async def main() -> None:
        queue = ModelQueue("m", capacity=100)
        for d in deadlines:
            queue.put(_pending(asyncio.get_running_loop(), d))
        taken = queue.take(take)
        assert [p.deadline for p in taken] == sorted(deadlines)[:take]
        assert len(queue) == len(deadlines) - len(taken)

    asyncio.run(main())


def test_an_answered_request_frees_its_place_before_the_runner_looks():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = ModelQueue("m", capacity=2)
        first, second = _pending(loop, 1.0), _pending(loop, 2.0)
        queue.put(first)
        queue.put(second)
        with pytest.raises(Overloaded, match="2 requests queued"):
            queue.put(_pending(loop, 3.0))
        first.future.cancel()  # the caller timed out or went away
        await asyncio.sleep(0)  # done-callbacks run on the next turn of the loop
        assert len(queue) == 1
        third = _pending(loop, 0.5)
        queue.put(third)
        assert queue.take(5) == [third, second]
        assert len(queue) == 0

    asyncio.run(main())


def test_requeued_requests_are_never_refused():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = ModelQueue("m", capacity=1)
        running = _pending(loop, 1.0)
        queue.put(running)
        (taken,) = queue.take(1)
        queue.put(_pending(loop, 2.0))
        queue.requeue(taken)  # its worker died: it goes back even though the queue is full
        assert [p.deadline for p in queue.take(2)] == [1.0, 2.0]

    asyncio.run(main())
