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
from ember.errors import InvalidInput, ModelFailed, StorageFull, WorkerCrashed
from ember.generation import FinishReason, GenerateRequest, TokenChunk
from ember.store import Store, StoredModel, Tier
from ember.store.format import write_raw
from ember.store.store import WEIGHTS
from ember.worker.protocol import Batch, rows_of

__all__ = [
    "FakeBackend",
    "FakeWorker",
    "GenerationProfile",
    "LatencyProfile",
    "generative_description",
    "run_in_virtual_time",
    "stage_weights",
]

T = TypeVar("T")

Model = Callable[[Arrays], Arrays]

#: A fake generative model's answer: the texts of its tokens, one per decode step (at most
#: ``max_tokens`` of them are sent; fewer end the sequence with ``finish_reason="stop"``).
Script = Callable[[GenerateRequest], Sequence[str]]

#: What every fake model declares: ``x`` in, ``x`` out, FP32 rows of 4.
FAKE_INPUTS = (TensorSpec("x", "FP32", (-1, 4)),)
FAKE_OUTPUTS = (TensorSpec("x", "FP32", (-1, 4)),)


def _identity(batch: Arrays) -> Arrays:
    return dict(batch)


@dataclass(frozen=True)
class LatencyProfile:
    """Seconds for a batch of ``rows``: ``base_s + per_row_s * rows``; loading takes ``load_s``,
    unloading ``unload_s``."""

    base_s: float = 0.005
    per_row_s: float = 0.0
    load_s: float = 0.05
    unload_s: float = 0.0

    def batch_s(self, rows: int) -> float:
        return self.base_s + self.per_row_s * rows


