"""Trace builders: repeatable arrival times for tests and the simulator."""

from __future__ import annotations

import random

__all__ = ["poisson_arrivals"]


def poisson_arrivals(rate_per_s: float, duration_s: float, seed: int = 0, start_s: float = 0.0) -> list[float]:
    """Arrival times of a Poisson process of ``rate_per_s`` over ``duration_s``, from a fixed seed."""
    if rate_per_s <= 0 or duration_s < 0:
        raise ValueError(f"need rate_per_s > 0 and duration_s >= 0, got {rate_per_s} and {duration_s}")
    rng = random.Random(seed)
    out: list[float] = []
    t = start_s
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= start_s + duration_s:
            return out
        out.append(t)
