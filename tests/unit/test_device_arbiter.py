"""The device arbiter: models sharing a worker take turns as the device policy says."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from ember.clock import VirtualClock
from ember.config import DeploySpec
from ember.policies import Candidate, LatestStartFirst
from ember.scheduler import DeviceArbiter
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, LatencyProfile, run_in_virtual_time


def _candidate(model: str, deadline: float) -> Candidate:
    return Candidate(model, deadline, run_s=0.01, swap_in_s=0.0, requests=1)


def test_a_free_device_is_granted_at_once_and_the_least_slack_goes_next():
    async def main(clock: VirtualClock) -> None:
        arbiter = DeviceArbiter(LatestStartFirst(), clock)
        order: list[str] = []

        async def run(model: str, deadline: float, seconds: float) -> None:
            async with arbiter.slot("w", _candidate(model, deadline)):
                order.append(model)
                await clock.sleep(seconds)

        first = asyncio.ensure_future(run("a", 10.0, 1.0))
        await asyncio.sleep(0)
        assert order == ["a"]
        late = asyncio.ensure_future(run("b", 5.0, 0.1))
        await asyncio.sleep(0)
        urgent = asyncio.ensure_future(run("c", 2.0, 0.1))
        await asyncio.sleep(0)
        assert arbiter.waiting("w") == 2
        await asyncio.gather(first, late, urgent)
        assert order == ["a", "c", "b"]  # c offered last but has the least slack
        assert arbiter.waiting("w") == 0
        async with arbiter.slot("w", _candidate("d", 1.0)):  # free again: no wait
            assert clock.now() == pytest.approx(1.2)

    run_in_virtual_time(main)


def test_a_cancelled_waiter_leaves_and_the_device_passes_on():
    async def main(clock: VirtualClock) -> None:
        arbiter = DeviceArbiter(LatestStartFirst(), clock)
        order: list[str] = []

        async def run(model: str, deadline: float) -> None:
            async with arbiter.slot("w", _candidate(model, deadline)):
                order.append(model)
                await clock.sleep(1.0)

        first = asyncio.ensure_future(run("a", 10.0))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(run("b", 1.0))
        kept = asyncio.ensure_future(run("c", 5.0))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(first, kept)
        assert order == ["a", "c"] and gone.cancelled()
        assert arbiter.waiting("w") == 0

    run_in_virtual_time(main)


def test_models_sharing_a_worker_run_by_deadline_not_by_arrival(tmp_path: Path):
    model = tmp_path / "model.py"
    model.write_text("class M: ...\n")

    async def main(clock: VirtualClock) -> None:
        order: list[float] = []
        backend = FakeBackend(clock, size=1, profile=LatencyProfile(base_s=0.05))
        backend.model = lambda batch: (order.append(float(batch["x"][0, 0])), dict(batch))[1]
        service = EmberService(ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm"), clock, backend)
        async with service:
            for name, slo in (("a", 1000), ("b", 500), ("c", 100)):
                spec = {"source": f"{model}:M", "name": name, "slo_ms": slo, "on_unmeetable": "best_effort"}
                await service.deploy(DeploySpec.model_validate(spec))
            order.clear()  # the warm-up batches

            def x(value: float) -> dict[str, np.ndarray]:
                return {"x": np.full((1, 4), value, dtype=np.float32)}

            running = asyncio.ensure_future(service.infer("a", x(1)))
            await clock.sleep(0.01)
            loose = asyncio.ensure_future(service.infer("b", x(2)))  # offered first, due in 500 ms
            await clock.sleep(0.01)
            tight = asyncio.ensure_future(service.infer("c", x(3)))  # offered second, due in 100 ms
            await asyncio.gather(running, loose, tight)
        assert order == [1.0, 3.0, 2.0]

    run_in_virtual_time(main)
