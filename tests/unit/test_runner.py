"""The runner's admission on fake workers in virtual time: it learns, and never locks a model out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ember.clock import VirtualClock
from ember.config import DeploySpec
from ember.errors import DeadlineUnmeetable
from ember.policies.batching import PROBE_AFTER_REFUSALS
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, LatencyProfile, run_in_virtual_time


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    path = tmp_path / "model.py"
    path.write_text("class M: ...\n")
    return f"{path}:M"


def _service(tmp_path: Path, clock: VirtualClock, **profile: float) -> tuple[EmberService, FakeBackend]:
    backend = FakeBackend(clock, size=1, profile=LatencyProfile(**profile))
    return EmberService(ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm"), clock, backend), backend


def _x(value: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 4), value, dtype=np.float32)}


def _spec(source: str, **kw: object) -> DeploySpec:
    return DeploySpec.model_validate({"source": source, "name": "m", **kw})


async def _spaced(service: EmberService, clock: VirtualClock, calls: int, gap_s: float, rows: int = 1) -> list[str]:
    outcomes = []
    for i in range(calls):
        try:
            await service.infer("m", _x(i, rows))
            outcomes.append("ok")
        except DeadlineUnmeetable:
            outcomes.append("refused")
        await clock.sleep(gap_s)
    return outcomes


def test_a_model_slow_only_at_first_is_served_again_after_a_few_refusals(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        # Every warm-up batch takes 3x the 100 ms SLO; from then on the model answers in 5 ms.
        service, backend = _service(tmp_path, clock, base_s=0.3)
        async with service:
            await service.deploy(_spec(model_file))
            (worker,) = backend.workers()
            worker.profile = LatencyProfile(base_s=0.005)
            outcomes = await _spaced(service, clock, calls=40, gap_s=0.25)
            assert outcomes.count("refused") <= PROBE_AFTER_REFUSALS
            assert "refused" not in outcomes[PROBE_AFTER_REFUSALS + 1 :]
            # Two rows, measured only in the slow warm-up: served again the same way.
            two = await _spaced(service, clock, calls=10, gap_s=0.25, rows=2)
            assert two.count("refused") <= PROBE_AFTER_REFUSALS and two[-1] == "ok"

    run_in_virtual_time(main)


def test_a_model_that_is_truly_too_slow_is_refused_with_an_honest_retry_after(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock, base_s=0.3)
        async with service:
            await service.deploy(_spec(model_file))
            # The warm-up's synthetic batches never justify a refusal: the first real one is measured.
            await service.infer("m", _x(0))
            with pytest.raises(DeadlineUnmeetable) as refused:
                await service.infer("m", _x(1))
            message = refused.value.message
            assert "past its SLO (100 ms)." in message and "retrying will not help" in message
            assert "ember update m --slo-ms" in message and "best-effort" in message
            # Retry-After is when it is measured again: retried then, it is served (late) as a probe.
            await clock.sleep(refused.value.retry_after_s)
            await service.infer("m", _x(2))
            outcomes = await _spaced(service, clock, calls=20, gap_s=0.5)
            assert outcomes.count("ok") <= 20 // (PROBE_AFTER_REFUSALS + 1) + 1

    run_in_virtual_time(main)


def test_the_first_batch_after_a_load_does_not_count(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock, base_s=0.005)
        async with service:
            await service.deploy(_spec(model_file, max_batch_size=1, warmup=False))
            (worker,) = backend.workers()
            worker.profile = LatencyProfile(base_s=0.5)  # a first inference: 5x the SLO
            await service.infer("m", _x(1))
            worker.profile = LatencyProfile(base_s=0.005)
            runner = service.runner("m")
            assert not runner.latency.known
            await service.infer("m", _x(2))
            assert runner.latency.predict(1) == pytest.approx(0.005)

    run_in_virtual_time(main)


def test_a_load_that_overruns_its_prediction_is_refused_when_the_deadline_is_lost(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock, base_s=0.005)
        async with service:
            await service.deploy(_spec(model_file))
            await service.infer("m", _x(0))  # a real request: 5 ms
            await service.unload("m")  # cool; its load was measured at 50 ms
            for worker in backend.workers():
                worker.profile = LatencyProfile(base_s=0.005, load_s=5.7)  # this time it takes 5.7 s
            start = clock.now()
            with pytest.raises(DeadlineUnmeetable) as refused:
                await service.infer("m", _x(1))  # admitted: 50 ms + 5 ms fit in 100 ms
            assert clock.now() - start <= 0.1  # refused once the deadline is lost, not after 5.7 s
            assert "being loaded" in refused.value.message
            # Asked during the overrun, the load is expected to take as long again as it has so far.
            await clock.sleep(1.0)
            with pytest.raises(DeadlineUnmeetable) as again:
                await service.infer("m", _x(2))
            assert again.value.retry_after_s >= 0.9 and clock.now() - start < 1.2

    run_in_virtual_time(main)
