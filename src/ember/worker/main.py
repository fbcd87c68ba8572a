"""Entry point of a worker process: start the runtime, then serve messages one at a time.

The parent passes one end of a socketpair as ``--fd``. The worker imports torch (and whatever
``--preload`` names), creates the CUDA context on GPU hosts, says :class:`WorkerReady`, then answers
each message in order: one batch at a time per device. When the parent goes away, it exits.

While generative models have sequences running, the worker runs their steps one after another and
reads every message that has arrived between two steps: a ``Generate`` joins at the next step, a
``Cancel`` frees its sequence before it, and one-shot batches, loads and unloads run in between.
Each step's chunks go back in one :class:`Tokens` frame.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import resource
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ember.errors import InvalidInput
from ember.generation import TokenChunk
from ember.store.arena import register_arena
from ember.worker.host import ModelHost
from ember.worker.protocol import (
    Cancel,
    Generate,
    Import,
    Infer,
    Load,
    Message,
    Ping,
    Progress,
    Reply,
    Shutdown,
    Tokens,
    Unload,
    WorkerReady,
    recv_message,
    send_message,
)

_STARTED = time.perf_counter()  # clock-ok: measures the worker's own start-up (after interpreter start)


def main(argv: list[str] | None = None) -> None:
    start = _STARTED
    parser = argparse.ArgumentParser(prog="ember-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--preload", action="append", default=[])
    parser.add_argument("--max-memory-bytes", type=int, default=0)
    parser.add_argument("--warm-arena", type=Path, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop

    host = start_runtime(args.device, args.threads, args.preload, args.warm_arena)
    device = host.device
    sock = socket.socket(fileno=args.fd)
    send_message(
        sock,
        WorkerReady(os.getpid(), str(device), str(torch.__version__), time.perf_counter() - start),  # clock-ok
    )
    serve(sock, host, args.max_memory_bytes)


def start_runtime(
    wanted_device: str, threads: int = 0, preload: Iterable[str] = (), warm_arena: Path | None = None
) -> ModelHost:
    """Start what every worker needs before its first message, wherever it runs (a subprocess of
    ``ember serve`` or a Ray actor): torch's threads, the device's libraries, the warm arena's pinning
    and the preloaded modules; returns the empty model host."""
    if threads > 0:
        torch.set_num_threads(threads)
    device = _pick_device(wanted_device)
    if device.type == "cuda":
        start_libraries(device)
        if warm_arena is not None:  # map and pin the warm arena once, before any load needs it
            register_arena(warm_arena)
    for module in preload:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    return ModelHost(device)


def serve(sock: socket.socket, host: ModelHost, max_memory_bytes: int = 0) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the parent went away: so do we
        _serve(sock, host, max_memory_bytes)


def _serve(sock: socket.socket, host: ModelHost, max_memory_bytes: int) -> None:
    while True:
        # Block for the next message when idle; between two steps, only read what has arrived.
        if host.generating and not select.select([sock], [], [], 0)[0]:
            _step(sock, host)
            continue
        message = recv_message(sock)
        if message is None or isinstance(message, Shutdown):
            if isinstance(message, Shutdown):
                send_message(sock, Reply(message.id, True))
            return
        if isinstance(message, Generate | Cancel):
            _sequence(sock, host, message)
            continue
        send_message(sock, handle(host, message, sock))
        if max_memory_bytes and isinstance(message, Infer):
            rss = resident_bytes()
            if rss > max_memory_bytes:
                # The batch was answered; the parent sees the exit and starts a fresh worker.
                mb = 1 << 20
                print(
                    f"ember worker {os.getpid()}: peak resident memory {rss // mb} MiB is over the worker limit of "
                    f"{max_memory_bytes // mb} MiB (a model may leak memory); exiting to be replaced",
                    file=sys.stderr,
                    flush=True,
                )
                return


def _sequence(sock: socket.socket, host: ModelHost, message: Generate | Cancel) -> None:
    """Start a sequence (answering only if it cannot run), or cancel one (answering with its last chunk)."""
    if isinstance(message, Cancel):
        if host.cancel(message.target):
            send_message(sock, Tokens(((message.target, TokenChunk("", finish_reason="cancelled")),)))
        return
    try:
        host.generate(message.key, message.id, message.request)
    except Exception as exc:
        send_message(sock, _failure(message, exc))


def _step(sock: socket.socket, host: ModelHost) -> None:
    chunks, failed = host.step()
    if chunks:
        send_message(sock, Tokens(tuple(chunks)))
    for seq_id, error, kind in failed:
        send_message(sock, Reply(seq_id, False, error=error, error_kind=kind))


def _progress_sender(sock: socket.socket, msg_id: int) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` that tells the parent at each whole percent (and at the end)."""
    last = [-1]

    def send(done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if percent > last[0] or done == total:
            last[0] = percent
            send_message(sock, Progress(msg_id, done, total))

    return send


def resident_bytes() -> int:
    """The most resident memory this process has held (``getrusage``: a syscall, where reading /proc
    costs about 100 us in a VM)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def handle(host: ModelHost, message: Message, sock: socket.socket | None = None) -> Reply:
    """Answer one message (an Import, Load, Unload, Infer or Ping) with its Reply; a failure becomes a
    Reply that says what was raised, and its traceback goes to stderr (the worker log). ``sock``: where
    an Import's Progress messages go (None: nowhere)."""
    msg_id = getattr(message, "id", -1)
    try:
        if isinstance(message, Infer):
            return Reply(msg_id, True, host.infer(message.key, message.requests))
        if isinstance(message, Load):
            load_s = host.load(
                message.key, message.model_ref, message.options, Path(message.weights_path), message.assets
            )
            return Reply(msg_id, True, load_s)
        if isinstance(message, Unload):
            for seq_id in host.unload(message.key):
                if sock is not None:
                    error = "the model was unloaded while the sequence ran; send the request again"
                    send_message(sock, Reply(seq_id, False, error=error, error_kind="ModelUnloaded"))
            return Reply(msg_id, True)
        if isinstance(message, Import):
            progress = None if sock is None else _progress_sender(sock, msg_id)
            described = host.import_model(message.model_ref, message.options, Path(message.staging), progress)
            return Reply(msg_id, True, described)
        if isinstance(message, Ping):
            return Reply(msg_id, True, sorted(host.models))
        return Reply(msg_id, False, error=f"unknown message {type(message).__name__}", error_kind="InternalError")
    except Exception as exc:
        return _failure(message, exc)


def _failure(message: Message, exc: Exception) -> Reply:
    """The error reply to ``message``, its traceback in the worker log (a caller's InvalidInput: none)."""
    detail = "".join(traceback.format_exception_only(exc)).strip()
    if not isinstance(exc, InvalidInput):
        print(
            f"ember worker {os.getpid()}: {type(message).__name__} failed:\n{traceback.format_exc()}",
            file=sys.stderr,
        )
    extra = {"errno": exc.errno} if isinstance(exc, OSError) else {}
    return Reply(getattr(message, "id", -1), False, error=detail, error_kind=type(exc).__name__, extra=extra)


def start_libraries(device: torch.device) -> None:
    """Create the CUDA context and the math libraries' handles now, not on a model's first request.

    cuBLAS (a matrix product in each half precision and fp32) and cuDNN (a convolution) build their
    handles and workspaces on first use, each a few hundred milliseconds in a fresh process: paid
    here, at the pool's start, they never fall on a cold start.
    """
    x = torch.ones(64, 64, device=device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        y = x.to(dtype)
        _ = y @ y
    image = torch.ones(1, 3, 16, 16, device=device)
    _ = torch.nn.functional.conv2d(image, torch.ones(4, 3, 3, 3, device=device))
    torch.cuda.synchronize(device)


def _pick_device(wanted: str) -> torch.device:
    if wanted == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


if __name__ == "__main__":
    main()
