"""Device scheduling: which model's batch a shared device runs next.

A device runs one batch at a time. When several models share it, each offers its next batch as a
:class:`Candidate`: its earliest deadline, the predicted run time, and the swap-in cost if the
model is not resident on the device (its load from host memory, or from disk). The idea is
Clockwork's (OSDI'20): predictable latencies let the scheduler start every batch at the last
moment that still meets its deadline, and count the swap a choice forces.

Decision rule of :class:`LatestStartFirst`: a candidate's *latest start* is
``earliest_deadline - swap_in_s - run_s``. Among candidates that can still make it
(``latest start >= now``), run the one whose latest start is earliest (least slack first); ties go
to the resident model (no swap), then to the one serving more requests, then to the name. When
no candidate can make it, the whole choice is best effort: the candidate with the most requests
per second of device time it costs, so a late device catches up fastest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Candidate", "DeviceScheduler", "LatestStartFirst"]


@dataclass(frozen=True)
class Candidate:
    model: str
    #: The earliest deadline among the requests of the batch.
    earliest_deadline: float
    #: Predicted seconds to run the batch once the model is resident.
    run_s: float
    #: Predicted seconds to bring the model onto the device first (0 when resident).
    swap_in_s: float
    requests: int

    @property
    def latest_start(self) -> float:
        return self.earliest_deadline - self.swap_in_s - self.run_s


class DeviceScheduler(Protocol):
    def choose(self, now: float, candidates: tuple[Candidate, ...]) -> Candidate | None: ...


@dataclass(frozen=True)
class LatestStartFirst:
    """Least slack first among batches that can meet their deadline, counting the swap-in."""

    def choose(self, now: float, candidates: tuple[Candidate, ...]) -> Candidate | None:
        if not candidates:
            return None
        feasible = [c for c in candidates if c.latest_start >= now]
        if feasible:
            return min(feasible, key=lambda c: (c.latest_start, c.swap_in_s > 0, -c.requests, c.model))
        return max(
            candidates,
            key=lambda c: (c.requests / max(c.swap_in_s + c.run_s, 1e-9), -c.earliest_deadline, c.model),
        )
