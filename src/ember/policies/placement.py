"""Placement: which worker (device) gets a model that is being promoted to hot.

Decision rule of :class:`MemoryAwarePlacement`: among ready workers whose device fits the
deployment and whose free memory holds the model's bytes (a worker of unknown capacity always
does), prefer

1. a worker with *time* to spare: its measured utilization plus the share of a device the model is
   expected to need (``demand``) stays within ``max_utilization``. Memory alone would pack a
   thousand small models onto one device that cannot run their batches in time;
   among those, one whose residents it can share a device with: a device runs one batch at a time,
   so a batch longer than ``blocking`` (a quarter) of a neighbour's SLO makes it miss its deadline
   however idle the device is on average. A 200 ms language-model step does not join 100 ms-SLO
   vision models while another device has time;
2. a worker where the model's weights already sit in a warm tier (its host memory): no disk read;
   then, on a cluster whose nodes each keep a store, one whose node holds them on its disk (cool):
   no copy from another node (:func:`locality`);
3. on workers of known capacity, the tightest fit (least free memory left after placing): packing
   keeps large holes for large models and lets idle devices stay empty;
4. then the least loaded (fewest batches in flight, fewest bytes, fewest models), then the id, so
   the choice is repeatable.

When no worker has time to spare, the least utilized one that fits is chosen (one whose residents
it can share a device with, if any). ``None`` means no
worker has room in memory: the caller evicts (see ``policies.eviction``) and asks again.
:class:`LeastLoaded` spreads models and ignores memory. :class:`PackByMemory` is the baselines'
placement: the fullest worker that still holds the model, by memory and optionally by a fraction of
a device per model, as Ray's scheduler packs fractional-GPU replicas and GPU FaaS offerings share a
device by memory; it reads neither device time nor SLOs.

Utilization is measured, so it lags: models placed in one burst all see the devices as they were.
:meth:`MemoryAwarePlacement.moves` corrects that afterwards. A device busier than ``high`` keeps its
busiest model and moves others, busiest first, until what stays is within ``max_utilization``:
each to the worker :meth:`~MemoryAwarePlacement.choose` picks among those with time for it (never
back to an overloaded one), counting the moves already planned. A model alone on an overloaded
device is not moved: it needs another instance, which is the autoscaler's decision.
:func:`device_share` is the expected share for a model with a known arrival rate.

Memory is what a model holds on the device: its weights and, for a generative model, the KV-cache
budget of its instance (:func:`kv_cache_bytes`: ``max_num_seqs x max_model_len x kv_bytes_per_token``,
enough for every sequence at full length), counted together (``PlacementRequest.device_bytes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

from ember.policies.latency import LatencyModel

__all__ = [
    "DEFAULT_TENANT",
    "LeastLoaded",
    "MemoryAwarePlacement",
    "Move",
    "PackByMemory",
    "Placement",
    "PlacementRequest",
    "Rebalancer",
    "Resident",
    "TenantIsolated",
    "WorkerView",
    "device_fits",
    "device_share",
    "kv_cache_bytes",
    "locality",
    "transfer_s",
]

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class PlacementRequest:
    """A model to place, as placement sees it. The defaults ask for a worker for a tenant's deploy-time
    import: no model yet (``model`` None), no bytes, any device."""

    model: str | None = None
    #: The bytes of its weights on the device.
    bytes: int = 0
    #: The device it asks for: ``auto``, a kind (``cuda``) or one device (``cuda:1``).
    device: str = "auto"
    tenant: str = DEFAULT_TENANT
    #: The share of a device's time it is expected to take (``device_share``).
    demand: float = 0.0
    slo_s: float = math.inf
    #: Predicted seconds of its shortest batch (one row).
    batch_s: float = 0.0
    #: A generative model's KV-cache budget, held on the device beside its weights (0: one-shot).
    kv_bytes: int = 0

    @property
    def device_bytes(self) -> int:
        """What it holds on the device: weights and KV cache."""
        return self.bytes + self.kv_bytes


@dataclass(frozen=True)
class Resident:
    """A model loaded on a worker, as :meth:`MemoryAwarePlacement.moves` sees it."""

    model: str
    bytes: int
    #: The fraction of the device's recent time its batches took.
    share: float
    #: Whether it may move now: ready, measured for a while, nothing in flight.
    movable: bool = True
    tenant: str = "default"
    slo_s: float = math.inf
    #: Predicted seconds of its shortest batch (one row).
    batch_s: float = 0.0


@dataclass(frozen=True)
class Move:
    """Load ``model`` on ``destination``, then drop it from ``source``."""

    model: str
    source: str
    destination: str


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
    #: Models whose weights sit in this worker's cool tier only (its node's disk), on a cluster where
    #: each node has its own store; elsewhere a model missing here is fetched from another node.
    cool_models: tuple[str, ...] = ()

    @property
    def free_bytes(self) -> int | None:
        return None if self.capacity_bytes is None else self.capacity_bytes - self.bytes_loaded

    #: Tenants whose models are loaded there.
    tenants: frozenset[str] = frozenset()
    #: The fraction of recent time the device ran batches (measured), plus the expected share of
    #: models placed there since it was measured.
    utilization: float = 0.0
    #: The loaded models with their shares of the device (only :meth:`MemoryAwarePlacement.moves` reads it).
    residents: tuple[Resident, ...] = ()
    #: The shortest SLO among the loaded models, and the longest of their shortest batches.
    shortest_slo_s: float = math.inf
    longest_batch_s: float = 0.0


class Placement(Protocol):
    def choose(self, request: PlacementRequest, workers: tuple[WorkerView, ...]) -> str | None:
        """The id of the worker that should load ``request``'s model, or None if none can."""
        ...


