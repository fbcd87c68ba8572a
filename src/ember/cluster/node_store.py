"""A store on every node of a Ray cluster: the Ray actor that keeps one node's copies of the weights.

Each node runs one :class:`NodeStore` actor (no CPU reserved) over an :class:`ember.store.Store` on
that node's disk (cool) and in its host memory (warm). The node of ``ember serve`` uses the
service's own store, where imports are committed: models enter the cluster there, once.

A node that needs weights it lacks (:meth:`NodeStore.ensure`) fetches them from another node's store
actor, file by file in ``FETCH_CHUNK`` pieces (:meth:`NodeStore.read`), peers first and the service's
node last. The pieces go from node to node through Ray's object store, not through the head process.
The copy lands in a staging folder and is committed as an import is: every chunk's crc32 is checked,
and the weights' and assets' sha256 must equal the source's manifest. A copy that fails either is
discarded and fetched again from the next source.

A node whose store directory cannot be opened or written (or whose disk filled up during a fetch)
says why in :meth:`NodeStore.refusing`; placement then gives it no model it does not already hold,
and ``ember status`` shows the reason. Asked again, a refusing store looks again (it opens its
directory, writes a probe file and, after a full disk, checks that the model that did not fit now
would), so a node whose disk was freed or fixed takes models again without a restart.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import ray

from ember.errors import CorruptCheckpoint, StorageFull
from ember.store import Store, Tier
from ember.store.store import ASSETS, MANIFEST, WEIGHTS

__all__ = ["FETCH_CHUNK", "NodeStore", "NodeStoreActor"]

_log = logging.getLogger(__name__)

#: Bytes per read of a fetch; ``FETCH_AHEAD`` reads are in flight at once.
FETCH_CHUNK = 8 << 20
FETCH_AHEAD = 4


class NodeStore:
    def __init__(self, root: str, warm_budget_bytes: int | None = None) -> None:
        self.root = Path(root)
        self._warm_budget_bytes = warm_budget_bytes
        self._store: Store | None = None
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        #: After a full disk: the bytes of the copy that did not fit, which must fit before it takes more.
        self._need_bytes = 0
        self._refusing = self._open()

    def node_id(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def refusing(self) -> str | None:
        """Why this node takes no new models (its store cannot be opened or written, or its disk is
        full), or None. A store that refuses looks again first: a freed or fixed disk is noticed."""
        with self._guard:
            if self._refusing is not None:
                self._refusing = self._open()
                if self._refusing is None:
                    self._need_bytes = 0
            return self._refusing

    def holdings(self) -> dict[str, str]:
        """Each model key held here -> its tier (``warm`` or ``cool``)."""
        if self._store is None:
            return {}
        return {key: self._store.tier(key).value for key in self._store.keys()}  # noqa: SIM118

    def manifest(self, key: str) -> dict[str, Any]:
        """The cool copy's manifest (sizes and sha256 of the weights and each asset)."""
        raw: dict[str, Any] = json.loads((self._opened().get(key).path / MANIFEST).read_bytes())
        return raw

    def read(self, key: str, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the cool copy's file ``name`` (``weights.ember`` or ``assets/X``)."""
        folder = self._opened().get(key).path
        path = (folder / name).resolve()
        if folder.resolve() not in path.parents:
            raise ValueError(f"{name!r} is not a file of model '{key}'")
        with open(path, "rb") as reader:
            reader.seek(offset)
            return reader.read(length)

    def ensure(self, key: str, sources: list[tuple[str, Any]]) -> dict[str, Any]:
        """Make ``key`` warm here, fetching it from the first of ``sources`` (node id, store actor) that
        gives a sound copy if this node lacks it. Returns the warm weights path, the tier the model was
        in here before, the node it came from (None: it was here) and the seconds the fetch took."""
        with self._lock(key):
            store = self._opened()
            before = store.tier(key)
            source, fetch_s = None, 0.0
            if before is Tier.COLD:
                if self._refusing is not None:
                    raise StorageFull(f"node {self.node_id()[:8]} takes no new models: {self._refusing}")
                source, fetch_s = self._fetch(store, key, sources)
            store.promote(key)
            return {
                "weights_path": str(store.weights_path(key)),
                "from_tier": before.value,
                "source": source,
                "fetch_s": fetch_s,
            }

    def close(self) -> None:
        """Close the store: the last store open on its root removes its warm copies (host memory)."""
        if self._store is not None:
            self._store.close()

    def demote(self, key: str) -> None:
        self._opened().demote(key)

    def remove(self, key: str) -> None:
        store = self._opened()
        if store.tier(key) is not Tier.COLD:
            store.remove(key)

    def _open(self) -> str | None:
        """Open the store if it is not open yet, then probe it; None if it takes new models, else why not."""
        if self._store is None:
            try:
                self._store = Store(self.root, warm_budget_bytes=self._warm_budget_bytes)
            except OSError as exc:
                return f"its store at {self.root} cannot be opened ({exc.strerror or exc})"
        return _probe(self.root, self._need_bytes)

    def _opened(self) -> Store:
        if self._store is None:
            raise StorageFull(f"node {self.node_id()[:8]} has no store: {self._refusing}")
        return self._store

    def _fetch(self, store: Store, key: str, sources: list[tuple[str, Any]]) -> tuple[str, float]:
        problems: list[str] = []
        for node, actor in sources:
            started = time.perf_counter()  # clock-ok: measures a real transfer
            staging = store.staging(key)
            size = 0
            try:
                manifest = ray.get(actor.manifest.remote(key))
                size = int(manifest["bytes"])
                _pull(actor, key, WEIGHTS, size, staging / WEIGHTS)
                (staging / ASSETS).mkdir()
                for name in manifest["assets"]:  # small files: one read each
                    data = ray.get(actor.read.remote(key, f"{ASSETS}/{name}", 0, -1))
                    (staging / ASSETS / name).write_bytes(data)
                stored = store.commit(key, staging)  # checks every chunk's crc32
                mine = self.manifest(key)
                if stored.sha256 != manifest["sha256"] or mine["assets"] != manifest["assets"]:
                    store.remove(key)
                    raise CorruptCheckpoint(f"the copy of '{key}' from node {node[:8]} differs from its manifest")
                return node, time.perf_counter() - started  # clock-ok
            except OSError as exc:
                store.abort(staging)
                if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES):
                    with self._guard:
                        self._need_bytes = size if exc.errno == errno.ENOSPC else 0
                        self._refusing = f"its store at {self.root} cannot be written ({exc.strerror})"
                    raise StorageFull(f"node {self.node_id()[:8]}: {self._refusing}") from None
                problems.append(f"{node[:8]}: {exc}")
            except Exception as exc:  # a corrupt copy, a source that died: discard it, try the next
                store.abort(staging)
                _log.warning("fetching %s from node %s failed: %s", key, node[:8], exc)
                problems.append(f"{node[:8]}: {type(exc).__name__}: {exc}")
        raise CorruptCheckpoint(
            f"no node gave a sound copy of '{key}' ({'; '.join(problems) or 'no node holds it'}); redeploy the model"
        )

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


