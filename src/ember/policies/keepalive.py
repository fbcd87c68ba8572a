"""Keep-alive: how long a model stays in each tier after its last request.

Scaling down demotes one tier at a time: hot (on the device) -> warm (host memory, runtime ready)
-> cool (local disk). Each step waits for its own keep-alive, counted from the last time the model
was busy. The controller asks every tick and applies the demotions it gets back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ember.store import Tier

__all__ = ["Demotion", "FixedKeepAlive", "KeepAlive", "ModelView"]


@dataclass(frozen=True)
class ModelView:
    name: str
    tier: Tier
    #: Seconds since the model last had a request queued or running.
    idle_s: float
    #: Requests queued or running now.
    busy: bool
    keepalive_hot_s: float
    keepalive_warm_s: float


@dataclass(frozen=True)
class Demotion:
    name: str
    to: Tier


class KeepAlive(Protocol):
    def decide(self, models: tuple[ModelView, ...]) -> tuple[Demotion, ...]: ...


@dataclass(frozen=True)
class FixedKeepAlive:
    """Demote after a fixed idle time per tier (the deployment's ``keepalive_hot_s`` / ``_warm_s``).

    The warm keep-alive counts from the end of the hot one, so a model idle for
    ``keepalive_hot_s + keepalive_warm_s`` is cool.
    """

    def decide(self, models: tuple[ModelView, ...]) -> tuple[Demotion, ...]:
        out: list[Demotion] = []
        for model in models:
            if model.busy:
                continue
            if model.tier is Tier.HOT and model.idle_s >= model.keepalive_hot_s:
                out.append(Demotion(model.name, Tier.WARM))
            elif model.tier is Tier.WARM and model.idle_s >= model.keepalive_hot_s + model.keepalive_warm_s:
                out.append(Demotion(model.name, Tier.COOL))
        return tuple(out)