@dataclass(frozen=True)
class GenerationProfile:
    """How a fake generative model takes its time: a prompt of ``n`` tokens prefills in
    ``prefill_base_s + prefill_per_token_s * n`` (and yields the first token); each further token takes
    a decode step of ``step_base_s + step_per_seq_s * b`` with ``b`` sequences running on the worker.
    A prompt is one token per ``bytes_per_token`` UTF-8 bytes (chat messages add ``template_tokens``);
    an answer ends (``stop``) after ``eos_after`` tokens, or at ``max_tokens`` (``length``)."""

    prefill_base_s: float = 0.005
    prefill_per_token_s: float = 0.0001
    step_base_s: float = 0.01
    step_per_seq_s: float = 0.001
    bytes_per_token: int = 4
    template_tokens: int = 8
    eos_after: int | None = None

    def prompt_tokens(self, request: GenerateRequest) -> int:
        extra = self.template_tokens if request.messages is not None else 0
        return max(1, request.size_hint() // self.bytes_per_token) + extra

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_base_s + self.prefill_per_token_s * tokens

    def step_s(self, batch: int) -> float:
        return self.step_base_s + self.step_per_seq_s * batch


def generative_description(max_model_len: int = 2048, kv_bytes_per_token: int = 1024) -> dict[str, Any]:
    """What a fake generative model's import reports (``FakeWorker.described``)."""
    return {
        "inputs": [],
        "outputs": [],
        "max_batch_size": 1,
        "task": "generate",
        "generation": {
            "max_model_len": max_model_len,
            "kv_bytes_per_token": kv_bytes_per_token,
            "vocab_size": 1000,
            "chat_template": True,
        },
    }


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
    #: What an import reports about the model; None: one FP32 input and output ``x`` of shape [-1, 4].
    described: dict[str, Any] | None = None
    alive: bool = True
    loaded: set[str] = field(default_factory=set)
    batches: list[tuple[str, int]] = field(default_factory=list)
    in_flight: int = 0
    generation: GenerationProfile = field(default_factory=GenerationProfile)
    script: Script | None = None
    #: Per loaded key, the options its load carried (``max_num_seqs``, ``max_model_len``, ...).
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Sequences generating now, per key; every sequence started, as (key, prompt tokens); and those
    #: closed before their end (cancelled).
    sequences: dict[str, int] = field(default_factory=dict)
    generations: list[tuple[str, int]] = field(default_factory=list)
    cancelled: int = 0
    #: The tiers of the models in its node's store; None: it loads from the controller's own store.
    node_tiers: dict[str, Tier] | None = None
    #: Why its node's store takes no new models (None: it takes them); models it holds still load.
    refusing: str | None = None
    _on_lost: Callable[[FakeWorker], None] | None = None
    _crash: asyncio.Event = field(default_factory=asyncio.Event)

    def holds(self, key: str) -> Tier | None:
        return None if self.node_tiers is None else self.node_tiers.get(key, Tier.COLD)

    def refuses(self, key: str) -> str | None:
        return None if self.holds(key) in (Tier.WARM, Tier.COOL) else self.refusing

    async def import_model(
        self, model_ref: str, options: dict[str, Any], staging: str, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        write_raw(Path(staging) / WEIGHTS, [("w", "uint8", (64,), bytes(64))])
        if progress is not None:
            progress(64, 64)
        if self.described is not None:
            return self.described
        return {
            "inputs": [spec.to_json() for spec in FAKE_INPUTS],
            "outputs": [spec.to_json() for spec in FAKE_OUTPUTS],
            "max_batch_size": 8,
            "task": None,
        }

    async def load(
        self, key: str, model_ref: str, options: dict[str, Any], weights_path: str, assets: dict[str, bytes]
    ) -> float:
        refused = self.refuses(key)
        if refused is not None:  # as a node's store that cannot take the weights
            raise StorageFull(f"worker {self.id} takes no new models: {refused}")
        await self._take(self.profile.load_s)
        if self.load_error is not None:
            raise ModelFailed(self.load_error)
        self.loaded.add(key)
        self.options[key] = dict(options)
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
        """Stream a fake answer timed by ``generation`` on ``clock``: ``script``'s texts (ending with
        ``stop`` when they run out), else tokens ``" t1"``, ``" t2"``, ...

        A prompt of ``max_model_len`` tokens or more is InvalidInput naming the limit; closing the
        stream early cancels the sequence (counted in ``cancelled``)."""
        self._check()
        if key not in self.loaded:
            raise ModelFailed(f"{key} is not loaded on {self.id}")
        profile = self.generation
        prompt = profile.prompt_tokens(request)
        max_len = self.options.get(key, {}).get("max_model_len")
        if max_len is not None and prompt >= int(max_len):
            raise InvalidInput(f"the prompt is {prompt} tokens, and this model takes at most {max_len} (max_model_len)")
        limit = request.params.max_tokens
        if max_len is not None:
            limit = min(limit, int(max_len) - prompt)
        ends = profile.eos_after
        texts = None if self.script is None else list(self.script(request))
        if texts is not None:
            ends = len(texts) if ends is None else min(ends, len(texts))
        if ends is not None:
            limit = min(limit, ends)
        self.generations.append((key, prompt))
        self.sequences[key] = self.sequences.get(key, 0) + 1
        finished = False
        try:
            await self._take(profile.prefill_s(prompt))
            made = 0
            while True:
                made += 1
                finish: FinishReason | None = None
                if made >= limit:
                    finish = "stop" if ends is not None and made >= ends else "length"
                    finished = True  # a consumer may close the stream at its last chunk
                yield TokenChunk(
                    f" t{made}" if texts is None else (texts[made - 1] if made <= len(texts) else ""),
                    (made,),
                    prompt_tokens=prompt if made == 1 else 0,
                    completion_tokens=made,
                    finish_reason=finish,
                )
                if finish is not None:
                    return
                await self._take(profile.step_s(sum(self.sequences.values())))
        finally:
            self.sequences[key] -= 1
            if not finished:
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
        *,
        described: dict[str, Any] | None = None,
        generation: GenerationProfile | None = None,
        script: Script | None = None,
    ):
        self.clock = clock
        self.profile = profile or LatencyProfile()
        self.model = model
        #: What every worker's import reports, and how its generative models take their time.
        self.described = described
        self.generation = generation or GenerationProfile()
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
            f"f{next(self._seq)}",
            self.clock,
            self.profile,
            self.model,
            described=self.described,
            generation=self.generation,
            script=self.script,
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
