"""Classic FaaS in the engine: requests bound to instances, and keep-alive expiry as exact events.

A set with a router binds each request to one idle instance (the router picks), else to a new
instance started for it, which serves it cold; with ``exact_keepalive`` the keep-alive is asked at
the exact idle times it names (an expiry event) rather than on ticks. Functions of the
:class:`~ember.sim.engine.Engine` they act on.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ember.policies import (
    Candidate,
    Demotion,
)
from ember.policies.baselines import IdleInstance
from ember.sim.control import hot_view
from ember.sim.instances import remove, start_instance
from ember.sim.state import EXPIRE, Request
from ember.sim.state import Device as _Device
from ember.sim.state import Instance as _Instance
from ember.sim.state import Model as _Model

if TYPE_CHECKING:
    from ember.sim.engine import Engine

__all__ = ["ask_keepalive", "bind", "expire", "run_bound"]


def bind(e: Engine, m: _Model, request: Request) -> None:
    """FaaS dispatch: bind ``request`` to the idle instance the router picks, else to a new instance
    started for it (served cold by it); with no room anywhere it waits in the model's queue."""
    now = e.now
    idle = [x for x in m.instances if x.bound is None and not x.running and x.ready_at <= now and not x.retiring]
    if idle:
        inst = idle[0]
        if len(idle) > 1:
            assert e.p.router is not None
            name = e.p.router.choose(tuple(IdleInstance(x.key, x.started_at, x.last_used) for x in idle))
            inst = e.instances[name]
        inst.bound = request
        inst.device.waiting.append(inst)
        e._offer(inst.device)
        return
    started = start_instance(e, m)
    if started is None:
        m.queue.append(request)
        m.version += 1
        e.blocked[m.idx] = m
        e._arm_tick()
        return
    started.bound = request


def run_bound(e: Engine, dev: _Device) -> None:
    """Run one of the requests bound to instances of ``dev`` (the device scheduler picks which)."""
    waiting = dev.waiting
    inst = waiting[0]
    if len(waiting) > 1:
        candidates = tuple(
            Candidate(x.key, x.bound[0], x.model.latency.predict(x.bound[1]), 0.0, 1)
            for x in waiting
            if x.bound is not None
        )
        chosen = e.p.devices.choose(e.now, candidates)
        inst = e.instances[chosen.model] if chosen is not None else inst
    waiting.remove(inst)
    assert inst.bound is not None
    e._start_batch(dev, inst, [inst.bound])


def ask_keepalive(e: Engine, inst: _Instance, idle_s: float) -> None:
    """Exact keep-alive: ask about ``inst``, idle for ``idle_s`` since its last use, and apply the answer;
    then ask again at the idle time ``KeepAlive.recheck_s`` names (an ``EXPIRE`` event)."""
    keepalive = e.p.keepalive
    assert keepalive is not None
    view = hot_view(e, inst, idle_s)
    for action in keepalive.decide((view,)):
        if isinstance(action, Demotion):
            remove(e, inst, action.to)
            return
    again = keepalive.recheck_s(view)
    if again < math.inf:
        e._push(inst.last_used + again, EXPIRE, (inst, inst.last_used, again))


def expire(e: Engine, obj: tuple[_Instance, float, float]) -> None:
    inst, last_used, idle_s = obj
    if inst.last_used != last_used or inst.running or inst.bound is not None or inst.key not in e.instances:
        return  # used again since (it is asked anew when it next goes idle), or gone
    ask_keepalive(e, inst, idle_s)
