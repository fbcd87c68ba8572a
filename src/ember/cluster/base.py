"""What the controller needs from a worker, wherever it runs.

``LocalBackend`` implements it with subprocesses on this machine; a Ray backend implements the same
two protocols with actors. Nothing above this seam knows which one runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from ember.api import Arrays
from ember.generation import GenerateRequest, TokenChunk
from ember.policies.tiers import Tier
from ember.worker.protocol import Batch

__all__ = ["ClusterBackend", "ProgressCallback", "WorkerHandle"]

#: ``progress(done_bytes, total_bytes)``: how far a long piece of work (an import) has got.
ProgressCallback = Callable[[int, int], None]


class WorkerHandle(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def alive(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...

    def holds(self, key: str) -> Tier | None:
        """The tier of ``key``'s weights in the store of the machine this worker runs on; None when that
        is the controller's own store (ask it)."""
        ...

    def refuses(self, key: str) -> str | None:
        """Why this worker cannot take ``key`` as a new model (its machine's store lacks the weights and
        cannot be written), or None: placement then passes it over for ``key``."""
        ...

    async def import_model(
        self, model_ref: str, options: dict[str, Any], staging: str, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """Run the model's deploy-time hooks into ``staging``; ``progress`` hears the weight bytes written."""
        ...

    async def load(
        self, key: str, model_ref: str, options: dict[str, Any], weights_path: str, assets: dict[str, bytes]
    ) -> float:
        """Build the model on the worker's device; returns the seconds the worker spent."""
        ...

    async def unload(self, key: str) -> None: ...

    async def infer(self, key: str, requests: list[Arrays]) -> Batch: ...

    def generate(self, key: str, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """One sequence of generative model ``key``, chunk by chunk, until a chunk with a
        ``finish_reason``. Raises an ``EmberError`` before or during the stream (``InvalidInput`` for a
        prompt over the length limit). Closing the iterator early (``aclose()``, or its consumer being
        cancelled) stops the sequence in the worker and frees its KV cache within one step."""
        ...


class ClusterBackend(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def workers(self) -> tuple[WorkerHandle, ...]:
        """The workers that are up and ready now."""
        ...

    async def recycle(self, worker: WorkerHandle) -> None:
        """Stop ``worker`` and start a fresh one in its place (as for a worker that died)."""
        ...

    def on_worker_lost(self, callback: Callable[[WorkerHandle], None]) -> None:
        """Call ``callback`` once for each worker that dies; the backend replaces it."""
        ...

    def on_worker_ready(self, callback: Callable[[WorkerHandle], None]) -> None:
        """Call ``callback`` once for each worker that joins the pool after it started (a replacement)."""
        ...

    def statistics(self) -> dict[str, Any]: ...
