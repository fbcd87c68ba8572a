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
scheduler picks which one runs. Loads on a device are serialised (one host link) and overlap its
compute. Control ticks run on the grid ``k * tick_s`` while anything is up: the hot keep-alive every
tick; the warm tier's keep-alive and pre-warm, and the autoscaler, every ``warm_tick_s``.

A set with a router (classic FaaS) binds each request to one instance instead of a shared queue,
and a set with ``exact_keepalive`` asks its keep-alive at the exact idle times it names (an expiry
event) rather than on ticks: the last section of :class:`Engine`.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import random
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from ember.errors import InvalidInput
from ember.policies import (
    DEFAULT_TENANT,
    Bandwidths,
    Candidate,
    Demotion,
    EvictionCandidate,
    KeepAlive,
    ModelView,
    PlacementRequest,
    Resident,
    ScaleView,
    WorkerView,
    admission,
    device_share,
)
from ember.policies.baselines import IdleInstance
from ember.policies.tiers import Tier
from ember.sim.cluster import ClusterSpec, ModelSpec
from ember.sim.policysets import PolicySet
from ember.sim.state import Device as _Device
from ember.sim.state import Instance as _Instance
from ember.sim.state import Model as _Model
from ember.sim.state import Request, RunResult
from ember.sim.workload import Workload
from ember.state import model_view, queue_snapshot, start_delay_s

__all__ = ["Engine", "RunResult"]

