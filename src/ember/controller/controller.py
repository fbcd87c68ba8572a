"""The control loop: tiers, keep-alive and placement, applied.

Every tick the controller builds a frozen view of each model (tier, idle time, busy) and asks the
keep-alive policy what to demote; it applies the answer. Promotion is on demand: the first request
for a model that is not hot calls :meth:`Controller.ensure_hot`, which brings it up one tier at a
time (cool -> warm: the store copies the weights into host memory; warm -> hot: a worker chosen by
the placement policy builds the model around them). Concurrent callers share one promotion.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from ember.clock import Clock, run_blocking
from ember.cluster.base import ClusterBackend, WorkerHandle
from ember.config import Deployment
from ember.errors import EmberError, ModelNotFound, ModelUnavailable, WorkerCrashed
from ember.metrics import Metrics
from ember.policies.keepalive import KeepAlive, ModelView
from ember.policies.placement import Placement, WorkerView
from ember.scheduler.runner import ModelRunner
from ember.store import Store, Tier

__all__ = ["ColdStart", "Controller"]

WORKER_WAIT_S = 120.0


@dataclass(frozen=True)
class ColdStart:
    """One promotion to hot: the tier it started from and how long it took."""

    tier: Tier
    seconds: float
    at: float


@dataclass
class _Model:
    deployment: Deployment
    runner: ModelRunner
    worker: WorkerHandle | None = None
    promoting: asyncio.Task[WorkerHandle] | None = None
    last_cold_start: ColdStart | None = None
    cold_starts: int = 0


class Controller:
    def __init__(
        self,
        clock: Clock,
        store: Store,
        backend: ClusterBackend,
        keepalive: KeepAlive,
        placement: Placement,
        metrics: Metrics,
        tick_s: float = 1.0,
    ) -> None:
        self._clock = clock
        self._store = store
        self._backend = backend
        self._keepalive = keepalive
        self._placement = placement
        self._metrics = metrics
        self._tick_s = tick_s
        self._models: dict[str, _Model] = {}
        backend.on_worker_lost(self._worker_lost)

    # -- registration ------------------------------------------------------------------------------

    def add(self, runner: ModelRunner) -> None:
        name = runner.deployment.name
        self._models[name] = _Model(runner.deployment, runner)
        self._metrics.set_tier(name, self.tier(name).value)

    async def remove(self, name: str) -> None:
        model = self._models.pop(name, None)
        if model is None:
            return
        if model.promoting is not None:
            model.promoting.cancel()
            with contextlib.suppress(BaseException):
                await model.promoting
        if model.worker is not None:
            with contextlib.suppress(EmberError):
                await model.worker.unload(model.deployment.key)
        self._metrics.forget(name, str(model.deployment.version))

    def import_worker(self, tenant: str) -> WorkerHandle | None:
        """The worker to run a deploy-time import of ``tenant``'s model: placement decides, as for a load,
        so a tenant's import never runs beside another tenant's models. None: no worker qualifies."""
        workers = {w.id: w for w in self._backend.workers()}
        views = tuple(self._worker_view(w) for w in workers.values())
        choice = self._placement.choose("", 0, "auto", views, tenant)
        return None if choice is None else workers[choice]

    # -- what the rest asks ------------------------------------------------------------------------

    def tier(self, name: str) -> Tier:
        model = self._get(name)
        if model.worker is not None and model.worker.alive:
            return Tier.HOT
        return self._store.tier(model.deployment.key)

    def instances(self, name: str) -> int:
        return 1 if self.tier(name) is Tier.HOT else 0

    def last_cold_start(self, name: str) -> ColdStart | None:
        return self._get(name).last_cold_start

    def cold_starts(self, name: str) -> int:
        return self._get(name).cold_starts

    async def ensure_hot(self, name: str) -> WorkerHandle:
        model = self._get(name)
        if model.worker is not None and model.worker.alive:
            return model.worker
        if model.promoting is None or model.promoting.done():
            model.promoting = asyncio.create_task(self._promote(model), name=f"ember-promote-{name}")
        return await asyncio.shield(model.promoting)

    def lost_instance(self, name: str, worker: WorkerHandle) -> None:
        model = self._models.get(name)
        if model is not None and model.worker is worker:
            model.worker = None
            self._metrics.set_tier(name, self.tier(name).value)

    async def demote(self, name: str, to: Tier) -> None:
        """Move ``name`` down to tier ``to`` (warm or cool) now."""
        model = self._get(name)
        if model.worker is not None:
            worker, model.worker = model.worker, None  # from here on, new requests promote again
            with contextlib.suppress(EmberError):
                await worker.unload(model.deployment.key)
        if to is Tier.COOL:
            await run_blocking(self._clock, self._store.demote, model.deployment.key)
        self._metrics.set_tier(name, self.tier(name).value)

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._clock.sleep(self._tick_s)
            await self.tick()

    async def tick(self) -> None:
        now = self._clock.now()
        views = tuple(self._view(model, now) for model in list(self._models.values()))
        for demotion in self._keepalive.decide(views):
            model = self._models.get(demotion.name)
            if model is not None and not model.runner.busy and model.promoting is None:
                await self.demote(demotion.name, demotion.to)

    def _view(self, model: _Model, now: float) -> ModelView:
        name = model.deployment.name
        busy = model.runner.busy or (model.promoting is not None and not model.promoting.done())
        return ModelView(
            name=name,
            tier=self.tier(name),
            idle_s=0.0 if busy else max(0.0, now - model.runner.stats.last_active),
            busy=busy,
            keepalive_hot_s=model.deployment.keepalive_hot_s,
            keepalive_warm_s=model.deployment.keepalive_warm_s,
        )

    # -- promotion ---------------------------------------------------------------------------------

    async def _promote(self, model: _Model) -> WorkerHandle:
        try:
            return await self._promote_once(model)
        finally:
            model.promoting = None

    async def _promote_once(self, model: _Model) -> WorkerHandle:
        deployment = model.deployment
        key = deployment.key
        start = self._clock.now()
        from_tier = self._store.tier(key)
        if from_tier is Tier.COLD:
            raise ModelUnavailable(
                f"the weights of '{deployment.name}' are missing from the store; redeploy it "
                f"(`ember rm {deployment.name}` then `ember deploy ...`)",
                retry_after_s=60.0,
            )
        if from_tier is Tier.COOL:
            await run_blocking(self._clock, self._store.promote, key)
        assets = await run_blocking(self._clock, self._store.assets, key)
        for attempt in range(2):
            worker = await self._choose_worker(deployment)
            try:
                await worker.load(
                    key, deployment.model_ref, deployment.options, str(self._store.weights_path(key)), assets
                )
                break
            except WorkerCrashed:
                if attempt == 1:
                    raise
        model.worker = worker
        seconds = self._clock.now() - start
        model.last_cold_start = ColdStart(from_tier, seconds, self._clock.wall())
        model.cold_starts += 1
        self._metrics.cold_starts.labels(deployment.name, from_tier.value).inc()
        self._metrics.load_seconds.labels(from_tier.value).observe(seconds)
        self._metrics.set_tier(deployment.name, Tier.HOT.value)
        return worker

    async def _choose_worker(self, deployment: Deployment) -> WorkerHandle:
        waited = 0.0
        while True:
            workers = {w.id: w for w in self._backend.workers()}
            views = tuple(self._worker_view(w) for w in workers.values())
            tenant = str(deployment.extra.get("tenant", "default"))
            choice = self._placement.choose(
                deployment.name, deployment.metadata.bytes, deployment.device, views, tenant
            )
            if choice is not None:
                return workers[choice]
            if waited >= WORKER_WAIT_S:
                raise ModelUnavailable(
                    f"no worker for device '{deployment.device}' is ready for '{deployment.name}' (models of "
                    "different tenants never share a worker); check `ember status` and the worker logs, or add "
                    "workers",
                    retry_after_s=10.0,
                )
            await self._clock.sleep(0.05)
            waited += 0.05

    def _worker_view(self, worker: WorkerHandle) -> WorkerView:
        hosted = [m for m in self._models.values() if m.worker is worker]
        return WorkerView(
            id=worker.id,
            ready=worker.alive,
            device=worker.device,
            models=tuple(m.deployment.name for m in hosted),
            bytes_loaded=sum(m.deployment.metadata.bytes for m in hosted),
            in_flight=worker.in_flight,
            tenants=frozenset(str(m.deployment.extra.get("tenant", "default")) for m in hosted),
        )

    def _worker_lost(self, worker: WorkerHandle) -> None:
        for name, model in self._models.items():
            if model.worker is worker:
                model.worker = None
                self._metrics.set_tier(name, self.tier(name).value)

    def _get(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        return model
