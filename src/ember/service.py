"""The Ember service: registry, store, workers, controller and one runner per model, wired together.

The gateway is a thin layer over this object; so is an embedded use from Python::

    async with EmberService(ServeOptions(home=Path("~/.ember"))) as ember:
        await ember.deploy(DeploySpec(source="examples/minilm.py:MiniLM"))
        out = await ember.infer("minilm", {"text": np.array([b"hello"], dtype=object)})

A generative model (``deployment.generative``) answers :meth:`EmberService.generate` instead: an async
iterator of :class:`~ember.generation.TokenChunk` (``scheduler.GenerativeRunner``); ``infer`` on it is
InvalidInput naming the generate routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import ValidationError

from ember.api import Arrays
from ember.clock import Clock, WallClock, run_blocking
from ember.cluster.base import ClusterBackend
from ember.cluster.channel import storage_full
from ember.cluster.factory import LOCAL, backend_for
from ember.cluster.local import WorkerLimits
from ember.config import (
    Deployment,
    DeploySpec,
    ModelMetadata,
    UpdateSpec,
    check_name,
    resolve_source,
    validation_message,
)
from ember.controller import Controller
from ember.errors import EmberError, InvalidInput, ModelFailed, ModelNotFound, ModelUnavailable, ShuttingDown
from ember.generation import GenerateRequest, TokenChunk
from ember.metering import BUCKET_S, Deployed, Holding, Meter, Usage, report
from ember.metrics import Metrics
from ember.policies import (
    HybridHistogramKeepAlive,
    LatencyModel,
    LatestStartFirst,
    MemoryAwarePlacement,
    SloBatcher,
    TenantIsolated,
    kv_cache_bytes,
    warmup_batch_sizes,
)
from ember.registry import DeploymentRecord, Registry
from ember.requestlog import REQUEST_LOG, RecentRequests, RequestLog, current
from ember.scheduler import DeviceArbiter, GenerativeRunner, ModelRunner
from ember.scope import TaskScope
from ember.state import GenerationStatistics
from ember.store import Store, Tier
from ember.store.bandwidths import HostBandwidths, read_bandwidths
from ember.tracing import Tracer, otlp_tracer

__all__ = ["EmberService", "ModelInfo", "ServeOptions"]

Progress = Callable[[dict[str, Any]], None]

_log = logging.getLogger(__name__)

#: Where registry rows that cannot be served are moved at start (``EmberService._set_aside``).
SET_ASIDE_DIR = "set-aside"
#: Where uploaded packages are unpacked while their deploy runs (``new_upload_folder``).
UPLOADS_DIR = "uploads"

#: Batch sizes the deploy-time warm-up measures (1, 2, 4), to seed each model's latency model.
WARMUP_SIZES = 3
#: How often the models' measured batch and load times are written to the registry (and at stop).
SAVE_MEASUREMENTS_S = 10.0

#: Seconds between two flushes of the meter's charges into the registry (a crash loses at most these).
METER_FLUSH_S = 10.0
#: Tier changes and cold starts kept for the dashboard (all models together).
HISTORY = 2048

#: A model's runner: batches of one-shot requests, or seats and streams of generative ones.
AnyRunner = ModelRunner | GenerativeRunner


@dataclass(frozen=True)
class ServeOptions:
    home: Path
    workers: int = 2
    device: str = "auto"
    threads: int = 0
    tick_s: float = 1.0
    #: Where the warm tier lives; None: shared memory (/dev/shm) when the host has it.
    warm_root: Path | None = None
    #: Byte budgets of the warm and cool tiers; None: unlimited. Promotion evicts the least recently used.
    warm_budget_bytes: int | None = None
    cool_budget_bytes: int | None = None
    #: With a warm budget, the warm tier is one shared-memory arena of that size, allocated and touched
    #: at start (see ember.store.arena); without one, a file per warm model.
    warm_arena: bool = True
    preload: tuple[str, ...] = ("numpy", "safetensors", "transformers", "tokenizers")
    #: Workers started ahead beyond ``workers``, to take a dead worker's place at once.
    spare_workers: int = 1
    #: A batch running longer is answered with an error and its worker replaced.
    batch_timeout_s: float = 120.0
    #: A worker whose peak resident memory passes this is replaced after its batch; None: three
    #: quarters of the host's memory shared among the workers; 0: no limit.
    worker_memory_bytes: int | None = None
    #: Memory for weights per worker; None: unknown, placement never counts it full.
    device_memory_bytes: int | None = None
    #: Let requests without an API key act as admin (``ember serve --insecure``, loopback only).
    insecure: bool = False
    #: Write one JSON line per request to HOME/logs/requests.jsonl (``ember.requestlog``).
    request_log: bool = True
    #: Export OpenTelemetry spans over OTLP (``ember.tracing``; needs the ``otel`` extra).
    otel: bool = False
    #: Where the workers run: ``local`` (processes of this machine, ``workers`` of them) or a Ray
    #: cluster (``ray``: RAY_ADDRESS or the cluster this host is a node of; ``ray://HOST:PORT``;
    #: ``HOST:PORT``), one worker per GPU or per ``cpus_per_worker`` CPUs of each node.
    cluster: str = LOCAL
    cpus_per_worker: float = 1.0


@dataclass(frozen=True)
class ModelInfo:
    """What ``ember ls`` shows of one model."""

    name: str
    version: int
    tier: str
    instances: int
    requests: int
    succeeded: int
    failed: int
    queued: int
    task: str | None
    slo_ms: float
    slo_attainment: float | None
    cold_starts: int
    last_cold_start: dict[str, Any] | None
    bytes: int
    source: str
    created_at: float
    tenant: str = "default"
    #: The most instances the autoscaler may run (``ember deploy --max-instances``).
    max_instances: int = 1
    #: What ``ember describe`` adds: inputs, outputs, batching, keep-alives, device, the model's options.
    settings: dict[str, Any] = field(default_factory=dict)
    #: A generative model's objectives, limits and token figures (``ttft_slo_ms``, ``tpot_slo_ms``,
    #: ``max_num_seqs``, ``max_model_len``, ``ttft_attainment``, ``tpot_attainment``, ``tokens_per_s``,
    #: ``running``, ``waiting``, ``prompt_tokens``, ``generation_tokens``); None for a one-shot model.
    generation: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class EmberService:
    def __init__(self, options: ServeOptions, clock: Clock | None = None, backend: ClusterBackend | None = None):
        self.options = options
        self.clock: Clock = clock or WallClock()
        home = options.home.expanduser()
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.metrics = Metrics()
        #: The request log the gateway writes (None: off).
        self.request_log = RequestLog(home / "logs" / REQUEST_LOG) if options.request_log else None
        #: The last requests (ring buffers, bounded): what the dashboard draws rates and latencies from;
        #: and each model's tier changes and cold starts, (wall-clock time, model, tier[, seconds]).
        self.recent = RecentRequests()
        #: Spans per request (``ember serve --otel``); None: off.
        self.tracer: Tracer | None = otlp_tracer() if options.otel else None
        self.tier_changes: deque[tuple[float, str, str]] = deque(maxlen=HISTORY)
        self.cold_start_log: deque[tuple[float, str, str, float]] = deque(maxlen=HISTORY)
        self._tiers: dict[str, str] = {}
        self.registry = Registry(home / "registry.sqlite")
        started = self.clock.now()
        self.store = Store(
            home / "store",
            options.warm_root,
            warm_budget_bytes=options.warm_budget_bytes,
            cool_budget_bytes=options.cool_budget_bytes,
            arena=options.warm_arena and bool(options.warm_budget_bytes),
        )
        #: Seconds the store took to open: allocating and touching the warm arena, where there is one.
        self.store_open_s = self.clock.now() - started
        memory = options.worker_memory_bytes
        if memory is None:  # a share of this host's memory; other nodes' hosts differ: no default there
            memory = WorkerLimits.default_memory_bytes(options.workers) if options.cluster == LOCAL else 0
        limits = WorkerLimits(options.batch_timeout_s, memory)
        self.backend: ClusterBackend = backend or backend_for(
            options.cluster,
            size=options.workers,
            log_dir=home / "logs",
            device=options.device,
            threads=options.threads,
            preload=options.preload,
            limits=limits,
            spares=options.spare_workers,
            warm_arena=self.store.arena_path,
            cpus_per_worker=options.cpus_per_worker,
            store_root=home / "store",
            node_root=home / "nodes",
        )
        #: The links first loads are predicted with: HOME/bandwidths.json (`ember store bench`), or defaults.
        self.bandwidths: HostBandwidths = read_bandwidths(home)
        if self.bandwidths.warning is not None:
            _log.warning("%s", self.bandwidths.warning)
        #: Cost accounting (``ember.metering``): fed by the controller's changes, flushed to the registry.
        self.meter = Meter(self.clock, on_charge=self.metrics.charge)
        placement = MemoryAwarePlacement()
        self.controller = Controller(
            self.clock,
            self.store,
            self.backend,
            HybridHistogramKeepAlive(),
            TenantIsolated(placement),
            self.metrics,
            options.tick_s,
            bandwidths=self.bandwidths.bandwidths,
            device_memory_bytes=options.device_memory_bytes,
            rebalancer=placement,
            on_change=self._metered,
        )
        self.arbiter = DeviceArbiter(LatestStartFirst(), self.clock)
        self._runners: dict[str, AnyRunner] = {}
        #: The control loop and the periodic save of measurements; their failures are logged.
        self._tasks = TaskScope(_log)
        #: Per model, the latency model last written to the registry.
        self._saved: dict[str, LatencyModel] = {}
        self._meter_task: asyncio.Task[None] | None = None
        #: Held while charges move from the meter to the registry, and while usage is read from both.
        self._usage_lock = asyncio.Lock()
        self._deploying: set[str] = set()
        self._accepting = False
        self.ready = False

    async def __aenter__(self) -> EmberService:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def new_upload_folder(self) -> Path:
        """A fresh, empty folder under ``HOME/uploads`` for one uploaded package (its owner removes it)."""
        uploads = self.home / UPLOADS_DIR
        uploads.mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(dir=uploads))

    async def start(self) -> None:
        # Packages of deploys that a stop cut short; a deploy removes its own when it ends.
        shutil.rmtree(self.home / UPLOADS_DIR, ignore_errors=True)
        for record in self.registry.recover():
            self._discard_files(record.key)
        await self.backend.start()
        for record in self.registry.all():
            try:
                deployment = _deployment(record)
            except Exception as exc:  # a row this Ember cannot serve must not keep the others down
                self._set_aside(record, exc)
                continue
            runner = self._add(deployment)
            restored = self._saved[record.name] = runner.latency.from_json(self.registry.latency(record.key))
            runner.restore_latency(restored)
        self._tasks.spawn(self.controller.run(), name="ember-controller")
        self._tasks.spawn(self._save_periodically(), name="ember-save-measurements")
        self._tasks.spawn(self._meter_loop(), name="ember-meter")
        self._accepting = True
        self.ready = True

    async def stop(self) -> None:
        self._accepting = False
        self.ready = False
        draining = ShuttingDown("Ember is shutting down; retry against another instance or after the restart")
        await asyncio.gather(*(runner.stop(draining) for runner in self._runners.values()))
        await self._tasks.aclose()
        await self.controller.close()
        self.save_measurements()
        try:
            await self.flush_usage()
        except Exception:  # stopping goes on
            _log.exception("could not record the last usage before stopping; it is lost")
        await self.backend.stop()
        self.store.close()
        self.registry.close()
        if self.request_log is not None:
            self.request_log.close()

    # -- requests ----------------------------------------------------------------------------------

    def runner(self, name: str) -> AnyRunner:
        runner = self._runners.get(name)
        if runner is None:
            raise ModelNotFound(name)
        return runner

    async def infer(self, name: str, inputs: Arrays, timeout_s: float | None = None) -> Arrays:
        if not self._accepting:
            raise ShuttingDown("Ember is shutting down; retry after the restart")
        runner = self.runner(name)
        if isinstance(runner, GenerativeRunner):
            raise generate_routes(name)
        self._note_request(name, runner)
        return await runner.submit(inputs, timeout_s)

    async def generate(
        self, name: str, request: GenerateRequest, timeout_s: float | None = None
    ) -> AsyncGenerator[TokenChunk, None]:
        """The chunks of ``request``'s answer as model ``name`` makes them.

        An async generator: admission's errors (DeadlineUnmeetable 429 with ``retry_after_s``,
        ModelNotFound, InvalidInput for a one-shot model or a too long request, Overloaded) raise on
        the first ``__anext__``; ``aclose()`` (a client that left) cancels the sequence on its worker.
        ``timeout_s`` bounds the time to the first token.
        """
        if not self._accepting:
            raise ShuttingDown("Ember is shutting down; retry after the restart")
        runner = self.runner(name)
        if not isinstance(runner, GenerativeRunner):
            raise InvalidInput(
                f"model '{name}' is not generative: call POST /v2/models/{name}/infer (or /v1/embeddings for "
                "an embedding model)"
            )
        self._note_request(name, runner)
        stream = runner.generate(request, timeout_s)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    def _note_request(self, name: str, runner: AnyRunner) -> None:
        """Tell the request log (when one records this request) which model and tier answer it."""
        record = current.get()
        if record is not None:
            record.model, record.tenant = name, runner.deployment.tenant
            tier = self.controller.tier(name)
            record.cold_start = None if tier is Tier.HOT else tier.value

    # -- deployments -------------------------------------------------------------------------------

    async def deploy(
        self,
        spec: DeploySpec,
        progress: Progress | None = None,
        load: bool = True,
        on_stored: Callable[[int], None] | None = None,
    ) -> ModelInfo:
        """Import ``spec``'s model into the store, register it and (with ``load``) bring it up hot.

        ``on_stored`` is called with the stored bytes before the deployment is committed; whatever it
        raises refuses the deploy, which is then rolled back (the gateway checks byte quotas with it).
        """
        say = progress or (lambda event: None)
        name = str(spec.name)
        if name in self._deploying:
            raise InvalidInput(f"model '{name}' is being deployed right now; wait for that to finish")
        try:
            model_ref, options = resolve_source(spec)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        self._deploying.add(name)
        try:
            record = self.registry.begin(name, spec.model_dump(), self.clock.wall())
            deployment = await self._import(record, spec, model_ref, options, say, on_stored)
        finally:
            self._deploying.discard(name)
        self._add(deployment)
        if load:
            try:
                await self._first_load(deployment, spec, say)
            except Exception:  # a model that cannot load (or a bug on the way) is not left deployed
                await self.remove(name)
                raise
            self.save_measurements()
        return self.info(name)

    async def _first_load(self, deployment: Deployment, spec: DeploySpec, say: Progress) -> None:
        name = deployment.name
        say({"stage": "loading", "model": name})
        loop = asyncio.get_running_loop()
        loaded = _progress_events(say, "loading", name)

        def copied(done: int, total: int) -> None:  # the copy to the warm tier runs in a thread
            loop.call_soon_threadsafe(loaded, done, total)

        try:
            with self.store.watch(deployment.key, copied):
                instance = await self.controller.ensure_hot(name)
        except EmberError as exc:
            raise InvalidInput(f"{spec.source} was imported but could not be loaded: {exc.message}") from exc
        cold = self.controller.last_cold_start(name)
        say({"stage": "ready", "model": name, "load_s": cold.seconds if cold else 0.0})
        if deployment.warmup:
            sizes = warmup_batch_sizes(deployment.max_batch_size, WARMUP_SIZES)
            try:
                measured = await self.runner(name).warm_up(instance, sizes)
            except ModelFailed as exc:  # its answers break its own declaration: not left deployed
                raise InvalidInput(f"{spec.source} was loaded, but {exc.message}") from exc
            say({"stage": "warmed", "model": name, "batch_sizes": list(sizes[:measured])})

    async def update(self, name: str, changes: UpdateSpec) -> ModelInfo:
        """Change ``name``'s SLO, keep-alives or on-unmeetable mode in place: no redeploy, no reload."""
        runner = self.runner(name)
        given = changes.changes()
        if not given:
            raise InvalidInput(
                "nothing to change: give at least one of slo_ms, keepalive_hot_s, keepalive_warm_s, on_unmeetable"
            )
        record = self.registry.get(name)
        try:
            DeploySpec.model_validate({**record.spec, **given})
        except ValidationError as exc:
            raise InvalidInput(f"cannot update '{name}': {validation_message(exc)}") from exc
        deployment = _deployment(self.registry.update_spec(name, given))
        runner.update(deployment)
        self.controller.update(deployment)
        runner.set_policy(_batch_policy(deployment))
        return self.info(name)

    def save_measurements(self) -> None:
        """Write every model's measured batch and load times that changed since the last write."""
        for name, runner in list(self._runners.items()):
            if self._saved.get(name) is runner.latency:
                continue
            with contextlib.suppress(sqlite3.Error):
                self.registry.save_latency(runner.deployment.key, runner.latency.to_json(), self.clock.wall())
                self._saved[name] = runner.latency

    async def _save_periodically(self) -> None:
        while True:
            await self.clock.sleep(SAVE_MEASUREMENTS_S)
            self.save_measurements()

    async def _import(
        self,
        record: DeploymentRecord,
        spec: DeploySpec,
        model_ref: str,
        options: dict[str, Any],
        say: Progress,
        on_stored: Callable[[int], None] | None,
    ) -> Deployment:
        key = record.key
        staging: Path | None = None
        try:
            staging = self.store.staging(key)
            ref = model_ref
            code_path, _, attr = model_ref.rpartition(":")
            if code_path.endswith(".py"):
                # Keep a copy of the user's code: later starts never go back to the source.
                code_dir = self.home / "code" / key
                code_dir.mkdir(parents=True, exist_ok=True)
                if spec.package is None:
                    shutil.copy2(code_path, code_dir / Path(code_path).name)
                    ref = f"{code_dir / Path(code_path).name}:{attr}"
                else:  # an uploaded package: every module in it, where it was (helpers import each other)
                    root = Path(spec.package).resolve()
                    await run_blocking(self.clock, _copy_modules, root, code_dir)
                    ref = f"{code_dir / Path(code_path).relative_to(root)}:{attr}"
            say({"stage": "importing", "model": record.name, "source": spec.source})
            worker = self.backend.workers()
            if not worker:
                raise ShuttingDown("no worker is ready to import the model; retry in a few seconds", 5.0)
            chosen = await self.controller.import_worker(str(spec.tenant or "default"))
            if chosen is None:
                raise ModelUnavailable(
                    f"no worker is free to import '{record.name}': models of different tenants never share a "
                    "worker, and every worker holds another tenant's models; add workers, or retry later",
                    10.0,
                )
            try:
                imported = _progress_events(say, "importing", record.name)
                described = await chosen.import_model(ref, options, str(staging), imported)
            except ModelFailed as exc:
                raise InvalidInput(f"importing {spec.source} failed: {exc.message}") from exc
            try:
                stored = await run_blocking(self.clock, lambda: self.store.commit(key, staging, compress=spec.compress))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                raise storage_full(str(exc)) from exc
            if on_stored is not None:
                on_stored(stored.bytes)
            say({"stage": "stored", "model": record.name, "bytes": stored.bytes})
            metadata = ModelMetadata.from_json({**described, "bytes": stored.bytes})
            _check_generative(spec, metadata)
            max_batch = min(spec.max_batch_size or metadata.max_batch_size, metadata.max_batch_size)
            finished = self.registry.finish(
                record.name,
                {
                    "model_ref": ref,
                    "options": options,
                    "model": metadata.to_json(),
                    "max_batch_size": max_batch,
                },
            )
        except BaseException:
            # Whatever went wrong (an Ember error, a bug, a cancelled request), no row is left importing.
            self.registry.abort(record.name)
            if staging is not None:
                self.store.abort(staging)
            self._discard_files(key)
            raise
        return _deployment(finished)

    async def remove(self, name: str) -> None:
        runner = self.runner(name)
        record = self.registry.remove(name)
        self._metered(name)
        del self._runners[name]
        self._saved.pop(name, None)
        self._tiers.pop(name, None)
        self.meter.forget(name)  # before the controller drops its metrics: no charge revives them
        await runner.stop(ModelNotFound(name))
        await self.controller.remove(name)
        await run_blocking(self.clock, self._discard_files, record.key)

    async def load(self, name: str) -> None:
        self.runner(name)
        await self.controller.ensure_hot(name)

    async def unload(self, name: str, tier: str = "cool") -> None:
        """Demote ``name`` to ``tier``: ``"warm"`` (off the device, weights kept in host memory) or
        ``"cool"`` (weights on local disk only). It never promotes: a model already at or below
        ``tier`` stays where it is. Raises InvalidInput for another tier name."""
        if tier not in ("cool", "warm"):
            raise InvalidInput(
                f"cannot unload to tier {_shorten(tier)}; use 'warm' (off the device, weights kept in host "
                "memory) or 'cool' (weights on local disk only, the default)"
            )
        self.runner(name)
        await self.controller.demote(name, Tier(tier))

    # -- what is there -----------------------------------------------------------------------------

    def deployment(self, name: str) -> Deployment:
        return self.runner(name).deployment

    def tenant_of(self, name: str) -> str | None:
        """The tenant owning model ``name``, or None if no such model is deployed."""
        runner = self._runners.get(name)
        return None if runner is None else runner.deployment.tenant

    def info(self, name: str) -> ModelInfo:
        runner = self.runner(name)
        d = runner.deployment
        stats = runner.statistics()
        cold = self.controller.last_cold_start(name)
        return ModelInfo(
            name=d.name,
            version=d.version,
            tier=self.controller.tier(name).value,
            instances=self.controller.instances(name),
            requests=stats.requests,
            succeeded=stats.succeeded,
            failed=stats.failed,
            queued=stats.queued,
            task=d.metadata.task,
            slo_ms=d.slo_ms,
            slo_attainment=stats.slo_attainment,
            cold_starts=self.controller.cold_starts(name),
            last_cold_start=None if cold is None else {"tier": cold.tier.value, "seconds": cold.seconds, "at": cold.at},
            bytes=d.metadata.bytes,
            source=str(d.extra.get("source", "")),
            created_at=d.created_at,
            tenant=d.tenant,
            max_instances=d.max_instances,
            settings={
                "inputs": [t.to_json() for t in d.metadata.inputs],
                "outputs": [t.to_json() for t in d.metadata.outputs],
                "max_batch_size": d.max_batch_size,
                "max_batch_wait_ms": d.max_batch_wait_ms,
                "max_queue": d.max_queue,
                "keepalive_hot_s": d.keepalive_hot_s,
                "keepalive_warm_s": d.keepalive_warm_s,
                "on_unmeetable": d.on_unmeetable,
                "warmup": d.warmup,
                "device": d.device,
                "options": dict(d.options),
            },
            generation=None if stats.generation is None else _generation_info(d, stats.generation),
        )

    def models(self) -> list[ModelInfo]:
        return [self.info(name) for name in sorted(self._runners)]

    def status(self) -> dict[str, Any]:
        stats = self.store.statistics()
        return {
            "ready": self.ready,
            "home": str(self.home),
            "pid": os.getpid(),
            "models": len(self._runners),
            "workers": self.backend.statistics(),
            "store": {
                "warm": {"models": stats.warm.models, "bytes": stats.warm.bytes, "budget": stats.warm.budget_bytes},
                "cool": {"models": stats.cool.models, "bytes": stats.cool.bytes, "budget": stats.cool.budget_bytes},
                "arena": None if stats.arena is None else dataclasses.asdict(stats.arena),
            },
            "bandwidths": self.bandwidths.to_json(),
            "generation": {
                name: _generation_info(runner.deployment, counted.generation)
                for name, runner in sorted(self._runners.items())
                if (counted := runner.statistics()).generation is not None
            },
        }

    # -- usage -------------------------------------------------------------------------------------

    async def flush_usage(self) -> None:
        """Charge every model up to now and add the charges to the registry (kept for the next flush
        if the write fails)."""
        async with self._usage_lock:
            self._charge_all()
            charges = self.meter.drain()
            try:
                await run_blocking(self.clock, self.registry.add_usage, charges)
            except BaseException:
                self.meter.restore(charges)
                raise

    async def usage(self, since: float | None = None, tenant: str | None = None) -> dict[str, Any]:
        """Metered usage since ``since`` (wall-clock seconds; whole buckets: the one holding ``since``
        counts), of ``tenant``'s models or of all; ``ember.metering.report`` says what is in it.

        What the registry holds plus the charges not flushed yet: a read writes nothing."""
        start = None if since is None else since - since % BUCKET_S
        async with self._usage_lock:
            self._charge_all()
            recorded = await run_blocking(self.clock, self.registry.usage, start, tenant)
            for (model, owner, bucket), charge in self.meter.pending().items():
                if (start is None or bucket >= start) and (tenant is None or owner == tenant):
                    recorded[(model, owner)] = recorded.get((model, owner), Usage()) + charge
        deployed = {
            name: Deployed(r.deployment.tenant, r.deployment.metadata.bytes, r.deployment.created_at)
            for name, r in self._runners.items()
        }
        return report(recorded, deployed, start, self.clock.wall())

    def _charge_all(self) -> None:
        for name in self._runners:
            self._metered(name)

    def _metered(self, name: str) -> None:
        """Tell the meter what ``name`` holds now (the controller calls this at every change)."""
        runner = self._runners.get(name)
        if runner is None:
            return
        d = runner.deployment
        size = d.metadata.bytes
        with contextlib.suppress(EmberError, OSError, ValueError):
            self._note_tier(name)
            instances = self.controller.instances(name)
            host = size if self.store.tier(d.key) is Tier.WARM else 0
            holding = Holding(instances, size, host)
            self.meter.observe(name, d.tenant, holding, runner.statistics().requests)

    def _note_tier(self, name: str) -> None:
        tier = self.controller.tier(name).value
        if self._tiers.get(name) == tier:
            return
        self._tiers[name] = tier
        now = self.clock.wall()
        self.tier_changes.append((now, name, tier))
        cold = self.controller.last_cold_start(name)
        if tier == "hot" and cold is not None:
            self.cold_start_log.append((cold.at, name, cold.tier.value, cold.seconds))

    async def _meter_loop(self) -> None:
        while True:
            await self.clock.sleep(METER_FLUSH_S)
            try:
                await self.flush_usage()
            except Exception:  # a full disk must not stop the metering: the charges wait for the next flush
                _log.exception("could not record usage; it is kept for the next flush")

    # -- internals ---------------------------------------------------------------------------------

    def _add(self, deployment: Deployment) -> AnyRunner:
        runner: AnyRunner
        if deployment.generative:  # its worker batches its sequences step by step: no device arbiter
            runner = GenerativeRunner(deployment, self.clock, self.controller, self.metrics)
        else:
            runner = ModelRunner(
                deployment, self.clock, _batch_policy(deployment), self.controller, self.metrics, self.arbiter
            )
        self._runners[deployment.name] = runner
        self.controller.add(runner)
        runner.start()
        return runner

    def _discard_files(self, key: str) -> None:
        with contextlib.suppress(KeyError, EmberError, OSError, ValueError):  # ValueError: not a valid key
            self.store.remove(key)
        name, _, version = key.rpartition("@")
        with contextlib.suppress(ValueError):  # a key no valid name makes names no folder of ours
            check_name(name)
            if version.isdigit():
                shutil.rmtree(self.home / "code" / key, ignore_errors=True)

    def _set_aside(self, record: DeploymentRecord, error: Exception) -> None:
        """Move a registry row that cannot be served to ``HOME/set-aside/`` (as JSON), and say so in the log."""
        folder = self.home / SET_ASIDE_DIR
        folder.mkdir(exist_ok=True)
        digest = hashlib.sha256(record.name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        path = folder / f"{digest}-v{record.version}.json"
        row = {"name": record.name, "version": record.version, "spec": record.spec, "metadata": record.metadata}
        path.write_text(json.dumps({**row, "created_at": record.created_at, "error": repr(error)}, default=str))
        self.registry.remove_row(record.name)
        _log.error(
            "deployment %r v%d cannot be served (%s: %s); it was set aside in %s: deploy the model again",
            record.name,
            record.version,
            type(error).__name__,
            error,
            path,
        )


def _generation_info(d: Deployment, stats: GenerationStatistics) -> dict[str, Any]:
    return {
        "ttft_slo_ms": d.ttft_slo_ms,
        "tpot_slo_ms": d.tpot_slo_ms,
        "max_num_seqs": d.max_num_seqs,
        "max_model_len": d.max_model_len,
        **stats.to_json(),
    }


def _check_generative(spec: DeploySpec, metadata: ModelMetadata) -> None:
    """A generative model must say how long its sequences may be; ``--max-model-len`` may only shorten it."""
    if metadata.task == "generate" and metadata.generation is None:
        raise InvalidInput(
            f"{spec.source} declares task 'generate' but reports no generation info (max_model_len, "
            "kv_bytes_per_token, vocab_size); a generative model class must describe them"
        )
    if metadata.generation is not None and spec.max_model_len is not None:
        own = metadata.generation.max_model_len
        if spec.max_model_len > own:
            raise InvalidInput(
                f"--max-model-len {spec.max_model_len} is more than {spec.source} supports ({own} tokens); "
                f"give at most {own}, or leave it out to use the model's own"
            )


def _copy_modules(root: Path, into: Path) -> None:
    """Copy every ``.py`` file under ``root`` to the same place under ``into``."""
    for module in root.rglob("*.py"):
        target = into / module.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, target)


