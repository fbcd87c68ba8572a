"""The controller against a fake runner: it folds only what the runner publishes, and tells it of loads."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from ember.clock import VirtualClock
from ember.config import Deployment, ModelMetadata
from ember.controller import Controller
from ember.metrics import Metrics
from ember.policies import FixedKeepAlive, MemoryAwarePlacement, Tier
from ember.state import RATE_SMOOTHING
from ember.store import Store
from ember.testing import FakeBackend, FakeRunner, LatencyProfile, run_in_virtual_time, stage_weights


def _deployment(name: str = "m", tenant: str | None = None) -> Deployment:
    return Deployment(
        name=name, version=1, model_ref="x.py:M", options={},
        metadata=ModelMetadata(inputs=(), outputs=(), max_batch_size=8, task=None, bytes=1024),
        slo_ms=100.0, max_batch_size=8, max_batch_wait_ms=0.0, keepalive_hot_s=60.0, keepalive_warm_s=600.0,
        max_queue=16, device="cpu", extra={} if tenant is None else {"tenant": tenant},
    )  # fmt: skip


def _controller(tmp_path: Path, clock: VirtualClock, backend: FakeBackend) -> tuple[Controller, Store]:
    store = Store(tmp_path / "store", tmp_path / "shm")
    keepalive = FixedKeepAlive()
    controller = Controller(clock, store, backend, keepalive, MemoryAwarePlacement(), Metrics(), tick_s=1.0)
    return controller, store


def test_a_tick_folds_what_the_runner_drained_once_and_its_arrivals_into_the_rate(tmp_path):
    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(clock)
        await backend.start()
        controller, _ = _controller(tmp_path, clock, backend)
        runner = FakeRunner(_deployment(tenant="acme"))
        controller.add(runner)
        assert controller.state("m").tenant == "acme"
        await clock.sleep(2.0)
        runner.arrive(10, at=clock.now())
        runner.idle_gap(3.0)
        runner.idle_gap(5.0)
        await controller.tick()
        state = controller.state("m")
        assert state.histogram.total == 2
        assert state.arrival_rate == pytest.approx(RATE_SMOOTHING * 10 / 2.0)
        assert state.last_active == clock.now()
        await clock.sleep(1.0)
        await controller.tick()  # nothing new: the gaps were handed over once, and no request came
        again = controller.state("m")
        assert again.histogram == state.histogram
        assert again.arrival_rate == pytest.approx(state.arrival_rate * (1 - RATE_SMOOTHING))
        await backend.stop()

    run_in_virtual_time(main)


def test_a_promotion_tells_the_runner_of_the_load_and_its_prediction_follows(tmp_path):
    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(clock, profile=LatencyProfile(base_s=0.01, load_s=0.5))
        await backend.start()
        controller, store = _controller(tmp_path, clock, backend)
        stage_weights(store, "m@1")
        runner = FakeRunner(_deployment())
        controller.add(runner)
        worker = await controller.ensure_hot("m")
        assert runner.loaded == [worker.id]
        assert [tier for tier, _ in runner.loads] == [Tier.COOL]
        assert controller.tier("m") is Tier.HOT and controller.start_delay_s("m") == 0.0
        await controller.demote("m", Tier.COOL)
        # The next load from the cool tier is predicted from the one measured, which the runner holds.
        measured_s = runner.loads[0][1]
        assert measured_s > 0 and controller.start_delay_s("m") == pytest.approx(measured_s)
        await backend.stop()

    run_in_virtual_time(main)


def test_device_time_the_runner_reports_becomes_the_models_share_of_its_worker(tmp_path):
    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(clock)
        await backend.start()
        controller, store = _controller(tmp_path, clock, backend)
        stage_weights(store, "m@1")
        runner = FakeRunner(_deployment())
        controller.add(runner)
        worker = await controller.ensure_hot("m")
        await controller.tick()
        await clock.sleep(2.0)
        runner.ran(worker.id, 1.0)  # half of the two seconds since the last tick
        await controller.tick()
        # Smoothed: halfway from the first tick's measurement (nothing ran) to this one's half.
        assert controller.utilization(worker.id) == pytest.approx(0.25)
        await clock.sleep(2.0)
        await controller.tick()  # the device seconds were handed over once: nothing ran since
        assert controller.utilization(worker.id) == pytest.approx(0.125)
        await backend.stop()

    run_in_virtual_time(main)


def test_a_model_waiting_for_room_is_placed_the_moment_a_demotion_frees_it(tmp_path):
    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(clock, profile=LatencyProfile(base_s=0.01, load_s=0.25))
        await backend.start()
        store = Store(tmp_path / "store", tmp_path / "shm")
        controller = Controller(
            clock, store, backend, FixedKeepAlive(), MemoryAwarePlacement(), Metrics(), device_memory_bytes=1500
        )
        busy, waiting = FakeRunner(_deployment("a")), FakeRunner(_deployment("b"))
        busy.stats = replace(busy.stats, queued=1)  # requests in flight: the eviction policy spares it
        for runner in (busy, waiting):
            stage_weights(store, runner.deployment.key)
            controller.add(runner)
        await controller.ensure_hot("a")
        promotion = asyncio.ensure_future(controller.ensure_hot("b"))  # no room on the only worker
        await clock.sleep(5.5)
        assert not promotion.done()
        demoted_at = clock.now()
        await controller.demote("a", Tier.WARM)
        await promotion
        # Woken by the demotion, not by a later look: only b's load on the worker (0.25 s) passed since.
        assert clock.now() - demoted_at == pytest.approx(0.25)
        assert controller.tier("b") is Tier.HOT
        await controller.close()
        await backend.stop()

    run_in_virtual_time(main)
