"""Token streams at the edge: opening a request's choices, interleaving them, and answering with
server-sent events that stop the generation when the client leaves.

A generative route opens one stream per choice (:func:`open_streams`): it waits for each stream's
first chunk before a byte of the answer is sent, so an admission error (404, 429 with Retry-After, a
prompt too long) is a proper HTTP status. Then :func:`interleave` yields ``(choice, chunk)`` as the
choices produce them. Every stream is closed (``aclose()``) when the answer ends, however it ends:
finished, failed, or the client gone; closing a stream cancels its sequence in the worker.

:class:`EventStream` sends ``text/event-stream`` answers and watches the connection: a client that
disconnects cancels the answer at once (between tokens or while waiting for one), not at the next
write. :func:`until_disconnected` does the same for answers sent whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ember.config import Deployment
from ember.generation import GenerateRequest, TokenChunk

__all__ = ["EventStream", "Generates", "Opened", "event", "interleave", "open_streams", "until_disconnected"]

T = TypeVar("T")

Stream = AsyncIterator[TokenChunk]


class Generates(Protocol):
    """What the generative routes need of the service (:class:`~ember.service.EmberService`)."""

    def deployment(self, name: str) -> Deployment: ...

    def generate(self, name: str, request: GenerateRequest, timeout_s: float | None = None) -> Stream: ...


class Opened:
    """A request's streams, one per choice, each with its first chunk already taken."""

    def __init__(self, streams: Sequence[Stream], firsts: Sequence[TokenChunk]) -> None:
        self.streams = list(streams)
        self.firsts = list(firsts)

    async def close(self) -> None:
        """Close every stream (idempotent); shielded, so a cancelled caller still frees the sequences."""
        closing = asyncio.ensure_future(_close_all(self.streams))
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            await closing
            raise


async def _close_all(streams: Sequence[Stream]) -> None:
    for stream in streams:
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]


async def open_streams(
    service: Generates, name: str, requests: Sequence[GenerateRequest], timeout_s: float | None = None
) -> Opened:
    """Start every choice and wait for each one's first chunk (together); the first error closes them
    all and is raised."""
    streams = [service.generate(name, request, timeout_s) for request in requests]
    firsts = [asyncio.ensure_future(anext(stream)) for stream in streams]
    try:
        chunks = list(await asyncio.gather(*firsts))
    except BaseException:
        for task in firsts:
            task.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        await Opened(streams, []).close()
        raise
    return Opened(streams, chunks)


async def interleave(opened: Opened) -> AsyncIterator[tuple[int, TokenChunk]]:
    """``(choice, chunk)`` as the choices make them, first chunks first, until each has finished.

    An error from any stream is raised (the caller closes the rest). Closing this iterator cancels the
    chunks being waited for; the caller still closes ``opened``.
    """
    pending: dict[asyncio.Future[TokenChunk], int] = {}
    try:
        for i, chunk in enumerate(opened.firsts):
            yield i, chunk
            if chunk.finish_reason is None:
                pending[asyncio.ensure_future(anext(opened.streams[i]))] = i
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: pending[t]):
                i = pending.pop(task)
                try:
                    chunk = task.result()
                except StopAsyncIteration:
                    continue  # a stream that ends without a finish_reason just ends
                yield i, chunk
                if chunk.finish_reason is None:
                    pending[asyncio.ensure_future(anext(opened.streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def event(data: Any) -> bytes:
    """One server-sent event: ``data: {json}`` and a blank line."""
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStream(Response):
    """A ``text/event-stream`` answer from ``events`` (bytes, one or more events each); when it ends
    (sent, failed, or the client gone) ``on_close`` runs, shielded from cancellation."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        self.events = events
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnected(receive, self._send_all(send))
        finally:
            closing = asyncio.ensure_future(self._close())
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                await closing
                raise

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # ASGI 2.4 servers: a write to a closed connection raises
            return

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self.events.aclose()  # type: ignore[attr-defined]
        await self.on_close()


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (``work`` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(watch, task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()
