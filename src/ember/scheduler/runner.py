"""The batching loop of one model: admit, wait for the policy, dispatch, answer.

``submit`` admits a request into the model's bounded queue (or refuses it at once) and waits for
its answer. ``run`` is the loop: it makes sure the model is hot (the promoter may have to bring it
up from a colder tier; requests wait, they are not dropped), asks the batching policy what to send,
and sends it to the model's instance. A batch lost with its worker is retried once, then answered
with an error; every admitted request gets an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

from ember.clock import Clock
from ember.cluster.base import WorkerHandle
from ember.config import Deployment
from ember.errors import DeadlineUnmeetable, EmberError, InternalError, ModelFailed, WorkerCrashed
from ember.metrics import Metrics
from ember.policies.batching import BatchPolicy, QueueSnapshot
from ember.policies.latency import LatencyModel
from ember.scheduler.queue import ModelQueue, Pending
from ember.worker.protocol import Arrays, rows_of

__all__ = ["ModelRunner", "Promoter", "RunnerStats"]


class Promoter(Protocol):
    async def ensure_hot(self, name: str) -> WorkerHandle:
        """The instance that serves ``name``, promoting the model to hot first if it is not."""
        ...

    def lost_instance(self, name: str, worker: WorkerHandle) -> None: ...


@dataclass
class RunnerStats:
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
    ) -> None:
        self.deployment = deployment
        self.queue = ModelQueue(deployment.name, deployment.max_queue)
        self.stats = RunnerStats(last_active=clock.now())
        self.running = 0
        self._clock = clock
        self._policy = policy
        self._promoter = promoter
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
        self._slo_total = metrics.slo_total.labels(name)
        self._latency = metrics.latency.labels(name)
        self._slo_met = metrics.slo_met.labels(name)
        self._slo_attainment = metrics.slo_attainment.labels(name)
        self.latency = LatencyModel()
        self._in_flight: list[Pending] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"ember-runner-{self.deployment.name}")

    async def stop(self, error: EmberError) -> None:
        """Stop the loop and answer every request it holds, queued or running, with ``error``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.fail_all(error)

    @property
    def busy(self) -> bool:
        return bool(self.running or len(self.queue))

    async def submit(self, inputs: Arrays, timeout_s: float | None = None) -> Arrays:
        now = self._clock.now()
        slo_s = self.deployment.slo_ms / 1000.0
        hard = timeout_s is not None
        deadline = now + (timeout_s if timeout_s is not None else slo_s)
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        pending = Pending(inputs, rows_of(inputs), now, deadline, hard, future)
        self.queue.put(pending)  # raises Overloaded when full: nothing was admitted
        self.stats.requests += 1
        self.stats.last_active = now
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

    async def run(self) -> None:
        while True:
            if not len(self.queue):
                self.queue.changed.clear()
                await self.queue.changed.wait()
                continue
            try:
                instance = await self._promoter.ensure_hot(self.deployment.name)
            except EmberError as exc:
                for pending in self.queue.drain():
                    _answer_error(pending, exc)
                continue
            now = self._clock.now()
            snapshot = QueueSnapshot(
                now=now,
                queued=self.queue.view(self.deployment.max_batch_size),
                instance_idle=True,
                max_batch_size=self.deployment.max_batch_size,
                latency=self.latency,
            )
            decision = self._policy.decide(snapshot)
            if decision.take == 0:
                self.queue.changed.clear()
                await self._wait_change(decision.wake_at)
                continue
            await self._dispatch(instance, self.queue.take(decision.take))

    def fail_all(self, error: EmberError) -> None:
        for pending in [*self._in_flight, *self.queue.drain()]:
            _answer_error(pending, error)

    async def _dispatch(self, instance: WorkerHandle, batch: list[Pending]) -> None:
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
        self._in_flight = live
        try:
            result = await instance.infer(self.deployment.key, [p.inputs for p in live])
            self._in_flight = []
        except WorkerCrashed as exc:
            self._in_flight = []
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
            self._in_flight = []
            for pending in live:
                _answer_error(pending, exc)
            return
        except Exception as exc:  # a bug in Ember: answer, then let it be seen
            for pending in live:
                _answer_error(pending, InternalError(f"internal error while running a batch: {exc!r}"))
            raise
        finally:
            # On cancellation ``_in_flight`` keeps the batch, so that ``stop`` answers it.
            self.running -= len(live)
            self.stats.last_active = self._clock.now()
        rows = sum(p.rows for p in live)
        self.stats.batches += 1
        self.stats.rows += rows
        self.latency = self.latency.observe_batch(rows, result.compute_s)
        self._exec_count.inc()
        self._count.inc(rows)
        self._compute_us.inc(result.compute_s * 1e6)
        for pending, output in zip(live, result.outputs, strict=True):
            self._queue_us.inc((pending.dispatched_at - pending.arrival) * 1e6)
            if pending.answered:
                continue
            if isinstance(output, str):
                pending.future.set_exception(ModelFailed(f"model '{self.deployment.name}': {output}"))
            else:
                pending.future.set_result(output)

    def _account(self, pending: Pending) -> None:
        now = self._clock.now()
        ok = pending.future.done() and not pending.future.cancelled() and pending.future.exception() is None
        self._slo_total.inc()
        self._latency.observe(now - pending.arrival)
        if ok:
            self.stats.succeeded += 1
            self._success.inc()
            if now - pending.arrival <= self.deployment.slo_ms / 1000.0:
                self.stats.slo_met += 1
                self._slo_met.inc()
        else:
            self.stats.failed += 1
            reason = "CANCELLED"
            if pending.future.done() and not pending.future.cancelled():
                error = pending.future.exception()
                reason = type(error).__name__ if error is not None else "UNKNOWN"
            self._metrics.failure.labels(*self._labels, reason).inc()
        attainment = self.stats.slo_attainment
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

    async def _wait_change(self, wake_at: float | None) -> None:
        if wake_at is None:
            await self.queue.changed.wait()
            return
        changed: asyncio.Future[Any] = asyncio.ensure_future(self.queue.changed.wait())
        timer: asyncio.Future[Any] = asyncio.ensure_future(self._clock.sleep(wake_at - self._clock.now()))
        try:
            await asyncio.wait([changed, timer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (changed, timer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _answer_error(pending: Pending, error: EmberError) -> None:
    if not pending.answered:
        pending.future.set_exception(error)


def _timed_out(model: str) -> DeadlineUnmeetable:
    return DeadlineUnmeetable(
        f"model '{model}' could not answer within the request's timeout; retry with a longer timeout "
        "or after the Retry-After delay",
        retry_after_s=1.0,
    )
