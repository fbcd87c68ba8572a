"""TaskScope: background tasks owned by one object, their failures logged, all ended at close."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ember.errors import ModelUnavailable
from ember.scope import TaskScope

_log = logging.getLogger("ember.test.scope")


def test_a_failure_nobody_awaits_is_logged_with_its_traceback(caplog):
    async def broken() -> None:
        raise ValueError("a bug")

    async def main() -> None:
        scope = TaskScope(_log)
        task = scope.spawn(broken(), name="ember-broken")
        await asyncio.wait([task])
        assert len(scope) == 0

    with caplog.at_level(logging.WARNING, logger="ember.test.scope"):
        asyncio.run(main())
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and "ember-broken failed" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ValueError


def test_an_ember_error_is_logged_by_its_message_and_its_awaiter_still_sees_it(caplog):
    async def unavailable() -> None:
        raise ModelUnavailable("no worker can take 'm' now", retry_after_s=1.0)

    async def main() -> None:
        scope = TaskScope(_log)
        with pytest.raises(ModelUnavailable):
            await scope.spawn(unavailable(), name="ember-promote-m")

    with caplog.at_level(logging.WARNING, logger="ember.test.scope"):
        asyncio.run(main())
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "ember-promote-m failed: no worker can take 'm' now"


def test_close_cancels_what_runs_waits_for_it_and_starts_nothing_after(caplog):
    ended: list[str] = []
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            ended.append("forever")

    async def main() -> None:
        scope = TaskScope(_log)
        task = scope.spawn(forever(), name="ember-forever")
        await started.wait()
        await scope.aclose()
        assert task.cancelled() and ended == ["forever"] and len(scope) == 0

        async def late() -> None: ...

        with pytest.raises(RuntimeError, match="closed"):
            scope.spawn(late(), name="ember-late")

    with caplog.at_level(logging.WARNING, logger="ember.test.scope"):
        asyncio.run(main())
    assert not caplog.records  # a cancelled task is not a failure