_LOAD, _DONE, _WAKE, _TICK, _EXPIRE = 0, 1, 2, 3, 4
#: When a device frees, at most this many models (those due first) propose a batch to its scheduler.
MAX_CANDIDATES = 8
#: A node whose host memory fills frees 1/WARM_SLACK of it beyond what it needs.
WARM_SLACK = 10
_HOT, _WARM, _COOL = Tier.HOT, Tier.WARM, Tier.COOL


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
        too_big = next((m for m in models if m.weights_bytes > cluster.device_memory_bytes), None)
        if too_big is not None:
            raise InvalidInput(
                f"model '{too_big.name}' ({too_big.weights_bytes / 1e9:.1f} GB) does not fit a device of"
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
        #: devices no longer empty, are dropped when met): see ``_hosts``.
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
        self.met = self.refused = self.batches = self.outstanding = 0
        self.cold = {_WARM.value: 0, _COOL.value: 0}
        self.missed: dict[str, int] = {}
        self.tick_armed = False
        self.tick_n = 0
        # Integrals over time: devices held, bytes resident, instances up.
        self._t_acc = 0.0
        self.held = self.used_total = 0
        self.gpu_s = self.byte_s = self.inst_s = 0.0
        if start_warm and policies.warm_tier:
            for node in range(cluster.nodes):
                for m in self.models:
                    self._keep_warm(node, m)

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
            self._pin_all()
        self._arm_tick()
        times, owners, sizes = self.workload.times, self.workload.models, self.workload.sizes
        n, i, heap = len(times), 0, self.heap
        models, pop = self.models, heapq.heappop
        while True:
            t_next = times[i] if i < n else math.inf
            if heap and heap[0][0] <= t_next:
                t, _, kind, obj = pop(heap)
                self.now = t
                if kind == _DONE:
                    self._done(obj)
                elif kind == _LOAD:
                    self._loaded(obj)
                elif kind == _WAKE:
                    self._wake(obj)
                elif kind == _EXPIRE:
                    self._expire(obj)
                else:
                    self._tick(obj)
            elif i < n:
                self.now = t_next
                self._arrive(models[owners[i]], sizes[i])
                i += 1
            else:
                break
        end = max(self.duration_s, self.now)
        self.now = end
        self._account()
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
        self._push(k * self.tick_s, _TICK, k)

    # -- requests ---------------------------------------------------------------------------------

    def _arrive(self, m: _Model, rows: int) -> None:
        now = self.now
        m.arrivals += 1
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
            self._scale(m)
            return
        if self.p.router is not None:
            self.outstanding += 1
            self._bind(m, (deadline, rows, now))
            return
        m.queue.append((deadline, rows, now))
        if self.p.admission and decided.verdict == "probe":
            m.probing.add((deadline, rows, now))
        m.version += 1
        self.outstanding += 1
        if len(m.queue) + m.running > len(m.instances):  # more work than instances: the autoscaler may act now
            self._scale(m)
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
            self._run_bound(dev)
            return
        if not dev.pending:
            return
        now, batcher = self.now, self.p.batcher
        proposals: list[tuple[_Model, _Instance, int, int]] = []
        pending = list(dev.pending.values())
        if len(pending) > MAX_CANDIDATES:  # ask the models due first; a busy device may hold hundreds
            for m in pending:
                if not m.queue:
                    del dev.pending[m.idx]
            due = [(m.queue[0][0], m.idx, m) for m in dev.pending.values()]
            pending = [m for _, _, m in heapq.nsmallest(MAX_CANDIDATES, due)]
        for m in pending:
            if len(proposals) == MAX_CANDIDATES:
                break
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
                self._push(decision.wake_at, _WAKE, m)
            if not q:
                dev.pending.pop(m.idx, None)
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
        self._push(self.now + seconds, _DONE, (inst, batch, rows, seconds))

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
        if inst.retiring and self._retire(inst):
            self._offer(dev)
            return
        if m.queue:
            dev.pending[m.idx] = m
        self._offer(dev)
        if self.p.exact_keepalive and not inst.running:
            self._ask_keepalive(inst, 0.0)

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
                self._retire(old)
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
            self._ask_keepalive(inst, 0.0)

    # -- instances --------------------------------------------------------------------------------

    def _scale(self, m: _Model) -> None:
        rate = max(m.rate, m.arrivals / self.window_s)
        queued = len(m.queue) + m.running
        if self.p.router is not None:  # and the bound requests waiting for their instance's load or device
            queued += sum(1 for x in m.instances if x.bound is not None and not x.running)
        view = ScaleView(m.name, rate, queued, len(m.instances), m.slo_s, m.max_batch, m.latency, 0, len(self.devices))
        want, m.scale_state = self.p.scaler.decide(self.now, view, m.scale_state)
        while len(m.instances) < want:
            if not self._start_instance(m):
                self.blocked[m.idx] = m
                self._arm_tick()
                return
        self.blocked.pop(m.idx, None)
        if want < len(m.instances):
            idle = [x for x in m.instances if not x.running and x.ready_at <= self.now and x.bound is None]
            idle.sort(key=lambda x: x.last_used)
            for inst in idle[: len(m.instances) - want]:
                self._remove(inst, _WARM)

    def _start_instance(self, m: _Model, preloaded: bool = False) -> _Instance | None:
        need = m.spec.weights_bytes
        demand = 0.0 if preloaded else device_share(max(m.rate, m.arrivals / self.window_s), m.latency, m.max_batch)
        hosts = self._hosts(m, need)
        place = self.p.placement.choose
        request = PlacementRequest(m.name, need, "cuda", DEFAULT_TENANT, demand, m.slo_s, m.latency.predict(1))
        chosen = place(request, tuple(self._view(d, m) for d in hosts))
        if chosen is None:  # no room anywhere: choose again as if every idle resident could be evicted
            chosen = place(request, tuple(self._view(d, m, True) for d in hosts))
            if chosen is None:
                return None
        return self._place(m, self.by_id[chosen], demand, preloaded)

    def _hosts(self, m: _Model, need: int) -> list[_Device]:
        """The devices placement is asked about for ``m``: every occupied one that could make room, and
        of the empty ones only the first by id, plus the first on each node where ``m`` is warm.

        Empty devices differ in nothing a placement policy reads but their id and whether ``m`` is
        warm on their node, so the policies' choice is the same as over every device, at the cost of
        the occupied ones only: a 1,000-device cluster mostly sits empty.
        """
        hosts = [d for d in self.occupied.values() if d.capacity - d.loading_bytes - d.running_bytes >= need]
        empty, devices = self.empty, self.devices
        while empty and devices[empty[0][1]].instances:
            heapq.heappop(empty)
        if not empty:
            return hosts
        first = devices[empty[0][1]]
        hosts.append(first)
        if self.p.warm_tier:
            for node, warm in enumerate(self.warm):
                if m.idx in warm and node != first.node:
                    per = self.cluster.devices_per_node
                    on_node = [d for d in devices[node * per : (node + 1) * per] if not d.instances]
                    if on_node:
                        hosts.append(min(on_node, key=lambda d: d.id))
        return hosts

    def _place(self, m: _Model, dev: _Device, demand: float, preloaded: bool = False) -> _Instance | None:
        """Load ``m`` on ``dev``, evicting idle residents if it must; None if it cannot."""
        need = m.spec.weights_bytes
        short = dev.used + need - dev.capacity
        if short > 0 and (preloaded or not self._evict(dev, short)):  # pinning evicts nothing
            return None
        node, warm = dev.node, self.warm[dev.node]
        source = _HOT if preloaded else (_WARM if self.p.warm_tier and m.idx in warm else _COOL)
        load_s = 0.0 if preloaded else self.cluster.load_s(m.spec, source is _WARM, self.p.loader, self.rng)
        ready = self.now if preloaded else max(self.now, dev.load_free_at) + load_s
        if not preloaded:
            dev.load_free_at = ready
        key = f"{m.name}#{m.next_key}"
        m.next_key += 1
        inst = _Instance(key, m, dev, ready, load_s, source, self.now)
        inst.share = demand
        dev.util += demand
        self._account()
        if not dev.instances:
            self.held += 1
            self.occupied[dev.idx] = dev
        dev.instances[key] = inst
        dev.used += need
        dev.view = None
        dev.names = (*dev.names, m.name)
        dev.shortest_slo_s = min(dev.shortest_slo_s, m.slo_s)
        dev.longest_batch_s = max(dev.longest_batch_s, m.latency.predict(1))
        self.used_total += need
        m.instances.append(inst)
        self.instances[key] = inst
        if self.p.warm_tier:
            self._keep_warm(node, m)
        if self.record:
            self.events.append((self.now, "load", key, dev.id, source.value, ready))
        self._arm_tick()
        if not preloaded:
            dev.loading_bytes += need
            self._push(ready, _LOAD, inst)
        return inst

    def _evict(self, dev: _Device, need: int) -> bool:
        now, bw = self.now, self.bandwidths
        candidates = tuple(
            EvictionCandidate(
                x.key,
                x.bytes,
                x.model.latency.predict_load(_WARM if self.p.warm_tier else _COOL, x.bytes, bw),
                x.model.rate,
                x.last_used,
                x.running or x.ready_at > now or x.bound is not None,
            )
            for x in dev.instances.values()
        )
        names = self.p.eviction.choose(need, candidates)
        if not names:
            return False
        for key in names:
            self._remove(dev.instances[key], _WARM)
        return True

    def _remove(self, inst: _Instance, to: Tier) -> None:
        dev, m = inst.device, inst.model
        self._account()
        del dev.instances[inst.key]
        del self.instances[inst.key]
        m.instances.remove(inst)
        dev.used -= inst.bytes
        dev.util = max(0.0, dev.util - inst.share)
        dev.view = None
        at = dev.names.index(m.name)
        dev.names = (*dev.names[:at], *dev.names[at + 1 :])
        residents = [x.model for x in dev.instances.values()]
        dev.shortest_slo_s = min((r.slo_s for r in residents), default=math.inf)
        dev.longest_batch_s = max((r.latency.predict(1) for r in residents), default=0.0)
        self.used_total -= inst.bytes
        if not dev.instances:
            self.held -= 1
            dev.util = 0.0
            del self.occupied[dev.idx]
            heapq.heappush(self.empty, (dev.id, dev.idx))
        if to is _WARM and self.p.warm_tier:
            self._keep_warm(dev.node, m)
        if self.record:
            self.events.append((self.now, "demote", inst.key, dev.id, to.value if self.p.warm_tier else "cool"))
        if m.queue and not m.instances:  # evicted with work waiting: bring it back at the next tick
            self.blocked[m.idx] = m
            self._arm_tick()

    def _keep_warm(self, node: int, m: _Model) -> None:
        warm = self.warm[node]
        if m.idx in warm:
            warm.move_to_end(m.idx)
            return
        warm[m.idx] = None
        self.warm_bytes[node] += m.spec.weights_bytes
        over = self.warm_bytes[node] - self.cluster.host_memory_bytes
        if over > 0:
            # Free a tenth of the host memory beyond what is needed: a full node would otherwise ask the
            # eviction policy about all its thousands of warm models at every model it adds.
            over += self.cluster.host_memory_bytes // WARM_SLACK
            candidates = tuple(
                EvictionCandidate(
                    str(i),
                    self.models[i].spec.weights_bytes,
                    0.0,
                    self.models[i].rate,
                    self.models[i].last_used,
                    i == m.idx,
                )
                for i in warm
            )
            for name in self.p.eviction.choose(over, candidates):
                self._drop_warm(node, int(name))

    def _drop_warm(self, node: int, idx: int) -> None:
        del self.warm[node][idx]
        self.warm_bytes[node] -= self.models[idx].spec.weights_bytes

    def _view(self, dev: _Device, model: _Model | None = None, evictable_gone: bool = False) -> WorkerView:
        """The device as placement sees it, optionally as if its idle residents were gone.

        ``warm_models`` holds the model being placed when its weights sit in this node's host memory:
        placement asks only about that model, and a node can hold thousands of warm ones.
        """
        view = dev.view
        if view is None or evictable_gone:
            names = dev.names
            loaded = dev.loading_bytes + dev.running_bytes if evictable_gone else dev.used
            view = WorkerView(
                dev.id,
                True,
                dev.id.split("/", 1)[1],
                names,
                loaded,
                int(dev.busy),
                dev.capacity,
                utilization=dev.util,
                shortest_slo_s=dev.shortest_slo_s,
                longest_batch_s=dev.longest_batch_s,
            )
            if not evictable_gone:
                dev.view = view
        if model is not None and self.p.warm_tier and model.idx in self.warm[dev.node]:
            view = replace(view, warm_models=(model.name,))
        return view

    def _pin_all(self) -> None:
        for m in self.models:
            if not self._start_instance(m, preloaded=True):
                raise InvalidInput(
                    f"always-on cannot pin '{m.name}' ({m.spec.weights_bytes / 1e9:.2f} GB): the models do not fit"
                    f" in {len(self.devices)} devices of {self.cluster.device_memory_bytes / 1e9:.0f} GB"
                )

    # -- control ticks ----------------------------------------------------------------------------

    def _tick(self, n: int) -> None:
        if n != self.tick_n:  # a later tick, armed before a sooner one was needed (exact keep-alive)
            return
        now, p = self.now, self.p
        self.occupancy.append((now, len(self.instances), sum(map(len, self.warm)), self.held))
        busiest = self._measure()
        if p.rebalance is not None and busiest > p.rebalance.high:
            self._rebalance()
        if p.keepalive is not None and not p.exact_keepalive:
            self._hot_tick(p.keepalive)
        slow = n % self.warm_every == 0
        if slow:
            for m in self.models:
                if m.arrivals or m.rate:
                    m.rate = 0.5 * m.rate + 0.5 * m.arrivals / self.window_s
                    m.arrivals = 0
            if p.warm_tier and p.keepalive is not None:
                self._warm_tick()
        active = self.blocked.copy()
        if slow:
            active |= {x.model.idx: x.model for x in self.instances.values()}
        for _, m in sorted(active.items()):
            self._scale(m)
            for inst in m.instances:
                if m.queue and inst.ready_at <= now:
                    inst.device.pending[m.idx] = m
                    self._offer(inst.device)
        self.tick_armed = False
        live = self.instances or self.blocked or (p.keepalive is not None and any(self.warm))
        if live and (now < self.duration_s or self.outstanding):
            self._arm_tick()

    def _measure(self) -> float:
        """Fold the device time each instance's batches took since the last tick into its share of the
        device, and each device's utilization; returns the highest utilization."""
        now, tick = self.now, self.tick_s
        totals: dict[_Device, float] = {}
        for x in self.instances.values():
            up = min(tick, now - x.ready_at)
            if up >= 0.5 * tick:  # up for most of the tick (until then it keeps its expected share)
                share = x.busy_s / up
                x.share = 0.5 * x.share + 0.5 * share if x.measured else share
                x.measured = True
            x.busy_s = 0.0
            totals[x.device] = totals.get(x.device, 0.0) + x.share
        for dev, util in totals.items():
            if dev.util != util:
                dev.util, dev.view = util, None
        return max(totals.values(), default=0.0)

    def _rebalance(self) -> None:
        """Move models off overloaded devices: load on the destination, drop the source once it is ready."""
        assert self.p.rebalance is not None
        now, high = self.now, self.p.rebalance.high
        views = []
        for dev in self.occupied.values():
            view = self._view(dev)
            if dev.util > high:
                residents = tuple(
                    Resident(
                        x.model.name,
                        x.bytes,
                        x.share,
                        x.measured and not x.retiring and all(y.ready_at <= now for y in x.model.instances),
                        DEFAULT_TENANT,
                        x.model.slo_s,
                        x.model.latency.predict(1),
                    )
                    for x in dev.instances.values()
                )
                view = replace(view, residents=residents)
            views.append(view)
        # Of the empty devices, as many as could receive a model (the first by id: see ``_hosts``).
        movers = sum(len(d.instances) for d in self.occupied.values() if d.util > high)
        empty = sorted((d for d in self.devices if not d.instances), key=lambda d: d.id)[:movers]
        views.extend(self._view(d) for d in empty)
        for move in self.p.rebalance.moves(tuple(views)):
            m, source, target = self.by_name[move.model], self.by_id[move.source], self.by_id[move.destination]
            old = next((x for x in m.instances if x.device is source), None)
            if old is None:
                continue
            new = self._place(m, target, old.share)
            if new is None:
                continue
            new.replaces, old.retiring = old, True
            if self.record:
                self.events.append((now, "move", old.key, source.id, target.id))

    def _retire(self, inst: _Instance) -> bool:
        """Drop a moving instance once its replacement is ready; False while that still loads."""
        m = inst.model
        if any(x.replaces is inst for x in m.instances):
            return False
        self._remove(inst, _WARM)
        if m.queue:
            for x in m.instances:
                if x.ready_at <= self.now:
                    x.device.pending[m.idx] = m
                    self._offer(x.device)
        return True

    def _hot_tick(self, keepalive: KeepAlive) -> None:
        """Ask the keep-alive about the hot instances whose answer may have changed since it was last
        asked (``KeepAlive.recheck_s``), and demote what it says."""
        now, asked = self.now, []
        for x in self.instances.values():
            if x.ready_at > now:
                continue
            m = x.model
            state = (x.last_used, m.histogram, m.prewarmed, m.latency, x.running or bool(m.queue))
            if now < x.check_at and state == x.checked:
                continue
            view = self._hot_view(x)
            x.check_at, x.checked = x.last_used + keepalive.recheck_s(view), state
            asked.append(view)
        for action in keepalive.decide(tuple(asked)):
            inst = self.instances.get(action.name)
            if isinstance(action, Demotion) and inst is not None and not inst.running:
                self._remove(inst, action.to)

    def _hot_view(self, x: _Instance, idle_s: float | None = None) -> ModelView:
        m, p = x.model, self.p
        idle = self.now - x.last_used if idle_s is None else idle_s
        busy = x.running or x.bound is not None or bool(m.queue)
        return model_view(
            x.key,
            _HOT,
            idle,
            busy,
            keepalive_hot_s=p.keepalive_hot_s,
            keepalive_warm_s=p.keepalive_warm_s,
            histogram=m.histogram,
            latency=m.latency,
            model_bytes=x.bytes,
            bandwidths=self.bandwidths,
            prewarmed=m.prewarmed,
        )

    def _warm_tick(self) -> None:
        now, p, bw = self.now, self.p, self.bandwidths
        views: list[ModelView] = []
        hot_nodes = {(x.device.node, x.model.idx) for x in self.instances.values()}
        for node, warm in enumerate(self.warm):
            for idx in warm:
                if (node, idx) in hot_nodes:
                    continue
                m = self.models[idx]
                busy = bool(m.queue) or m.running > 0
                view = model_view(
                    f"{idx}@{node}",
                    _WARM,
                    now - m.last_used,
                    busy,
                    keepalive_hot_s=p.keepalive_hot_s,
                    keepalive_warm_s=p.keepalive_warm_s,
                    histogram=m.histogram,
                    latency=m.latency,
                    model_bytes=m.spec.weights_bytes,
                    bandwidths=bw,
                    prewarmed=m.prewarmed,
                )
                views.append(view)
        assert p.keepalive is not None
        for action in p.keepalive.decide(tuple(views)):
            idx, node = (int(s) for s in action.name.split("@"))
            m = self.models[idx]
            if not isinstance(action, Demotion):  # pre-warm: bring it up before its next expected request
                if not m.instances and self._start_instance(m):
                    m.prewarmed = True
            elif action.to is _COOL and idx in self.warm[node]:
                self._drop_warm(node, idx)
                if self.record:
                    self.events.append((now, "demote", f"{m.name}@{node}", "host", action.to.value))

    def _account(self) -> None:
        dt = self.now - self._t_acc
        if dt > 0:
            self.gpu_s += self.held * dt
            self.byte_s += self.used_total * dt
            self.inst_s += len(self.instances) * dt
            self._t_acc = self.now

    # -- FaaS: requests bound to instances, and the exact keep-alive ------------------------------

    def _bind(self, m: _Model, request: Request) -> None:
        """FaaS dispatch: bind ``request`` to the idle instance the router picks, else to a new instance
        started for it (served cold by it); with no room anywhere it waits in the model's queue."""
        now = self.now
        idle = [x for x in m.instances if x.bound is None and not x.running and x.ready_at <= now and not x.retiring]
        if idle:
            inst = idle[0]
            if len(idle) > 1:
                assert self.p.router is not None
                name = self.p.router.choose(tuple(IdleInstance(x.key, x.started_at, x.last_used) for x in idle))
                inst = self.instances[name]
            inst.bound = request
            inst.device.waiting.append(inst)
            self._offer(inst.device)
            return
        started = self._start_instance(m)
        if started is None:
            m.queue.append(request)
            m.version += 1
            self.blocked[m.idx] = m
            self._arm_tick()
            return
        started.bound = request

    def _run_bound(self, dev: _Device) -> None:
        """Run one of the requests bound to instances of ``dev`` (the device scheduler picks which)."""
        waiting = dev.waiting
        inst = waiting[0]
        if len(waiting) > 1:
            candidates = tuple(
                Candidate(x.key, x.bound[0], x.model.latency.predict(x.bound[1]), 0.0, 1)
                for x in waiting
                if x.bound is not None
            )
            chosen = self.p.devices.choose(self.now, candidates)
            inst = self.instances[chosen.model] if chosen is not None else inst
        waiting.remove(inst)
        assert inst.bound is not None
        self._start_batch(dev, inst, [inst.bound])

    def _ask_keepalive(self, inst: _Instance, idle_s: float) -> None:
        """Exact keep-alive: ask about ``inst``, idle for ``idle_s`` since its last use, and apply the answer;
        then ask again at the idle time ``KeepAlive.recheck_s`` names (an ``_EXPIRE`` event)."""
        keepalive = self.p.keepalive
        assert keepalive is not None
        view = self._hot_view(inst, idle_s)
        for action in keepalive.decide((view,)):
            if isinstance(action, Demotion):
                self._remove(inst, action.to)
                return
        again = keepalive.recheck_s(view)
        if again < math.inf:
            self._push(inst.last_used + again, _EXPIRE, (inst, inst.last_used, again))

    def _expire(self, obj: tuple[_Instance, float, float]) -> None:
        inst, last_used, idle_s = obj
        if inst.last_used != last_used or inst.running or inst.bound is not None or inst.key not in self.instances:
            return  # used again since (it is asked anew when it next goes idle), or gone
        self._ask_keepalive(inst, idle_s)