def _batch_policy(deployment: Deployment) -> SloBatcher:
    return SloBatcher(deployment.on_unmeetable, max_wait_s=deployment.max_batch_wait_ms / 1000.0)


def _shorten(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _progress_events(say: Progress, stage: str, name: str) -> Callable[[int, int], None]:
    """``progress(done, total)`` that says ``stage`` with the bytes and percent done, at each whole percent."""
    last = [-1]

    def report(done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if percent > last[0]:
            last[0] = percent
            say({"stage": stage, "model": name, "bytes": done, "total_bytes": total, "percent": percent})

    return report


def _deployment(record: DeploymentRecord) -> Deployment:
    check_name(record.name)
    spec = DeploySpec.model_validate(record.spec)
    meta = record.metadata
    metadata = ModelMetadata.from_json(meta["model"])
    options = dict(meta["options"])
    max_model_len = None
    if metadata.generation is not None:
        own = metadata.generation.max_model_len
        max_model_len = own if spec.max_model_len is None else min(spec.max_model_len, own)
        options |= generation_options(spec.max_num_seqs, max_model_len, metadata.generation.kv_bytes_per_token)
    return Deployment(
        name=record.name,
        version=record.version,
        model_ref=str(meta["model_ref"]),
        options=options,
        metadata=metadata,
        slo_ms=spec.slo_ms,
        max_batch_size=int(meta["max_batch_size"]),
        max_batch_wait_ms=spec.max_batch_wait_ms,
        keepalive_hot_s=spec.keepalive_hot_s,
        keepalive_warm_s=spec.keepalive_warm_s,
        max_queue=spec.max_queue,
        device=spec.device,
        created_at=record.created_at,
        on_unmeetable=spec.on_unmeetable,
        warmup=spec.warmup,
        max_instances=spec.max_instances,
        extra={"source": spec.source, "tenant": spec.tenant or "default"},
        ttft_slo_ms=spec.ttft_slo_ms,
        tpot_slo_ms=spec.tpot_slo_ms,
        max_num_seqs=spec.max_num_seqs,
        max_model_len=max_model_len,
    )


def generate_routes(name: str) -> InvalidInput:
    """The answer to an infer request for generative model ``name``: the routes it does answer."""
    return InvalidInput(
        f"model '{name}' is generative: it answers POST /v1/chat/completions, /v1/completions, "
        f"/v2/models/{name}/generate and /v2/models/{name}/generate_stream, not infer"
    )


def generation_options(max_num_seqs: int, max_model_len: int, kv_bytes_per_token: int) -> dict[str, int]:
    """What a generative model's load carries beside its own options: the most sequences an instance
    runs, the longest prompt + answer, and the KV-cache budget that holds them all at full length."""
    return {
        "max_num_seqs": max_num_seqs,
        "max_model_len": max_model_len,
        "kv_budget_bytes": kv_cache_bytes(max_num_seqs, max_model_len, kv_bytes_per_token),
    }
