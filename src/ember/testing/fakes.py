"""Fake workers on an injected clock, implementing the ``ClusterBackend``/``WorkerHandle`` seam."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ember.api import Arrays, TensorSpec, check_answer
from ember.clock import Clock, VirtualClock
from ember.cluster.base import ProgressCallback, WorkerHandle
from ember.errors import InvalidInput, ModelFailed, WorkerCrashed
from ember.generation import FinishReason, GenerateRequest, GenerationInfo, TokenChunk
from ember.store import Store, StoredModel
from ember.store.format import write_raw
from ember.store.store import WEIGHTS
from ember.worker.protocol import Batch, rows_of

__all__ = [
    "FAKE_GENERATION",
    "FakeBackend",
    "FakeWorker",
    "LatencyProfile",
    "count_prompt_tokens",
    "run_in_virtual_time",
    "stage_weights",
]

T = TypeVar("T")

Model = Callable[[Arrays], Arrays]

#: What every fake model declares: ``x`` in, ``x`` out, FP32 rows of 4.
FAKE_INPUTS = (TensorSpec("x", "FP32", (-1, 4)),)
FAKE_OUTPUTS = (TensorSpec("x", "FP32", (-1, 4)),)


#: What a fake generative model says about itself (``FakeWorker(generation=...)``).
FAKE_GENERATION = GenerationInfo(max_model_len=2048, kv_bytes_per_token=4096, vocab_size=1000)

#: A fake generative model: the texts of the tokens it answers a request with (at most
#: ``max_tokens`` of them are sent; fewer end the sequence with ``finish_reason="stop"``).
Script = Callable[[GenerateRequest], Sequence[str]]


def _identity(batch: Arrays) -> Arrays:
    return dict(batch)


def _counting(request: GenerateRequest) -> Sequence[str]:
    """`` t0``, `` t1``, ... one per token asked for."""
    return [f" t{i}" for i in range(request.params.max_tokens)]


def count_prompt_tokens(request: GenerateRequest) -> int:
    """A fake tokenizer's count of the prompt: its whitespace-separated words (at least one)."""
    if request.prompt is not None:
        return max(1, len(request.prompt.split()))
    return max(1, sum(len(m.content.split()) + 1 for m in request.messages or ()))


@dataclass(frozen=True)
class LatencyProfile:
    """Seconds for a batch of ``rows``: ``base_s + per_row_s * rows``; loading takes ``load_s``,
    unloading ``unload_s``."""

    base_s: float = 0.005
    per_row_s: float = 0.0
    load_s: float = 0.05
    unload_s: float = 0.0

    #: Generative models: a prefill takes ``prefill_s + prefill_per_token_s * prompt_tokens``; each
    #: decode step ``decode_s + decode_per_seq_s * running sequences`` of that model on the worker.
    prefill_s: float = 0.01
    prefill_per_token_s: float = 0.0
    decode_s: float = 0.02
    decode_per_seq_s: float = 0.0

    def batch_s(self, rows: int) -> float:
        return self.base_s + self.per_row_s * rows

    def prefill_time_s(self, prompt_tokens: int) -> float:
        return self.prefill_s + self.prefill_per_token_s * prompt_tokens

    def decode_step_s(self, running: int) -> float:
        return self.decode_s + self.decode_per_seq_s * running


