"""The Ray backend's view of the node stores: which node holds which model in which tier, and the
fetches that move weights from node to node (:mod:`ember.cluster.node_store` is the actor side).

The node of ``ember serve`` (the *home* node) shares the service's store: imports land there, and it
is every fetch's last resort. Any other node's store lives under ``node_root/<node id>`` on that
node's disk. :meth:`NodeStores.ensure` asks a node's store to make a model warm there, naming as
sources the nodes that hold it (warm ones first), then the home node.

A node's store that cannot be written, or whose disk filled up during a fetch, *refuses*:
:meth:`NodeStores.refusing` says why, the node's workers take no model it lacks, and the backend's
poll asks it again (:meth:`NodeStores.recheck`) until it takes models again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import EmberError, StorageFull, WorkerCrashed
from ember.policies.tiers import Tier

__all__ = ["Fetch", "NodeStores"]

_log = logging.getLogger(__name__)

#: Fetches remembered (for ``ember status`` and the measured node-to-node bandwidth).
FETCHES_KEPT = 64


@dataclass(frozen=True)
class Fetch:
    """One model copied from node ``source`` to node ``node``."""

    key: str
    node: str
    source: str
    seconds: float


class NodeStores:
    def __init__(self, home: str, store_root: Path, node_root: Path) -> None:
        self.home = home
        self._store_root = store_root
        self._node_root = node_root
        self._actors: dict[str, Any] = {}
        self._opening: dict[str, asyncio.Future[None]] = {}
        self._held: dict[str, dict[str, Tier]] = {}
        self._refusing: dict[str, str | None] = {}
        self._rechecking: set[str] = set()
        self.fetches: deque[Fetch] = deque(maxlen=FETCHES_KEPT)

    def nodes(self) -> set[str]:
        """The nodes whose store is open or opening."""
        return set(self._actors) | set(self._opening)

    def is_open(self, node_id: str) -> bool:
        """Whether the node's store is open (its actor started and said what it holds)."""
        return node_id in self._actors

    def is_home(self, node_id: str) -> bool:
        return node_id == self.home

    def root_of(self, node_id: str) -> Path:
        return self._store_root if self.is_home(node_id) else self._node_root / node_id[:16]

    def tier(self, node_id: str, key: str) -> Tier:
        return self._held.get(node_id, {}).get(key, Tier.COLD)

    def refusing(self, node_id: str) -> str | None:
        """Why the node takes no new models (its store cannot be written), or None."""
        return self._refusing.get(node_id)

    def refusing_nodes(self) -> set[str]:
        """The nodes whose open store refuses new models."""
        return {node_id for node_id in self._actors if self._refusing.get(node_id) is not None}

    async def recheck(self, node_id: str) -> None:
        """Ask a node's store whether it still refuses (its disk may have been freed or fixed)."""
        actor = self._actors.get(node_id)
        if actor is None or node_id in self._rechecking:
            return
        self._rechecking.add(node_id)
        try:
            refusing = await asyncio.wrap_future(actor.refusing.remote().future())
        except Exception as exc:  # the node is leaving: the poll forgets it
            _log.warning("could not ask the store of Ray node %s again: %s", node_id[:8], type(exc).__name__)
            return
        finally:
            self._rechecking.discard(node_id)
        if self._actors.get(node_id) is actor:
            self._refusing[node_id] = refusing

    async def open(self, node_id: str) -> None:
        """Start the node's store actor and learn what it holds."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from ember.cluster.node_store import NodeStoreActor

        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._opening[node_id] = done
        actor: Any = None
        try:
            actor = NodeStoreActor.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
            ).remote(str(self.root_of(node_id)))
            held = await asyncio.wrap_future(actor.holdings.remote().future())
            refusing = await asyncio.wrap_future(actor.refusing.remote().future())
        except Exception as exc:
            self._refusing[node_id] = f"its store did not open ({type(exc).__name__}: {exc})"
            _log.warning("the store of Ray node %s did not open: %s", node_id[:8], exc)
            return
        finally:
            self._opening.pop(node_id, None)
            done.set_result(None)
        self._actors[node_id] = actor
        self._held[node_id] = {key: Tier(tier) for key, tier in held.items()}
        self._refusing[node_id] = refusing

    def forget(self, node_id: str) -> None:
        """The node left: whatever it held is gone with it."""
        actor = self._actors.pop(node_id, None)
        self._held.pop(node_id, None)
        self._refusing.pop(node_id, None)
        if actor is not None:
            import ray

            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    async def close(self, timeout_s: float) -> None:
        """Close every node's store (their warm copies leave host memory), then stop the actors."""
        import ray

        closing = [asyncio.wrap_future(actor.close.remote().future()) for actor in self._actors.values()]
        if closing:
            await asyncio.wait(closing, timeout=timeout_s)
        for future in closing:
            if future.done() and not future.cancelled():
                future.exception()
        for actor in self._actors.values():
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self._actors.clear()
        self._held.clear()

    async def ensure(self, node_id: str, key: str) -> str:
        """Make ``key`` warm in ``node_id``'s store (fetched from another node if it lacks it); the
        weights path there."""
        opening = self._opening.get(node_id)
        if opening is not None:
            await asyncio.shield(opening)
        actor = self._actors.get(node_id)
        if actor is None:
            why = self._refusing.get(node_id) or "its store is not open"
            raise StorageFull(f"node {node_id[:8]} takes no models: {why}")
        peers = [n for n, held in self._held.items() if key in held and n not in (node_id, self.home)]
        peers.sort(key=lambda n: (self._held[n][key] is not Tier.WARM, n))
        sources = [(n, self._actors[n]) for n in peers if n in self._actors]
        if self.home in self._actors:
            sources.append((self.home, self._actors[self.home]))
        try:
            result = await asyncio.wrap_future(actor.ensure.remote(key, sources).future())
        except Exception as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, StorageFull) and self._actors.get(node_id) is actor:
                self._refusing[node_id] = cause.message.partition(": ")[2] or cause.message
            if isinstance(cause, EmberError):
                raise cause from None
            raise WorkerCrashed(f"the store of node {node_id[:8]} failed: {type(exc).__name__}") from None
        self._held.setdefault(node_id, {})[key] = Tier.WARM
        if result["source"] is not None:
            self.fetches.append(Fetch(key, node_id, str(result["source"]), float(result["fetch_s"])))
        return str(result["weights_path"])

    def describe(self, node_id: str) -> dict[str, Any]:
        """What ``ember status`` shows of a node's store."""
        held = self._held.get(node_id, {})
        return {
            "root": str(self.root_of(node_id)),
            "models": {tier.value: sorted(k for k, t in held.items() if t is tier) for tier in (Tier.WARM, Tier.COOL)},
            "refusing": self._refusing.get(node_id),
            "fetched": [
                {"key": f.key, "from": f.source, "seconds": f.seconds} for f in self.fetches if f.node == node_id
            ],
        }
