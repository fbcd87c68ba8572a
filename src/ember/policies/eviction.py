"""Eviction: which models leave a tier when memory is short.

Decision rule of :class:`ExpectedCostEviction`: evicting a model costs, in expectation, its reload
time times the probability that it is needed again soon. With arrivals at ``arrival_rate`` (a
Poisson estimate), the probability of a request within ``horizon_s`` is
``1 - exp(-arrival_rate * horizon_s)``. Models are evicted cheapest expected cost per byte freed
first (ties: least recently used, then name) until ``need_bytes`` are free. A busy model is never
evicted; if the idle ones cannot free enough, nothing is evicted and the caller must wait.

:class:`LruEviction` is the baseline: least recently used first, the same rules otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Eviction", "EvictionCandidate", "ExpectedCostEviction", "LruEviction", "reuse_probability"]


@dataclass(frozen=True)
class EvictionCandidate:
    name: str
    bytes: int
    #: Predicted seconds to bring it back to this tier after eviction.
    reload_s: float
    #: Requests per second (recent estimate).
    arrival_rate: float
    last_used: float
    busy: bool = False


class Eviction(Protocol):
    def choose(self, need_bytes: int, candidates: tuple[EvictionCandidate, ...]) -> tuple[str, ...]:
        """Names to evict, in order, freeing at least ``need_bytes``; () if that is impossible or unneeded."""
        ...


def reuse_probability(arrival_rate: float, horizon_s: float) -> float:
    """Probability of at least one Poisson arrival at ``arrival_rate`` within ``horizon_s``."""
    if arrival_rate <= 0 or horizon_s <= 0:
        return 0.0
    return 1.0 - math.exp(-arrival_rate * horizon_s)


def _pick(need_bytes: int, ordered: list[EvictionCandidate]) -> tuple[str, ...]:
    if need_bytes <= 0:
        return ()
    chosen: list[str] = []
    freed = 0
    for candidate in ordered:
        if freed >= need_bytes:
            break
        chosen.append(candidate.name)
        freed += candidate.bytes
    return tuple(chosen) if freed >= need_bytes else ()


@dataclass(frozen=True)
class ExpectedCostEviction:
    """Evict the lowest expected reload cost (reload time x probability of reuse) per byte first."""

    horizon_s: float = 60.0

    def cost(self, candidate: EvictionCandidate) -> float:
        return candidate.reload_s * reuse_probability(candidate.arrival_rate, self.horizon_s)

    def choose(self, need_bytes: int, candidates: tuple[EvictionCandidate, ...]) -> tuple[str, ...]:
        idle = [c for c in candidates if not c.busy]
        idle.sort(key=lambda c: (self.cost(c) / max(c.bytes, 1), c.last_used, c.name))
        return _pick(need_bytes, idle)


@dataclass(frozen=True)
class LruEviction:
    """Evict the least recently used first."""

    def choose(self, need_bytes: int, candidates: tuple[EvictionCandidate, ...]) -> tuple[str, ...]:
        idle = sorted((c for c in candidates if not c.busy), key=lambda c: (c.last_used, c.name))
        return _pick(need_bytes, idle)
