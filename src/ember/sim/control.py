"""The engine's control ticks: measuring device shares, rebalancing, keep-alive and the autoscaler.

Ticks run on the grid ``k * tick_s`` while anything is up: the hot keep-alive every tick; the warm
tier's keep-alive and pre-warm, the arrival rates and the autoscaler every ``warm_tick_s``. Functions
of the :class:`~ember.sim.engine.Engine` they act on, split from it by concept.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ember.policies import (
    DEFAULT_TENANT,
    Demotion,
    KeepAlive,
    ModelView,
    Resident,
)
from ember.sim.instances import device_view, drop_warm, place_on, remove, scale, start_instance
from ember.sim.state import COOL as _COOL
from ember.sim.state import HOT as _HOT
from ember.sim.state import WARM as _WARM
from ember.sim.state import Device as _Device
from ember.sim.state import Instance as _Instance
from ember.state import model_view

if TYPE_CHECKING:
    from ember.sim.engine import Engine

__all__ = ["hot_tick", "hot_view", "measure", "rebalance", "retire", "tick", "warm_tick"]


def tick(e: Engine, n: int) -> None:
    if n != e.tick_n:  # a later tick, armed before a sooner one was needed (exact keep-alive)
        return
    now, p = e.now, e.p
    e.occupancy.append((now, len(e.instances), sum(map(len, e.warm)), e.held))
    busiest = measure(e)
    if p.rebalance is not None and busiest > p.rebalance.high:
        rebalance(e)
    if p.keepalive is not None and not p.exact_keepalive:
        hot_tick(e, p.keepalive)
    slow = n % e.warm_every == 0
    if slow:
        for m in e.models:
            if m.arrivals or m.rate:
                m.rate = 0.5 * m.rate + 0.5 * m.arrivals / e.window_s
                m.arrivals = 0
        if p.warm_tier and p.keepalive is not None:
            warm_tick(e)
    active = e.blocked.copy()
    if slow:
        active |= {x.model.idx: x.model for x in e.instances.values()}
    for _, m in sorted(active.items()):
        scale(e, m)
        for inst in m.instances:
            if m.queue and inst.ready_at <= now:
                inst.device.pending[m.idx] = m
                e._offer(inst.device)
    e.tick_armed = False
    live = e.instances or e.blocked or (p.keepalive is not None and any(e.warm))
    if live and (now < e.duration_s or e.outstanding):
        e._arm_tick()


def measure(e: Engine) -> float:
    """Fold the device time each instance's batches took since the last tick into its share of the
    device, and each device's utilization; returns the highest utilization."""
    now, tick = e.now, e.tick_s
    totals: dict[_Device, float] = {}
    for x in e.instances.values():
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


def rebalance(e: Engine) -> None:
    """Move models off overloaded devices: load on the destination, drop the source once it is ready."""
    assert e.p.rebalance is not None
    now, high = e.now, e.p.rebalance.high
    views = []
    for dev in e.occupied.values():
        view = device_view(e, dev)
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
    # Of the empty devices, as many as could receive a model (the first by id: see ``instances.candidate_devices``).
    movers = sum(len(d.instances) for d in e.occupied.values() if d.util > high)
    empty = sorted((d for d in e.devices if not d.instances), key=lambda d: d.id)[:movers]
    views.extend(device_view(e, d) for d in empty)
    for move in e.p.rebalance.moves(tuple(views)):
        m, source, target = e.by_name[move.model], e.by_id[move.source], e.by_id[move.destination]
        old = next((x for x in m.instances if x.device is source), None)
        if old is None:
            continue
        new = place_on(e, m, target, old.share)
        if new is None:
            continue
        new.replaces, old.retiring = old, True
        if e.record:
            e.events.append((now, "move", old.key, source.id, target.id))


def retire(e: Engine, inst: _Instance) -> bool:
    """Drop a moving instance once its replacement is ready; False while that still loads."""
    m = inst.model
    if any(x.replaces is inst for x in m.instances):
        return False
    remove(e, inst, _WARM)
    if m.queue:
        for x in m.instances:
            if x.ready_at <= e.now:
                x.device.pending[m.idx] = m
                e._offer(x.device)
    return True


def hot_tick(e: Engine, keepalive: KeepAlive) -> None:
    """Ask the keep-alive about the hot instances whose answer may have changed since it was last
    asked (``KeepAlive.recheck_s``), and demote what it says."""
    now, asked = e.now, []
    for x in e.instances.values():
        if x.ready_at > now:
            continue
        m = x.model
        state = (x.last_used, m.histogram, m.prewarmed, m.latency, x.running or bool(m.queue))
        if now < x.check_at and state == x.checked:
            continue
        view = hot_view(e, x)
        x.check_at, x.checked = x.last_used + keepalive.recheck_s(view), state
        asked.append(view)
    for action in keepalive.decide(tuple(asked)):
        inst = e.instances.get(action.name)
        if isinstance(action, Demotion) and inst is not None and not inst.running:
            remove(e, inst, action.to)


def hot_view(e: Engine, x: _Instance, idle_s: float | None = None) -> ModelView:
    m, p = x.model, e.p
    idle = e.now - x.last_used if idle_s is None else idle_s
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
        model_bytes=x.model.spec.weights_bytes,
        bandwidths=e.bandwidths,
        prewarmed=m.prewarmed,
        slo_s=m.slo_s,
    )


def warm_tick(e: Engine) -> None:
    now, p, bw = e.now, e.p, e.bandwidths
    views: list[ModelView] = []
    hot_nodes = {(x.device.node, x.model.idx) for x in e.instances.values()}
    for node, warm in enumerate(e.warm):
        for idx in warm:
            if (node, idx) in hot_nodes:
                continue
            m = e.models[idx]
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
                slo_s=m.slo_s,
            )
            views.append(view)
    assert p.keepalive is not None
    for action in p.keepalive.decide(tuple(views)):
        idx, node = (int(s) for s in action.name.split("@"))
        m = e.models[idx]
        if not isinstance(action, Demotion):  # pre-warm: bring it up before its next expected request
            if not m.instances and start_instance(e, m):
                m.prewarmed = True
        elif action.to is _COOL and idx in e.warm[node]:
            drop_warm(e, node, idx)
            if e.record:
                e.events.append((now, "demote", f"{m.name}@{node}", "host", action.to.value))
