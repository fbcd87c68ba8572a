"""The store's index of its warm arena: which model holds which slab, and where the next one goes.

Three kinds of slab are not free: *held* (a warm model's, named in its ``weights.slab``),
*pending* (a promotion is filling it; nothing names it on disk until the promotion's warm folder
is renamed into place, so a crash mid-copy leaves it free) and *retired* (its model was demoted
but a worker may still hold tensors over it, which :meth:`Arena.in_use` tells from the worker's
read lock). A retired slab is free again once no worker holds it; a held slab a worker holds is
never chosen for eviction, so the arena never reuses memory under a running model.

Placement and the choice of victims are :func:`ember.store.slabs.plan_room`'s: one contiguous
slab per model, best fit, least recently used models out first. The index is rebuilt at start from
the warm folders (:meth:`ArenaIndex.adopt`): a slab is adopted only if it lies in this arena, on
its alignment, overlaps no other, and holds a readable checkpoint of the manifest's size.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.errors import CorruptCheckpoint
from ember.store.arena import Arena, SlabRef
from ember.store.compress import read_compressed_index
from ember.store.format import is_compressed, read_index, read_index_at
from ember.store.slabs import RoomPlan, Slab, free_runs, plan_room, slab_length

__all__ = ["ArenaIndex", "ArenaStats"]


@dataclass(frozen=True)
class ArenaStats:
    """The arena's size, the bytes its slabs take (held, pending and retired), its largest free run."""

    bytes: int
    used_bytes: int
    largest_free_bytes: int
    models: int
    huge_pages: bool


class ArenaIndex:
    """Slabs of one :class:`Arena` by state; thread-safe (one leaf lock, held for no I/O but lock probes)."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self._held: dict[str, Slab] = {}
        self._pending: dict[str, Slab] = {}
        self._retired: list[Slab] = []
        self._lock = threading.Lock()

    def adopt(self, key: str, ref: SlabRef, size: int) -> bool:
        """Take a warm folder's slab into the index at start; False if it cannot be trusted."""
        arena = self.arena
        slab = Slab(ref.offset, slab_length(ref.length, arena.align))
        if ref.arena != arena.path or ref.length != size or ref.offset % arena.align or slab.end > arena.size:
            return False
        with self._lock:
            if any(s.offset < slab.end and slab.offset < s.end for s in self._held.values()):
                return False
            try:
                read_index_at(arena.path, ref.offset, ref.length)
            except CorruptCheckpoint:
                return False
            self._held[key] = slab
        return True

    def plan(self, key: str, size: int, lru_order: Sequence[str], keep: Collection[str] = ()) -> RoomPlan:
        """Where a ``size``-byte checkpoint goes and which warm models (not in ``keep``) leave first;
        ValueError if it cannot fit."""
        arena = self.arena
        length = slab_length(size, arena.align)
        if length > arena.size:
            raise ValueError(f"model '{key}' ({size} bytes) exceeds the warm budget of {arena.size} bytes; raise it")
        with self._lock:
            self._prune()
            busy = {f"\0retired{i}": s for i, s in enumerate(self._retired)}
            busy |= {f"\0pending-{k}": s for k, s in self._pending.items()}
            held = dict(self._held)
            in_use = {k for k, s in held.items() if arena.in_use(s.offset, s.length)}
        plan = plan_room(length, arena.size, held | busy, lru_order, keep=in_use | set(busy) | set(keep))
        if plan is None:
            raise ValueError(
                f"model '{key}' ({size} bytes) does not fit the warm arena: workers hold or promotions fill "
                "the rest; unload models from the workers or raise the warm budget"
            )
        return plan

    def reserve(self, key: str, slab: Slab) -> None:
        """Mark ``slab`` as being filled for ``key`` (after the plan's victims have been released)."""
        with self._lock:
            self._retired = [s for s in self._retired if not (s.offset < slab.end and slab.offset < s.end)]
            self._pending[key] = slab

    def commit(self, key: str) -> None:
        """The pending slab of ``key`` now holds its warm copy."""
        with self._lock:
            self._held[key] = self._pending.pop(key)

    def abandon(self, key: str) -> None:
        """Forget a pending slab whose promotion failed (nothing if it was committed)."""
        with self._lock:
            self._pending.pop(key, None)

    def release(self, key: str) -> None:
        """``key`` left the warm tier: its slab is retired until no worker holds it."""
        with self._lock:
            slab = self._held.pop(key, None)
            if slab is not None:
                self._retired.append(slab)

    def fill(self, offset: int, source: Path, threads: int) -> None:
        """Copy (or decompress) the cool checkpoint ``source`` into the slab at ``offset``, checking it."""
        if is_compressed(source):
            self.arena.fill_compressed(offset, read_compressed_index(source), threads)
        else:
            self.arena.fill(offset, source, read_index(source), threads)

    def _prune(self) -> None:
        """Free the retired slabs no worker holds any more (call with the lock held)."""
        self._retired = [s for s in self._retired if self.arena.in_use(s.offset, s.length)]

    def statistics(self) -> ArenaStats:
        with self._lock:
            self._prune()
            taken = [*self._held.values(), *self._pending.values(), *self._retired]
            models = len(self._held)
        unique = set(taken)
        runs = free_runs(self.arena.size, unique)
        used = self.arena.size - sum(r.length for r in runs)
        largest = max((r.length for r in runs), default=0)
        return ArenaStats(self.arena.size, used, largest, models, self.arena.huge_pages)
