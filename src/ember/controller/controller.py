"""The control loop: tiers, keep-alive and pre-warm, autoscaling and promotion, applied.

Every tick the controller takes what each runner published (its statistics and the measurements
drained since the last tick), folds them into the model's frozen state (``ember.state.fold``),
builds each policy's input with the state layer's builders and asks the pure policies what to do:
keep-alive (demote idle models one tier, or pre-warm one whose next request is expected soon); the
autoscaler (how many instances a hot model needs, up to ``max_instances``: one instance added at a
time, idle ones removed); rebalancing (``moves.py``).

Promotion is on demand: the first request for a model that is not hot calls :meth:`ensure_hot`,
which brings it up one tier at a time (cool -> warm: the store copies the weights into host memory;
warm -> hot: a worker chosen by placement, ``placing.py``, builds the model around them).
Concurrent callers share one promotion. Each load's measured time goes to the runner, whose
latency model predicts the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ember.clock import Clock, run_blocking
from ember.cluster.base import ClusterBackend, WorkerHandle
from ember.config import Deployment
from ember.controller.moves import measure_shares, rebalance, unload_left
from ember.controller.placing import WORKER_WAIT_S, choose_worker, recycle_for, view_of_worker, wait_for_workers
from ember.errors import EmberError, ModelNotFound, ModelUnavailable, StorageFull, WorkerCrashed
from ember.metrics import Metrics
from ember.policies.autoscaler import Autoscaler, SloAutoscaler
from ember.policies.eviction import Eviction, ExpectedCostEviction
from ember.policies.keepalive import Demotion, KeepAlive, ModelView
from ember.policies.latency import Bandwidths, remaining_load_s
from ember.policies.placement import (
    Placement,
    PlacementRequest,
    Rebalancer,
    transfer_s,
)
from ember.policies.tiers import Tier
from ember.scope import TaskScope
from ember.state import Measured, ModelState, Runner, RunnerStatistics, fold, model_view, scale_view
from ember.store import Store
from ember.store.format import is_compressed

__all__ = ["ColdStart", "Controller"]


_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColdStart:
    """One promotion to hot: the tier it started from and how long it took."""

    tier: Tier
    seconds: float
    at: float


@dataclass
class _Model:
    deployment: Deployment
    runner: Runner
    state: ModelState
    workers: list[WorkerHandle] = field(default_factory=list)
    promoting: asyncio.Task[WorkerHandle] | None = None
    #: When the running promotion began, and how long it was predicted to take.
    promoting_since: float = 0.0
    promoting_s: float = 0.0
    scaling: asyncio.Task[object] | None = None
    last_cold_start: ColdStart | None = None
    cold_starts: int = 0
    #: The runner's statistics and what it measured, as of the last tick.
    stats: RunnerStatistics = field(default_factory=RunnerStatistics)
    measured: Measured = field(default_factory=Measured)
    #: When its last promotion to hot finished: its idle time on the device counts from then at the
    #: earliest (a load started by a refused request is not demoted at the next tick).
    hot_since: float = 0.0

    def alive(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.alive]


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
        *,
        autoscaler: Autoscaler | None = None,
        eviction: Eviction | None = None,
        bandwidths: Bandwidths | None = None,
        device_memory_bytes: int | None = None,
        rebalancer: Rebalancer | None = None,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self._clock = clock
        self._store = store
        self._backend = backend
        self._keepalive = keepalive
        self._placement = placement
        self._autoscaler = autoscaler or SloAutoscaler()
        self._eviction = eviction or ExpectedCostEviction()
        self._bandwidths = bandwidths or Bandwidths()
        self._device_memory_bytes = device_memory_bytes
        #: Worker id -> the tenants whose code has run there (loaded or imported). A worker keeps
        #: what a model left in its process, so it never serves another tenant: it is recycled first.
        self._tenants_seen: dict[str, set[str]] = {}
        self._metrics = metrics
        self._tick_s = tick_s
        self._models: dict[str, _Model] = {}
        self._rebalancer = rebalancer
        #: (model, worker id) -> the model's measured share of that worker's time; and the expected
        #: share of the placements made since the last measurement.
        self._shares: dict[tuple[str, str], float] = {}
        self._planned: dict[tuple[str, str], float] = {}
        self._measured_at = clock.now()
        #: Instances moved away, to unload once no batch of theirs runs there.
        self._leaving: list[tuple[_Model, WorkerHandle]] = []
        #: The promotions, added instances and moves in progress: their failures are logged.
        self._tasks = TaskScope(_log)
        #: Set (then replaced) whenever something placement reads changes; see ``placing.wait_for_workers``.
        self._changed = asyncio.Event()
        #: Told a model's name whenever its instances or tier may have changed (the service's meter).
        self._on_change = on_change
        backend.on_worker_lost(self._worker_lost)
        backend.on_worker_ready(lambda _: self.workers_changed())

    # -- registration ------------------------------------------------------------------------------

    def add(self, runner: Runner) -> None:
        name = runner.deployment.name
        self._models[name] = _Model(runner.deployment, runner, ModelState.of(runner.deployment, self._clock.now()))
        self.model_changed(name)

    def update(self, deployment: Deployment) -> None:
        """Use ``deployment`` (a changed SLO or keep-alive of the same version) from the next tick on."""
        model = self._models.get(deployment.name)
        if model is not None:
            model.deployment = deployment
            model.state = replace(model.state, tenant=deployment.tenant)

    async def remove(self, name: str) -> None:
        model = self._models.pop(name, None)
        if model is None:
            return
        for task in (model.promoting, model.scaling):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for worker in model.workers:
            with contextlib.suppress(EmberError):
                await worker.unload(model.deployment.key)
        model.workers.clear()
        self._metrics.forget(name)
        self.workers_changed()

    async def import_worker(self, tenant: str) -> WorkerHandle | None:
        """The worker to run a deploy-time import of ``tenant``'s model: placement decides, as for a load,
        so a tenant's import never runs beside another tenant's models (an idle worker that ran another
        tenant's code is recycled for it). None: no worker qualifies."""
        deadline, recycled = self._clock.now() + WORKER_WAIT_S, False
        while True:
            workers = {w.id: w for w in self._backend.workers()}
            views = tuple(view_of_worker(self, w) for w in workers.values())
            choice = self._placement.choose(PlacementRequest(tenant=tenant), views)
            if choice is not None:
                self._tenants_seen.setdefault(choice, set()).add(tenant)
                return workers[choice]
            if not recycled:
                recycled = await recycle_for(self, tenant, views, workers)
                if not recycled:
                    return None
            if not await wait_for_workers(self, deadline):
                return None

    # -- what the rest asks ------------------------------------------------------------------------

    def tier(self, name: str) -> Tier:
        model = self._get(name)
        if model.alive():
            return Tier.HOT
        return self._store.tier(model.deployment.key)

    def state(self, name: str) -> ModelState:
        """What the control loop remembers of ``name``, as of its last tick."""
        return self._get(name).state

    def utilization(self, worker_id: str) -> float:
        """The share of ``worker_id``'s device time its models took, as measured at the last tick."""
        return sum(
            self._share(name, worker_id)
            for name, m in self._models.items()
            if any(w.id == worker_id for w in m.workers)
        )

    def instances(self, name: str) -> int:
        return len(self._get(name).alive())

    def hot_instances(self, name: str) -> tuple[WorkerHandle, ...]:
        model = self._models.get(name)
        return () if model is None else tuple(model.alive())

    def start_delay_s(self, name: str) -> float:
        model = self._models.get(name)
        if model is None or model.alive():
            return 0.0
        if self._promoting(model):  # the rest of the running load; one past its prediction is not ending
            return remaining_load_s(model.promoting_s, self._clock.now() - model.promoting_since)
        return self._load_s(model, self._store.tier(model.deployment.key))

    def last_cold_start(self, name: str) -> ColdStart | None:
        return self._get(name).last_cold_start

    def cold_starts(self, name: str) -> int:
        return self._get(name).cold_starts

    async def ensure_hot(self, name: str) -> WorkerHandle:
        model = self._get(name)
        alive = model.alive()
        if alive:
            return alive[0]
        return await asyncio.shield(self._start_promotion(model))

    def prewarm(self, name: str) -> None:
        model = self._models.get(name)
        if model is not None and not model.alive():
            self._start_promotion(model)

    def lost_instance(self, name: str, worker: WorkerHandle) -> None:
        model = self._models.get(name)
        if model is not None and worker in model.workers:
            model.workers.remove(worker)
            self.model_changed(name)
            self.workers_changed()

    async def demote(self, name: str, to: Tier) -> None:
        """Move ``name`` down to tier ``to`` (warm or cool) now."""
        model = self._get(name)
        workers, model.workers = model.workers, []  # from here on, new requests promote again
        for worker in workers:
            with contextlib.suppress(EmberError):
                await worker.unload(model.deployment.key)
        self.workers_changed()
        if self._models.get(name) is not model:
            return  # removed meanwhile: remove() has dealt with its files
        if to is Tier.COOL:
            await run_blocking(self._clock, self._store.demote, model.deployment.key)
        self.model_changed(name)

    def model_changed(self, name: str) -> None:
        """``name``'s instances or tier may have changed: the tier gauge, and whoever listens, learn it."""
        self._metrics.set_tier(name, self.tier(name).value)
        if self._on_change is not None:
            self._on_change(name)

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._clock.sleep(self._tick_s)
            try:
                await self.tick()
            except Exception:  # a bug in one decision must not stop every later one
                _log.exception("a control tick failed; the next one runs as usual")

    async def tick(self) -> None:
        now = self._clock.now()
        models = list(self._models.values())
        for model in models:
            self._measure(model, now)
        views = tuple(self._view(model, now) for model in models)
        for action in self._keepalive.decide(views):
            target = self._models.get(action.name)
            if target is None or target.runner.statistics().busy or self._promoting(target):
                continue
            if isinstance(action, Demotion):
                await self.demote(action.name, action.to)
            else:
                target.state = replace(target.state, prewarmed=True)
                self._start_promotion(target)
        for model in models:
            if model.deployment.max_instances > 1 and model.deployment.name in self._models:
                await self._autoscale(model, now)
        measure_shares(self, now)
        await unload_left(self)
        if self._rebalancer is not None:
            await rebalance(self, self._rebalancer)

    def _measure(self, model: _Model, now: float) -> None:
        """Take what the runner measured since the last tick and fold it into the model's state."""
        model.stats, model.measured = model.runner.statistics(), model.runner.drain()
        model.state = fold(model.state, model.measured, model.stats, now)

    def _view(self, model: _Model, now: float) -> ModelView:
        d, state = model.deployment, model.state
        return model_view(
            d.name,
            self.tier(d.name),
            now - max(state.last_active, model.hot_since),
            model.stats.busy or self._promoting(model),
            keepalive_hot_s=d.keepalive_hot_s,
            keepalive_warm_s=d.keepalive_warm_s,
            histogram=state.histogram,
            latency=state.latency,
            model_bytes=d.metadata.bytes,
            bandwidths=self._bandwidths,
            prewarmed=state.prewarmed,
            slo_s=d.start_slo_s,
        )

    def _load_s(self, model: _Model, tier: Tier) -> float:
        size = model.deployment.metadata.bytes
        load_s = model.runner.latency.predict_load(tier, size, self._bandwidths)
        if tier is not Tier.HOT and self._must_fetch(model.deployment.key):
            load_s += transfer_s(size, self._bandwidths.network_bytes_per_s)
        return load_s

    def _must_fetch(self, key: str) -> bool:
        """Whether no worker's machine holds ``key``'s weights: each node of a cluster has its own store,
        and a cold start must copy them from another node first."""
        held = [w.holds(key) for w in self._backend.workers()]
        return bool(held) and all(h is Tier.COLD for h in held)

    # -- autoscaling -------------------------------------------------------------------------------

    async def _autoscale(self, model: _Model, now: float) -> None:
        alive = model.alive()
        if not alive or self._promoting(model) or (model.scaling is not None and not model.scaling.done()):
            return
        d, stats = model.deployment, model.runner.statistics()
        view = scale_view(d, stats, model.state.arrival_rate, len(alive))
        count, scale_state = self._autoscaler.decide(now, view, model.state.scale_state)
        model.state = replace(model.state, scale_state=scale_state)
        if count > len(alive):
            model.scaling = self._tasks.spawn(self._add_instance(model), name=f"ember-scale-{d.name}")
        elif count < len(alive):
            idle = [w for w in reversed(alive) if w.id not in stats.busy_instances]
            for worker in idle[: len(alive) - count]:
                model.workers.remove(worker)
                with contextlib.suppress(EmberError):
                    await worker.unload(d.key)
                self.workers_changed()
                self.model_changed(d.name)

    async def _add_instance(self, model: _Model, worker: WorkerHandle | None = None) -> bool:
        """Load one more instance of ``model``, on ``worker`` or where placement says; True if it is up."""
        d = model.deployment
        try:
            if worker is None:
                worker = await choose_worker(self, d, exclude={w.id for w in model.workers}, wait=False)
                if worker is None:
                    return False
            assets = await run_blocking(self._clock, self._store.assets, d.key)
            await worker.load(d.key, d.model_ref, d.options, str(self._store.weights_path(d.key)), assets)
        except EmberError as exc:
            _log.warning("could not add an instance of %s: %s", d.name, exc.message)
            return False
        if d.name not in self._models:
            return False
        model.workers.append(worker)
        model.runner.instance_loaded(worker.id)
        self.model_changed(d.name)
        return True

    # -- promotion ---------------------------------------------------------------------------------

    def _promoting(self, model: _Model) -> bool:
        return model.promoting is not None and not model.promoting.done()

    def _start_promotion(self, model: _Model) -> asyncio.Task[WorkerHandle]:
        if model.promoting is None or model.promoting.done():
            model.promoting_since = self._clock.now()
            model.promoting_s = self._load_s(model, self._store.tier(model.deployment.key))
            task = self._tasks.spawn(self._promote(model), name=f"ember-promote-{model.deployment.name}")
            model.promoting = task
        return model.promoting

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
        weights = self._store.weights_path(key)
        copying = None
        if from_tier is Tier.COOL and is_compressed(weights):  # decoding it twice would cost more than it saves
            await run_blocking(self._clock, self._store.promote, key)
            weights = self._store.weights_path(key)
        elif from_tier is Tier.COOL:
            # The worker loads the disk copy while the store copies it into the warm tier: the cold
            # start costs the longer of the two, not their sum. The copy checks every checksum; if it
            # fails, the instance built meanwhile is unloaded and the request fails with it.
            copying = asyncio.ensure_future(run_blocking(self._clock, self._store.promote, key))
        try:
            assets = await run_blocking(self._clock, self._store.assets, key)
            worker = await self._load_on_a_worker(deployment, str(weights), assets)
        except BaseException:
            if copying is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(copying)
            raise
        if copying is not None:
            try:
                await copying
            except BaseException:
                with contextlib.suppress(EmberError):
                    await worker.unload(key)
                raise
        model.workers.append(worker)
        model.runner.instance_loaded(worker.id)
        model.hot_since = self._clock.now()
        seconds = model.hot_since - start
        model.runner.observe_load(from_tier, seconds)
        model.last_cold_start = ColdStart(from_tier, seconds, self._clock.wall())
        model.cold_starts += 1
        self._metrics.cold_starts.labels(deployment.name, from_tier.value).inc()
        self._metrics.load_seconds.labels(from_tier.value).observe(seconds)
        self.model_changed(deployment.name)
        return worker

    async def _load_on_a_worker(self, deployment: Deployment, weights: str, assets: dict[str, bytes]) -> WorkerHandle:
        """Build ``deployment`` on the worker placement chooses (once more on another if that one dies,
        or if its node's store filled up fetching the weights: that node now refuses new models)."""
        for attempt in range(2):
            worker = await choose_worker(self, deployment)
            if worker is None:  # only when told not to wait
                raise ModelUnavailable(f"no worker can take '{deployment.name}' now", retry_after_s=10.0)
            try:
                await worker.load(deployment.key, deployment.model_ref, deployment.options, weights, assets)
                return worker
            except (WorkerCrashed, StorageFull):
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def _worker_lost(self, worker: WorkerHandle) -> None:
        self._tenants_seen.pop(worker.id, None)
        for name, model in self._models.items():
            if worker in model.workers:
                model.workers.remove(worker)
                self.model_changed(name)
        self.workers_changed()

    def workers_changed(self) -> None:
        """Something placement reads changed (a worker came or went, a model left one): wake every
        choice of a worker that waits."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def close(self) -> None:
        """Cancel the promotions, added instances and moves still running, and wait for them."""
        await self._tasks.aclose()

    def _share(self, name: str, worker_id: str) -> float:
        key = (name, worker_id)
        return self._shares.get(key, 0.0) + self._planned.get(key, 0.0)

    def _get(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        return model
