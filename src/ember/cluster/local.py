"""Workers as subprocesses of this machine, started ahead and kept in a pool.

Each worker is ``python -m ember.worker`` talking over a socketpair. The pool keeps ``size`` workers
up: one that dies is reported to the controller (which re-places its models and retries its
in-flight batches) and a fresh one is started in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.api import Arrays
from ember.cluster.base import ProgressCallback, WorkerHandle
from ember.errors import (
    EmberError,
    InternalError,
    InvalidInput,
    ModelFailed,
    ModelUnavailable,
    StorageFull,
    WorkerCrashed,
)
from ember.generation import GenerateRequest, TokenChunk
from ember.worker.lifeline import PARENT_ENV
from ember.worker.protocol import (
    Batch,
    Cancel,
    Generate,
    Import,
    Infer,
    Load,
    Message,
    Progress,
    Reply,
    Shutdown,
    Tokens,
    Unload,
    WorkerReady,
    encode_frame,
    read_frame,
    write_frame,
)

__all__ = ["LocalBackend", "LocalWorker", "WorkerLimits"]

START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class WorkerLimits:
    """What one worker may take before Ember stops it: a model that hangs or leaks cannot take the
    worker's other models (or the host) with it.

    ``batch_timeout_s``: a batch running longer is answered with an error and its worker is killed
    and replaced. ``memory_bytes``: a worker whose resident memory grows past it finishes the batch
    at hand, then exits and is replaced (0: no limit).
    """

    batch_timeout_s: float = 120.0
    memory_bytes: int = 0

    @staticmethod
    def default_memory_bytes(workers: int) -> int:
        """Three quarters of the host's memory, shared among ``workers``."""
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return 0
        return int(0.75 * total) // max(1, workers)


