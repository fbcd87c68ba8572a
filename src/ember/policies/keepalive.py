"""Keep-alive and pre-warm: when a model leaves each tier after its last request, and when it comes back.

Scaling down demotes one tier at a time: hot (on the device) -> warm (host memory, runtime ready)
-> cool (local disk). The controller asks every tick and applies the actions it gets back.

:class:`HybridHistogramKeepAlive` is the hybrid histogram policy of "Serverless in the Wild"
(Shahrad et al., ATC'20), per model and applied to the hot tier. Each model keeps a histogram of
its idle times (from the end of one busy period to the next arrival; :class:`IdleHistogram`, bins
growing geometrically so one histogram covers seconds to hours). Decision rule, with ``lo`` the
``prewarm_percentile`` (5th) of the idle times and ``hi`` the ``keepalive_percentile`` (99th):

- While the histogram is *not representative* (fewer than ``min_samples`` idle times, or more than
  ``max_out_of_range`` of them past its last bin), fall back to the deployment's fixed keep-alive.
- Otherwise the hot keep-alive is ``hi * (1 + margin)``, clamped to ``[min_keepalive_s,
  max_keepalive_s]``. If ``lo * (1 - margin)`` is longer than ``min_gap_s``, the next request is
  predictably far away: the model is demoted to warm as soon as it goes idle, and pre-warmed back
  to hot ``load_s`` (its predicted load time) before ``lo * (1 - margin)``.
  A model pre-warmed during an idle period is not demoted early again in that period.
- A model whose load from warm (``load_s``) takes at most ``cheap_reload_fraction`` of its SLO loses
  no deadline to a warm start, so holding it on a device buys nothing: its hot keep-alive is the
  shorter of the deployment's fixed one and the histogram's, with no pre-warm. Keeping such models
  hot for hours is what grows a node's loaded-model count through a day: under Zipf popularity most
  models' 99th-percentile idle time is hours, so once their histograms are representative they
  would never leave the device.
- The warm tier's keep-alive follows the same test one tier down. A model whose load from cool
  (``cool_load_s``) would cost it its deadline keeps its warm copy however long it idles: the copy
  is what lets its next request meet the SLO, and host memory is bounded apart from this (the
  caller evicts warm copies by expected cost when it fills: ``policies.eviction``). Any other
  model leaves host memory once idle past ``keepalive_percentile`` of its idle times (with the
  margin, within ``[min_keepalive_s, max_warm_s]``), never before it leaves the device; while its
  histogram is not representative, or when its SLO is not known, after the fixed
  ``keepalive_warm_s`` past the hot keep-alive.

:class:`FixedKeepAlive` is the baseline: fixed idle times per tier, no pre-warm. Both are pure:
the histogram is a frozen value that ``observe`` replaces.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, field
from typing import Protocol

from ember.policies._frozen import evolve
from ember.policies.tiers import Tier

__all__ = [
    "Demotion",
    "FixedKeepAlive",
    "HybridHistogramKeepAlive",
    "IdleHistogram",
    "KeepAlive",
    "KeepAliveWindows",
    "ModelView",
    "Prewarm",
]


@dataclass(frozen=True)
class IdleHistogram:
    """Counts of idle times in geometric bins: bin ``i`` holds ``[edge(i-1), edge(i))``, edge(-1) = 0."""

    first_edge_s: float = 0.5
    growth: float = 1.25
    num_bins: int = 48
    counts: tuple[int, ...] = ()
    out_of_range: int = 0
    #: Idle times counted in ``counts`` (kept, so ``total`` is O(1) for a policy asked every tick).
    in_range: int = 0

    def edge(self, index: int) -> float:
        """The upper edge of bin ``index``."""
        return _edges(self.first_edge_s, self.growth, self.num_bins)[index]

    @property
    def total(self) -> int:
        return self.in_range + self.out_of_range

    def observe(self, idle_s: float) -> IdleHistogram:
        """The histogram with one more idle time."""
        if not math.isfinite(idle_s) or idle_s < 0:
            return self
        counts = self.counts or (0,) * self.num_bins
        index = bisect.bisect_right(_edges(self.first_edge_s, self.growth, self.num_bins), idle_s)
        if index == self.num_bins:
            return evolve(self, counts=counts, out_of_range=self.out_of_range + 1)
        counts = (*counts[:index], counts[index] + 1, *counts[index + 1 :])
        return evolve(self, counts=counts, in_range=self.in_range + 1)

    def percentile(self, quantile: float, upper: bool) -> float:
        """The ``quantile`` of the idle times, as its bin's upper edge (``upper``) or lower edge."""
        total = self.total
        if total == 0:
            return 0.0
        index = _rank_bin(self.counts, max(1, math.ceil(quantile * total)))
        if index < 0:
            return math.inf
        if upper:
            return self.edge(index)
        return 0.0 if index == 0 else self.edge(index - 1)


