"""FakeWorker.generate: the fake generative worker other tests build on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ember.errors import InvalidInput, ModelFailed
from ember.generation import GenerateRequest, SamplingParams, TokenChunk
from ember.testing import (
    FakeWorker,
    GenerationProfile,
    VirtualClock,
    generative_description,
    run_in_virtual_time,
)


#: A prompt of ``n`` tokens for the default profile (4 UTF-8 bytes a token).
def _prompt(tokens: int) -> str:
    return "abcd" * tokens


def _request(prompt: str = _prompt(3), max_tokens: int = 4) -> GenerateRequest:
    return GenerateRequest(SamplingParams(max_tokens=max_tokens, temperature=0.0), prompt=prompt)


async def _loaded(clock: VirtualClock, **kwargs: object) -> FakeWorker:
    worker = FakeWorker("f0", clock, described=generative_description(), **kwargs)  # type: ignore[arg-type]
    await worker.load("m@1", "fake:Model", {"max_model_len": 16}, "", {})
    return worker


async def _collect(worker: FakeWorker, request: GenerateRequest) -> list[TokenChunk]:
    return [chunk async for chunk in worker.generate("m@1", request)]


def test_streams_max_tokens_then_length() -> None:
    async def main(clock: VirtualClock) -> tuple[list[TokenChunk], float]:
        profile = GenerationProfile(prefill_base_s=0.1, prefill_per_token_s=0.0, step_base_s=0.01, step_per_seq_s=0.0)
        worker = await _loaded(clock, generation=profile)
        start = clock.now()
        chunks = await _collect(worker, _request(max_tokens=3))
        return chunks, clock.now() - start

    chunks, took = run_in_virtual_time(main)
    assert [c.text for c in chunks] == [" t1", " t2", " t3"]
    assert [c.completion_tokens for c in chunks] == [1, 2, 3]
    assert chunks[0].prompt_tokens == 3
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert took == pytest.approx(0.1 + 2 * 0.01)


def test_a_short_script_stops_and_a_long_prompt_is_refused() -> None:
    async def main(clock: VirtualClock) -> list[TokenChunk]:
        worker = await _loaded(clock, script=lambda request: ["Paris", "."])
        with pytest.raises(InvalidInput, match="max_model_len"):
            await _collect(worker, _request(prompt=_prompt(16)))
        with pytest.raises(ModelFailed):
            await _collect(FakeWorker("f1", clock), _request())
        return await _collect(worker, _request(max_tokens=10))

    chunks = run_in_virtual_time(main)
    assert "".join(c.text for c in chunks) == "Paris."
    assert chunks[-1].finish_reason == "stop"


def test_the_length_limit_ends_the_sequence() -> None:
    async def main(clock: VirtualClock) -> list[TokenChunk]:
        worker = await _loaded(clock)
        return await _collect(worker, _request(prompt=_prompt(14), max_tokens=10))

    chunks = run_in_virtual_time(main)
    assert len(chunks) == 2 and chunks[-1].finish_reason == "length"


def test_closing_early_cancels_and_batch_mates_slow_each_step() -> None:
    async def main(clock: VirtualClock) -> tuple[int, int, int, float]:
        profile = GenerationProfile(prefill_base_s=0.0, prefill_per_token_s=0.0, step_base_s=0.01, step_per_seq_s=0.01)
        worker = await _loaded(clock, generation=profile)
        stream = worker.generate("m@1", _request(max_tokens=8))
        await anext(stream)
        running_then = worker.sequences["m@1"]
        start = clock.now()
        other = asyncio.ensure_future(_collect(worker, _request(max_tokens=2)))
        await anext(stream)
        await stream.aclose()
        await other
        return running_then, worker.cancelled, sum(worker.sequences.values()), clock.now() - start

    running_then, cancelled, running_after, took = run_in_virtual_time(main)
    assert running_then == 1
    assert cancelled == 1
    assert running_after == 0
    assert took == pytest.approx(0.03)  # one step with two sequences running


def test_import_reports_a_generative_model(tmp_path: Path) -> None:
    async def main(clock: VirtualClock) -> dict[str, object]:
        worker = FakeWorker("f0", clock, described=generative_description(max_model_len=512))
        return await worker.import_model("fake:M", {}, str(tmp_path))

    described = run_in_virtual_time(main)
    assert described["task"] == "generate"
    assert described["generation"]["max_model_len"] == 512  # type: ignore[index]
