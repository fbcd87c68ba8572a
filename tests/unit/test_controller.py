"""The controller applying the policies on fake workers in virtual time: keep-alive, pre-warm,
autoscaling, eviction."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from ember.clock import VirtualClock
from ember.config import DeploySpec
from ember.errors import DeadlineUnmeetable
from ember.policies.tiers import Tier
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, LatencyProfile, run_in_virtual_time


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    path = tmp_path / "model.py"
    path.write_text("class M: ...\n")
    return f"{path}:M"


def _service(tmp_path: Path, clock: VirtualClock, size: int = 1, **options: object) -> tuple[EmberService, FakeBackend]:
    backend = FakeBackend(clock, size=size, profile=LatencyProfile(base_s=0.01, load_s=0.05))
    opts = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm", **options)  # type: ignore[arg-type]
    return EmberService(opts, clock=clock, backend=backend), backend


def _x(value: float) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 4), value, dtype=np.float32)}


def _spec(source: str, name: str = "m", **kw: object) -> DeploySpec:
    return DeploySpec.model_validate({"source": source, "name": name, **kw})


def test_a_model_called_every_two_seconds_leaves_the_device_soon_after_its_calls_stop(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file, keepalive_hot_s=300))
            for i in range(15):
                await service.infer("m", _x(i))
                await clock.sleep(2.0)
            assert service.info("m").tier == "hot"
            # The idle-time histogram says its gaps are ~2 s: it is kept ~3 s, not the fixed 300 s.
            await clock.sleep(5.0)
            assert service.info("m").tier == "warm"

    run_in_virtual_time(main)


def test_a_model_with_a_few_calls_keeps_the_fixed_keepalive(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file, keepalive_hot_s=30))
            for i in range(3):  # too few idle times for a representative histogram
                await service.infer("m", _x(i))
                await clock.sleep(2.0)
            await clock.sleep(20.0)
            assert service.info("m").tier == "hot"
            await clock.sleep(10.0)
            assert service.info("m").tier == "warm"

    run_in_virtual_time(main)


def test_a_periodic_model_is_demoted_between_calls_and_prewarmed_before_the_next(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file, keepalive_hot_s=300, slo_ms=50))
            for i in range(14):  # a timer every minute
                await service.infer("m", _x(i))
                await clock.sleep(60.0)
            await service.infer("m", _x(99))
            await clock.sleep(30.0)
            assert service.info("m").tier == "warm"  # off the device between calls
            await clock.sleep(25.0)
            info = service.info("m")
            assert info.tier == "hot"  # pre-warmed before the next expected call
            out = await service.infer("m", _x(100))  # within its 50 ms SLO: no load on its path
            assert out["x"][0, 0] == 100.0
            assert service.info("m").cold_starts == info.cold_starts
            assert service.info("m").slo_attainment == 1.0

    run_in_virtual_time(main)


def test_the_autoscaler_adds_an_instance_under_load_and_removes_it_after_the_load(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock, size=2)
        async with service:
            await service.deploy(_spec(model_file, max_instances=2, on_unmeetable="best_effort", slo_ms=100))
            assert service.info("m").instances == 1
            calls = []
            # 1000 requests per second for 5 s. The autoscaler plans one instance for 560 per second:
            # 8-row batches of 10 ms fit half the 100 ms SLO, at 70% utilization.
            for i in range(5000):
                calls.append(asyncio.ensure_future(service.infer("m", _x(i))))
                await clock.sleep(1 / 1000)
            assert service.info("m").instances == 2
            await asyncio.gather(*calls)
            assert all(any(key == "m@1" for key, _ in w.batches) for w in backend.workers())
            await clock.sleep(90.0)  # the load is gone for longer than the down-scale delay
            info = service.info("m")
            assert info.instances == 1 and info.tier == "hot"

    run_in_virtual_time(main)


def test_a_full_device_evicts_the_cheapest_model_to_make_room(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            size = (await service.deploy(_spec(model_file, "a"))).bytes
            await service.deploy(_spec(model_file, "b"), load=False)
        # Restart with room on the device for one model only.
        again, _ = _service(tmp_path, clock, device_memory_bytes=size + size // 2)
        async with again:
            await again.load("a")
            assert again.info("a").tier == "hot"
            assert (await again.infer("b", _x(1), timeout_s=5.0))["x"][0, 0] == 1.0
            assert again.info("b").tier == "hot"
            assert again.info("a").tier == "warm"  # evicted from the device, still in host memory

    run_in_virtual_time(main)


def test_two_busy_models_packed_on_one_worker_are_spread_once_its_time_runs_out(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            size = (await service.deploy(_spec(model_file, "a"), load=False)).bytes
            await service.deploy(_spec(model_file, "b"), load=False)
        # Two workers with room for three models each: packing by memory puts both on one.
        again, backend = _service(tmp_path, clock, size=2, device_memory_bytes=3 * size)
        async with again:
            await again.load("a")
            await again.load("b")
            hosts = {m: again.controller.hot_instances(m)[0].id for m in ("a", "b")}
            assert hosts["a"] == hosts["b"]
            # 70 requests per second each, 10 ms a batch: together more than the one device has.
            calls = []
            for i in range(700):
                for name in ("a", "b"):
                    calls.append(asyncio.ensure_future(again.infer(name, _x(i))))
                await clock.sleep(1 / 70)
            results = await asyncio.gather(*calls)
            assert len(results) == 1400 and all(r["x"].shape == (1, 4) for r in results)
            spread = {m: [w.id for w in again.controller.hot_instances(m)] for m in ("a", "b")}
            assert len(spread["a"]) == len(spread["b"]) == 1  # moved, not copied
            assert spread["a"] != spread["b"]
            # the instance that left was unloaded from its old worker
            for worker in backend.workers():
                assert len(worker.loaded) == 1

    run_in_virtual_time(main)


def test_removing_a_model_while_it_is_demoted_leaves_the_control_loop_running(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(clock, profile=LatencyProfile(base_s=0.01, load_s=0.05, unload_s=0.5))
        opts = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm")
        service = EmberService(opts, clock=clock, backend=backend)
        async with service:
            await service.deploy(_spec(model_file, "a"))
            demoting = asyncio.ensure_future(service.controller.demote("a", Tier.COOL))
            await clock.sleep(0.1)  # the unload is under way
            await service.remove("a")
            await demoting  # no ModelNotFound: the removal dealt with it
            # the loop still demotes: a model idle past its keep-alive leaves the device
            await service.deploy(_spec(model_file, "b", keepalive_hot_s=2))
            await service.infer("b", _x(1))
            await clock.sleep(5.0)
            assert service.info("b").tier != "hot"

    run_in_virtual_time(main)


def test_a_load_started_by_a_refused_request_stays_hot_for_the_retry(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        # A load is predicted to take 50 ms (the default links' set-up cost), longer than the 40 ms
        # SLO: a request for the cool model is refused at admission, and the load it starts (0.3 s)
        # must survive until the client retries.
        backend = FakeBackend(clock, profile=LatencyProfile(base_s=0.01, load_s=0.3))
        opts = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm")
        service = EmberService(opts, clock=clock, backend=backend)
        async with service:
            await service.deploy(_spec(model_file, "m", slo_ms=40, keepalive_hot_s=5), load=False)
            await clock.sleep(30.0)  # idle for longer than its keep-alive before anyone asks
            with pytest.raises(DeadlineUnmeetable) as refused:
                await service.infer("m", _x(1))
            await clock.sleep(refused.value.retry_after_s or 1.0)
            await clock.sleep(1.5)  # ticks pass after the load finished
            assert service.info("m").tier == "hot"
            assert (await service.infer("m", _x(2)))["x"][0, 0] == 2.0

    run_in_virtual_time(main)


def test_refusing_the_head_of_the_queue_does_not_shorten_the_batch_behind_it(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file, max_batch_size=2, slo_ms=35))  # warm-up: 10 ms a batch
            (worker,) = backend.workers()
            worker.profile = LatencyProfile(base_s=0.03)  # from now on every batch takes 30 ms
            first = asyncio.ensure_future(service.infer("m", _x(0)))  # runs until 30 ms
            await clock.sleep(0.001)
            doomed = asyncio.ensure_future(service.infer("m", _x(1)))  # admitted; due at 36 ms
            await clock.sleep(0.028)
            rest = [asyncio.ensure_future(service.infer("m", _x(i))) for i in (2, 3)]  # due at 64 ms
            await first
            # At 30 ms the model is known to take 30 ms: the second cannot make 36 ms and is refused;
            # the two behind it can make 64 ms together, in one batch, though the policy's first
            # look at the queue (two requests) saw only one of them.
            with pytest.raises(DeadlineUnmeetable):
                await doomed
            assert [r["x"][0, 0] for r in await asyncio.gather(*rest)] == [2.0, 3.0]
            assert worker.batches[-1][1] == 2

    run_in_virtual_time(main)


def test_a_worker_whose_node_store_refuses_takes_no_new_model_but_still_loads_one_it_holds(tmp_path, model_file):
    """A node whose store is full or unwritable: placement passes its workers over for a model the node
    lacks (the load would fail there), and still uses them for one the node holds."""

    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock, size=2)
        async with service:
            full, spare = backend.workers()
            full.node_tiers, spare.node_tiers = {}, {}
            full.refusing = "its store at /nodes/a cannot be written (No space left on device)"
            for name in ("a", "b", "c"):
                await service.deploy(_spec(model_file, name=name))
                assert service.deployment(name).key in spare.loaded
            assert not full.loaded

            # Both nodes refuse now, and only the full one holds "a" (on its disk): that is where it goes.
            key = service.deployment("a").key
            await service.unload("a", "cool")
            spare.refusing = full.refusing
            full.node_tiers[key] = Tier.COOL
            await service.infer("a", _x(1.0))
            assert key in full.loaded and key not in spare.loaded

    run_in_virtual_time(main)
