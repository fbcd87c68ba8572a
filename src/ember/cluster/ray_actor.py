"""The Ray actor that is one Ember worker: the runtime start and the serve loop of ``python -m
ember.worker`` (:func:`ember.worker.main.start_runtime`, :func:`ember.worker.main.serve`), on a TCP
connection from the gateway instead of a socketpair.

Once its runtime is up, the actor listens on its node's address (:mod:`ember.worker.listener`);
:meth:`WorkerActor.ready` tells the gateway where, and the token to open the connection with. A
thread takes that one connection and serves frames on it until it ends (the gateway went away, a
Shutdown, or the worker's memory limit passed after a batch); the actor then exits, and the pool
starts a fresh one. :meth:`WorkerActor.watch` runs in its own concurrency group: it returns only by
ending the actor, so its caller learns of the actor's death, idle or not, when it raises.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import ray

from ember.worker.listener import accept_one, listen, new_token

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
        self._address = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        self._listener = listen(self._address)
        self._token = new_token()
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ember-worker-serve", daemon=True)
        self._thread.start()
        self._startup_s = time.perf_counter() - started  # clock-ok

    def ready(self) -> dict[str, Any]:
        """Who this worker is, and where the gateway connects to it (``host``, ``port``, ``token``)."""
        import torch

        context = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "device": str(self._host.device),
            "torch_version": str(torch.__version__),
            "startup_s": self._startup_s,
            "node_id": context.get_node_id(),
            "host": self._address,
            "port": int(self._listener.getsockname()[1]),
            "token": self._token,
        }

    def _serve(self) -> None:
        from ember.worker.main import serve

        try:
            sock = accept_one(self._listener, self._token)
            if sock is not None:
                with sock:
                    serve(sock, self._host, self._max_memory_bytes)
        finally:
            self._ended.set()

    @ray.method(concurrency_group="watch")
    def watch(self) -> None:
        """Block until the worker's connection ends, then end the actor (the caller's reference raises)."""
        self._ended.wait()
        ray.actor.exit_actor()  # type: ignore[no-untyped-call]


_ACTOR_OPTIONS: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0, "concurrency_groups": {"watch": 1}}
#: The actor class: ``WorkerActor.options(...).remote(device, threads, preload, max_memory_bytes)``.
WorkerActor: Any = ray.remote(**_ACTOR_OPTIONS)(Worker)