@functools.lru_cache(maxsize=4096)
def _rank_bin(counts: tuple[int, ...], rank: int) -> int:
    """The bin holding the ``rank``-th idle time (-1: past every bin). Cached: the keep-alive asks
    about every model at every tick, and a model's counts change only when one of its idle periods ends."""
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return index
    return -1


@functools.cache
def _edges(first_edge_s: float, growth: float, num_bins: int) -> tuple[float, ...]:
    """The upper edges of a histogram's bins, as ``IdleHistogram.edge`` computes them."""
    return tuple(first_edge_s * growth**index for index in range(num_bins))


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
    #: The model's idle-time histogram (empty for a model never seen idle).
    histogram: IdleHistogram = field(default_factory=IdleHistogram)
    #: Predicted seconds to bring the model to hot from its current tier (from warm when it is hot).
    load_s: float = 0.0
    #: Whether a pre-warm brought the model up during this idle period (it is not demoted early again).
    prewarmed: bool = False
    #: Its latency SLO (inf: none known; a warm start is then never counted as free).
    slo_s: float = math.inf
    #: Predicted seconds to bring the model to hot from cool (local disk); inf: unknown.
    cool_load_s: float = math.inf


@dataclass(frozen=True)
class Demotion:
    name: str
    to: Tier


@dataclass(frozen=True)
class Prewarm:
    """Bring ``name`` to hot now: its next request is expected soon."""

    name: str


class KeepAlive(Protocol):
    def decide(self, models: tuple[ModelView, ...]) -> tuple[Demotion | Prewarm, ...]: ...

    def recheck_s(self, model: ModelView) -> float:
        """Idle seconds before which :meth:`decide` does nothing new for ``model`` if only its idle time
        changes: a caller asking about many models may skip it until then (inf: until it is busy or
        its histogram changes)."""
        ...


def _next_threshold(idle_s: float, thresholds: tuple[float, ...]) -> float:
    """The first of ``thresholds`` past ``idle_s`` (the decision is constant between them), or inf."""
    return min((t for t in thresholds if t > idle_s), default=math.inf)


@dataclass(frozen=True)
class KeepAliveWindows:
    #: Idle seconds after which the model leaves the hot tier.
    keepalive_s: float
    #: Idle seconds before which the model need not be hot (0: stay hot from the start).
    prewarm_s: float
    #: Whether these came from the histogram (False: the fixed fallback).
    from_histogram: bool
    #: Idle seconds after which the model leaves the warm tier (host memory) for cool (inf: never).
    cool_s: float = math.inf


@dataclass(frozen=True)
class FixedKeepAlive:
    """Demote after a fixed idle time per tier (the deployment's ``keepalive_hot_s`` / ``_warm_s``).

    The warm keep-alive counts from the end of the hot one, so a model idle for
    ``keepalive_hot_s + keepalive_warm_s`` is cool.
    """

    def decide(self, models: tuple[ModelView, ...]) -> tuple[Demotion | Prewarm, ...]:
        out: list[Demotion | Prewarm] = []
        for model in models:
            if model.busy:
                continue
            if model.tier is Tier.HOT and model.idle_s >= model.keepalive_hot_s:
                out.append(Demotion(model.name, Tier.WARM))
            elif model.tier is Tier.WARM and model.idle_s >= model.keepalive_hot_s + model.keepalive_warm_s:
                out.append(Demotion(model.name, Tier.COOL))
        return tuple(out)

    def recheck_s(self, model: ModelView) -> float:
        if model.busy:
            return math.inf
        return _next_threshold(model.idle_s, (model.keepalive_hot_s, model.keepalive_hot_s + model.keepalive_warm_s))


