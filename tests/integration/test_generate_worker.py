"""A real worker process streaming generative sequences: concurrent streams, cancellation, errors,
and one-shot batches between steps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from harness import EXAMPLES

from ember.cluster.local import LocalBackend, LocalWorker
from ember.errors import InvalidInput
from ember.generation import GenerateRequest, SamplingParams, TokenChunk

BIGRAM = f"{EXAMPLES / 'byte_bigram.py'}:ByteBigram"
ECHO = f"{Path(__file__).parent / 'models' / 'echo.py'}:Echo"


async def _deploy(
    worker: LocalWorker, ref: str, key: str, staging: Path, options: dict[str, object]
) -> dict[str, object]:
    staging.mkdir()
    described = await worker.import_model(ref, {k: v for k, v in options.items() if k == "step_delay_s"}, str(staging))
    assets = {f.name: f.read_bytes() for f in (staging / "assets").iterdir()}
    await worker.load(key, ref, options, str(staging / "weights.ember"), assets)
    return described


def _request(prompt: str, max_tokens: int, ignore_eos: bool = False) -> GenerateRequest:
    return GenerateRequest(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos), prompt=prompt)


def test_streams_cancels_and_runs_batches_between_steps(tmp_path: Path) -> None:
    async def main() -> None:
        backend = LocalBackend(1, tmp_path / "logs", preload=(), spares=0)
        await backend.start()
        try:
            worker = backend.workers()[0]
            options = {"step_delay_s": 0.002, "max_num_seqs": 2, "max_model_len": 1 << 20, "kv_budget_bytes": 0}
            described = await _deploy(worker, BIGRAM, "bigram@1", tmp_path / "bigram", options)
            assert described["task"] == "generate"
            assert described["generation"]["vocab_size"] == 257  # type: ignore[index]
            await _deploy(worker, ECHO, "echo@1", tmp_path / "echo", {})

            # One sequence alone: the model's whole answer, then "stop" at its end token.
            chunks = [c async for c in worker.generate("bigram@1", _request("Hello", 100))]
            assert "".join(c.text for c in chunks) == "Hi, Ember!"
            assert chunks[0].prompt_tokens == 5 and chunks[-1].finish_reason == "stop"

            # Two long sequences at once; both stream.
            a = worker.generate("bigram@1", _request("a", 1_000_000, ignore_eos=True))
            b = worker.generate("bigram@1", _request("b", 1_000_000, ignore_eos=True))
            for _ in range(3):
                first_a, first_b = await anext(a), await anext(b)
                assert first_a.finish_reason is None and first_b.finish_reason is None
            # A one-shot batch runs between two steps, while both sequences go on.
            x = np.arange(6, dtype=np.float32).reshape(2, 3)
            batch = await worker.infer("echo@1", [{"x": x}])
            assert isinstance(batch.outputs[0], dict)
            np.testing.assert_array_equal(batch.outputs[0]["y"], x)
            # Closing b cancels it: its seat is free for c at once (max_num_seqs is 2, a still runs).
            await b.aclose()
            c_chunks: list[TokenChunk] = [c async for c in worker.generate("bigram@1", _request("c", 4))]
            assert c_chunks[-1].finish_reason == "length" and c_chunks[-1].completion_tokens == 4
            assert (await anext(a)).finish_reason is None  # a never stopped
            await a.aclose()

            # A prompt over the length limit is refused before the stream starts.
            with pytest.raises(InvalidInput, match="max_model_len 8"):
                await worker.load(
                    "short@1", BIGRAM, {"max_model_len": 8}, str(tmp_path / "bigram" / "weights.ember"), {}
                )
                async for _ in worker.generate("short@1", _request("far too long a prompt", 4)):
                    pass
            # Nothing is left running on the worker.
            assert worker.in_flight == 0
        finally:
            await backend.stop()

    asyncio.run(asyncio.wait_for(main(), 300))
