"""Workers as subprocesses of this machine, started ahead and kept in a pool.

Each worker is ``python -m ember.worker`` talking over a socketpair (the protocol's gateway half is
:class:`~ember.cluster.channel.WorkerChannel`). The pool keeps ``size`` workers
up: one that dies is reported to the controller (which re-places its models and retries its
in-flight batches) and a fresh one is started in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.cluster.base import WorkerHandle
from ember.cluster.channel import WorkerChannel
from ember.errors import WorkerCrashed
from ember.worker.lifeline import PARENT_ENV
from ember.worker.protocol import WorkerReady, read_frame

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


class LocalWorker(WorkerChannel):
    """One worker process, spoken to over a socketpair (see :class:`WorkerChannel`)."""

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
        super().__init__(worker_id, device, limits.batch_timeout_s)
        self._warm_arena = warm_arena
        self._limits = limits
        self._wanted_device = device
        self._threads = threads
        self._preload = preload
        self._log_path = log_path
        self._process: asyncio.subprocess.Process | None = None
        self._lost_callback: Callable[[LocalWorker], None] | None = None
        self.ready_info: WorkerReady | None = None

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
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=parent)
            first = await asyncio.wait_for(read_frame(reader), START_TIMEOUT_S)
        except TimeoutError:
            first = None
        except BaseException:  # cancelled while starting: never leave the process behind
            await asyncio.shield(self._kill(writer))
            raise
        if not isinstance(first, WorkerReady) or writer is None:
            await self._kill(writer)
            raise WorkerCrashed(f"worker {self._id} did not start; see {self._log_path}")
        self.ready_info = first
        self._device = first.device
        self._lost_callback = on_lost
        self._attach(reader, writer)

    async def stop(self) -> None:
        await self._close(shutdown=True)
        await self._kill()

    async def kill(self) -> None:
        """SIGKILL the process; its reader then reports it lost, as for any death."""
        await self._kill()

    def _crash(self, reason: str) -> WorkerCrashed:
        return WorkerCrashed(f"worker {self._id} (pid {self.pid}) exited; see {self._log_path}")

    def _lost(self, reason: str) -> None:
        if self._lost_callback is not None:
            self._lost_callback(self)

    async def _stop_stuck(self) -> None:
        await self._kill()

    async def _kill(self, writer: asyncio.StreamWriter | None = None) -> None:
        self._alive = False
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()
        for each in (writer, self._writer):
            if each is not None:
                each.close()


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
