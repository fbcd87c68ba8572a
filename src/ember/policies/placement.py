"""Placement: which worker (device) gets a model that is being promoted to hot.

Decision rule of :class:`MemoryAwarePlacement`: among ready workers whose device fits the
deployment and whose free memory holds the model's bytes (a worker of unknown capacity always
does), prefer

1. a worker where the model's weights already sit in a warm tier (its host memory): no disk read;
2. on workers of known capacity, the tightest fit (least free memory left after placing): packing
   keeps large holes for large models and lets idle devices stay empty;
3. then the least loaded (fewest batches in flight, fewest bytes, fewest models), then the id, so
   the choice is repeatable.

``None`` means no worker has room: the caller evicts (see ``policies.eviction``) and asks again.
:class:`LeastLoaded` is the baseline that spreads models and ignores memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "DEFAULT_TENANT",
    "LeastLoaded",
    "MemoryAwarePlacement",
    "Placement",
    "TenantIsolated",
    "WorkerView",
    "device_fits",
]

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class WorkerView:
    id: str
    ready: bool
    device: str
    #: Models loaded there, and the bytes of their weights.
    models: tuple[str, ...]
    bytes_loaded: int
    #: Batches sent and not yet answered.
    in_flight: int
    #: Device memory for weights; None: unknown (never full).
    capacity_bytes: int | None = None
    #: Models whose weights sit in this worker's warm tier (host memory).
    warm_models: tuple[str, ...] = ()

    @property
    def free_bytes(self) -> int | None:
        return None if self.capacity_bytes is None else self.capacity_bytes - self.bytes_loaded

    #: Tenants whose models are loaded there.
    tenants: frozenset[str] = frozenset()


class Placement(Protocol):
    def choose(
        self, model: str, model_bytes: int, device: str, workers: tuple[WorkerView, ...], tenant: str = DEFAULT_TENANT
    ) -> str | None:
        """The id of the worker that should load ``model`` (of ``tenant``), or None if none can."""
        ...


@dataclass(frozen=True)
class MemoryAwarePlacement:
    """Warm weights first, then the tightest memory fit, then the least loaded."""

    def choose(
        self, model: str, model_bytes: int, device: str, workers: tuple[WorkerView, ...], tenant: str = DEFAULT_TENANT
    ) -> str | None:
        fits = [
            w
            for w in workers
            if w.ready and device_fits(device, w.device) and (w.free_bytes is None or w.free_bytes >= model_bytes)
        ]
        if not fits:
            return None

        def score(w: WorkerView) -> tuple[bool, float, int, int, int, str]:
            free = w.free_bytes
            left = float("inf") if free is None else float(free - model_bytes)
            return (model not in w.warm_models, left, w.in_flight, w.bytes_loaded, len(w.models), w.id)

        return min(fits, key=score).id


@dataclass(frozen=True)
class LeastLoaded:
    """Spread models: the ready worker with the fewest bytes loaded, then the fewest models.

    ``device`` ``"auto"`` matches any worker; otherwise the worker's device kind must match
    (``cuda`` matches ``cuda:N``). Ties break on the worker id, so the choice is repeatable.
    """

    def choose(
        self, model: str, model_bytes: int, device: str, workers: tuple[WorkerView, ...], tenant: str = DEFAULT_TENANT
    ) -> str | None:
        fits = [w for w in workers if w.ready and device_fits(device, w.device)]
        if not fits:
            return None
        best = min(fits, key=lambda w: (w.bytes_loaded, len(w.models), w.in_flight, w.id))
        return best.id


@dataclass(frozen=True)
class TenantIsolated:
    """Models of different tenants never share a worker process; ``inner`` chooses among the rest.

    Alone in the pool, a tenant spreads over every worker as ``inner`` likes. Once another tenant is
    there, a tenant that already has workers keeps to them, and empty workers are left for tenants
    that have none. None when no worker qualifies.
    """

    inner: Placement = LeastLoaded()

    def choose(
        self, model: str, model_bytes: int, device: str, workers: tuple[WorkerView, ...], tenant: str = DEFAULT_TENANT
    ) -> str | None:
        allowed = tuple(w for w in workers if w.tenants <= {tenant})
        shared = any(w.tenants - {tenant} for w in workers)
        own = tuple(w for w in allowed if w.tenants)
        if shared and own:
            choice = self.inner.choose(model, model_bytes, device, own, tenant)
            if choice is not None:
                return choice
        return self.inner.choose(model, model_bytes, device, allowed, tenant)


def device_fits(wanted: str, have: str) -> bool:
    """Whether a worker on device ``have`` serves a deployment asking for ``wanted``."""
    if wanted == "auto":
        return True
    if ":" in wanted:
        return wanted == have
    return have.split(":", 1)[0] == wanted
