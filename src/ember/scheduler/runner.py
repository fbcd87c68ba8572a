"""The batching loop of one model: admit, ask the batching policy, dispatch, answer.

``submit`` admits a request into the model's bounded queue, or refuses it at once: when the queue
is full (``Overloaded``), or when admission (``policies.admission``) predicts that even alone it
cannot finish by its deadline (``DeadlineUnmeetable``, 429 with ``Retry-After``: when the same
request is predicted to be admitted; for SLO deadlines only when the deployment says
``on_unmeetable="refuse"``, for a caller's own timeout always). A request only the model's measured
speed would refuse is served as a probe when an instance is idle and that measurement is due for a
check, so a refusal never lasts. A refusal for a model that is not hot starts its promotion, so the
retry finds it loaded.

``run`` is the loop: it makes sure the model has a hot instance (the promoter may have to bring it
up from a colder tier; requests wait, and one whose deadline is lost while the load runs is refused
then, not at the load's end), snapshots the queue for the batching policy (``policies.SloBatcher``),
refuses what the policy refuses and sends the batch to an idle instance. With several instances,
batches run concurrently, one per instance. Every batch's measured compute time feeds the model's
latency model, except an instance's first batch after a load (a first inference in a process is
often several times a steady one). A batch lost with its worker is retried once, then answered
with an error; every admitted request gets an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ember.api import ANSWER_MISMATCH, DATATYPES, Arrays
from ember.clock import Clock
from ember.cluster.base import WorkerHandle
from ember.config import Deployment
from ember.errors import DeadlineUnmeetable, EmberError, InternalError, ModelFailed, WorkerCrashed
from ember.metrics import Metrics
from ember.policies.batching import Admission, BatchPolicy, QueueSnapshot, admission
from ember.policies.devices import Candidate
from ember.policies.latency import LatencyModel
from ember.policies.tiers import Tier
from ember.requestlog import current
from ember.scheduler.device import DeviceArbiter
from ember.scheduler.queue import ModelQueue, Pending
from ember.scope import TaskScope
from ember.state import Measured, RunnerStatistics, queue_snapshot, start_delay_s
from ember.worker.protocol import rows_of

__all__ = ["ModelRunner", "Promoter"]

_log = logging.getLogger(__name__)

#: Idle gaps kept between two controller ticks; more are dropped (one per idle period at most).
MAX_IDLE_GAPS = 256


class Promoter(Protocol):
    async def ensure_hot(self, name: str) -> WorkerHandle:
        """An instance that serves ``name``, promoting the model to hot first if it has none."""
        ...

    def hot_instances(self, name: str) -> tuple[WorkerHandle, ...]:
        """The instances holding ``name`` now (none while it is not hot)."""
        ...

    def start_delay_s(self, name: str) -> float:
        """Predicted seconds before ``name`` could start a batch: its load time when not hot, else 0."""
        ...

    def prewarm(self, name: str) -> None:
        """Start bringing ``name`` to hot without waiting for it."""
        ...

    def lost_instance(self, name: str, worker: WorkerHandle) -> None: ...


@dataclass
class _Counters:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    slo_met: int = 0
    batches: int = 0
    rows: int = 0
    last_active: float = 0.0

    @property
    def slo_attainment(self) -> float | None:
        answered = self.succeeded + self.failed
        return self.slo_met / answered if answered else None


class ModelRunner:
    def __init__(
        self,
        deployment: Deployment,
        clock: Clock,
        policy: BatchPolicy,
        promoter: Promoter,
        metrics: Metrics,
        arbiter: DeviceArbiter | None = None,
    ) -> None:
        self.deployment = deployment
        self.queue = ModelQueue(deployment.name, deployment.max_queue)
        self._stats = _Counters(last_active=clock.now())
        self.running = 0
        self._clock = clock
        self._policy = policy
        self._promoter = promoter
        self._arbiter = arbiter
        self._metrics = metrics
        self._labels = labels = (deployment.name, str(deployment.version))
        # Each metric's child for this model, looked up once: labels() costs microseconds per call.
        name = deployment.name
        self._pending_gauge = metrics.pending.labels(*labels)
        self._exec_count = metrics.exec_count.labels(*labels)
        self._count = metrics.count.labels(*labels)
        self._compute_us = metrics.compute_us.labels(*labels)
        self._queue_us = metrics.queue_us.labels(*labels)
        self._success = metrics.success.labels(*labels)
        self._request_us = metrics.request_us.labels(*labels)
        self._slo_total = metrics.slo_total.labels(name)
        self._latency_seconds = metrics.latency.labels(name)
        self._slo_met = metrics.slo_met.labels(name)
        self._slo_attainment = metrics.slo_attainment.labels(name)
        #: The latency model: the one place every measured batch, refusal and load is folded in.
        self._latency = LatencyModel()
        #: Idle periods that ended (seconds), for the keep-alive histogram, and the device seconds this
        #: model's batches took per instance (its share of each device), since the last ``drain()``.
        self._idle_gaps: list[float] = []
        self._busy_s: dict[str, float] = {}
        self._refuse = deployment.on_unmeetable == "refuse"
        #: Batches running now, by instance id: when each started, how long it is predicted to take,
        #: and its requests.
        self._running: dict[str, tuple[float, float, list[Pending]]] = {}
        #: Instances loaded since their last batch: that first batch's time is not a steady one.
        self._fresh: set[str] = set()
        #: The loop's task, in a scope that logs its failure (a bug) the moment it happens.
        self._tasks = TaskScope(_log)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = self._tasks.spawn(self.run(), name=f"ember-runner-{self.deployment.name}")

    async def stop(self, error: EmberError) -> None:
        """Stop the loop and answer every request it holds, queued or running, with ``error``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.fail_all(error)

    def instance_loaded(self, instance_id: str) -> None:
        """Told by the promoter: ``instance_id`` has just loaded the model (its next batch is its first)."""
        self._fresh.add(instance_id)

    def update(self, deployment: Deployment) -> None:
        """Apply a changed deployment (its SLO, keep-alives, on-unmeetable) from the next request on."""
        self.deployment = deployment
        self._refuse = deployment.on_unmeetable == "refuse"

    def set_policy(self, policy: BatchPolicy) -> None:
        """Decide with ``policy`` from the next decision on."""
        self._policy = policy

    def busy_instances(self) -> set[str]:
        """The ids of the instances running one of this model's batches now."""
        return set(self._running)

    @property
    def busy(self) -> bool:
        return bool(self.running or len(self.queue))

    @property
    def latency(self) -> LatencyModel:
        """The latency model as measured so far."""
        return self._latency

    def restore_latency(self, latency: LatencyModel) -> None:
        """Start from ``latency`` (measurements saved by an earlier process)."""
        self._latency = latency

    def observe_load(self, tier: Tier, seconds: float) -> None:
        """Told by the promoter: a load of the model from ``tier`` took ``seconds``."""
        self._latency = self._latency.observe_load(tier, seconds)

    def statistics(self) -> RunnerStatistics:
        """The counters and what the runner holds now, as an immutable snapshot."""
        stats = self._stats
        return RunnerStatistics(
            requests=stats.requests,
            succeeded=stats.succeeded,
            failed=stats.failed,
            slo_met=stats.slo_met,
            batches=stats.batches,
            rows=stats.rows,
            last_active=stats.last_active,
            queued=len(self.queue),
            running=self.running,
            busy_instances=frozenset(self._running),
            latency=self._latency,
        )

    def drain(self) -> Measured:
        """What was measured since the last drain (idle gaps, device seconds per instance), handed over once."""
        measured = Measured(tuple(self._idle_gaps), self._busy_s)
        self._idle_gaps, self._busy_s = [], {}
        return measured

    async def submit(self, inputs: Arrays, timeout_s: float | None = None) -> Arrays:
        now = self._clock.now()
        slo_s = self.deployment.slo_ms / 1000.0
        hard = timeout_s is not None
        deadline = now + (timeout_s if timeout_s is not None else slo_s)
        rows = rows_of(inputs)
        probe = False
        if hard or self._refuse:
            decided = self._admission(now, deadline, rows, idle=self._idle())
            if decided.verdict == "refuse":
                if decided.too_slow:
                    self._latency = self._latency.observe_refusal(rows)
                self._count_refusal()
                raise self._unmeetable(now, deadline, rows, hard, deadline - now, decided)
            probe = decided.verdict == "probe"
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        pending = Pending(inputs, rows, now, deadline, hard, future, probe=probe)
        idle = not self.busy
        self.queue.put(pending)  # raises Overloaded when full: nothing was admitted
        if idle and self._stats.requests and len(self._idle_gaps) < MAX_IDLE_GAPS:
            self._idle_gaps.append(now - self._stats.last_active)
        self._stats.requests += 1
        self._stats.last_active = now
        self._pending_gauge.inc()
        try:
            if hard:
                return await self._wait_until(future, deadline)
            return await future
        finally:
            if not future.done():  # the caller went away: the queue skips it from now on
                future.cancel()
            self._pending_gauge.dec()
            self._account(pending)
            record = current.get()
            if record is not None and pending.dispatched_at:
                record.queued_at, record.queue_s = pending.arrival, pending.dispatched_at - pending.arrival
                record.compute_s = pending.extra.get("compute_s")
                record.batch = pending.extra.get("batch")

    def _start_delay(self, now: float) -> float:
        """Predicted seconds before a request arriving now could start running, served alone."""
        busy_until = None
        if self._running and len(self._running) >= max(1, len(self._promoter.hot_instances(self.deployment.name))):
            busy_until = min(start + run_s for start, run_s, _ in self._running.values())
        return start_delay_s(now, load_s=self._promoter.start_delay_s(self.deployment.name), busy_until=busy_until)

    def _idle(self) -> bool:
        """Whether a request admitted now would start at once: an instance holds the model and runs nothing."""
        hot = self._promoter.hot_instances(self.deployment.name)
        return bool(hot) and len(self._running) < len(hot) and not len(self.queue)

    def _admission(self, now: float, deadline: float, rows: int, idle: bool = False) -> Admission:
        return admission(now, deadline, rows, self._latency, self._start_delay(now), idle=idle)

    def _unmeetable(
        self, now: float, deadline: float, rows: int, hard: bool, allowed_s: float, decided: Admission | None = None
    ) -> DeadlineUnmeetable:
        """The refusal of a request of ``rows`` due at ``deadline``, allowed ``allowed_s`` in all (its SLO or
        timeout); ``decided``: admission's verdict, else that of the same request arriving now (its retry)."""
        name = self.deployment.name
        decided = decided or self._admission(now, now + allowed_s, rows)
        retry = max(decided.retry_after_s, 0.001)
        budget_ms = 1000.0 * (deadline - now)
        what = "the request's timeout" if hard else "its SLO"
        limit = f"{what} ({allowed_s * 1000.0:.0f} ms)" if hard else f"{what} ({self.deployment.slo_ms:g} ms)"
        loading = self._promoter.start_delay_s(name) > 0 and not self._promoter.hot_instances(name)
        if loading:
            self._promoter.prewarm(name)
        if budget_ms <= 0:  # e.g. a retry after its worker died under it, or a load that ran long
            return DeadlineUnmeetable(
                f"model '{name}' could not answer within {what}: it ran out {-budget_ms:.0f} ms ago, "
                f"{'while the model was being loaded' if loading else 'before the request could run'}; "
                f"retry in {_seconds(retry)}",
                retry_after_s=retry,
            )
        run_ms = 1000.0 * self._latency.admission_s(rows)
        if decided.too_slow:
            size = "one row" if rows == 1 else f"{rows} rows"
            return DeadlineUnmeetable(
                f"model '{name}' needs {run_ms:.0f} ms for {size} by its latest measurements, past {limit}. "
                f"It is measured again (one request served as a probe) within {_seconds(retry)}; until then "
                f"retrying will not help. If it is this slow, give it a longer SLO (`ember update {name} "
                "--slo-ms N`) or let it answer late (`ember update "
                f"{name} --on-unmeetable best-effort`)",
                retry_after_s=retry,
            )
        why = "it is being loaded" if loading else "it is busy"
        predicted_ms = run_ms + 1000.0 * self._start_delay(now)
        return DeadlineUnmeetable(
            f"model '{name}' is predicted to answer in {predicted_ms:.0f} ms ({why}), past {limit}; "
            f"retry in {_seconds(retry)}",
            retry_after_s=retry,
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as batches:
            while True:
                if not len(self.queue):
                    self.queue.changed.clear()
                    await self.queue.changed.wait()
                    continue
                name = self.deployment.name
                instances = self._promoter.hot_instances(name)
                if not instances:
                    promotion = asyncio.ensure_future(self._promoter.ensure_hot(name))
                    try:
                        await self._while_loading(promotion)
                        promotion.result()
                    except EmberError as exc:
                        for pending in self.queue.drain():
                            _answer_error(pending, exc)
                    finally:
                        if not promotion.done():
                            promotion.cancel()
                    continue
                idle = [w for w in instances if w.id not in self._running]
                if not idle:  # decide when an instance frees: O(1) per arrival, not a queue scan
                    self.queue.changed.clear()
                    await self.queue.changed.wait()
                    continue
                now = self._clock.now()
                peek = self.queue.peek(self.deployment.max_batch_size)
                decision = self._policy.decide(self._snapshot(now, peek, self._start_delay(now)))
                if decision.refuse:
                    self._refuse_queued(now, peek, decision.refuse)
                    continue  # decide again: requests beyond the window it saw may now join the batch
                if decision.take == 0:
                    self.queue.changed.clear()
                    await self._wait_change(decision.wake_at)
                    continue
                batch = self.queue.take(decision.take)
                if not batch:
                    continue
                instance = idle[0]
                self._running[instance.id] = (now, self._latency.predict(sum(p.rows for p in batch)), batch)
                batches.create_task(self._dispatch(instance, batch), name=f"ember-batch-{name}")

    async def _while_loading(self, promotion: asyncio.Future[WorkerHandle]) -> None:
        """Until ``promotion`` ends, refuse each queued request whose deadline is lost even if the load
        ended now; the rest wait for the model."""
        while not promotion.done():
            now = self._clock.now()
            peek = self.queue.peek(self.deployment.max_batch_size)
            wake_at: float | None = None
            if peek:
                decision = self._policy.decide(self._snapshot(now, peek, None))
                if decision.refuse:
                    self._refuse_queued(now, peek, decision.refuse)
                    continue
                if math.isfinite(decision.valid_until):
                    # At least a millisecond on: a decision whose turn is this instant must not spin.
                    wake_at = max(decision.valid_until, now + 1e-3)
            self.queue.changed.clear()
            await self._wait_change(wake_at, promotion)

    def _snapshot(self, now: float, peek: list[Pending], start_delay: float | None) -> QueueSnapshot:
        """The batching policy's view of ``peek``; ``start_delay`` None: no instance can take a batch now."""
        return queue_snapshot(
            now,
            tuple((p.deadline, p.rows, p.arrival) for p in peek),
            self._latency,
            self.deployment.max_batch_size,
            instance_idle=start_delay is not None,
            start_delay_s=start_delay or 0.0,
            hard=tuple(p.hard for p in peek),
            probes=tuple(p.probe for p in peek),
        )

    def _refuse_queued(self, now: float, peek: list[Pending], positions: tuple[int, ...]) -> None:
        refused = set(positions)
        self.queue.remove([p for i, p in enumerate(peek) if i in refused])
        for index in positions:
            pending = peek[index]
            allowed_s = pending.deadline - pending.arrival
            _answer_error(pending, self._unmeetable(now, pending.deadline, pending.rows, pending.hard, allowed_s))

    def fail_all(self, error: EmberError) -> None:
        running = [p for _, _, batch in self._running.values() for p in batch]
        self._running.clear()
        for pending in [*running, *self.queue.drain()]:
            _answer_error(pending, error)

    async def _dispatch(self, instance: WorkerHandle, batch: list[Pending]) -> None:
        try:
            await self._run_batch(instance, batch)
        except asyncio.CancelledError:
            raise  # ``_running`` keeps the batch, so that ``stop`` answers it
        finally:
            if not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                self._running.pop(instance.id, None)
                self.queue.changed.set()  # an instance is free: the loop looks again

    async def _run_batch(self, instance: WorkerHandle, batch: list[Pending]) -> None:
        now = self._clock.now()
        live: list[Pending] = []
        for pending in batch:
            if pending.hard and now >= pending.deadline:
                _answer_error(pending, _timed_out(self.deployment.name))
            else:
                pending.dispatched_at = now
                live.append(pending)
        if not live:
            return
        self.running += len(live)
        rows = sum(p.rows for p in live)
        try:
            async with self._device_slot(instance, live, rows):
                result = await instance.infer(self.deployment.key, [p.inputs for p in live])
        except WorkerCrashed as exc:
            self._promoter.lost_instance(self.deployment.name, instance)
            for pending in live:
                if pending.retried:
                    _answer_error(
                        pending,
                        WorkerCrashed(f"{exc.message}; the request failed twice, so it is not retried"),
                    )
                else:
                    pending.retried = True
                    self.queue.requeue(pending)
            return
        except EmberError as exc:
            for pending in live:
                _answer_error(pending, exc)
            return
        except Exception as exc:  # a bug in Ember: answer, then let it be seen
            for pending in live:
                _answer_error(pending, InternalError(f"internal error while running a batch: {exc!r}"))
            raise
        finally:
            self.running -= len(live)
            self._stats.last_active = self._clock.now()
        self._stats.batches += 1
        self._stats.rows += rows
        self._observe(instance.id, rows, result.compute_s)
        self._busy_s[instance.id] = self._busy_s.get(instance.id, 0.0) + result.compute_s
        self._exec_count.inc()
        self._count.inc(rows)
        self._compute_us.inc(result.compute_s * 1e6)
        for pending, output in zip(live, result.outputs, strict=True):
            pending.extra["compute_s"], pending.extra["batch"] = result.compute_s, len(live)
            self._queue_us.inc((pending.dispatched_at - pending.arrival) * 1e6)
            if pending.answered:
                continue
            if isinstance(output, str):
                pending.future.set_exception(ModelFailed(f"model '{self.deployment.name}': {output}"))
            else:
                pending.future.set_result(output)

    def _device_slot(
        self, instance: WorkerHandle, live: list[Pending], rows: int
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """The device of ``instance``, as the arbiter grants it among the models sharing it."""
        if self._arbiter is None:
            return contextlib.nullcontext()
        candidate = Candidate(
            model=self.deployment.name,
            earliest_deadline=min(p.deadline for p in live),
            run_s=self._latency.predict(rows),
            swap_in_s=0.0,  # the model is loaded on ``instance`` before any batch is sent
            requests=len(live),
        )
        return self._arbiter.slot(instance.id, candidate)

    async def warm_up(self, instance: WorkerHandle, sizes: tuple[int, ...]) -> int:
        """Run one batch of zeros per size in ``sizes`` on ``instance``; fold the times in. Returns batches run.

        A size the model rejects ends the sweep: warm-up only seeds the latency model, and the model's
        own traffic keeps refining it. On an instance that has run nothing since its load, the first
        size runs twice: the first run is not a steady one, and is not counted. An answer that breaks
        the model's declared outputs (a wrong shape or datatype, one row for several) is a broken
        model, not a rejected size: ModelFailed.
        """
        measured = 0
        first = (sizes[0],) if sizes and instance.id in self._fresh else ()
        for index, size in enumerate((*first, *sizes)):
            inputs = _zeros(self.deployment, size)
            if inputs is None:
                break
            try:
                result = await instance.infer(self.deployment.key, [inputs])
            except EmberError:
                break
            failed = [out for out in result.outputs if isinstance(out, str)]
            if any(out.startswith(ANSWER_MISMATCH) for out in failed):
                raise ModelFailed(f"its warm-up batch of {size} zero rows failed: {failed[0]}")
            if failed:
                break
            self._observe(instance.id, size, result.compute_s, warmup=True)
            measured += index >= len(first)
        return measured

    def _observe(self, instance_id: str, rows: int, seconds: float, warmup: bool = False) -> None:
        """Fold a measured batch into the latency model, unless it was its instance's first since a load."""
        if instance_id in self._fresh:
            self._fresh.discard(instance_id)
            return
        self._latency = self._latency.observe_batch(rows, seconds, self._clock.now(), warmup=warmup)

    def _count_refusal(self) -> None:
        """Count a request refused at admission: a failure against the SLO, as one refused later is."""
        self._stats.requests += 1
        self._stats.failed += 1
        self._slo_total.inc()
        self._metrics.failure.labels(*self._labels, DeadlineUnmeetable.__name__).inc()
        attainment = self._stats.slo_attainment
        if attainment is not None:
            self._slo_attainment.set(attainment)

    def _account(self, pending: Pending) -> None:
        now = self._clock.now()
        ok = pending.future.done() and not pending.future.cancelled() and pending.future.exception() is None
        self._slo_total.inc()
        self._latency_seconds.observe(now - pending.arrival)
        if ok:
            self._stats.succeeded += 1
            self._success.inc()
            self._request_us.inc((now - pending.arrival) * 1e6)
            if now - pending.arrival <= self.deployment.slo_ms / 1000.0:
                self._stats.slo_met += 1
                self._slo_met.inc()
        else:
            self._stats.failed += 1
            reason = "CANCELLED"
            if pending.future.done() and not pending.future.cancelled():
                error = pending.future.exception()
                reason = type(error).__name__ if error is not None else "UNKNOWN"
            self._metrics.failure.labels(*self._labels, reason).inc()
        attainment = self._stats.slo_attainment
        if attainment is not None:
            self._slo_attainment.set(attainment)

    async def _wait_until(self, future: asyncio.Future[Arrays], deadline: float) -> Arrays:
        timer: asyncio.Future[Any] = asyncio.ensure_future(self._clock.sleep(deadline - self._clock.now()))
        waiting: list[asyncio.Future[Any]] = [future, timer]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        if not future.done():
            future.set_exception(_timed_out(self.deployment.name))
        return future.result()

    async def _wait_change(self, wake_at: float | None, also: asyncio.Future[Any] | None = None) -> None:
        """Wait until the queue changes, ``wake_at`` comes, or ``also`` is done."""
        if wake_at is None and also is None:
            await self.queue.changed.wait()
            return
        changed: asyncio.Future[Any] = asyncio.ensure_future(self.queue.changed.wait())
        mine = [changed]
        if wake_at is not None:
            mine.append(asyncio.ensure_future(self._clock.sleep(wake_at - self._clock.now())))
        try:
            await asyncio.wait([*mine, *([also] if also is not None else [])], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in mine:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _zeros(deployment: Deployment, rows: int) -> Arrays | None:
    """A batch of ``rows`` zero rows (empty strings for BYTES) shaped as the model declares; None if it cannot be."""
    out: Arrays = {}
    for spec in deployment.metadata.inputs:
        shape = (rows, *(1 if d == -1 else d for d in spec.shape[1:]))
        dtype = DATATYPES.get(spec.datatype)
        if dtype is None or math.prod(shape) > 1 << 22:
            return None
        if spec.datatype == "BYTES":
            out[spec.name] = np.full(shape, b"", dtype=object)
        else:
            out[spec.name] = np.zeros(shape, dtype=dtype)
    return out or None


def _seconds(seconds: float) -> str:
    """A delay as people say it: whole seconds, rounded up as ``Retry-After`` is (at least 1 s)."""
    return f"{max(1, math.ceil(seconds))} s"


def _answer_error(pending: Pending, error: EmberError) -> None:
    if not pending.answered:
        pending.future.set_exception(error)


def _timed_out(model: str) -> DeadlineUnmeetable:
    return DeadlineUnmeetable(
        f"model '{model}' could not answer within the request's timeout; retry with a longer timeout "
        "or after the Retry-After delay",
        retry_after_s=1.0,
    )