class Rebalancer(Protocol):
    @property
    def high(self) -> float:
        """:meth:`moves` plans nothing unless some worker's utilization is above this (callers may
        skip building views)."""
        ...

    def moves(self, workers: tuple[WorkerView, ...]) -> tuple[Move, ...]:
        """Models to move off overloaded workers, and where to."""
        ...


@dataclass(frozen=True)
class MemoryAwarePlacement:
    """Time to spare first, then warm weights, then the tightest memory fit, then the least loaded."""

    #: The utilization a placement may fill a device to.
    max_utilization: float = 0.7
    #: Above this, :meth:`moves` moves models off a device.
    high: float = 0.85
    #: At most this many moves off one device per decision.
    max_moves: int = 4
    #: A batch may hold a device for at most this fraction of a neighbour's SLO.
    blocking: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.max_utilization <= self.high:
            raise ValueError(f"need 0 < max_utilization ({self.max_utilization}) <= high ({self.high})")

    def choose(self, request: PlacementRequest, workers: tuple[WorkerView, ...]) -> str | None:
        model, model_bytes, slo_s, batch_s = request.model, request.device_bytes, request.slo_s, request.batch_s
        fits = [
            w
            for w in workers
            if w.ready
            and device_fits(request.device, w.device)
            and (w.free_bytes is None or w.free_bytes >= model_bytes)
        ]
        if not fits:
            return None
        blocking = self.blocking
        limit = self.max_utilization - request.demand
        roomy = [w for w in fits if w.utilization <= limit]
        together = [
            w
            for w in (roomy or fits)
            if batch_s <= blocking * w.shortest_slo_s and w.longest_batch_s <= blocking * slo_s
        ]
        if not roomy:
            return min(together or fits, key=lambda w: (w.utilization, w.in_flight, w.id)).id

        def score(w: WorkerView) -> tuple[int, float, int, int, int, str]:
            free = w.free_bytes
            left = float("inf") if free is None else float(free - model_bytes)
            return (locality(model, w), left, w.in_flight, w.bytes_loaded, len(w.models), w.id)

        return min(together or roomy, key=score).id

    def moves(self, workers: tuple[WorkerView, ...]) -> tuple[Move, ...]:
        """Models to move off devices busier than ``high``, and where to (see the module's doc)."""
        hot = sorted((w for w in workers if w.utilization > self.high and len(w.residents) > 1),
                     key=lambda w: (-w.utilization, w.id))  # fmt: skip
        if not hot:
            return ()
        planned = {w.id: w for w in workers}
        overloaded = {w.id for w in hot}
        result: list[Move] = []
        for source in hot:
            residents = sorted(source.residents, key=lambda r: (-r.share, r.model))
            staying, moved = source.utilization, 0
            for resident in residents[1:]:
                if staying <= self.max_utilization or moved == self.max_moves:
                    break
                if not resident.movable or resident.share <= 0:
                    continue
                kind = source.device.split(":", 1)[0]
                others = tuple(
                    w
                    for w in planned.values()
                    if w.id not in overloaded
                    and w.tenants <= {resident.tenant}
                    and resident.model not in w.models
                    and w.utilization + resident.share <= self.max_utilization
                )
                request = PlacementRequest(
                    model=resident.model,
                    bytes=resident.bytes,
                    device=kind,
                    tenant=resident.tenant,
                    demand=resident.share,
                    slo_s=resident.slo_s,
                    batch_s=resident.batch_s,
                )
                target = self.choose(request, others)
                if target is None:
                    continue
                result.append(Move(resident.model, source.id, target))
                chosen = planned[target]
                planned[target] = replace(
                    chosen,
                    utilization=chosen.utilization + resident.share,
                    bytes_loaded=chosen.bytes_loaded + resident.bytes,
                    models=(*chosen.models, resident.model),
                    shortest_slo_s=min(chosen.shortest_slo_s, resident.slo_s),
                    longest_batch_s=max(chosen.longest_batch_s, resident.batch_s),
                )
                staying -= resident.share
                moved += 1
        return tuple(result)


