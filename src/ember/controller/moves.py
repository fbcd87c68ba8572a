"""Rebalancing: each model's measured share of its workers, and moves off overloaded ones.

Every tick the device seconds a runner reports per worker become the model's share of that worker
(smoothed by ``SHARE_SMOOTHING``); a worker's utilization is the sum of its models' shares plus
the expected share of those placed since. When the rebalancer (``MemoryAwarePlacement.moves``)
names moves, each is applied as load on the destination first, then take the source out of use and
unload it once no batch of the model runs there. Functions of the :class:`Controller` they act on.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from ember.cluster.base import WorkerHandle
from ember.controller.placing import view_of_worker
from ember.errors import EmberError
from ember.policies.placement import Rebalancer, Resident
from ember.state import Measured, kv_bytes_of

if TYPE_CHECKING:
    from ember.controller.controller import Controller, _Model

_log = logging.getLogger(__name__)

__all__ = ["measure_shares", "move_model", "rebalance", "residents", "unload_left"]

#: Weight of the newest tick in a model's share of a worker.
SHARE_SMOOTHING = 0.5


def measure_shares(c: Controller, now: float) -> None:
    """Fold the device seconds each model's batches took on each worker since the last tick into its
    share of that worker."""
    elapsed, c._measured_at = now - c._measured_at, now
    if elapsed <= 0:
        return
    shares: dict[tuple[str, str], float] = {}
    for name, model in c._models.items():
        busy = model.measured.busy_s
        for worker in model.alive():
            key = (name, worker.id)
            measured = busy.get(worker.id, 0.0) / elapsed
            before = c._shares.get(key)
            shares[key] = measured if before is None else before + SHARE_SMOOTHING * (measured - before)
        model.measured = Measured()
    c._shares = shares
    c._planned.clear()


async def rebalance(c: Controller, policy: Rebalancer) -> None:
    """Move models off workers busier than ``policy.high``: load on the destination first."""
    workers = {w.id: w for w in c._backend.workers()}
    views = tuple(view_of_worker(c, w) for w in workers.values())
    if not any(v.utilization > policy.high for v in views):
        return
    views = tuple(
        replace(v, residents=residents(c, workers[v.id])) if v.utilization > policy.high else v for v in views
    )
    for move in policy.moves(views):
        model = c._models.get(move.model)
        source, target = workers.get(move.source), workers.get(move.destination)
        if model is None or source is None or target is None or source not in model.workers:
            continue
        _log.info("moving %s from %s to %s: its worker is overloaded", move.model, move.source, move.destination)
        c._planned[(move.model, move.destination)] = c._share(move.model, move.source)
        model.scaling = c._tasks.spawn(move_model(c, model, source, target), name=f"ember-move-{move.model}")


def residents(c: Controller, worker: WorkerHandle) -> tuple[Resident, ...]:
    leaving = {(id(m), w.id) for m, w in c._leaving}
    return tuple(
        Resident(
            model=name,
            bytes=m.deployment.metadata.bytes + kv_bytes_of(m.deployment),
            share=c._share(name, worker.id),
            movable=(name, worker.id) in c._shares
            and not c._promoting(m)
            and (m.scaling is None or m.scaling.done())
            and (id(m), worker.id) not in leaving,
            tenant=m.state.tenant,
            slo_s=m.deployment.slo_ms / 1000.0,
            batch_s=m.runner.latency.predict(1),
        )
        for name, m in c._models.items()
        if worker in m.workers
    )


async def move_model(c: Controller, model: _Model, source: WorkerHandle, target: WorkerHandle) -> None:
    if not await c._add_instance(model, target) or source not in model.workers:
        return
    model.workers.remove(source)  # no new batch goes there; the one running finishes
    c._leaving.append((model, source))
    await unload_left(c)
    c.model_changed(model.deployment.name)


async def unload_left(c: Controller) -> None:
    """Unload the instances moved away whose last batch has finished."""
    still: list[tuple[_Model, WorkerHandle]] = []
    for model, worker in c._leaving:
        if worker in model.workers or model.deployment.name not in c._models:
            continue  # back in use (placed there again), or removed: remove() unloaded it
        if worker.id in model.runner.statistics().busy_instances:
            still.append((model, worker))
            continue
        with contextlib.suppress(EmberError):
            await worker.unload(model.deployment.key)
        c.workers_changed()
    c._leaving = still
