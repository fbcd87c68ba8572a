"""The messages between the gateway process and a worker process, and how they are framed.

Each frame is a 4-byte little-endian length followed by a pickle (protocol 5) of one message.
Both ends are Ember's own code: over a socketpair the parent created (a local worker), or over a TCP
connection that the worker accepts only after it opens with the worker's secret token, which the
gateway got through Ray (a Ray actor; :mod:`ember.worker.listener`). So pickle is safe here; no user
input is unpickled (request tensors arrive as numpy arrays built by the codec).
Every request message carries an ``id``; the worker answers each with a :class:`Reply` of the same id.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ember.api import Arrays
from ember.generation import GenerateRequest, TokenChunk

__all__ = [
    "Batch",
    "Cancel",
    "Generate",
    "Import",
    "Infer",
    "Load",
    "Ping",
    "Progress",
    "Reply",
    "Shutdown",
    "Tokens",
    "Unload",
    "WorkerReady",
    "encode_frame",
    "read_frame",
    "recv_message",
    "send_message",
    "write_frame",
]

_HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 31


@dataclass(frozen=True)
class WorkerReady:
    """The first message a worker sends, once its runtime (Python, torch, CUDA) is up."""

    pid: int
    device: str
    torch_version: str
    startup_s: float


@dataclass(frozen=True)
class Import:
    """Run the model's deploy-time hooks and write its weights and assets into ``staging``."""

    id: int
    model_ref: str
    options: dict[str, Any]
    staging: str


@dataclass(frozen=True)
class Load:
    """Build the model around the weights at ``weights_path`` (a store tier) on ``device``."""

    id: int
    key: str
    model_ref: str
    options: dict[str, Any]
    weights_path: str
    assets: dict[str, bytes]
    device: str


@dataclass(frozen=True)
class Unload:
    id: int
    key: str


@dataclass(frozen=True)
class Infer:
    """One batch: each element is one request's inputs."""

    id: int
    key: str
    requests: list[Arrays]


@dataclass(frozen=True)
class Generate:
    """Start one sequence of generative model ``key``. The worker answers with :class:`Tokens` frames
    naming this ``id`` (the last chunk of a sequence has a ``finish_reason``), or with an error
    :class:`Reply` of this ``id`` if the request cannot run (a prompt over the length limit)."""

    id: int
    key: str
    request: GenerateRequest


@dataclass(frozen=True)
class Cancel:
    """Stop sequence ``target`` (the ``id`` of its :class:`Generate`) and free its KV cache. The
    worker answers with a last chunk for it whose ``finish_reason`` is ``cancelled`` (none if the
    sequence had already finished)."""

    id: int
    target: int


@dataclass(frozen=True)
class Tokens:
    """What one step produced: a chunk per sequence, each with the ``id`` of its :class:`Generate`."""

    chunks: tuple[tuple[int, TokenChunk], ...]


@dataclass(frozen=True)
class Ping:
    id: int


@dataclass(frozen=True)
class Shutdown:
    id: int


@dataclass(frozen=True)
class Batch:
    """A batch's results, one entry per request: its outputs, or an error message."""

    outputs: list[Arrays | str]
    compute_s: float


@dataclass(frozen=True)
class Reply:
    id: int
    ok: bool
    value: Any = None
    error: str = ""
    error_kind: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """Sent by the worker while it works on message ``id`` (an import): bytes done out of a total."""

    id: int
    done_bytes: int
    total_bytes: int


Message = WorkerReady | Import | Load | Unload | Infer | Generate | Cancel | Tokens | Ping | Shutdown | Reply | Progress


def _dumps(message: Message) -> bytes:
    return pickle.dumps(message, protocol=5)


def encode_frame(message: Message) -> bytes:
    """``message`` as one frame: its length, then its pickle."""
    payload = _dumps(message)
    return _HEADER.pack(len(payload)) + payload


def send_message(sock: socket.socket, message: Message) -> None:
    sock.sendall(encode_frame(message))


def recv_message(sock: socket.socket) -> Message | None:
    """The next message, or None when the peer has closed the connection."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    payload = _recv_exactly(sock, length)
    if payload is None:
        return None
    message: Message = pickle.loads(payload)
    return message


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            return None
        got += n
    return bytes(buf)


async def write_frame(writer: asyncio.StreamWriter, message: Message) -> None:
    writer.write(encode_frame(message))
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader) -> Message | None:
    try:
        header = await reader.readexactly(_HEADER.size)
        (length,) = _HEADER.unpack(header)
        payload = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    message: Message = pickle.loads(payload)
    return message


def rows_of(arrays: Arrays) -> int:
    """Rows of a request: the length of its inputs' first dimension (all must agree)."""
    for array in arrays.values():
        return int(np.shape(array)[0]) if np.ndim(array) else 1
    return 0
