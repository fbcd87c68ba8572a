"""Placement and eviction as the controller applies them: which worker loads a model, and what leaves.

``choose_worker`` asks the placement policy among the workers' views (``view_of_worker``, built
with the state layer's ``worker_view``); when none fits, the eviction policy names what to demote
from the fitting worker with the most room (``evict_for``), or an idle worker that ran another
tenant's code is recycled (``recycle_for``); then it waits for a worker. Functions of the
:class:`Controller` they act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from ember.cluster.base import WorkerHandle
from ember.config import Deployment
from ember.errors import EmberError, ModelUnavailable
from ember.policies.eviction import EvictionCandidate
from ember.policies.placement import PlacementRequest, WorkerView, device_fits, device_share
from ember.policies.tiers import Tier
from ember.state import Hosted, kv_bytes_of, worker_view

if TYPE_CHECKING:
    from ember.controller.controller import Controller

_log = logging.getLogger(__name__)

__all__ = ["choose_worker", "evict_for", "recycle_for", "view_of_worker"]

WORKER_WAIT_S = 120.0
#: A waiting choice looks again at least this often, for what no event announces (a busy worker that
#: only another tenant's code ran in going idle, so that it may be recycled).
RECHECK_S = 1.0


async def choose_worker(
    c: Controller, deployment: Deployment, exclude: set[str] | None = None, wait: bool = True
) -> WorkerHandle | None:
    deadline = c._clock.now() + WORKER_WAIT_S
    while True:
        workers = {w.id: w for w in c._backend.workers() if not exclude or w.id not in exclude}
        views = tuple(view_of_worker(c, w, deployment) for w in workers.values())
        tenant = deployment.tenant
        model = c._models.get(deployment.name)
        demand, batch_s = 0.0, 0.0
        if model is not None:
            demand = device_share(model.state.arrival_rate, model.runner.latency, deployment.max_batch_size)
            batch_s = model.runner.latency.predict(1)
        request = PlacementRequest(
            model=deployment.name,
            bytes=deployment.metadata.bytes,
            device=deployment.device,
            tenant=tenant,
            demand=demand,
            slo_s=deployment.slo_ms / 1000.0,
            batch_s=batch_s,
            kv_bytes=kv_bytes_of(deployment),
        )
        choice = c._placement.choose(request, views)
        if choice is not None:
            c._tenants_seen.setdefault(choice, set()).add(tenant)
            c._planned[(deployment.name, choice)] = demand
            return workers[choice]
        if await evict_for(c, deployment, views, workers):
            continue
        if await recycle_for(c, tenant, views, workers):
            continue  # its replacement, fresh, comes up while this loop waits
        if not wait:
            return None
        if not await wait_for_workers(c, deadline):
            raise ModelUnavailable(
                f"no worker for device '{deployment.device}' is ready for '{deployment.name}' or has "
                f"{deployment.metadata.bytes + kv_bytes_of(deployment)} bytes free (weights and KV cache; models "
                "of different tenants never share a worker); "
                "check `ember status` and the worker logs, or add workers",
                retry_after_s=10.0,
            )


async def wait_for_workers(c: Controller, deadline: float) -> bool:
    """Wait until something placement reads changes (``Controller.workers_changed``: a worker came or
    went, a model left one), or ``RECHECK_S`` passes; False, at once, when ``deadline`` has passed."""
    now = c._clock.now()
    if now >= deadline:
        return False
    changed = asyncio.ensure_future(c._changed.wait())
    timer = asyncio.ensure_future(c._clock.sleep(min(RECHECK_S, deadline - now)))
    try:
        await asyncio.wait([changed, timer], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (changed, timer):
            waiter.cancel()
    return True


async def evict_for(
    c: Controller, deployment: Deployment, views: tuple[WorkerView, ...], workers: dict[str, WorkerHandle]
) -> bool:
    """Demote what the eviction policy names from the fitting worker with the most room; True if any."""
    fitting = [v for v in views if v.ready and device_fits(deployment.device, v.device) and v.free_bytes is not None]
    if not fitting:
        return False
    target = max(fitting, key=lambda v: (v.free_bytes or 0, v.id))
    need = deployment.metadata.bytes + kv_bytes_of(deployment) - (target.free_bytes or 0)
    hosted = [m for m in c._models.values() if workers[target.id] in m.workers]
    stats = [m.runner.statistics() for m in hosted]
    candidates = tuple(
        EvictionCandidate(
            name=m.deployment.name,
            bytes=m.deployment.metadata.bytes + kv_bytes_of(m.deployment),
            reload_s=c._load_s(m, Tier.WARM),
            arrival_rate=m.state.arrival_rate,
            last_used=s.last_active,
            busy=s.busy,
        )
        for m, s in zip(hosted, stats, strict=True)
    )
    victims = c._eviction.choose(need, candidates)
    for name in victims:
        victim = c._models[name]
        worker = workers[target.id]
        if worker in victim.workers:
            victim.workers.remove(worker)
        with contextlib.suppress(EmberError):
            await worker.unload(victim.deployment.key)
        c.model_changed(name)
    return bool(victims)


async def recycle_for(
    c: Controller, tenant: str, views: tuple[WorkerView, ...], workers: dict[str, WorkerHandle]
) -> bool:
    """Recycle an idle worker that only another tenant's code has run in, so ``tenant`` gets a fresh
    process; True if one was."""
    idle = [v for v in views if v.ready and not v.models and v.in_flight == 0 and v.tenants and tenant not in v.tenants]
    if not idle:
        return False
    victim = min(idle, key=lambda v: v.id)
    _log.info("recycling worker %s (it ran tenants %s) for tenant %s", victim.id, sorted(victim.tenants), tenant)
    c._tenants_seen.pop(victim.id, None)
    await c._backend.recycle(workers[victim.id])
    return True


def view_of_worker(c: Controller, worker: WorkerHandle, deployment: Deployment | None = None) -> WorkerView:
    """``deployment``: the model being placed, whose warm weights every worker can map."""
    hosted = (
        Hosted(
            name=m.deployment.name,
            bytes=m.deployment.metadata.bytes,
            tenant=m.state.tenant,
            slo_s=m.deployment.slo_ms / 1000.0,
            batch_s=m.runner.latency.predict(1),
            share=c._share(m.deployment.name, worker.id),
            kv_bytes=kv_bytes_of(m.deployment),
        )
        for m in c._models.values()
        if worker in m.workers
    )
    # Where the weights are, for this worker: its node's store, or else the controller's (shared). A
    # worker whose node's store lacks them and cannot be written is not ready for this model.
    held = None if deployment is None else worker.holds(deployment.key)
    refused = deployment is not None and worker.refuses(deployment.key) is not None
    if held is None and deployment is not None:
        held = Tier.WARM if c._store.tier(deployment.key) is Tier.WARM else None
    name = None if deployment is None else deployment.name
    return worker_view(
        worker.id,
        worker.device,
        hosted,
        ready=worker.alive and not refused,
        in_flight=worker.in_flight,
        capacity_bytes=c._device_memory_bytes,
        warm_model=name if held is Tier.WARM else None,
        cool_model=name if held is Tier.COOL else None,
        tenants_seen=c._tenants_seen.get(worker.id, ()),
    )
