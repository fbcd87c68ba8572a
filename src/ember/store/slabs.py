"""Slabs: where in the warm-tier arena a model's weights go, and which models leave to make room.

The arena is ``arena_bytes`` of shared memory; each warm model holds one *slab*, a run of it
starting on an ``align``-byte boundary and rounded up to a whole number of ``align`` units. Between
the slabs are free runs. Decisions:

- :func:`free_runs`: the free runs left by a set of slabs (adjacent free space is one run).
- :func:`place`: the offset for a slab of ``length`` bytes: the smallest free run that holds it
  (best fit; ties: the lowest offset), None if no run does.
- :func:`plan_room`: which models to evict (least recently used first, never one in ``keep``) so
  that a slab of ``length`` bytes can be placed, and where; None if evicting every other model is
  not enough.

A model takes ONE contiguous slab, never several. Its checkpoint is one contiguous data region
and a worker binds tensors to it as views, so a slab split across runs would mean per-tensor
placement and a mapping per piece; instead, when no free run is long enough, the planner evicts
models until one is. Evicting every model frees the whole arena, so any model no larger than the
arena fits without compaction, and nothing is ever moved under a running model. The cost is that
fragmentation may evict a model more than the bytes alone require; the planner then keeps only
the victims that overlap the run it chose.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["RoomPlan", "Slab", "free_runs", "place", "plan_room", "slab_length"]


@dataclass(frozen=True, order=True)
class Slab:
    """A run of the arena: ``length`` bytes from ``offset``."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class RoomPlan:
    """Evict ``victims`` (in this order), then put the new slab at ``slab``."""

    victims: tuple[str, ...]
    slab: Slab


def slab_length(num_bytes: int, align: int) -> int:
    """The bytes a slab holding ``num_bytes`` takes: rounded up to ``align`` (at least one unit)."""
    if align <= 0 or num_bytes < 0:
        raise ValueError(f"num_bytes={num_bytes}, align={align}: use num_bytes >= 0 and align > 0")
    return max(align, -(-num_bytes // align) * align)


def free_runs(arena_bytes: int, slabs: Collection[Slab]) -> list[Slab]:
    """The free runs of an ``arena_bytes`` arena holding ``slabs`` (which must not overlap), in order."""
    runs: list[Slab] = []
    cursor = 0
    for slab in sorted(slabs):
        if slab.offset > cursor:
            runs.append(Slab(cursor, slab.offset - cursor))
        cursor = max(cursor, slab.end)
    if cursor < arena_bytes:
        runs.append(Slab(cursor, arena_bytes - cursor))
    return runs


def place(length: int, arena_bytes: int, slabs: Collection[Slab]) -> Slab | None:
    """Best fit: a slab of ``length`` at the start of the smallest free run that holds it, else None."""
    fits = [run for run in free_runs(arena_bytes, slabs) if run.length >= length]
    if not fits:
        return None
    best = min(fits, key=lambda run: (run.length, run.offset))
    return Slab(best.offset, length)


def plan_room(
    length: int,
    arena_bytes: int,
    held: Mapping[str, Slab],
    lru_order: Sequence[str],
    keep: Collection[str] = (),
) -> RoomPlan | None:
    """Where a slab of ``length`` bytes goes and which models in ``held`` must leave first.

    Models are considered for eviction in ``lru_order`` (least recently used first; models held
    but missing from it come first, in name order); those in ``keep`` are never evicted. Once a
    run fits, only the victims overlapping it are kept in the plan. None if it cannot fit.
    """
    if length > arena_bytes:
        return None
    ranked = [k for k in sorted(held) if k not in lru_order] + [k for k in lru_order if k in held]
    remaining = dict(held)
    chosen: list[str] = []
    for key in [None, *(k for k in ranked if k not in keep)]:
        if key is not None:
            chosen.append(key)
            del remaining[key]
        slab = place(length, arena_bytes, remaining.values())
        if slab is not None:
            victims = tuple(k for k in chosen if held[k].offset < slab.end and slab.offset < held[k].end)
            return RoomPlan(victims, slab)
    return None