@dataclass(frozen=True)
class HybridHistogramKeepAlive:
    """Per-model keep-alive and pre-warm windows from the idle-time histogram; fixed fallback."""

    prewarm_percentile: float = 0.05
    keepalive_percentile: float = 0.99
    margin: float = 0.1
    min_samples: int = 10
    max_out_of_range: float = 0.5
    min_keepalive_s: float = 1.0
    max_keepalive_s: float = 4 * 3600.0
    #: A predicted gap shorter than this is not worth demoting for.
    min_gap_s: float = 10.0
    #: A load taking at most this fraction of the model's SLO costs it no deadline (see the module).
    cheap_reload_fraction: float = 0.25
    #: The longest the warm tier keeps an idle model chosen from its histogram.
    max_warm_s: float = 24 * 3600.0

    def windows(self, model: ModelView) -> KeepAliveWindows:
        """The hot tier's keep-alive and pre-warm windows for ``model``, and when it leaves the warm tier."""
        hist = model.histogram
        total = hist.total
        known = math.isfinite(model.slo_s)
        keep_warm = known and not self._cheap(model.cool_load_s, model.slo_s)
        if total < self.min_samples or hist.out_of_range > self.max_out_of_range * total:
            hot = model.keepalive_hot_s
            return KeepAliveWindows(hot, 0.0, False, math.inf if keep_warm else hot + model.keepalive_warm_s)
        high = max(hist.percentile(self.keepalive_percentile, upper=True) * (1 + self.margin), self.min_keepalive_s)
        keepalive = min(high, self.max_keepalive_s)
        if keep_warm:
            cool = math.inf
        elif known:
            cool = max(keepalive, min(high, self.max_warm_s))
        else:
            cool = keepalive + model.keepalive_warm_s
        if self._cheap(model.load_s, model.slo_s):
            return KeepAliveWindows(min(keepalive, model.keepalive_hot_s), 0.0, True, cool)
        low = hist.percentile(self.prewarm_percentile, upper=False) * (1 - self.margin)
        prewarm = low if low > self.min_gap_s and low < keepalive else 0.0
        return KeepAliveWindows(keepalive, prewarm, True, cool)

    def _cheap(self, load_s: float, slo_s: float) -> bool:
        """Whether a load of ``load_s`` costs a model with SLO ``slo_s`` no deadline."""
        return math.isfinite(slo_s) and load_s <= self.cheap_reload_fraction * slo_s

    def decide(self, models: tuple[ModelView, ...]) -> tuple[Demotion | Prewarm, ...]:
        out: list[Demotion | Prewarm] = []
        for model in models:
            if model.busy:
                continue
            w = self.windows(model)
            idle = model.idle_s
            if model.tier is Tier.HOT:
                early = w.prewarm_s and not model.prewarmed and idle < w.prewarm_s - model.load_s
                if idle >= w.keepalive_s or early:
                    out.append(Demotion(model.name, Tier.WARM))
            elif model.tier in (Tier.WARM, Tier.COOL) and w.prewarm_s and w.prewarm_s - model.load_s <= idle:
                if idle < w.keepalive_s:
                    out.append(Prewarm(model.name))
                elif model.tier is Tier.WARM and idle >= w.cool_s:
                    out.append(Demotion(model.name, Tier.COOL))
            elif model.tier is Tier.WARM and idle >= w.cool_s:
                out.append(Demotion(model.name, Tier.COOL))
        return tuple(out)

    def recheck_s(self, model: ModelView) -> float:
        if model.busy:
            return math.inf
        w = self.windows(model)
        thresholds: tuple[float, ...] = (w.keepalive_s, w.cool_s)
        if w.prewarm_s:
            thresholds = (*thresholds, w.prewarm_s - model.load_s)
        return _next_threshold(model.idle_s, thresholds)