def _pull(actor: Any, key: str, name: str, size: int, target: Path) -> None:
    """Copy ``size`` bytes of ``name`` from ``actor`` into ``target``, ``FETCH_AHEAD`` reads in flight."""
    offsets = list(range(0, size, FETCH_CHUNK))
    pending: list[Any] = [actor.read.remote(key, name, o, FETCH_CHUNK) for o in offsets[:FETCH_AHEAD]]
    with open(target, "wb") as writer:
        for i in range(len(offsets)):
            if i + FETCH_AHEAD < len(offsets):
                pending.append(actor.read.remote(key, name, offsets[i + FETCH_AHEAD], FETCH_CHUNK))
            writer.write(ray.get(pending[i]))
            pending[i] = None  # its bytes are written: let Ray free them


def _probe(root: Path, need_bytes: int = 0) -> str | None:
    """None if a file can be written under ``root`` and its disk has ``need_bytes`` free, else why not."""
    probe = root / "staging" / ".probe"
    try:
        probe.write_bytes(b"ember")
        probe.unlink()
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return f"its store at {root} cannot be written ({exc.strerror or exc})"
    if free < need_bytes:
        return f"its disk at {root} is full ({free} bytes free; a model of {need_bytes} bytes did not fit)"
    return None


_ACTOR_OPTIONS: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 8, "num_cpus": 0}
#: The actor class: ``NodeStoreActor.options(...).remote(root)``.
NodeStoreActor: Any = ray.remote(**_ACTOR_OPTIONS)(NodeStore)
