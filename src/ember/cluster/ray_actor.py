"""The Ray actor that is one Ember worker: the runtime start and the message handling of
``python -m ember.worker`` (:func:`ember.worker.main.start_runtime`, :func:`ember.worker.main.handle`),
called through Ray instead of over a socketpair.

The actor answers its messages one at a time, in the order they were sent (a threaded actor of
concurrency 1), as a worker process does. :meth:`WorkerActor.watch` runs in its own concurrency
group and never returns: its caller learns of the actor's death, idle or not, when it raises.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import ray

from ember.worker.protocol import Infer, Message, Reply

__all__ = ["Worker", "WorkerActor"]


class Worker:
    def __init__(self, device: str, threads: int, preload: tuple[str, ...], max_memory_bytes: int) -> None:
        started = time.perf_counter()  # clock-ok: the worker measures its own start-up
        # Ember never downloads weights at run time: keep Hugging Face libraries offline.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from ember.worker.main import start_runtime

        self._host = start_runtime(device, threads, preload)
        self._max_memory_bytes = max_memory_bytes
        self._startup_s = time.perf_counter() - started  # clock-ok
        self._stopped = threading.Event()

    def ready(self) -> dict[str, Any]:
        import torch

        context = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "device": str(self._host.device),
            "torch_version": str(torch.__version__),
            "startup_s": self._startup_s,
            "node_id": context.get_node_id(),
        }

    def handle(self, message: Message) -> tuple[Reply, bool]:
        """The reply to ``message``, and whether this worker passed its memory limit (after a batch):
        its handle then stops it once the reply is in, and the pool starts a fresh one."""
        from ember.worker.main import handle, resident_bytes

        reply = handle(self._host, message)
        over = bool(self._max_memory_bytes) and isinstance(message, Infer)
        return reply, over and resident_bytes() > self._max_memory_bytes

    @ray.method(concurrency_group="watch")
    def watch(self) -> None:
        """Block until the actor dies (the caller's reference then raises)."""
        self._stopped.wait()


_ACTOR_OPTIONS: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0, "concurrency_groups": {"watch": 1}}
#: The actor class: ``WorkerActor.options(...).remote(device, threads, preload, max_memory_bytes)``.
WorkerActor: Any = ray.remote(**_ACTOR_OPTIONS)(Worker)
