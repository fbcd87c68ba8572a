"""The service's scheduling, tiers and fault handling, on fake workers in virtual time."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from ember.clock import VirtualClock
from ember.config import DeploySpec, UpdateSpec
from ember.errors import DeadlineUnmeetable, InvalidInput, ModelFailed, ModelNotFound, Overloaded, WorkerCrashed
from ember.service import SET_ASIDE_DIR, EmberService, ServeOptions
from ember.testing import FakeBackend, LatencyProfile, run_in_virtual_time


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    # The fake workers never import it; the deploy path only needs the file to exist.
    path = tmp_path / "model.py"
    path.write_text("class M: ...\n")
    return f"{path}:M"


def _service(tmp_path: Path, clock: VirtualClock, **profile: float) -> tuple[EmberService, FakeBackend]:
    backend = FakeBackend(clock, size=1, profile=LatencyProfile(**profile))
    options = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm")
    service = EmberService(options, clock=clock, backend=backend)
    return service, backend


def _x(value: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 4), value, dtype=np.float32)}


def _spec(source: str, **kw: object) -> DeploySpec:
    return DeploySpec.model_validate({"source": source, "name": "m", **kw})


def test_requests_are_answered_by_the_model(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            info = await service.deploy(_spec(model_file))
            assert info.tier == "hot" and info.cold_starts == 1
            outs = await asyncio.gather(*(service.infer("m", _x(i)) for i in range(10)))
            for i, out in enumerate(outs):
                np.testing.assert_array_equal(out["x"], _x(i)["x"])
            assert service.info("m").succeeded == 10

    run_in_virtual_time(main)


def test_batches_form_while_the_instance_is_busy_and_respect_the_batch_size(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock, base_s=0.05)
        async with service:
            # Most of the 30 requests finish past the 100 ms SLO: served late, not refused.
            await service.deploy(_spec(model_file, on_unmeetable="best_effort"))  # the fake takes at most 8 rows
            (worker,) = backend.workers()
            warmup = len(worker.batches)
            await asyncio.gather(*(service.infer("m", _x(i)) for i in range(30)))
            rows = [r for _, r in worker.batches[warmup:]]
            assert sum(rows) == 30
            assert max(rows) == 8  # full batches formed behind the first one
            assert all(r <= 8 for r in rows)

    run_in_virtual_time(main)


def test_the_queue_serves_earliest_deadline_first(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        order: list[float] = []

        service, backend = _service(tmp_path, clock, base_s=0.1)
        backend.model = lambda batch: (order.append(float(batch["x"][0, 0])), dict(batch))[1]
        async with service:
            await service.deploy(_spec(model_file, max_batch_size=1))
            order.clear()  # the deploy-time warm-up ran batches of zeros
            first = asyncio.ensure_future(service.infer("m", _x(0)))
            await clock.sleep(0.01)  # the first batch is running; the rest queue behind it
            late = [asyncio.ensure_future(service.infer("m", _x(t), timeout_s=t)) for t in (9.0, 5.0, 7.0)]
            await asyncio.gather(first, *late)
        assert order == [0.0, 5.0, 7.0, 9.0]

    run_in_virtual_time(main)


def test_a_full_queue_refuses_at_once_and_loses_nothing_admitted(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock, base_s=0.1)
        async with service:
            await service.deploy(_spec(model_file, max_queue=2, max_batch_size=1, on_unmeetable="best_effort"))
            running = asyncio.ensure_future(service.infer("m", _x(0)))
            await clock.sleep(0.01)
            queued = [asyncio.ensure_future(service.infer("m", _x(i))) for i in (1, 2)]
            await asyncio.sleep(0)
            with pytest.raises(Overloaded) as refused:
                await service.infer("m", _x(3))
            assert refused.value.retry_after_s > 0
            results = await asyncio.gather(running, *queued)
            assert [float(r["x"][0, 0]) for r in results] == [0.0, 1.0, 2.0]

    run_in_virtual_time(main)


def test_a_request_past_its_timeout_is_refused_not_served_late(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock, load_s=1.0)
        async with service:
            await service.deploy(_spec(model_file, on_unmeetable="best_effort"))
            await service.unload("m")
            start = clock.now()
            with pytest.raises(DeadlineUnmeetable, match="timeout"):
                await service.infer("m", _x(1), timeout_s=0.2)
            assert clock.now() == start  # the load alone takes 1 s: refused at once, not after 0.2 s
            # A request without a timeout waits for the promotion instead of being dropped.
            out = await service.infer("m", _x(2))
            assert float(out["x"][0, 0]) == 2.0

    run_in_virtual_time(main)


def test_idle_models_are_demoted_tier_by_tier_and_come_back_on_demand(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            # A lax SLO: a load from cool costs no deadline, so the warm copy goes after its keep-alive
            # (with a tight one, policies.keepalive keeps it: test_policy_keepalive).
            await service.deploy(_spec(model_file, keepalive_hot_s=10, keepalive_warm_s=20, slo_ms=10_000))
            await service.infer("m", _x(1))
            await clock.sleep(5)
            assert service.info("m").tier == "hot"
            await clock.sleep(7)
            assert service.info("m").tier == "warm"
            await clock.sleep(20)
            assert service.info("m").tier == "cool"
            await service.infer("m", _x(1))
            info = service.info("m")
            assert info.tier == "hot"
            assert info.last_cold_start is not None and info.last_cold_start["tier"] == "cool"
            assert info.cold_starts == 2

    run_in_virtual_time(main)


def test_a_batch_lost_with_its_worker_is_retried_once_on_the_replacement(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock, base_s=0.5)
        async with service:
            await service.deploy(_spec(model_file, on_unmeetable="best_effort"))
            calls = [asyncio.ensure_future(service.infer("m", _x(i))) for i in range(4)]
            await clock.sleep(0.1)
            backend.workers()[0].crash()
            results = await asyncio.gather(*calls)
            assert [float(r["x"][0, 0]) for r in results] == [0.0, 1.0, 2.0, 3.0]
            assert backend.restarts == 1

    run_in_virtual_time(main)


def test_a_batch_that_kills_two_workers_is_answered_with_an_error(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock, base_s=0.5)
        async with service:
            await service.deploy(_spec(model_file, on_unmeetable="best_effort"))
            call = asyncio.ensure_future(service.infer("m", _x(1)))
            for _ in range(2):
                # Crash the worker while it runs the batch (not while it loads the model).
                while not any(w.in_flight and w.batches for w in backend.workers()):
                    await clock.sleep(0.01)
                backend.workers()[0].crash()
            with pytest.raises(WorkerCrashed):
                await call
            assert (await service.infer("m", _x(5)))["x"][0, 0] == 5.0

    run_in_virtual_time(main)


def test_removed_models_are_gone_and_queued_requests_answered(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock, base_s=0.5)
        async with service:
            await service.deploy(_spec(model_file, max_batch_size=1, on_unmeetable="best_effort"))
            calls = [asyncio.ensure_future(service.infer("m", _x(i))) for i in range(3)]
            await clock.sleep(0.1)
            await service.remove("m")
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert any(isinstance(r, ModelNotFound) for r in results)
            assert all(isinstance(r, dict | ModelNotFound) for r in results)
            with pytest.raises(ModelNotFound):
                await service.infer("m", _x(1))
            assert service.store.keys() == []

    run_in_virtual_time(main)


def test_deployments_survive_a_restart(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file, slo_ms=42))
        again, _ = _service(tmp_path, clock)
        async with again:
            info = again.info("m")
            assert info.slo_ms == 42 and info.tier == "cool"
            # Loading it is predicted to take longer than its 42 ms SLO: refused at once, and the
            # refusal starts the load, so a retry after Retry-After is predicted to meet its SLO, and does.
            with pytest.raises(DeadlineUnmeetable, match="being loaded") as refused:
                await again.infer("m", _x(3))
            await clock.sleep(refused.value.retry_after_s * 1.001)
            assert (await again.infer("m", _x(3)))["x"][0, 0] == 3.0
            assert again.info("m").tier == "hot"

    run_in_virtual_time(main)


def test_a_model_that_cannot_load_is_not_left_deployed(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock)
        async with service:
            for worker in backend.workers():
                worker.load_error = "setup raised ValueError: no"
            with pytest.raises(InvalidInput, match="could not be loaded: setup raised"):
                await service.deploy(_spec(model_file))
            assert service.models() == [] and service.store.keys() == []
            assert service.registry.all() == []

    run_in_virtual_time(main)


def test_a_request_that_cannot_meet_its_slo_is_refused_at_once_with_retry_after(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock, base_s=0.03)
        async with service:
            await service.deploy(_spec(model_file, slo_ms=50, max_batch_size=1))
            await service.infer("m", _x(0))  # a real request measures 30 ms a batch
            (worker,) = backend.workers()
            warmup = len(worker.batches)
            # The first request fits the 50 ms SLO, a second one arriving while the first runs would
            # end at 60 ms, so it is refused without queueing.
            first = asyncio.ensure_future(service.infer("m", _x(1)))
            await asyncio.sleep(0)
            await clock.sleep(0.001)
            start = clock.now()
            with pytest.raises(DeadlineUnmeetable, match="SLO") as refused:
                await service.infer("m", _x(2))
            assert clock.now() == start
            assert refused.value.http_status == 429 and refused.value.retry_after_s > 0
            assert (await first)["x"][0, 0] == 1.0
            assert len(worker.batches) == warmup + 1  # the refused request never ran
            info = service.info("m")
            assert (info.requests, info.failed) == (3, 1)

    run_in_virtual_time(main)


def test_best_effort_serves_the_same_request_late(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock, base_s=0.03)
        async with service:
            await service.deploy(_spec(model_file, slo_ms=50, max_batch_size=1, on_unmeetable="best_effort"))
            first = asyncio.ensure_future(service.infer("m", _x(1)))
            await asyncio.sleep(0)
            await clock.sleep(0.001)
            assert (await service.infer("m", _x(2)))["x"][0, 0] == 2.0
            await first
            assert service.info("m").slo_attainment == 0.5

    run_in_virtual_time(main)


def test_a_queued_request_that_can_no_longer_make_its_slo_is_refused_not_served_late(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock, base_s=0.03)
        async with service:
            await service.deploy(_spec(model_file, slo_ms=100, max_batch_size=1))
            (worker,) = backend.workers()
            warmup = len(worker.batches)
            worker.profile = LatencyProfile(base_s=0.2)  # the model slows down after its warm-up
            first = asyncio.ensure_future(service.infer("m", _x(1)))
            await asyncio.sleep(0)
            await clock.sleep(0.001)
            # Predicted to start at 30 ms and end at 60 ms: admitted. The first batch really ends at
            # 200 ms, past this request's 101 ms deadline, so it is refused then instead of run.
            second = asyncio.ensure_future(service.infer("m", _x(2)))
            assert (await first)["x"][0, 0] == 1.0
            with pytest.raises(DeadlineUnmeetable, match="SLO"):
                await second
            assert len(worker.batches) == warmup + 1  # the second request never ran
            assert service.info("m").failed == 1

    run_in_virtual_time(main)


def test_a_model_that_answers_one_row_for_many_fails_its_deploy_naming_the_output(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock)
        backend.model = lambda batch: {"x": batch["x"][:1]}  # right for one row, wrong for more
        async with service:
            with pytest.raises(InvalidInput) as caught:
                await service.deploy(_spec(model_file))
            message = caught.value.message
            assert "warm-up batch of 2 zero rows" in message and "output 'x'" in message
            assert "does not match the declared outputs" in message
            with pytest.raises(ModelNotFound):
                service.info("m")  # not left deployed

    run_in_virtual_time(main)


def test_measured_times_survive_a_restart(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        # A model that loads in 5 ms and answers in 2 ms, with a 20 ms SLO: the 50 ms set-up guess
        # for a first load would refuse its first call after a restart.
        service, _ = _service(tmp_path, clock, base_s=0.002, load_s=0.005)
        async with service:
            await service.deploy(_spec(model_file, slo_ms=20))  # measures a load from cool
        again, _ = _service(tmp_path, clock, base_s=0.002, load_s=0.005)
        async with again:
            assert again.info("m").tier == "cool"
            assert (await again.infer("m", _x(2)))["x"][0, 0] == 2.0  # not refused on a guess
            assert again.info("m").failed == 0

    run_in_virtual_time(main)


@pytest.mark.parametrize("name", ["m\n", "m\r", "acme+m\n", " m", "m\x00"])
def test_names_and_tenants_must_match_whole(name):
    with pytest.raises(ValueError, match="is not allowed"):
        DeploySpec.model_validate({"source": "x.py:M", "name": name})
    with pytest.raises(ValueError, match="is not allowed"):
        DeploySpec.model_validate({"source": "x.py:M", "tenant": "acme\n"})


def test_a_deploy_that_fails_on_a_bug_leaves_no_row_and_the_name_stays_deployable(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock)
        async with service:
            for worker in backend.workers():
                worker.described = {"inputs": "not a list of tensors"}  # metadata that does not parse
            with pytest.raises(Exception) as failed:  # whatever the bug raises
                await service.deploy(_spec(model_file))
            assert not isinstance(failed.value, InvalidInput)
            assert service.models() == [] and service.registry.all() == [] and service.store.keys() == []
            for worker in backend.workers():
                worker.described = None
            assert (await service.deploy(_spec(model_file))).version == 2

    run_in_virtual_time(main)


def test_an_answer_of_the_wrong_datatype_is_model_failed_naming_the_output(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file, warmup=False))
            (worker,) = backend.workers()
            worker.model = lambda batch: {"x": batch["x"].astype(np.float64)}
            with pytest.raises(ModelFailed, match=r"output 'x' is float64 but declared FP32"):
                await service.infer("m", _x(1.0))
            worker.model = lambda batch: {"y": batch["x"]}
            with pytest.raises(ModelFailed, match=r"output 'x' is missing \(predict returned y\)"):
                await service.infer("m", _x(1.0))

    run_in_virtual_time(main)


def test_a_deploy_reports_import_and_load_progress_in_bytes_and_percent(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        events: list[dict] = []
        async with service:
            await service.deploy(_spec(model_file), events.append)
        progress = [e for e in events if "total_bytes" in e]
        stages = [e["stage"] for e in progress]
        assert "importing" in stages and "loading" in stages
        for e in progress:
            assert e["model"] == "m" and 0 <= e["bytes"] <= e["total_bytes"]
            assert e["percent"] == 100 * e["bytes"] // e["total_bytes"]
        assert [e["percent"] for e in progress if e["stage"] == "importing"][-1] == 100
        assert [e["percent"] for e in progress if e["stage"] == "loading"][-1] == 100

    run_in_virtual_time(main)


def test_a_start_sets_aside_a_registry_row_it_cannot_serve_and_serves_the_rest(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file))
        registry = tmp_path / "home" / "registry.sqlite"
        with sqlite3.connect(registry) as db:  # rows an older Ember let in: names ending in a newline
            spec = json.dumps({"source": model_file, "name": "bad\n"})
            db.execute("INSERT INTO deployments VALUES ('bad\n', 1, 'ready', ?, '{}', 1.0)", (spec,))
            db.execute("INSERT INTO deployments VALUES ('wedged\n', 1, 'importing', ?, '{}', 1.0)", (spec,))
        db.close()
        again, _ = _service(tmp_path, clock)
        async with again:
            assert [m.name for m in again.models()] == ["m"]
            assert (await again.infer("m", _x(2)))["x"][0, 0] == 2.0
            assert [r.name for r in again.registry.all()] == ["m"]
            (aside,) = (tmp_path / "home" / SET_ASIDE_DIR).iterdir()
            assert json.loads(aside.read_text())["name"] == "bad\n"

    run_in_virtual_time(main)


def test_the_slo_and_keepalives_change_in_place(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock, base_s=0.3)
        async with service:
            await service.deploy(_spec(model_file))
            await service.infer("m", _x(0))  # measured: 300 ms a batch, past the 100 ms SLO
            with pytest.raises(DeadlineUnmeetable):
                await service.infer("m", _x(1))
            info = await service.update("m", UpdateSpec(slo_ms=500, keepalive_hot_s=60))
            assert info.slo_ms == 500 and info.version == 1 and info.tier == "hot"
            assert (await service.infer("m", _x(2)))["x"][0, 0] == 2.0
            assert service.deployment("m").keepalive_hot_s == 60
            with pytest.raises(InvalidInput, match="slo_ms"):
                await service.update("m", UpdateSpec(slo_ms=-1))
            with pytest.raises(InvalidInput, match="nothing to change"):
                await service.update("m", UpdateSpec())
        again, _ = _service(tmp_path, clock)
        async with again:
            assert again.info("m").slo_ms == 500

    run_in_virtual_time(main)
