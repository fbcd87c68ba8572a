"""The engine's instances: how many a model gets, where each goes, and what leaves to make room.

``scale`` asks the autoscaler; ``start_instance`` asks placement among the devices that matter
(``candidate_devices``) and ``place_on`` loads the model there, evicting idle residents the eviction policy names;
``remove`` demotes an instance (to the node's warm tier when the set has one, whose host memory is
kept by ``keep_warm``); ``device_view`` is a device as placement sees it. Functions of the
:class:`~ember.sim.engine.Engine` they act on, split from it by concept.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import replace
from typing import TYPE_CHECKING

from ember.errors import InvalidInput
from ember.policies import (
    DEFAULT_TENANT,
    EvictionCandidate,
    PlacementRequest,
    ScaleView,
    WorkerView,
    device_share,
)
from ember.policies.tiers import Tier
from ember.sim.state import COOL as _COOL
from ember.sim.state import HOT as _HOT
from ember.sim.state import LOAD
from ember.sim.state import WARM as _WARM
from ember.sim.state import Device as _Device
from ember.sim.state import Instance as _Instance
from ember.sim.state import Model as _Model

if TYPE_CHECKING:
    from ember.sim.engine import Engine

__all__ = [
    "candidate_devices",
    "device_view",
    "drop_warm",
    "evict",
    "keep_warm",
    "pin_all",
    "place_on",
    "remove",
    "scale",
    "start_instance",
]

#: A node whose host memory fills frees 1/WARM_SLACK of it beyond what it needs.
WARM_SLACK = 10


def scale(e: Engine, m: _Model) -> None:
    rate = max(m.rate, m.arrivals / e.window_s)
    queued = len(m.queue) + m.running
    if e.p.router is not None:  # and the bound requests waiting for their instance's load or device
        queued += sum(1 for x in m.instances if x.bound is not None and not x.running)
    view = ScaleView(m.name, rate, queued, len(m.instances), m.slo_s, m.max_batch, m.latency, 0, len(e.devices))
    want, m.scale_state = e.p.scaler.decide(e.now, view, m.scale_state)
    while len(m.instances) < want:
        if not start_instance(e, m):
            e.blocked[m.idx] = m
            e._arm_tick()
            return
    e.blocked.pop(m.idx, None)
    if want < len(m.instances):
        idle = [x for x in m.instances if not x.running and x.ready_at <= e.now and x.bound is None]
        idle.sort(key=lambda x: x.last_used)
        for inst in idle[: len(m.instances) - want]:
            remove(e, inst, _WARM)


def start_instance(e: Engine, m: _Model, preloaded: bool = False) -> _Instance | None:
    need = m.spec.device_bytes  # weights and KV cache
    demand = 0.0 if preloaded else device_share(max(m.rate, m.arrivals / e.window_s), m.latency, m.max_batch)
    hosts = candidate_devices(e, m, need)
    place = e.p.placement.choose
    request = PlacementRequest(m.name, need, "cuda", DEFAULT_TENANT, demand, m.slo_s, m.latency.predict(1))
    chosen = place(request, tuple(device_view(e, d, m) for d in hosts))
    if chosen is None:  # no room anywhere: choose again as if every idle resident could be evicted
        chosen = place(request, tuple(device_view(e, d, m, True) for d in hosts))
        if chosen is None:
            return None
    return place_on(e, m, e.by_id[chosen], demand, preloaded)


def candidate_devices(e: Engine, m: _Model, need: int) -> list[_Device]:
    """The devices placement is asked about for ``m``: every occupied one that could make room, and
    of the empty ones only the first by id, plus the first on each node where ``m`` is warm.

    Empty devices differ in nothing a placement policy reads but their id and whether ``m`` is
    warm on their node, so the policies' choice is the same as over every device, at the cost of
    the occupied ones only: a 1,000-device cluster mostly sits empty.
    """
    hosts = [d for d in e.occupied.values() if d.capacity - d.loading_bytes - d.running_bytes >= need]
    empty, devices = e.empty, e.devices
    while empty and devices[empty[0][1]].instances:
        heapq.heappop(empty)
    if not empty:
        return hosts
    first = devices[empty[0][1]]
    hosts.append(first)
    if e.p.warm_tier:
        for node, warm in enumerate(e.warm):
            if m.idx in warm and node != first.node:
                per = e.cluster.devices_per_node
                on_node = [d for d in devices[node * per : (node + 1) * per] if not d.instances]
                if on_node:
                    hosts.append(min(on_node, key=lambda d: d.id))
    return hosts


def place_on(e: Engine, m: _Model, dev: _Device, demand: float, preloaded: bool = False) -> _Instance | None:
    """Load ``m`` on ``dev``, evicting idle residents if it must; None if it cannot."""
    need = m.spec.device_bytes  # weights and KV cache
    short = dev.used + need - dev.capacity
    if short > 0 and (preloaded or not evict(e, dev, short)):  # pinning evicts nothing
        return None
    node, warm = dev.node, e.warm[dev.node]
    source = _HOT if preloaded else (_WARM if e.p.warm_tier and m.idx in warm else _COOL)
    # A process start overlaps the device's other loads; the copy waits for its host link.
    start_s, copy_s = (0.0, 0.0) if preloaded else e.cluster.load_phases(m.spec, source is _WARM, e.p.loader, e.rng)
    load_s = start_s + copy_s
    ready = e.now if preloaded else max(e.now + start_s, dev.load_free_at) + copy_s
    if not preloaded:
        dev.load_free_at = ready
    key = f"{m.name}#{m.next_key}"
    m.next_key += 1
    inst = _Instance(key, m, dev, ready, load_s, source, e.now)
    inst.share = demand
    dev.util += demand
    e._account()
    if not dev.instances:
        e.held += 1
        e.occupied[dev.idx] = dev
    dev.instances[key] = inst
    dev.used += need
    dev.view = None
    dev.names = (*dev.names, m.name)
    dev.shortest_slo_s = min(dev.shortest_slo_s, m.slo_s)
    dev.longest_batch_s = max(dev.longest_batch_s, m.latency.predict(1))
    e.used_total += need
    e.class_used[e.class_of[m.idx]] += need
    m.instances.append(inst)
    e.instances[key] = inst
    if e.p.warm_tier:
        keep_warm(e, node, m)
    if e.record:
        e.events.append((e.now, "load", key, dev.id, source.value, ready))
    e._arm_tick()
    if not preloaded:
        dev.loading_bytes += need
        e.loaded_bytes += m.spec.weights_bytes
        if source is _COOL:
            e.loaded_from_disk += m.spec.weights_bytes
        e._push(ready, LOAD, inst)
    return inst


def evict(e: Engine, dev: _Device, need: int) -> bool:
    now, bw = e.now, e.bandwidths
    candidates = tuple(
        EvictionCandidate(
            x.key,
            x.bytes,
            x.model.latency.predict_load(_WARM if e.p.warm_tier else _COOL, x.model.spec.weights_bytes, bw),
            x.model.rate,
            x.last_used,
            x.running or x.ready_at > now or x.bound is not None,
        )
        for x in dev.instances.values()
    )
    names = e.p.eviction.choose(need, candidates)
    if not names:
        return False
    for key in names:
        remove(e, dev.instances[key], _WARM)
    return True


def remove(e: Engine, inst: _Instance, to: Tier) -> None:
    dev, m = inst.device, inst.model
    e._account()
    del dev.instances[inst.key]
    del e.instances[inst.key]
    m.instances.remove(inst)
    dev.used -= inst.bytes
    dev.util = max(0.0, dev.util - inst.share)
    dev.view = None
    at = dev.names.index(m.name)
    dev.names = (*dev.names[:at], *dev.names[at + 1 :])
    residents = [x.model for x in dev.instances.values()]
    dev.shortest_slo_s = min((r.slo_s for r in residents), default=math.inf)
    dev.longest_batch_s = max((r.latency.predict(1) for r in residents), default=0.0)
    e.used_total -= inst.bytes
    e.class_used[e.class_of[m.idx]] -= inst.bytes
    if not dev.instances:
        e.held -= 1
        dev.util = 0.0
        del e.occupied[dev.idx]
        heapq.heappush(e.empty, (dev.id, dev.idx))
    if to is _WARM and e.p.warm_tier:
        keep_warm(e, dev.node, m)
    if e.record:
        e.events.append((e.now, "demote", inst.key, dev.id, to.value if e.p.warm_tier else "cool"))
    if m.queue and not m.instances:  # evicted with work waiting: bring it back at the next tick
        e.blocked[m.idx] = m
        e._arm_tick()


def keep_warm(e: Engine, node: int, m: _Model) -> None:
    warm = e.warm[node]
    if m.idx in warm:
        warm.move_to_end(m.idx)
        return
    e._account_host()
    warm[m.idx] = None
    e.warm_bytes[node] += m.spec.weights_bytes
    e.class_warm[e.class_of[m.idx]] += m.spec.weights_bytes
    over = e.warm_bytes[node] - e.cluster.host_memory_bytes
    if over > 0:
        # Free a tenth of the host memory beyond what is needed: a full node would otherwise ask the
        # eviction policy about all its thousands of warm models at every model it adds.
        over += e.cluster.host_memory_bytes // WARM_SLACK
        candidates = tuple(
            EvictionCandidate(
                str(i),
                e.models[i].spec.weights_bytes,
                0.0,
                e.models[i].rate,
                e.models[i].last_used,
                i == m.idx,
            )
            for i in warm
        )
        for name in e.p.eviction.choose(over, candidates):
            drop_warm(e, node, int(name))


def drop_warm(e: Engine, node: int, idx: int) -> None:
    e._account_host()
    del e.warm[node][idx]
    e.warm_bytes[node] -= e.models[idx].spec.weights_bytes
    e.class_warm[e.class_of[idx]] -= e.models[idx].spec.weights_bytes


def device_view(e: Engine, dev: _Device, model: _Model | None = None, evictable_gone: bool = False) -> WorkerView:
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
    if model is not None and e.p.warm_tier and model.idx in e.warm[dev.node]:
        view = replace(view, warm_models=(model.name,))
    return view


def pin_all(e: Engine) -> None:
    for m in e.models:
        if not start_instance(e, m, preloaded=True):
            raise InvalidInput(
                f"always-on cannot pin '{m.name}' ({m.spec.weights_bytes / 1e9:.2f} GB): the models do not fit"
                f" in {len(e.devices)} devices of {e.cluster.device_memory_bytes / 1e9:.0f} GB"
            )
