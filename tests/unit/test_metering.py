"""Cost accounting: device-seconds and GB-seconds charged for known hold intervals, in virtual time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ember.clock import VirtualClock
from ember.config import DeploySpec
from ember.metering import BUCKET_S, Holding, Meter, Usage, accrue, always_on, report
from ember.registry import Registry
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, LatencyProfile, run_in_virtual_time

GB = 10**9


def _total(charges: dict[tuple[str, str, float], Usage], model: str | None = None) -> Usage:
    total = Usage()
    for (m, _, _), usage in charges.items():
        if model is None or m == model:
            total = total + usage
    return total


def test_a_holding_is_charged_for_exactly_the_time_it_was_held() -> None:
    clock = VirtualClock(start=10.0)
    meter = Meter(clock)
    meter.observe("m", "acme", Holding(instances=1, device_bytes=2 * GB, host_bytes=2 * GB))
    clock.advance(30.0)
    meter.observe("m", "acme", Holding(instances=2, device_bytes=2 * GB, host_bytes=2 * GB))
    clock.advance(15.5)
    meter.observe("m", "acme", Holding(instances=0, device_bytes=2 * GB, host_bytes=2 * GB))  # warm
    clock.advance(100.0)
    meter.observe("m", "acme", Holding())  # cool: nothing held
    clock.advance(1000.0)
    meter.forget("m")
    usage = _total(meter.drain())
    assert usage.device_seconds == 30.0 + 2 * 15.5
    assert usage.device_gb_seconds == pytest.approx(2 * (30.0 + 2 * 15.5))
    assert usage.host_gb_seconds == pytest.approx(2 * (30.0 + 15.5 + 100.0))
    assert meter.drain() == {}  # drained once


def test_charges_are_split_at_bucket_boundaries_and_add_up() -> None:
    clock = VirtualClock(start=0.0, epoch=1_000_040.0)  # wall time 20 s into the bucket of 1_000_020
    meter = Meter(clock, bucket_s=BUCKET_S)
    meter.observe("m", "t", Holding(instances=1))
    clock.advance(130.0)  # wall 1_000_040 -> 1_000_170: across two boundaries
    meter.observe("m", "t", Holding(instances=1))
    charges = meter.drain()
    by_bucket = {bucket: u.device_seconds for (_, _, bucket), u in charges.items()}
    assert by_bucket == {1_000_020.0: 40.0, 1_000_080.0: 60.0, 1_000_140.0: 30.0}


def test_requests_are_counted_from_the_runner_s_running_count() -> None:
    clock = VirtualClock()
    meter = Meter(clock)
    meter.observe("m", "t", Holding(), requests=0)
    meter.observe("m", "t", Holding(), requests=5)
    meter.observe("m", "t", Holding(), requests=7)
    assert _total(meter.drain()).requests == 7


def test_every_charge_reaches_the_listener() -> None:
    clock = VirtualClock()
    seen: list[tuple[str, str, Usage]] = []
    meter = Meter(clock, on_charge=lambda m, t, u: seen.append((m, t, u)))
    meter.observe("m", "t", Holding(instances=3))
    clock.advance(2.0)
    meter.forget("m")
    assert seen == [("m", "t", accrue(Holding(instances=3), 2.0))]


def test_the_registry_adds_usage_up_across_reopens(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.sqlite")
    registry.add_usage({("m", "acme", 60.0): Usage(10.0, 1.0, 2.0, 3)})
    registry.close()
    registry = Registry(tmp_path / "r.sqlite")
    registry.add_usage({("m", "acme", 60.0): Usage(5.0, 0.5, 1.0, 1), ("m", "acme", 120.0): Usage(1.0, 0, 0, 0)})
    assert registry.usage() == {("m", "acme"): Usage(16.0, 1.5, 3.0, 4)}
    assert registry.usage(since=120.0) == {("m", "acme"): Usage(1.0, 0, 0, 0)}
    assert registry.usage(tenant="other") == {}
    registry.close()


def test_the_report_puts_always_on_beside_each_deployed_model() -> None:
    from ember.metering import Deployed

    recorded = {("m", "acme"): Usage(10.0, 20.0, 30.0, 4), ("gone", "default"): Usage(1.0, 0.0, 0.0, 1)}
    result = report(recorded, {"m": Deployed("acme", 2 * GB, since=1000.0)}, start=None, end=1100.0)
    rows = {row["model"]: row for row in result["models"]}  # type: ignore[attr-defined]
    assert rows["m"]["always_on"] == always_on(2 * GB, 100.0).to_json()
    assert rows["gone"]["always_on"] is None
    assert result["total"] == Usage(11.0, 20.0, 30.0, 5).to_json()
    assert [t["tenant"] for t in result["tenants"]] == ["acme", "default"]  # type: ignore[attr-defined]


def test_the_service_meters_a_model_held_for_known_intervals(tmp_path: Path) -> None:
    """Hot from its cold start until an unload to warm, then warm: device-seconds are that interval."""
    model = tmp_path / "model.py"
    model.write_text("class M: ...\n")

    async def main(clock: VirtualClock) -> None:
        # Dyadic times (0.5 s loads, 0.25 s batches, 1 s ticks) keep every sum exact.
        backend = FakeBackend(clock, size=1, profile=LatencyProfile(base_s=0.25, load_s=0.5))
        options = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm")
        async with EmberService(options, clock=clock, backend=backend) as service:
            spec = {"source": f"{model}:M", "name": "m", "warmup": False, "keepalive_hot_s": 10_000}
            await service.deploy(DeploySpec.model_validate({**spec, "on_unmeetable": "best_effort"}))
            cold = service.info("m").last_cold_start
            assert cold is not None
            hot_since = cold["at"] - clock.wall() + clock.now()
            for _ in range(3):
                await service.infer("m", {"x": np.zeros((1, 4), dtype=np.float32)})
            await clock.sleep(40.0)
            await service.unload("m", "warm")
            unloaded = clock.now()
            await clock.sleep(20.0)
            report = await service.usage()
            (row,) = report["models"]
            assert row["device_seconds"] == unloaded - hot_since
            assert row["requests"] == 3
            size = service.info("m").bytes
            assert row["host_gb_seconds"] == pytest.approx(size / GB * (clock.now() - hot_since))
            assert row["always_on"]["device_seconds"] == pytest.approx(clock.wall() - service.info("m").created_at)
            metric = service.metrics.device_seconds.labels("m", "default")._value.get()
            assert metric == pytest.approx(unloaded - hot_since)

    run_in_virtual_time(main)


def test_a_registry_from_before_usage_gains_the_table(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "r.sqlite"
    Registry(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE usage")
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    registry = Registry(path)
    registry.add_usage({("m", "t", 0.0): Usage(1.0, 0.0, 0.0, 1)})
    assert registry.usage() == {("m", "t"): Usage(1.0, 0.0, 0.0, 1)}
    registry.close()


def test_reading_usage_counts_unflushed_charges_and_writes_nothing(tmp_path: Path) -> None:
    model = tmp_path / "model.py"
    model.write_text("class M: ...\n")

    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(clock, size=1, profile=LatencyProfile(base_s=0.25, load_s=0.5))
        options = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm")
        async with EmberService(options, clock=clock, backend=backend) as service:
            spec = DeploySpec.model_validate({"source": f"{model}:M", "name": "m", "warmup": False})
            await service.deploy(spec)
            await service.infer("m", {"x": np.zeros((1, 4), dtype=np.float32)})
            (row,) = (await service.usage())["models"]
            assert row["requests"] == 1 and row["device_seconds"] > 0
            assert service.registry.usage() == {}  # before the first flush (METER_FLUSH_S)
            await service.flush_usage()
            assert service.registry.usage()[("m", "default")].requests == 1
            (again,) = (await service.usage())["models"]
            assert again["requests"] == 1  # flushed charges are not counted twice

    run_in_virtual_time(main)