@dataclass(frozen=True)
class LeastLoaded:
    """Spread models: the ready worker with the fewest bytes loaded, then the fewest models.

    ``device`` ``"auto"`` matches any worker; otherwise the worker's device kind must match
    (``cuda`` matches ``cuda:N``). Ties break on the worker id, so the choice is repeatable.
    """

    def choose(self, request: PlacementRequest, workers: tuple[WorkerView, ...]) -> str | None:
        fits = [w for w in workers if w.ready and device_fits(request.device, w.device)]
        if not fits:
            return None
        best = min(fits, key=lambda w: (w.bytes_loaded, len(w.models), w.in_flight, w.id))
        return best.id


@dataclass(frozen=True)
class PackByMemory:
    """Pack: among ready workers that fit the device and have room, the one left with the least free
    memory after placing (the tightest fit), then the one with the most models, then the id.

    Room is memory (``bytes`` within the worker's free bytes; a worker of unknown capacity always has
    room, and comes after every worker of known capacity) and, with ``gpu_fraction`` set, a share of
    the device: each model asks for that fraction (Ray's ``num_gpus``), so a worker holds at most
    ``1 / gpu_fraction`` of them. Devices fill one after another and an empty one is taken only when
    no occupied one has room. None when no worker has room: the caller evicts and asks again.
    """

    #: The fraction of a device each model asks for; None: memory alone limits a device.
    gpu_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.gpu_fraction is not None and not 0 < self.gpu_fraction <= 1:
            raise ValueError(f"need 0 < gpu_fraction <= 1, got {self.gpu_fraction}")

    def choose(self, request: PlacementRequest, workers: tuple[WorkerView, ...]) -> str | None:
        need, fraction = request.device_bytes, self.gpu_fraction
        slots = math.inf if fraction is None else math.floor(1 / fraction + 1e-9)
        fits = [
            w
            for w in workers
            if w.ready
            and device_fits(request.device, w.device)
            and (w.free_bytes is None or w.free_bytes >= need)
            and len(w.models) < slots
        ]
        if not fits:
            return None

        def score(w: WorkerView) -> tuple[float, int, str]:
            free = w.free_bytes
            return (math.inf if free is None else free - need, -len(w.models), w.id)

        return min(fits, key=score).id


@dataclass(frozen=True)
class TenantIsolated:
    """Models of different tenants never share a worker process; ``inner`` chooses among the rest.

    Alone in the pool, a tenant spreads over every worker as ``inner`` likes. Once another tenant is
    there, a tenant that already has workers keeps to them, and empty workers are left for tenants
    that have none. None when no worker qualifies.
    """

    inner: Placement = LeastLoaded()

    def choose(self, request: PlacementRequest, workers: tuple[WorkerView, ...]) -> str | None:
        tenant = request.tenant
        allowed = tuple(w for w in workers if w.tenants <= {tenant})
        shared = any(w.tenants - {tenant} for w in workers)
        own = tuple(w for w in allowed if w.tenants)
        if shared and own:
            choice = self.inner.choose(request, own)
            if choice is not None:
                return choice
        return self.inner.choose(request, allowed)


def device_fits(wanted: str, have: str) -> bool:
    """Whether a worker on device ``have`` serves a deployment asking for ``wanted``."""
    if wanted == "auto":
        return True
    if ":" in wanted:
        return wanted == have
    return have.split(":", 1)[0] == wanted


def device_share(rate: float, latency: LatencyModel, max_batch_size: int) -> float:
    """The share of one device's time ``rate`` requests per second take, batched as they would be.

    The smallest power-of-two batch ``b`` (at most ``max_batch_size``) whose batches keep up with the
    rate (``rate * predict(b) / b <= 1``) sets the share; 1.0 when none does. 0 while nothing is
    measured or nothing arrives.
    """
    if rate <= 0:
        return 0.0
    size = 1
    while True:
        share = rate * latency.predict(size) / size
        if share <= 1.0:
            return share
        if size >= max_batch_size:
            return 1.0
        size = min(size * 2, max_batch_size)


def kv_cache_bytes(max_num_seqs: int, max_model_len: int, kv_bytes_per_token: int) -> int:
    """The KV-cache budget of one instance of a generative model: every sequence at full length."""
    return max_num_seqs * max_model_len * kv_bytes_per_token


def locality(model: str | None, worker: WorkerView) -> int:
    """How far ``model``'s weights are from ``worker``: 0 warm in its host memory, 1 on its node's disk
    (cool), 2 elsewhere (the shared store's disk, or another node's store)."""
    if model in worker.warm_models:
        return 0
    return 1 if model in worker.cool_models else 2


def transfer_s(model_bytes: int, bytes_per_s: float, setup_s: float = 0.0) -> float:
    """Seconds to copy ``model_bytes`` of weights from another node at ``bytes_per_s`` (the measured
    node-to-node rate), plus ``setup_s``; what a cold start on a node lacking the weights adds to its
    predicted load time."""
    if bytes_per_s <= 0:
        raise ValueError(f"bytes_per_s={bytes_per_s}: use a positive rate")
    return setup_s + model_bytes / bytes_per_s