class LocalWorker:
    """One worker process and the reader task that matches its replies to requests."""

    def __init__(
        self,
        worker_id: str,
        device: str,
        threads: int,
        preload: tuple[str, ...],
        log_path: Path,
        limits: WorkerLimits = WorkerLimits(),
        warm_arena: Path | None = None,
    ) -> None:
        self._id = worker_id
        self._warm_arena = warm_arena
        self._limits = limits
        self._wanted_device = device
        self._threads = threads
        self._preload = preload
        self._log_path = log_path
        self._device = device
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        #: Who hears the Progress messages of a message in flight, by its id.
        self._progress: dict[int, ProgressCallback] = {}
        #: The chunks (or the error) of each running sequence, by the id of its Generate.
        self._streams: dict[int, asyncio.Queue[TokenChunk | EmberError]] = {}
        self._process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._alive = False
        self._closing = False
        self._lost_callback: Callable[[LocalWorker], None] | None = None
        self._write_lock = asyncio.Lock()
        self._last_reply_at = 0.0
        self.ready_info: WorkerReady | None = None

    @property
    def id(self) -> str:
        return self._id

    @property
    def device(self) -> str:
        return self._device

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._streams)

    def holds(self, key: str) -> None:
        """A local worker loads from the controller's own store."""
        return None

    def refuses(self, key: str) -> None:
        """The controller's own store refuses at import time, not at placement."""
        return None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self, on_lost: Callable[[LocalWorker], None]) -> None:
        parent, child = socket.socketpair()
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable,
            "-m",
            "ember.worker",
            "--fd",
            str(child.fileno()),
            "--device",
            self._wanted_device,
        ]
        args += ["--threads", str(self._threads), "--max-memory-bytes", str(self._limits.memory_bytes)]
        for module in self._preload:
            args += ["--preload", module]
        if self._warm_arena is not None:
            args += ["--warm-arena", str(self._warm_arena)]
        # Ember never downloads weights at run time: keep Hugging Face libraries offline.
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **os.environ, PARENT_ENV: str(os.getpid())}
        with open(self._log_path, "ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *args, pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        child.close()
        try:
            reader, self._writer = await asyncio.open_connection(sock=parent)
            first = await asyncio.wait_for(read_frame(reader), START_TIMEOUT_S)
        except TimeoutError:
            first = None
        except BaseException:  # cancelled while starting: never leave the process behind
            await asyncio.shield(self._kill())
            raise
        if not isinstance(first, WorkerReady):
            await self._kill()
            raise WorkerCrashed(f"worker {self._id} did not start; see {self._log_path}")
        self.ready_info = first
        self._device = first.device
        self._alive = True
        self._lost_callback = on_lost
        self._reader_task = asyncio.create_task(self._read_loop(reader), name=f"ember-worker-{self._id}")

    async def import_model(
        self, model_ref: str, options: dict[str, Any], staging: str, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        reply = await self._call(lambda i: Import(i, model_ref, options, staging), progress=progress)
        value: dict[str, Any] = reply.value
        return value

    async def load(
        self, key: str, model_ref: str, options: dict[str, Any], weights_path: str, assets: dict[str, bytes]
    ) -> float:
        reply = await self._call(lambda i: Load(i, key, model_ref, options, weights_path, assets, self._device))
        return float(reply.value)

    async def unload(self, key: str) -> None:
        await self._call(lambda i: Unload(i, key))

    async def infer(self, key: str, requests: list[Arrays]) -> Batch:
        timeout_s = self._limits.batch_timeout_s
        try:
            reply = await self._call(lambda i: Infer(i, key, requests), timeout_s)
        except TimeoutError:
            # The worker is stuck in the model's code: stop it (the pool replaces it, and the
            # controller re-places its models). This batch is not retried: it would hang again.
            await self._kill()
            raise ModelFailed(
                f"model '{key.partition('@')[0]}' ran a batch for over {timeout_s:g} s, the batch timeout; "
                "its worker was stopped and replaced. Fix the model, or raise `ember serve --batch-timeout-s`"
            ) from None
        batch: Batch = reply.value
        return batch

    async def generate(self, key: str, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """One sequence, chunk by chunk; closing the iterator early sends ``Cancel`` for it."""
        if not self._alive or self._writer is None:
            raise WorkerCrashed(f"worker {self._id} is not running")
        msg_id = next(self._ids)
        queue: asyncio.Queue[TokenChunk | EmberError] = asyncio.Queue()
        self._streams[msg_id] = queue
        finished = False
        try:
            # One frame in one write: frames never interleave, whoever else is writing.
            self._writer.write(encode_frame(Generate(msg_id, key, request)))
            while True:
                item = await queue.get()
                if isinstance(item, EmberError):
                    finished = True  # the worker holds nothing for it
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(msg_id, None)
            if not finished and self._alive and self._writer is not None and not self._writer.is_closing():
                # Written without waiting: this runs while the consumer is being cancelled too.
                self._writer.write(encode_frame(Cancel(next(self._ids), msg_id)))

    async def stop(self) -> None:
        self._closing = True
        if self._alive and self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call(lambda i: Shutdown(i)), 5.0)
        await self._kill()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task

    async def _call(
        self, make: Callable[[int], Message], timeout_s: float | None = None, progress: ProgressCallback | None = None
    ) -> Reply:
        """Send a message and wait for its reply; with ``timeout_s``, raise TimeoutError once the worker
        has spent that long on this message itself (not on the ones it answers first). ``progress``
        hears the worker's Progress messages about it."""
        if not self._alive or self._writer is None:
            raise WorkerCrashed(f"worker {self._id} is not running")
        msg_id = next(self._ids)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        if progress is not None:
            self._progress[msg_id] = progress
        try:
            async with self._write_lock:
                await write_frame(self._writer, make(msg_id))
            if timeout_s is not None:
                self._watch(msg_id, future, timeout_s)
            reply = await future
        except (ConnectionError, RuntimeError) as exc:
            raise WorkerCrashed(f"worker {self._id} connection broke: {exc}") from exc
        finally:
            self._pending.pop(msg_id, None)
            self._progress.pop(msg_id, None)
        if not reply.ok:
            raise error_from(reply)
        return reply

    def _watch(self, msg_id: int, future: asyncio.Future[Reply], timeout_s: float) -> None:
        """Fail ``future`` with TimeoutError once the worker has run message ``msg_id`` for ``timeout_s``.

        A worker answers its messages one at a time, in order: a message starts when the one before
        it is answered. Time spent waiting behind another message (a hung batch of another model, a
        long load) does not count against this one.
        """
        loop = asyncio.get_running_loop()  # clock-ok: a watchdog on a real process
        sent = loop.time()
        handle: list[asyncio.TimerHandle] = []

        def check() -> None:
            if future.done():
                return
            if any(earlier < msg_id for earlier in self._pending):  # not its turn yet
                handle[0] = loop.call_later(timeout_s, check)
                return
            left = max(sent, self._last_reply_at) + timeout_s - loop.time()
            if left > 0:
                handle[0] = loop.call_later(left, check)
                return
            # Stuck: whatever else was sent to this worker will never run there. Fail it now, as a
            # crash (its runner retries it on another worker); the caller kills the process.
            self._alive = False
            lost = WorkerCrashed(f"worker {self._id} was stopped: a batch ahead of this one hung")
            for other in self._pending.values():
                if other is not future and not other.done():
                    other.set_exception(lost)
            future.set_exception(TimeoutError())

        handle.append(loop.call_later(timeout_s, check))
        future.add_done_callback(lambda _: handle[0].cancel())

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await read_frame(reader)
                if message is None:
                    break
                if isinstance(message, Tokens):
                    for seq_id, chunk in message.chunks:
                        stream = self._streams.get(seq_id)
                        if stream is not None:
                            stream.put_nowait(chunk)
                elif isinstance(message, Reply):
                    stream = self._streams.get(message.id)
                    if stream is not None:  # a sequence the worker refused or failed
                        stream.put_nowait(error_from(message))
                        continue
                    self._last_reply_at = asyncio.get_running_loop().time()  # clock-ok: for _watch
                    future = self._pending.get(message.id)
                    if future is not None and not future.done():
                        future.set_result(message)
                elif isinstance(message, Progress):
                    listener = self._progress.get(message.id)
                    if listener is not None:
                        listener(message.done_bytes, message.total_bytes)
        finally:
            self._alive = False
            crash = WorkerCrashed(f"worker {self._id} (pid {self.pid}) exited; see {self._log_path}")
            for future in list(self._pending.values()):
                if not future.done():
                    future.set_exception(crash)
            for stream in list(self._streams.values()):
                stream.put_nowait(crash)
            if not self._closing and self._lost_callback is not None:
                self._lost_callback(self)

    async def kill(self) -> None:
        """SIGKILL the process; its reader then reports it lost, as for any death."""
        await self._kill()

    async def _kill(self) -> None:
        self._alive = False
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()
        if self._writer is not None:
            self._writer.close()


def error_from(reply: Reply) -> EmberError:
    if reply.error_kind in ("KeyError", "InternalError"):
        return InternalError(f"worker: {reply.error}")
    if reply.extra.get("errno") == errno.ENOSPC:
        return storage_full(reply.error)
    if reply.error_kind == "ModelUnloaded":
        return ModelUnavailable(f"worker: {reply.error}")
    if reply.error_kind in ("ClassNotFound", "InvalidInput"):  # the caller's mistake, not the model's failure
        return InvalidInput(reply.error.partition(": ")[2] or reply.error)
    return ModelFailed(f"the model raised {reply.error}; fix the model and redeploy it (`ember logs` shows more)")


def storage_full(detail: str) -> StorageFull:
    return StorageFull(
        f"the disk under Ember's home is full ({detail}); free space there (or lower the store's budgets) "
        "and try again. Nothing was kept of this attempt"
    )


class LocalBackend:
    """A pool of ``size`` local worker processes, and ``spares`` more started ahead.

    A spare has its runtime imported and nothing loaded. When a worker dies (killed, hung, recycled
    for its memory), a spare takes its place at once, so its models are re-placed without waiting
    seconds for a Python runtime to start; a new spare is then started in the background. Spares
    are started once the pool is up, so they do not slow the server's start.
    """

    def __init__(
        self,
        size: int,
        log_dir: Path,
        device: str = "auto",
        threads: int = 0,
        preload: tuple[str, ...] = ("numpy", "safetensors", "transformers"),
        limits: WorkerLimits | None = None,
        spares: int = 1,
        warm_arena: Path | None = None,
    ) -> None:
        """``warm_arena``: the store's arena, which CUDA workers map and register as pinned memory at start."""
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, not {size}")
        self._size = size
        self._log_dir = log_dir
        self._device = device
        # Leave a core to the gateway: oversubscribed OpenMP threads spin and collapse throughput
        # (a MiniLM batch went from 25 ms to 800 ms with two threads on a busy 2-core host).
        self._threads = threads or max(1, ((os.cpu_count() or 1) - 1) // size)
        self._preload = preload
        self._warm_arena = warm_arena
        self._limits = limits or WorkerLimits(memory_bytes=WorkerLimits.default_memory_bytes(size))
        self._workers: dict[str, LocalWorker] = {}
        self._spares_wanted = spares
        self._spares: list[LocalWorker] = []
        self._callbacks: list[Callable[[LocalWorker], None]] = []
        self._ready_callbacks: list[Callable[[LocalWorker], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = itertools.count()
        self._stopping = False
        self.restarts = 0

    async def start(self) -> None:
        await asyncio.gather(*(self._start_one() for _ in range(self._size)))
        for _ in range(self._spares_wanted):
            self._background(self._replace(spare=True))

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        everyone = [*self._workers.values(), *self._spares]
        await asyncio.gather(*(w.stop() for w in everyone), return_exceptions=True)
        self._workers.clear()
        self._spares.clear()

    def workers(self) -> tuple[LocalWorker, ...]:
        return tuple(w for w in self._workers.values() if w.alive)

    async def recycle(self, worker: WorkerHandle) -> None:
        """Kill ``worker``: the pool treats it as lost (a spare takes its place; a new one starts)."""
        if isinstance(worker, LocalWorker):
            await worker.kill()

    def on_worker_lost(self, callback: Callable[[LocalWorker], None]) -> None:
        self._callbacks.append(callback)

    def on_worker_ready(self, callback: Callable[[LocalWorker], None]) -> None:
        self._ready_callbacks.append(callback)

    def _joined(self, worker: LocalWorker) -> None:
        for callback in self._ready_callbacks:
            callback(worker)

    def statistics(self) -> dict[str, Any]:
        return {
            "backend": "local",
            "size": self._size,
            "ready": len(self.workers()),
            "restarts": self.restarts,
            "spares": len(self._spares),
            "spare_workers": [{"id": w.id, "pid": w.pid} for w in self._spares],
            "workers": [
                {"id": w.id, "pid": w.pid, "device": w.device, "alive": w.alive, "in_flight": w.in_flight}
                for w in self._workers.values()
            ],
        }

    async def _start_one(self, spare: bool = False) -> None:
        n = next(self._seq)
        log_path = self._log_dir / f"worker-{n}.log"
        worker = LocalWorker(
            f"w{n}", self._device, self._threads, self._preload, log_path, self._limits, self._warm_arena
        )
        await worker.start(self._lost)
        if spare and len(self._workers) >= self._size:
            self._spares.append(worker)
        else:  # a worker died while this one started: it is needed now
            self._workers[worker.id] = worker
            self._joined(worker)

    def _lost(self, worker: LocalWorker) -> None:
        if worker in self._spares:
            self._spares.remove(worker)
            if not self._stopping:
                self._background(self._replace(spare=True))
            return
        self._workers.pop(worker.id, None)
        if self._spares and not self._stopping:
            # Before the callbacks, so that the controller can place the lost models on it.
            spare = self._spares.pop(0)
            self._workers[spare.id] = spare
            self._joined(spare)
        for callback in self._callbacks:
            callback(worker)
        if self._stopping:
            return
        self.restarts += 1
        replacing_spare = len(self._workers) >= self._size
        self._background(self._replace(spare=replacing_spare))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name="ember-worker-start")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, spare: bool = False) -> None:
        # A worker that cannot start is retried: the pool must not shrink for good.
        for attempt in range(5):
            try:
                await self._start_one(spare)
                return
            except WorkerCrashed:
                await asyncio.sleep(min(30.0, 2.0**attempt))  # clock-ok: back-off between restarts