@dataclass
class FakeWorker:
    """A worker that runs ``model`` (a function of a batch) and takes time on ``clock``."""

    id: str
    clock: Clock
    profile: LatencyProfile = field(default_factory=LatencyProfile)
    model: Model = _identity
    device: str = "cpu"
    #: When set, every load fails with this message, as a model whose setup raises.
    load_error: str | None = None
    #: What an import reports about the model; None: one FP32 input and output ``x`` of shape [-1, 4]
    #: (or, with ``generation`` set, a generative model with that ``GenerationInfo``).
    described: dict[str, Any] | None = None
    #: Generative models: what an import reports (None: the model is one-shot) and the scripted tokens.
    generation: GenerationInfo | None = None
    script: Script = _counting
    alive: bool = True
    loaded: set[str] = field(default_factory=set)
    batches: list[tuple[str, int]] = field(default_factory=list)
    in_flight: int = 0
    #: The options of each loaded model's ``Load`` (a generative model's max_num_seqs, max_model_len, ...).
    load_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Sequences running now, by model key; every sequence started, as (key, prompt tokens); the
    #: number of sequences stopped before their end (their stream closed early).
    running: dict[str, int] = field(default_factory=dict)
    sequences: list[tuple[str, int]] = field(default_factory=list)
    cancelled: int = 0
    _on_lost: Callable[[FakeWorker], None] | None = None
    _crash: asyncio.Event = field(default_factory=asyncio.Event)

    async def import_model(
        self, model_ref: str, options: dict[str, Any], staging: str, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        write_raw(Path(staging) / WEIGHTS, [("w", "uint8", (64,), bytes(64))])
        if progress is not None:
            progress(64, 64)
        if self.described is not None:
            return self.described
        if self.generation is not None:
            return {
                "inputs": [],
                "outputs": [],
                "max_batch_size": 1,
                "task": "generate",
                "generation": self.generation.to_json(),
            }
        return {
            "inputs": [spec.to_json() for spec in FAKE_INPUTS],
            "outputs": [spec.to_json() for spec in FAKE_OUTPUTS],
            "max_batch_size": 8,
            "task": None,
        }

    async def load(
        self, key: str, model_ref: str, options: dict[str, Any], weights_path: str, assets: dict[str, bytes]
    ) -> float:
        await self._take(self.profile.load_s)
        if self.load_error is not None:
            raise ModelFailed(self.load_error)
        self.loaded.add(key)
        self.load_options[key] = dict(options)
        return self.profile.load_s

    async def unload(self, key: str) -> None:
        self._check()
        if self.profile.unload_s > 0:
            await self.clock.sleep(self.profile.unload_s)
        self.loaded.discard(key)

    async def infer(self, key: str, requests: list[Arrays]) -> Batch:
        if key not in self.loaded:
            raise ModelFailed(f"{key} is not loaded on {self.id}")
        rows = sum(rows_of(r) for r in requests)
        self.batches.append((key, rows))
        seconds = self.profile.batch_s(rows)
        await self._take(seconds)
        return Batch([self._answer(r) for r in requests], seconds)

    async def generate(self, key: str, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """``script``'s tokens, one chunk per decode step, timed by the latency profile on the clock.

        The first chunk comes after the prefill; each later one after a decode step whose length
        grows with the sequences of ``key`` running at once. A prompt at or over the model's length
        limit (the Load option ``max_model_len``, else ``generation.max_model_len``) is refused with
        ``InvalidInput``; a sequence reaching the limit ends with ``finish_reason="length"``.
        """
        self._check()
        if key not in self.loaded:
            raise ModelFailed(f"{key} is not loaded on {self.id}")
        prompt_tokens = count_prompt_tokens(request)
        limit = int(self.load_options.get(key, {}).get("max_model_len") or 0)
        if not limit:
            limit = (self.generation or FAKE_GENERATION).max_model_len
        if prompt_tokens >= limit:
            raise InvalidInput(
                f"the prompt is {prompt_tokens} tokens; this model takes at most {limit - 1} (max_model_len {limit})"
            )
        texts = list(self.script(request))
        room = min(request.params.max_tokens, limit - prompt_tokens)
        self.sequences.append((key, prompt_tokens))
        self.running[key] = self.running.get(key, 0) + 1
        done = False
        try:
            await self._take(self.profile.prefill_time_s(prompt_tokens))
            for i, text in enumerate(texts[:room]):
                if i > 0:
                    await self._take(self.profile.decode_step_s(self.running[key]))
                last = i + 1 == min(room, len(texts))
                reason: FinishReason | None = None
                if last:
                    reason = "stop" if len(texts) < room else "length"
                done = last
                yield TokenChunk(
                    text,
                    token_ids=(i,),
                    prompt_tokens=prompt_tokens if i == 0 else 0,
                    completion_tokens=i + 1,
                    finish_reason=reason,
                )
            if not done:  # the script had no tokens at all
                done = True
                yield TokenChunk("", prompt_tokens=prompt_tokens, finish_reason="stop")
        finally:
            self.running[key] -= 1
            if not self.running[key]:
                del self.running[key]
            if not done:
                self.cancelled += 1

    def _answer(self, request: Arrays) -> Arrays | str:
        """``model``'s answer, checked against the declared outputs as a real worker checks it."""
        answer = self.model(request)
        declared: tuple[TensorSpec, ...] = FAKE_OUTPUTS
        if self.described is not None and isinstance(self.described.get("outputs"), list):
            declared = tuple(TensorSpec.from_json(spec) for spec in self.described["outputs"])
        mismatch = check_answer(declared, answer, rows_of(request))
        return answer if mismatch is None else mismatch

    def crash(self) -> None:
        """Die now: batches in flight fail with WorkerCrashed and the backend is told."""
        if not self.alive:
            return
        self.alive = False
        self.loaded.clear()
        self._crash.set()
        if self._on_lost is not None:
            self._on_lost(self)

    def _check(self) -> None:
        if not self.alive:
            raise WorkerCrashed(f"fake worker {self.id} is dead")

    async def _take(self, seconds: float) -> None:
        self._check()
        self.in_flight += 1
        try:
            sleep = asyncio.ensure_future(self.clock.sleep(seconds))
            crashed = asyncio.ensure_future(self._crash.wait())
            await asyncio.wait({sleep, crashed}, return_when=asyncio.FIRST_COMPLETED)
            sleep.cancel()
            crashed.cancel()
        finally:
            self.in_flight -= 1
        self._check()


class FakeBackend:
    """A pool of fake workers; a crashed worker is replaced by a fresh one at once."""

    def __init__(
        self,
        clock: Clock,
        size: int = 1,
        profile: LatencyProfile | None = None,
        model: Model = _identity,
        generation: GenerationInfo | None = None,
        script: Script = _counting,
    ):
        """``generation`` and ``script``: every worker serves a fake generative model (see FakeWorker)."""
        self.clock = clock
        self.profile = profile or LatencyProfile()
        self.model = model
        self.generation = generation
        self.script = script
        self._size = size
        self._seq = itertools.count()
        self._workers: dict[str, FakeWorker] = {}
        self._callbacks: list[Callable[[FakeWorker], None]] = []
        self._ready_callbacks: list[Callable[[FakeWorker], None]] = []
        self.restarts = 0

    async def start(self) -> None:
        for _ in range(self._size):
            self._spawn()

    async def stop(self) -> None:
        self._workers.clear()

    def workers(self) -> tuple[FakeWorker, ...]:
        return tuple(w for w in self._workers.values() if w.alive)

    async def recycle(self, worker: WorkerHandle) -> None:
        if isinstance(worker, FakeWorker):
            worker.crash()

    def on_worker_lost(self, callback: Callable[[FakeWorker], None]) -> None:
        self._callbacks.append(callback)

    def on_worker_ready(self, callback: Callable[[FakeWorker], None]) -> None:
        self._ready_callbacks.append(callback)

    def statistics(self) -> dict[str, Any]:
        return {
            "backend": "fake",
            "size": self._size,
            "ready": len(self.workers()),
            "restarts": self.restarts,
        }

    def _spawn(self) -> FakeWorker:
        worker = FakeWorker(
            f"f{next(self._seq)}", self.clock, self.profile, self.model, generation=self.generation, script=self.script
        )
        worker._on_lost = self._lost
        self._workers[worker.id] = worker
        return worker

    def _lost(self, worker: FakeWorker) -> None:
        self._workers.pop(worker.id, None)
        for callback in self._callbacks:
            callback(worker)
        self.restarts += 1
        replacement = self._spawn()
        for callback in self._ready_callbacks:
            callback(replacement)


def stage_weights(store: Store, key: str, size: int = 1024) -> StoredModel:
    """Put a checkpoint of ``size`` bytes of weights under ``key`` in ``store``'s cool tier, as an import would."""
    staging = store.staging(key)
    data = bytes(range(256)) * (size // 256) + b"\0" * (size % 256)
    write_raw(staging / WEIGHTS, [("w", "uint8", (size,), data)])
    (staging / "assets").mkdir(exist_ok=True)
    return store.commit(key, staging)


def run_in_virtual_time(main: Callable[[VirtualClock], Awaitable[T]]) -> T:
    """Run ``main(clock)`` in a fresh event loop whose clock jumps to the next deadline when idle."""

    async def runner() -> T:
        clock = VirtualClock()
        jumper = asyncio.create_task(clock.run_autojump())
        try:
            return await main(clock)
        finally:
            jumper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await jumper

    return asyncio.run(runner())
