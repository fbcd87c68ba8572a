"""The discrete-event engine: a workload, a modeled cluster and one policy set, in virtual time.

Time is the engine's own float: events (a load done, a batch done, a batching wake-up, a control
tick, a keep-alive expiry) sit in a heap ordered by ``(time, sequence)`` and arrivals stream in
from the workload; at equal times events go before arrivals. Every random draw comes from one
``random.Random(seed)`` taken in event order, so a run is a pure function of its inputs: the same
scenario and seed give the same event log, bit for bit.

The engine is the loop of DESIGN.md principle 1: it builds each policy's snapshot, calls it and
applies the decision, and folds measurements back into the per-model state the policies keep
(``LatencyModel``, ``IdleHistogram``, ``ScaleState``). A device runs one batch at a time: when it
frees, each resident model with queued requests asks its batching policy for a batch and the device
scheduler picks which one runs. Copies of weights onto a device are serialised (one host link), in
the order their loads begin, and overlap its compute; a plain function's process start, before its
copy, overlaps everything (``ClusterSpec.load_phases``). The policies' inputs come from the state
layer's builders (``ember.state``), the same ones the server's runner and controller use.

This module is the loop and the requests' path; the rest of the engine is split by concept, as
functions of the :class:`Engine` they act on: ``instances.py`` (how many instances, where, what
leaves), ``control.py`` (the control ticks on the grid ``k * tick_s``), ``faas.py`` (requests
bound to instances under a router, exact keep-alive expiry events) and ``generative.py`` (generative
requests: each instance's continuous batch, its steps on the device, a ``STEP`` event per step).
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import random
from collections import OrderedDict
from typing import Any

from ember.errors import InvalidInput
from ember.metering import Holding, accrue
from ember.policies import (
    Bandwidths,
    Candidate,
    admission,
)
from ember.sim.cluster import ClusterSpec, Loader, ModelSpec
from ember.sim.control import retire, tick
from ember.sim.faas import ask_keepalive, bind, expire, run_bound
from ember.sim.generative import STEP, GenRun, Step, arrive, propose, run_chosen, step_done
from ember.sim.instances import keep_warm, pin_all, scale
from ember.sim.policysets import PolicySet
from ember.sim.state import COOL as _COOL
from ember.sim.state import DONE, EXPIRE, LOAD, STAGING_BYTES, TICK, WAKE, ClassUsage, Request, RunResult
from ember.sim.state import WARM as _WARM
from ember.sim.state import Device as _Device
from ember.sim.state import Instance as _Instance
from ember.sim.state import Model as _Model
from ember.sim.workload import Workload
from ember.state import queue_snapshot, start_delay_s

__all__ = ["Engine", "RunResult"]

#: When a device frees, at most this many models (those due first) propose a batch to its scheduler.
MAX_CANDIDATES = 8


class Engine:
    """One run of one policy set. ``Engine(...).run()`` returns a :class:`RunResult`."""

    def __init__(
        self,
        cluster: ClusterSpec,
        models: tuple[ModelSpec, ...],
        workload: Workload,
        policies: PolicySet,
        *,
        duration_s: float,
        seed: int,
        tick_s: float = 1.0,
        warm_tick_s: float = 60.0,
        record_events: bool = False,
        start_warm: bool = False,
    ) -> None:
        if tick_s <= 0 or warm_tick_s <= 0 or duration_s <= 0:
            raise InvalidInput("tick_s, warm_tick_s and duration_s must be positive")
        too_big = next((m for m in models if m.device_bytes > cluster.device_memory_bytes), None)
        if too_big is not None:
            raise InvalidInput(
                f"model '{too_big.name}' ({too_big.device_bytes / 1e9:.1f} GB"
                f"{' with its KV cache' if too_big.device_bytes > too_big.weights_bytes else ''})"
                " does not fit a device of"
                f" {cluster.device_memory_bytes / 1e9:.1f} GB; give the cluster more device memory"
            )
        self.cluster, self.workload, self.p = cluster, workload, policies
        self.duration_s, self.tick_s = duration_s, tick_s
        self.warm_every = max(1, round(warm_tick_s / tick_s))
        self.window_s = self.warm_every * tick_s
        self.rng = random.Random(seed)
        self.learns = policies.learns
        self.models = [_Model(i, s, policies.max_batch_size or s.max_batch_size) for i, s in enumerate(models)]
        self.by_name = {m.name: m for m in self.models}
        per = cluster.devices_per_node
        self.devices = [_Device(i, i // per, cluster.device_memory_bytes) for i in range(cluster.num_devices)]
        self.by_id = {d.id: d for d in self.devices}
        #: Devices with at least one instance, and the empty ones as a heap by id (stale entries, of
        #: devices no longer empty, are dropped when met): see ``instances.candidate_devices``.
        self.occupied: dict[int, _Device] = {}
        self.empty = [(d.id, d.idx) for d in self.devices]
        heapq.heapify(self.empty)
        cal = cluster.calibration
        self.bandwidths = Bandwidths(cal.disk_read_bytes_per_s, cal.h2d_pinned_bytes_per_s, 0.0)
        self.warm: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(cluster.nodes)]
        self.warm_bytes = [0] * cluster.nodes
        self.instances: dict[str, _Instance] = {}
        self.blocked: dict[int, _Model] = {}
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.record = record_events
        self.events: list[tuple[Any, ...]] = []
        self.latencies: list[float] = []
        self.occupancy: list[tuple[float, int, int, int]] = []
        #: Generative requests: queued sequences, each instance's batch, what they measured (``generative.py``).
        self.gen = GenRun()
        self.met = self.refused = self.batches = self.outstanding = 0
        self.cold = {_WARM.value: 0, _COOL.value: 0}
        self.missed: dict[str, int] = {}
        self.tick_armed = False
        self.tick_n = 0
        # Integrals over time: devices held, bytes resident, instances up, warm copies; bytes loaded.
        self._t_acc = self._t_host = 0.0
        self.held = self.used_total = 0
        self.gpu_s = self.byte_s = self.inst_s = self.host_gb_s = 0.0
        self.loaded_bytes = self.loaded_from_disk = 0
        # The same per model class: requests, weights on devices and warm copies (bytes now, integrals).
        self.classes = list(dict.fromkeys(s.model_class for s in models))
        at = {name: i for i, name in enumerate(self.classes)}
        self.class_of = [at[s.model_class] for s in models]
        self.class_requests = [0] * len(self.classes)
        self.class_used, self.class_warm = [0] * len(self.classes), [0] * len(self.classes)
        self.class_byte_s, self.class_host_gb_s = [0.0] * len(self.classes), [0.0] * len(self.classes)
        if start_warm and policies.warm_tier:
            for node in range(cluster.nodes):
                for m in self.models:
                    keep_warm(self, node, m)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> RunResult:
        # The loop allocates millions of short-lived tuples and frozen values, and no reference cycles
        # that outlive an event: the cyclic collector's passes over them cost 10-20% of a run.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if collecting:
                gc.enable()

    def _run(self) -> RunResult:
        if self.p.pinned:
            pin_all(self)
        self._arm_tick()
        times, owners, sizes = self.workload.times, self.workload.models, self.workload.sizes
        outputs = self.workload.outputs
        n, i, heap = len(times), 0, self.heap
        models, pop = self.models, heapq.heappop
        while True:
            t_next = times[i] if i < n else math.inf
            if heap and heap[0][0] <= t_next:
                t, _, kind, obj = pop(heap)
                self.now = t
                if kind == DONE:
                    self._done(obj)
                elif kind == LOAD:
                    self._loaded(obj)
                elif kind == WAKE:
                    self._wake(obj)
                elif kind == EXPIRE:
                    expire(self, obj)
                elif kind == STEP:
                    step_done(self, obj)
                else:
                    tick(self, obj)
            elif i < n:
                self.now = t_next
                m = models[owners[i]]
                if m.spec.generation is None:
                    self._arrive(m, sizes[i])
                else:
                    arrive(self, m, sizes[i], outputs[i])
                i += 1
            else:
                break
        end = max(self.duration_s, self.now)
        self.now = end
        self._account()
        self._account_host()
        pinned_warm = self.p.loader is Loader.EMBER  # Ember's warm arena is registered as pinned memory
        staging = len(self.devices) * STAGING_BYTES / 1e9 * end if self.p.loader is Loader.EMBER else 0.0
        classes = {
            name: ClassUsage(self.class_requests[i], self.class_byte_s[i] / 1e9, self.class_host_gb_s[i])
            for i, name in enumerate(self.classes)
        }
        return RunResult(
            self.p.name,
            end,
            self.latencies,
            self.met,
            self.refused,
            dict(self.cold),
            self.gpu_s,
            self.byte_s,
            self.inst_s,
            len(self.devices),
            self.batches,
            self.missed,
            self.events,
            self.occupancy,
            self.host_gb_s,
            self.loaded_bytes,
            self.loaded_from_disk,
            (self.host_gb_s if pinned_warm else 0.0) + staging,
            0.0 if pinned_warm else self.host_gb_s,
            staging,
            classes,
            generative=self.gen.stats if any(m.spec.generation for m in self.models) else None,
        )

    def _push(self, t: float, kind: int, obj: Any) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, obj))

    def _arm_tick(self) -> None:
        """Arm the next control tick on the grid ``k * tick_s`` unless one is armed (or, with exact
        keep-alive events, arm a sooner one: the next on the ``warm_tick_s`` grid, or on the ``tick_s``
        grid while a model waits for room; the later one is then stale)."""
        if self.tick_armed and not self.p.exact_keepalive:
            return
        k = math.floor(self.now / self.tick_s) + 1
        if k * self.tick_s <= self.now:  # now / tick_s rounded down a whole tick (tick_s = 0.1, now = 4.3)
            k += 1
        if self.p.exact_keepalive and not self.blocked:
            k = -(-k // self.warm_every) * self.warm_every
        if self.tick_armed and k >= self.tick_n:
            return
        self.tick_armed, self.tick_n = True, k
        self._push(k * self.tick_s, TICK, k)

    # -- requests ---------------------------------------------------------------------------------

    def _arrive(self, m: _Model, rows: int) -> None:
        now = self.now
        m.arrivals += 1
        self.class_requests[self.class_of[m.idx]] += 1
        if self.learns and not m.queue and not m.running:
            m.histogram = m.histogram.observe(now - m.last_used)  # an idle period ends
            m.prewarmed = False
        deadline = now + m.slo_s
        if self.p.admission:
            delay = self._start_delay(m)
            idle = delay == 0.0 and not m.queue and not m.running and bool(m.instances)
            decided = admission(now, deadline, rows, m.latency, delay, idle=idle)
        if self.p.admission and decided.verdict == "refuse":
            if self.learns and decided.too_slow:
                m.latency = m.latency.observe_refusal(rows)
            self.refused += 1
            if self.record:
                self.events.append((now, "refuse", m.name))
            scale(self, m)
            return
        if self.p.router is not None:
            self.outstanding += 1
            bind(self, m, (deadline, rows, now))
            return
        m.queue.append((deadline, rows, now))
        if self.p.admission and decided.verdict == "probe":
            m.probing.add((deadline, rows, now))
        m.version += 1
        self.outstanding += 1
        if len(m.queue) + m.running > len(m.instances):  # more work than instances: the autoscaler may act now
            scale(self, m)
        for inst in m.instances:
            dev = inst.device
            dev.pending[m.idx] = m
            if not dev.busy and inst.ready_at <= now:
                self._offer(dev)

    def _start_delay(self, m: _Model) -> float:
        """Seconds before a batch of ``m`` could start: 0 when an instance is up, else the soonest load
        (the engine knows when a running load ends)."""
        if not m.instances:
            warm = self.p.warm_tier and any(m.idx in w for w in self.warm)
            load_s = m.latency.predict_load(_WARM if warm else _COOL, m.spec.weights_bytes, self.bandwidths)
            return start_delay_s(self.now, load_s=load_s)
        instances = m.instances
        ready = instances[0].ready_at if len(instances) == 1 else min(x.ready_at for x in instances)
        return start_delay_s(self.now, loading_until=ready)

    def _offer(self, dev: _Device) -> None:
        """The device is free: every resident model with work proposes a batch; the device scheduler picks one."""
        if dev.busy:
            return
        if dev.waiting:
            run_bound(self, dev)
            return
        if not dev.pending:
            return
        now, batcher = self.now, self.p.batcher
        proposals: list[tuple[_Model, _Instance, int, int]] = []
        steps: list[Step] = []
        pending = list(dev.pending.values())
        if len(pending) > MAX_CANDIDATES:  # ask the models due first; a busy device may hold hundreds
            for m in pending:
                if not m.queue and not m.running:
                    del dev.pending[m.idx]
            due = [(m.queue[0][0] if m.queue else now, m.idx, m) for m in dev.pending.values()]
            pending = [m for _, _, m in heapq.nsmallest(MAX_CANDIDATES, due)]
        for m in pending:
            if len(proposals) + len(steps) == MAX_CANDIDATES:
                break
            if m.spec.generation is not None:  # a generative model proposes its instance's next step
                mine = propose(self, m, dev)
                if not mine:
                    del dev.pending[m.idx]
                steps += mine
                continue
            q = m.queue
            inst = None
            if q:
                for x in m.instances:
                    if x.device is dev and x.ready_at <= now:
                        inst = x
                        break
            if inst is None:
                del dev.pending[m.idx]  # put back on the next arrival, or when an instance here is ready
                continue
            while True:  # refusals first, then the batch decided on the queue without them
                decision = m.decision
                if now >= decision.valid_until or m.decided[0] != m.version or m.decided[1] is not m.latency:
                    queued = tuple(q) if len(q) <= m.max_batch else tuple(itertools.islice(q, m.max_batch + 1))
                    probes = tuple(r in m.probing for r in queued) if m.probing else ()
                    decision = batcher.decide(queue_snapshot(now, queued, m.latency, m.max_batch, probes=probes))
                    m.decision, m.decided, m.candidate = decision, (m.version, m.latency), None
                if not decision.refuse:
                    break
                self._refuse(m, decision.refuse)
                if not q:
                    break
            if decision.take > 0 and q:
                proposals.append((m, inst, min(decision.take, len(q)), decision.rows))
            elif decision.wake_at is not None and (m.wake_at is None or decision.wake_at < m.wake_at):
                m.wake_at = decision.wake_at
                self._push(decision.wake_at, WAKE, m)
            if not q:
                dev.pending.pop(m.idx, None)
        if steps:
            run_chosen(self, dev, steps, proposals)
            return
        if not proposals:
            return
        if len(proposals) > 1:
            by_name = {m.name: (m, inst, take) for m, inst, take, _ in proposals}
            candidates = tuple(self._candidate(m, take, rows) for m, _, take, rows in proposals)
            chosen = self.p.devices.choose(now, candidates)
            if chosen is None:
                return
            m, inst, take = by_name[chosen.model]
        else:
            m, inst, take, _ = proposals[0]
        q = m.queue
        m.version += 1
        self._start_batch(dev, inst, [q.popleft() for _ in range(take)])

    def _candidate(self, m: _Model, take: int, rows: int) -> Candidate:
        """The device scheduler's view of ``m``'s next batch, kept as long as its batching decision."""
        candidate = m.candidate
        if candidate is None or candidate.requests != take:
            q = m.queue
            run_s = m.latency.predict(rows or sum(q[j][1] for j in range(take)))
            candidate = m.candidate = Candidate(m.name, q[0][0], run_s, 0.0, take)
        return candidate

    def _refuse(self, m: _Model, positions: tuple[int, ...]) -> None:
        m.version += 1
        for j in sorted(set(positions), reverse=True):
            if j < len(m.queue):
                m.probing.discard(m.queue[j])
                del m.queue[j]
                self.refused += 1
                self.outstanding -= 1
        if self.record:
            self.events.append((self.now, "refuse", m.name, len(positions)))

    def _start_batch(self, dev: _Device, inst: _Instance, batch: list[Request]) -> None:
        m = inst.model
        rows = sum(r[1] for r in batch)
        if m.probing:
            m.probing.difference_update(batch)
        seconds = m.spec.batch_s(rows, self.rng)
        dev.busy, inst.running = True, True
        dev.running_bytes = inst.bytes
        inst.busy_s += seconds
        m.running += len(batch)
        self.batches += 1
        if self.record:
            self.events.append((self.now, "batch", inst.key, dev.id, len(batch), rows, seconds))
        self._push(self.now + seconds, DONE, (inst, batch, rows, seconds))

    def _done(self, obj: tuple[_Instance, list[Request], int, float]) -> None:
        inst, batch, rows, seconds = obj
        now, m, dev = self.now, inst.model, inst.device
        self._answer(inst, batch)
        if self.learns:
            m.latency = m.latency.observe_batch(rows, seconds, now)
        m.running -= len(batch)
        inst.running, inst.last_used, m.last_used = False, now, now
        inst.bound = None
        dev.busy, dev.running_bytes = False, 0
        if inst.retiring and retire(self, inst):
            self._offer(dev)
            return
        if m.queue:
            dev.pending[m.idx] = m
        self._offer(dev)
        if self.p.exact_keepalive and not inst.running:
            ask_keepalive(self, inst, 0.0)

    def _answer(self, inst: _Instance, batch: list[Request]) -> None:
        """Count ``batch`` answered now by ``inst``: latency, SLO, and cold when it waited for the load."""
        now, m = self.now, inst.model
        lat, cold, missed = self.latencies, self.cold, self.missed
        for deadline, _, arrival in batch:
            lat.append(now - arrival)
            if now <= deadline:
                self.met += 1
            else:
                missed[m.name] = missed.get(m.name, 0) + 1
            if arrival < inst.ready_at:
                cold[inst.source.value] += 1
        self.outstanding -= len(batch)

    def _wake(self, m: _Model) -> None:
        m.wake_at = None
        for inst in m.instances:
            inst.device.pending[m.idx] = m
            self._offer(inst.device)

    def _loaded(self, inst: _Instance) -> None:
        dev, m = inst.device, inst.model
        dev.loading_bytes -= inst.bytes
        if self.learns:
            m.latency = m.latency.observe_load(inst.source, inst.load_s)
        if self.record:
            self.events.append((self.now, "ready", inst.key, dev.id))
        old = inst.replaces
        if old is not None:
            inst.replaces = None
            if old.key in self.instances and not old.running:
                retire(self, old)
        bound = inst.bound
        if bound is not None:
            if m.spec.cold_service is not None:  # the load was the bound request's whole service
                inst.bound = None
                inst.last_used = m.last_used = self.now
                self._answer(inst, [bound])
                if self.record:
                    self.events.append((self.now, "served_cold", inst.key, dev.id))
            else:
                dev.waiting.append(inst)
        if m.queue:
            dev.pending[m.idx] = m
        self._offer(dev)
        if self.p.exact_keepalive and not inst.running and inst.bound is None:
            ask_keepalive(self, inst, 0.0)

    def _account(self) -> None:
        dt = self.now - self._t_acc
        if dt > 0:
            self.gpu_s += self.held * dt
            self.byte_s += self.used_total * dt
            self.inst_s += len(self.instances) * dt
            for g, used in enumerate(self.class_used):
                if used:
                    self.class_byte_s[g] += used * dt
            self._t_acc = self.now

    def _account_host(self) -> None:
        """Charge the warm copies held since the last change (the meter's rule, ``ember.metering.accrue``).

        Its own clock, apart from ``_account``'s: billing host memory splits no other integral.
        """
        dt = self.now - self._t_host
        if dt > 0:
            self.host_gb_s += accrue(Holding(host_bytes=sum(self.warm_bytes)), dt).host_gb_seconds
            for g, held in enumerate(self.class_warm):
                if held:
                    self.class_host_gb_s[g] += accrue(Holding(host_bytes=held), dt).host_gb_seconds
            self._t_host = self.now
