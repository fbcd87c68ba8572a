"""The gateway's half of the worker protocol: one connection to one worker, shared by every backend.

A worker, wherever it runs (a subprocess over a socketpair, a Ray actor over TCP), reads frames of
:mod:`ember.worker.protocol` and answers them one at a time. :class:`WorkerChannel` sends a worker
its messages, matches each :class:`Reply` to the request awaiting it, hands an import's
:class:`Progress` to its listener and a sequence's :class:`Tokens` to its stream, and stops a batch
that runs past the batch timeout. When the connection ends, every request in flight fails with
:class:`~ember.errors.WorkerCrashed` (the runners retry it on another worker) and the subclass tells
its pool. Subclasses say only how the worker starts and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

from ember.api import Arrays
from ember.cluster.base import ProgressCallback
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
    encode_frame,
    read_frame,
    write_frame,
)

__all__ = ["WorkerChannel", "error_from", "storage_full"]

#: How long ``close`` waits for the worker to answer a Shutdown.
SHUTDOWN_WAIT_S = 5.0


class WorkerChannel:
    """Requests to one worker over one stream of frames, and the task that reads its answers.

    A subclass connects (or starts the worker and connects), then calls :meth:`_attach`; it says what
    a loss is called (:meth:`_crash`), whom to tell (:meth:`_lost`) and how to stop a worker stuck in a
    batch (:meth:`_stop_stuck`).
    """

    def __init__(self, worker_id: str, device: str, batch_timeout_s: float) -> None:
        self._id = worker_id
        self._device = device
        self._batch_timeout_s = batch_timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        #: Who hears the Progress messages of a message in flight, by its id.
        self._progress: dict[int, ProgressCallback] = {}
        #: The chunks (or the error) of each running sequence, by the id of its Generate.
        self._streams: dict[int, asyncio.Queue[TokenChunk | EmberError]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._last_reply_at = 0.0
        self._alive = False
        #: Stopping on purpose: the end of the connection is reported to no one.
        self._closing = False
        self._gone = False

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

    # -- what a subclass provides -----------------------------------------------------------------

    def _crash(self, reason: str) -> WorkerCrashed:
        """The error of the requests in flight when the worker is lost for ``reason``."""
        return WorkerCrashed(f"worker {self._id} was lost ({reason}); retry the request")

    def _lost(self, reason: str) -> None:
        """The worker is gone (not on purpose): tell its pool. Called once."""

    async def _stop_stuck(self) -> None:
        """Stop the worker: it ran a batch past the batch timeout."""
        raise NotImplementedError

    # -- the connection ---------------------------------------------------------------------------

    def _attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Speak to the worker over ``reader``/``writer`` from now on."""
        self._writer = writer
        self._alive = True
        self._reader_task = asyncio.create_task(self._read_loop(reader), name=f"ember-worker-{self._id}")

    def _lose(self, reason: str) -> None:
        """The worker is gone: fail what it owed, close the connection and (unless stopping on
        purpose) tell the pool, once."""
        self._alive = False
        if self._gone:
            return
        self._gone = True
        crash = self._crash(reason)
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(crash)
        for stream in list(self._streams.values()):
            stream.put_nowait(crash)
        if self._writer is not None:
            self._writer.close()
        if not self._closing:
            self._lost(reason)

    async def _close(self, shutdown: bool) -> None:
        """End the connection on purpose (after asking the worker to shut down, with ``shutdown``) and
        wait for the reader to finish."""
        self._closing = True
        if shutdown and self._alive and self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call(lambda i: Shutdown(i)), SHUTDOWN_WAIT_S)
        self._lose("stopped")
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task

    # -- the requests -----------------------------------------------------------------------------

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
        timeout_s = self._batch_timeout_s
        try:
            reply = await self._call(lambda i: Infer(i, key, requests), timeout_s)
        except TimeoutError:
            # The worker is stuck in the model's code: stop it (the pool replaces it, and the
            # controller re-places its models). This batch is not retried: it would hang again.
            await self._stop_stuck()
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
            # crash (its runner retries it on another worker); the caller stops the worker.
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
            self._lose("its connection closed")


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
