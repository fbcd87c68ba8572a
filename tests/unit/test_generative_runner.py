"""Generative models served through the service on fake workers in virtual time: deploy, admission by
TTFT and TPOT, seats, bounded waiting, streams that end early, scale to zero, learning."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from ember.clock import VirtualClock
from ember.config import DeploySpec
from ember.errors import DeadlineUnmeetable, InvalidInput, ModelNotFound, Overloaded
from ember.generation import ChatMessage, GenerateRequest, SamplingParams, TokenChunk
from ember.policies.batching import PROBE_AFTER_REFUSALS
from ember.scheduler import GenerativeRunner
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, GenerationProfile, generative_description, run_in_virtual_time


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    path = tmp_path / "llm.py"
    path.write_text("class LLM: ...\n")
    return f"{path}:LLM"


def _service(
    tmp_path: Path, clock: VirtualClock, *, max_model_len: int = 2048, workers: int = 1, **profile: float | int | None
) -> tuple[EmberService, FakeBackend]:
    backend = FakeBackend(
        clock,
        size=workers,
        described=generative_description(max_model_len=max_model_len),
        generation=GenerationProfile(**profile),  # type: ignore[arg-type]
    )
    options = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm")
    return EmberService(options, clock, backend), backend


def _spec(source: str, **kw: object) -> DeploySpec:
    return DeploySpec.model_validate({"source": source, "name": "llm", **kw})


def _ask(prompt: str = "x" * 40, max_tokens: int = 5, **kw: object) -> GenerateRequest:
    return GenerateRequest(SamplingParams(max_tokens, temperature=0.0, **kw), prompt=prompt)  # type: ignore[arg-type]


async def _collect(service: EmberService, request: GenerateRequest, timeout_s: float | None = None) -> list[TokenChunk]:
    return [chunk async for chunk in service.generate("llm", request, timeout_s)]


async def _until_finish(service: EmberService, request: GenerateRequest) -> list[TokenChunk]:
    """What the gateway does: read up to the chunk with a finish reason, then close the stream."""
    stream = service.generate("llm", request)
    chunks = []
    try:
        async for chunk in stream:
            chunks.append(chunk)
            if chunk.finish_reason is not None:
                break
    finally:
        await stream.aclose()
    return chunks


def test_a_generative_deploy_carries_its_limits_into_the_deployment_and_its_load(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock, max_model_len=1024)
        async with service:
            await service.deploy(_spec(model_file, max_num_seqs=4, max_model_len=512, ttft_slo_ms=700))
            d = service.deployment("llm")
            assert d.generative and d.max_model_len == 512 and d.max_num_seqs == 4 and d.ttft_slo_ms == 700
            assert isinstance(service.runner("llm"), GenerativeRunner)
            (worker,) = backend.workers()
            options = worker.options[d.key]
            assert options["max_num_seqs"] == 4 and options["max_model_len"] == 512
            assert options["kv_budget_bytes"] == 4 * 512 * 1024
            with pytest.raises(InvalidInput, match=r"more than .* supports \(1024 tokens\)"):
                await service.deploy(_spec(model_file, name="big", max_model_len=4096))
        again, _ = _service(tmp_path, clock, max_model_len=1024)
        async with again:  # the registry round trip keeps every generative field
            d = again.deployment("llm")
            assert (d.max_model_len, d.max_num_seqs, d.ttft_slo_ms) == (512, 4, 700)
            assert d.options["kv_budget_bytes"] == 4 * 512 * 1024

    run_in_virtual_time(main)


def test_a_stream_yields_every_token_then_its_finish_and_the_prompt_ratio_is_learned(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file))
            chunks = await _collect(service, _ask("y" * 400, max_tokens=6))
            assert [c.text for c in chunks] == [f" t{i}" for i in range(1, 7)]
            assert chunks[0].prompt_tokens == 100 and chunks[-1].finish_reason == "length"
            runner = service.runner("llm")
            assert isinstance(runner, GenerativeRunner)
            for _ in range(2):
                await _collect(service, _ask("y" * 400, max_tokens=6))
            assert runner.tokens.prompt_tokens(800) == 200  # 4 bytes per token, as the worker said
            info = service.info("llm")
            assert info.succeeded == 3 and info.slo_attainment == 1.0
            stats = runner.statistics().generation
            assert stats is not None and stats.generation_tokens == 18 and stats.prompt_tokens == 300
            chat = GenerateRequest(SamplingParams(3), messages=(ChatMessage("user", "hello"),))
            assert (await _collect(service, chat))[-1].completion_tokens == 3

    run_in_virtual_time(main)


def test_infer_on_a_generative_model_names_the_generate_routes_and_generate_on_one_shot_too(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file))
            backend.workers()[0].described = None  # the next import is a one-shot model
            await service.deploy(_spec(model_file, name="vec"))
            with pytest.raises(InvalidInput, match=r"not generative: call POST /v2/models/vec/infer"):
                await anext(service.generate("vec", _ask()))
            with pytest.raises(InvalidInput, match=r"/v1/chat/completions.*/v2/models/llm/generate"):
                await service.infer("llm", {"x": np.zeros((1, 4), dtype=np.float32)})
            with pytest.raises(ModelNotFound):
                await anext(service.generate("nope", _ask()))
            with pytest.raises(InvalidInput, match="max_model_len"):
                await anext(service.generate("llm", _ask(max_tokens=4096)))
            # Asking for the whole length (the gateway's default without max_tokens) runs until prompt
            # and answer fill it.
            whole = await _collect(service, _ask(max_tokens=2048))
            assert whole[-1].finish_reason == "length"
            assert whole[0].prompt_tokens + whole[-1].completion_tokens == 2048

    run_in_virtual_time(main)


def test_each_instance_runs_at_most_max_num_seqs_and_the_rest_wait_their_turn(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file, max_num_seqs=2, on_unmeetable="best_effort"))
            (worker,) = backend.workers()
            most = 0

            async def watch() -> None:
                nonlocal most
                while True:
                    most = max(most, sum(worker.sequences.values()))
                    await clock.sleep(0.001)

            watcher = asyncio.ensure_future(watch())
            results = await asyncio.gather(*(_collect(service, _ask(max_tokens=20)) for _ in range(5)))
            watcher.cancel()
            assert all(r[-1].completion_tokens == 20 for r in results)
            assert most == 2
            assert service.runner("llm").statistics().running == 0

    run_in_virtual_time(main)


def test_waiting_is_bounded_by_max_queue(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file, max_num_seqs=1, max_queue=1, on_unmeetable="best_effort"))
            first = asyncio.ensure_future(_collect(service, _ask(max_tokens=50)))
            await clock.sleep(0.05)
            second = asyncio.ensure_future(_collect(service, _ask(max_tokens=5)))
            await clock.sleep(0.01)
            with pytest.raises(Overloaded, match="--max-queue"):
                await _collect(service, _ask())
            assert len(await first) == 50 and len(await second) == 5

    run_in_virtual_time(main)


def test_a_request_whose_first_token_cannot_come_in_time_is_refused_at_once_with_retry_after(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock, step_base_s=0.05)
        async with service:
            await service.deploy(_spec(model_file, max_num_seqs=1, ttft_slo_ms=500))
            await _collect(service, _ask(max_tokens=40))  # measures steps and answer lengths
            running = service.generate("llm", _ask(max_tokens=40))
            await anext(running)
            # The only seat is held for about 39 more steps of 50 ms: far past a 500 ms TTFT objective.
            started = clock.now()
            with pytest.raises(DeadlineUnmeetable, match="every seat is taken") as refused:
                await anext(service.generate("llm", _ask(max_tokens=40)))
            assert clock.now() == started  # at once, not after waiting
            assert 1.0 < refused.value.retry_after_s < 2.5
            await running.aclose()
            # The seat is free again: the same request is admitted and served in time.
            chunks = await _collect(service, _ask(max_tokens=3))
            assert chunks[-1].completion_tokens == 3

    run_in_virtual_time(main)


def test_a_client_that_leaves_cancels_its_sequence_on_the_worker(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file))
            (worker,) = backend.workers()
            stream = service.generate("llm", _ask(max_tokens=100))
            await anext(stream)
            await anext(stream)
            await stream.aclose()
            assert worker.cancelled == 1 and sum(worker.sequences.values()) == 0
            stats = service.runner("llm").statistics()
            assert stats.running == 0 and not stats.busy
            # A consumer cancelled while it waits for a chunk cancels the sequence just the same.
            task = asyncio.ensure_future(_collect(service, _ask(max_tokens=100)))
            await clock.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert worker.cancelled == 2 and sum(worker.sequences.values()) == 0

    run_in_virtual_time(main)


def test_an_idle_model_scales_to_zero_a_running_stream_keeps_it_and_a_request_brings_it_back(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock, step_base_s=0.5)
        async with service:
            await service.deploy(_spec(model_file, keepalive_hot_s=3, keepalive_warm_s=5, ttft_slo_ms=5000))
            # A stream of 20 tokens at 0.5 s each outlives the hot keep-alive: never demoted under it.
            chunks = await _collect(service, _ask(max_tokens=20))
            assert len(chunks) == 20 and service.info("llm").tier == "hot"
            assert service.info("llm").cold_starts == 1
            await clock.sleep(4.5)
            assert service.info("llm").tier == "warm"
            await clock.sleep(6)
            assert service.info("llm").tier == "cool"
            chunks = await _collect(service, _ask(max_tokens=2))
            info = service.info("llm")
            assert chunks[-1].completion_tokens == 2 and info.tier == "hot"
            assert info.last_cold_start is not None and info.last_cold_start["tier"] == "cool"

    run_in_virtual_time(main)


def test_a_model_too_slow_per_token_at_first_is_served_again_after_a_few_refusals(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock, step_base_s=0.5)
        async with service:
            await service.deploy(_spec(model_file, tpot_slo_ms=100, ttft_slo_ms=2000))
            # A first real stream measures 500 ms steps, five times its TPOT objective.
            await _collect(service, _ask(max_tokens=4))
            (worker,) = backend.workers()
            worker.generation = GenerationProfile(step_base_s=0.01)
            outcomes = []
            for _ in range(12):
                try:
                    await _collect(service, _ask(max_tokens=4))
                    outcomes.append("ok")
                except DeadlineUnmeetable as exc:
                    assert "per output token" in exc.message
                    outcomes.append("refused")
                await clock.sleep(0.1)
            assert 1 <= outcomes.count("refused") <= PROBE_AFTER_REFUSALS
            assert "refused" not in outcomes[PROBE_AFTER_REFUSALS + 1 :]

    run_in_virtual_time(main)


def test_a_worker_lost_before_the_first_token_is_retried_on_its_replacement(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock, prefill_base_s=1.0)
        async with service:
            await service.deploy(_spec(model_file, on_unmeetable="best_effort"))
            call = asyncio.ensure_future(_collect(service, _ask(max_tokens=3)))
            await clock.sleep(0.5)
            backend.workers()[0].crash()
            chunks = await call
            assert chunks[-1].completion_tokens == 3 and backend.restarts == 1

    run_in_virtual_time(main)


def test_metrics_have_vllms_names_and_info_shows_attainment_and_tokens_per_second(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, backend = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file, ttft_slo_ms=1000, tpot_slo_ms=100))
            await _collect(service, _ask("z" * 80, max_tokens=5))
            # A stream closed once its finish came (as the gateway closes it) ran to its end too.
            await _until_finish(service, _ask("z" * 80, max_tokens=5))
            assert backend.workers()[0].cancelled == 0
            assert service.info("llm").succeeded == 2 and service.info("llm").failed == 0
            text = service.metrics.render().decode()
            label = '{model_name="llm"}'
            assert f"vllm:time_to_first_token_seconds_count{label} 2.0" in text
            assert f"vllm:time_per_output_token_seconds_count{label} 8.0" in text  # 4 tokens after each first
            assert f"vllm:e2e_request_latency_seconds_count{label} 2.0" in text
            assert f"vllm:prompt_tokens_total{label} 40.0" in text
            assert f"vllm:generation_tokens_total{label} 10.0" in text
            assert 'vllm:request_success_total{finished_reason="length",model_name="llm"} 2.0' in text
            assert f"vllm:num_requests_running{label} 0.0" in text
            assert f"vllm:num_requests_waiting{label} 0.0" in text
            info = service.info("llm").generation
            assert info is not None
            assert info["ttft_attainment"] == 1.0 and info["tpot_attainment"] == 1.0
            assert info["tokens_per_s"] == pytest.approx(10 / 60)  # over the last minute
            assert (info["ttft_slo_ms"], info["tpot_slo_ms"], info["max_model_len"]) == (1000, 100, 2048)
            assert service.status()["generation"]["llm"]["generation_tokens"] == 10
            await service.remove("llm")
            assert "vllm:generation_tokens_total{" not in service.metrics.render().decode()

    run_in_virtual_time(main)


def test_the_oip_infer_route_of_a_generative_model_names_the_generate_routes(tmp_path, model_file):
    import httpx

    from ember.gateway.app import build_app

    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file))
            transport = httpx.ASGITransport(app=build_app(service, manage_lifetime=False))
            key = (service.home / "admin.key").read_text().strip()
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://ember", headers=headers) as client:
                body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]}
                response = await client.post("/v2/models/llm/infer", json=body)
                assert response.status_code == 400
                assert "/v2/models/llm/generate" in response.json()["error"]
                assert (await client.get("/v2/models/llm")).status_code == 200  # its metadata still answers

    run_in_virtual_time(main)


def test_a_cold_model_refuses_a_ttft_its_load_cannot_meet_starts_loading_and_serves_the_retry(tmp_path, model_file):
    async def main(clock: VirtualClock) -> None:
        service, _ = _service(tmp_path, clock)
        async with service:
            await service.deploy(_spec(model_file, ttft_slo_ms=30))
            await service.unload("llm")  # to cool: its load is predicted to take far more than 30 ms
            started = clock.now()
            with pytest.raises(DeadlineUnmeetable, match="being loaded") as refused:
                await anext(service.generate("llm", _ask()))
            assert clock.now() == started
            await clock.sleep(refused.value.retry_after_s * 1.001)
            # Retried when the rest of the load fits the objective: admitted, it waits for the load.
            chunks = await _collect(service, _ask(max_tokens=2))
            assert chunks[-1].completion_tokens == 2 and service.info("llm").tier == "hot"

    run_in_virtual_time(main)
