"""Placement: which worker gets a model that is being promoted to hot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["LeastLoaded", "Placement", "TenantIsolated", "WorkerView"]

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
    #: Tenants whose models are loaded there.
    tenants: frozenset[str] = frozenset()


class Placement(Protocol):
    def choose(
        self, model: str, model_bytes: int, device: str, workers: tuple[WorkerView, ...], tenant: str = DEFAULT_TENANT
    ) -> str | None:
        """The id of the worker that should load ``model`` (of ``tenant``), or None if none can."""
        ...


@dataclass(frozen=True)
class LeastLoaded:
    """Spread models: the ready worker with the fewest bytes loaded, then the fewest models.

    ``device`` ``"auto"`` matches any worker; otherwise the worker's device kind must match
    (``cuda`` matches ``cuda:N``). Ties break on the worker id, so the choice is repeatable.
    """

    def choose(
        self, model: str, model_bytes: int, device: str, workers: tuple[WorkerView, ...], tenant: str = DEFAULT_TENANT
    ) -> str | None:
        fits = [w for w in workers if w.ready and _device_fits(device, w.device)]
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


def _device_fits(wanted: str, have: str) -> bool:
    if wanted == "auto":
        return True
    if ":" in wanted:
        return wanted == have
    return have.split(":", 1)[0] == wanted
