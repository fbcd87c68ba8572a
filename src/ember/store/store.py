"""The weight store: a model's cool copy on local disk and its warm copy in host shared memory.

    root/models/<key>/        cool: weights.ember, assets/<name>, manifest.json
    root/staging/<random>/    an import in progress (or a model being removed)
    warm_root/<key>/          warm: the same three, in /dev/shm where the host has it; or, with
                              an arena, weights.slab in place of weights.ember
    warm_root/.arena-<token>  the warm arena (:mod:`ember.store.arena`), when the store has one

Every copy is built in a scratch folder and renamed into place with its ``manifest.json`` written
last, so a folder under a key's name is always complete; a crash leaves only scratch folders, and
the first ``Store`` opened on a root afterwards deletes them. A ``flock`` on ``root/.lock`` tells a
store whether it is the only one open on the root: only then does it clean up at start, and only
the last one to close removes the warm copies. Within a process, a lock per key serialises
commit, promote, demote, remove and verify; ``tier()`` and the other reads take no lock.

Weights are Ember checkpoints (:mod:`ember.store.format`): commit, promote and ``verify`` check
every chunk's crc32 (a promote checks the warm copy it made, so what workers map has been checked).

Each tier may have a byte budget. The store remembers the order in which models were used
(committed, promoted, or their weights path asked for; a logical counter, not the clock) and
``evictable`` lists a tier's models least recently used first; ``make_room`` demotes (warm) or
removes (cool) in that order until the bytes fit, and returns what it moved. ``promote`` makes room
in the warm tier itself; ``commit`` refuses a model the cool budget cannot hold, since dropping a
cool copy loses the model until it is imported again: that is the controller's call.

With ``arena=True`` the warm tier is one shared-memory region of the warm budget's size,
allocated and touched when the store opens, and each warm model's checkpoint takes a slab of it
(:mod:`ember.store.arena`, :mod:`ember.store.warm_arena`): promotion reads straight into the
slab, eviction frees slabs until one contiguous run fits, and ``weights_path`` names the model's
``weights.slab``, which :func:`ember.store.loader.load_checkpoint` follows. Only a store that is
the only one open on its root may own an arena; a restart rebuilds the arena's index from the
warm folders, and the last store to close removes the arena with the warm copies.

The store reports the warm, cool and cold tiers; hot (on the device) is the worker's business.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.errors import CorruptCheckpoint
from ember.policies.tiers import Tier
from ember.store.arena import ARENA_PREFIX, SLAB_FILE, Arena, SlabRef
from ember.store.compress import compress_checkpoint, decompress_checkpoint, read_compressed_index, verify_frames
from ember.store.format import REPAIR as _FORMAT_REPAIR
from ember.store.format import atomic_file, fsync_path, is_compressed, read_index, read_index_at, verify_chunks
from ember.store.warm_arena import ArenaIndex, ArenaStats

__all__ = ["ArenaStats", "Store", "StoreStats", "StoredModel", "Tier", "TierStats"]

WEIGHTS = "weights.ember"
ASSETS = "assets"
MANIFEST = "manifest.json"
CHUNK_BYTES = 8 << 20
MIN_FILE_SAVING = 0.05  # commit(compress=True) keeps the compressed weights only if they are this much smaller
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SCRATCH = (".promote-", ".trash-")
_REPAIR = "remove it from the store and import it again from its source"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredModel:
    """A committed model: its key (``"name@version"``), its weights' size and hash, its assets.

    ``bytes`` is the size of the cool copy's weights; ``raw_bytes`` is that of the uncompressed
    checkpoint when the cool copy is compressed (the size of its warm copy), else None.
    """

    key: str
    bytes: int
    sha256: str
    assets: tuple[str, ...]
    path: Path
    raw_bytes: int | None = None

    @property
    def warm_bytes(self) -> int:
        """The size of the model's weights in the warm tier (always uncompressed)."""
        return self.bytes if self.raw_bytes is None else self.raw_bytes


@dataclass(frozen=True)
class TierStats:
    """A tier's models and weight bytes, and its byte budget (None: unlimited)."""

    models: int
    bytes: int
    budget_bytes: int | None = None


@dataclass(frozen=True)
class StoreStats:
    """Models and weight bytes per tier; a warm model also counts in cool (its disk copy stays).

    ``arena``: the warm arena's figures, for a store that has one."""

    warm: TierStats
    cool: TierStats
    arena: ArenaStats | None = None


@dataclass(frozen=True)
class _Manifest:
    key: str
    size: int
    sha256: str
    assets: dict[str, str]  # asset name -> sha256
    raw_bytes: int | None = None  # the uncompressed size, when the cool weights are compressed

    @property
    def warm_size(self) -> int:
        return self.size if self.raw_bytes is None else self.raw_bytes

    def to_json(self) -> bytes:
        body: dict[str, object] = {"key": self.key, "bytes": self.size, "sha256": self.sha256, "assets": self.assets}
        if self.raw_bytes is not None:
            body["raw_bytes"] = self.raw_bytes
        return json.dumps(body, indent=2).encode() + b"\n"

    @classmethod
    def load(cls, folder: Path) -> _Manifest:
        """Read ``folder``'s manifest: FileNotFoundError if absent, CorruptCheckpoint if malformed."""
        path = folder / MANIFEST
        try:
            raw = json.loads(path.read_bytes())
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptCheckpoint(f"{path} is not valid JSON ({exc}); {_REPAIR}") from None
        ok = isinstance(raw, dict) and isinstance(raw.get("key"), str) and isinstance(raw.get("sha256"), str)
        ok = ok and type(raw.get("bytes")) is int and raw["bytes"] >= 0 and bool(_SHA256.fullmatch(raw["sha256"]))
        ok = ok and isinstance(raw.get("assets"), dict) and all(map(_is_asset_name, raw["assets"]))
        raw_bytes = raw.get("raw_bytes") if isinstance(raw, dict) else None
        ok = ok and (raw_bytes is None or (type(raw_bytes) is int and raw_bytes >= 0))
        if not ok or not all(isinstance(h, str) and _SHA256.fullmatch(h) for h in raw["assets"].values()):
            raise CorruptCheckpoint(f"{path} is not a manifest Ember wrote; {_REPAIR}")
        return cls(raw["key"], raw["bytes"], raw["sha256"], dict(sorted(raw["assets"].items())), raw_bytes)


class Store:
    """Committed models on disk (cool) and their copies in host shared memory (warm)."""

    def __init__(
        self,
        root: Path,
        warm_root: Path | None = None,
        *,
        warm_budget_bytes: int | None = None,
        cool_budget_bytes: int | None = None,
        verify_threads: int = 4,
        arena: bool = False,
    ) -> None:
        for name, budget in (("warm_budget_bytes", warm_budget_bytes), ("cool_budget_bytes", cool_budget_bytes)):
            if budget is not None and budget < 0:
                raise ValueError(f"{name}={budget}: use a byte count of 0 or more, or None for no limit")
        if arena and not warm_budget_bytes:
            raise ValueError("arena=True needs a warm budget: it is the arena's size")
        self._budgets = {Tier.WARM: warm_budget_bytes, Tier.COOL: cool_budget_bytes}
        self._verify_threads = max(1, verify_threads)
        self._ticks = itertools.count(1)
        self._last_use: dict[str, int] = {}
        self._room_lock = threading.Lock()
        self._root = Path(root).resolve()
        self._models = self._root / "models"
        self._staging = self._root / "staging"
        self._models.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(exist_ok=True)
        self._warm_root = Path(warm_root) if warm_root is not None else _default_warm_root(self._root)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        #: Who hears the progress of a model's copy to the warm tier (see :meth:`watch`).
        self._watchers: dict[str, Callable[[int, int], None]] = {}
        self._lock_fd: int | None = os.open(self._root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._arena: ArenaIndex | None = None
        alone = False
        with contextlib.suppress(BlockingIOError):  # another store is open on root: leave its work be
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
            self._clean()
            if arena:
                try:
                    self._open_arena(warm_budget_bytes or 0)
                except BaseException:
                    self.close()
                    raise
        if arena and not alone:
            self.close()
            raise ValueError(f"another store is open on {self._root}; an arena needs the store to itself, stop it")
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    def _open_arena(self, budget: int) -> None:
        """Map (or create) the arena and adopt the slabs of the complete warm folders; drop the rest
        (warm copies outside the arena too: the budget is the arena's size)."""
        index = ArenaIndex(Arena(self._warm_root, budget))
        for entry in sorted(self._warm_root.glob("*")):
            if _KEY.fullmatch(entry.name) and entry.is_dir():
                try:
                    ref, size = SlabRef.load(entry / SLAB_FILE), _Manifest.load(entry).warm_size
                    adopted = index.adopt(entry.name, ref, size)
                except (OSError, CorruptCheckpoint):
                    adopted = False
                if not adopted:
                    _log.warning("deleting %s: a warm copy outside this arena (a crash or a resized arena)", entry)
                    _delete(entry)
        self._arena = index

    @property
    def arena_path(self) -> Path | None:
        """The warm arena's file, for workers to map; None without an arena."""
        return self._arena.arena.path if self._arena is not None else None

    def staging(self, key: str) -> Path:
        """A fresh empty folder: write ``weights.ember`` and ``assets/<name>`` there, then commit."""
        self._check_open(key)
        folder = self._staging / f"{key}.{secrets.token_hex(8)}"
        folder.mkdir()
        return folder

    def commit(self, key: str, staging: Path, *, compress: bool = False) -> StoredModel:
        """Check and hash the staged files, write the manifest last and move the folder to the cool tier.

        With ``compress`` the staged weights are first replaced by their compressed form
        (:mod:`ember.store.compress`) if that saves at least ``MIN_FILE_SAVING`` of the bytes; else
        they stay as they are. The cool tier then holds (and its budget counts) the compressed
        bytes; promote decompresses them into the warm tier.

        ValueError if ``key`` is already committed, the folder is not a complete staging folder or
        the cool budget cannot hold it; CorruptCheckpoint if the weights are not a sound Ember
        checkpoint. The folder is then left as it was, for the caller to fix or ``abort``.
        """
        self._check_open(key)
        folder = self._own_staging(staging)
        weights, assets_dir = folder / WEIGHTS, folder / ASSETS
        if not weights.is_file():
            raise ValueError(f"{folder} holds no {WEIGHTS}; write it with write_checkpoint, then commit")
        strays = [p.name for p in folder.iterdir() if p != weights and not (p == assets_dir and p.is_dir())]
        if strays:
            raise ValueError(f"{folder} holds {strays}; it may hold only {WEIGHTS} and an {ASSETS}/ folder")
        names = sorted(p.name for p in assets_dir.iterdir()) if assets_dir.is_dir() else []
        if bad := [n for n in names if not (_is_asset_name(n) and (assets_dir / n).is_file())]:
            raise ValueError(f"assets {bad} in {assets_dir} are not plain files with plain names")
        with self._lock(key):
            cool = self._models / key
            if cool.exists():
                raise ValueError(f"model '{key}' is already in the store; remove it or use a new version")
            if compress and not is_compressed(weights):
                self._compress_staged(weights)
            raw_bytes = check_file(weights, self._verify_threads)
            sha256, size = _hash_file(weights, key, sync=True)
            budget = self._budgets[Tier.COOL]
            if budget is not None and self.statistics().cool.bytes + size > budget:
                raise ValueError(
                    f"model '{key}' ({size} bytes) does not fit the cool tier's budget of {budget} bytes; "
                    f"make_room({size}, Tier.COOL) or raise cool_budget_bytes"
                )
            assets = {name: _hash_file(assets_dir / name, key, sync=True)[0] for name in names}
            manifest = _Manifest(key, size, sha256, assets, raw_bytes if raw_bytes != size else None)
            _write_atomic(folder / MANIFEST, manifest.to_json())
            try:
                os.rename(folder, cool)
            except OSError as exc:  # another process committed the key in the meantime
                raise ValueError(f"model '{key}' is already in the store ({exc})") from None
            fsync_path(self._models)
        self.touch(key)
        return self.get(key)

    def _compress_staged(self, weights: Path) -> None:
        packed = weights.with_name(weights.name + ".z")
        try:
            size = compress_checkpoint(weights, packed, threads=self._verify_threads)
            if size <= weights.stat().st_size * (1 - MIN_FILE_SAVING):
                os.replace(packed, weights)
        finally:
            packed.unlink(missing_ok=True)

    def abort(self, staging: Path) -> None:
        """Delete a staging folder (nothing if it is already gone)."""
        shutil.rmtree(self._own_staging(staging), ignore_errors=True)

    def get(self, key: str) -> StoredModel:
        """The committed model ``key``; KeyError if the store does not hold it."""
        manifest = self._cool_manifest(key)
        path = self._models / key
        return StoredModel(key, manifest.size, manifest.sha256, tuple(manifest.assets), path, manifest.raw_bytes)

    def tier(self, key: str) -> Tier:
        """WARM if a warm copy exists, COOL if only the disk copy does, COLD if neither."""
        _check_key(key)
        if (self._warm_root / key / MANIFEST).is_file():
            return Tier.WARM
        if (self._models / key / MANIFEST).is_file():
            return Tier.COOL
        return Tier.COLD

    def weights_path(self, key: str) -> Path:
        """The warm ``weights.ember`` if the model is warm, else the cool one; counts as a use."""
        self.touch(key)
        if self.tier(key) is Tier.WARM:
            slab = self._warm_root / key / SLAB_FILE
            if not slab.is_file():
                return self._warm_root / key / WEIGHTS
            if self._arena is not None:
                return slab
        return self.get(key).path / WEIGHTS

    def assets(self, key: str) -> dict[str, bytes]:
        """The model's asset files by name, read from the warm copy if there is one."""
        warm = self._warm_root / key
        if self.tier(key) is Tier.WARM:
            with contextlib.suppress(FileNotFoundError):  # demoted while we read: use the disk
                return {name: (warm / ASSETS / name).read_bytes() for name in _Manifest.load(warm).assets}
        cool = self._models / key
        return {name: (cool / ASSETS / name).read_bytes() for name in self._cool_manifest(key).assets}

    def keys(self) -> list[str]:
        """The committed keys, sorted."""
        return sorted(p.name for p in self._models.iterdir() if _KEY.fullmatch(p.name) and (p / MANIFEST).is_file())

    def touch(self, key: str) -> None:
        """Record a use of ``key``: it becomes the last of its tier to be evicted."""
        _check_key(key)
        self._last_use[key] = next(self._ticks)

    def evictable(self, tier: Tier = Tier.WARM) -> list[str]:
        """The models ``make_room`` may move out of ``tier`` (WARM, or COOL: those not also warm), LRU first."""
        if tier not in (Tier.WARM, Tier.COOL):
            raise ValueError(f"{tier} has no budget here; evict from Tier.WARM or Tier.COOL")
        keys = [k for k in self.keys() if (self.tier(k) is Tier.WARM) == (tier is Tier.WARM)]
        return sorted(keys, key=lambda k: (self._last_use.get(k, 0), k))

    def make_room(self, num_bytes: int, tier: Tier = Tier.WARM, keep: Collection[str] = ()) -> list[str]:
        """Move models out of ``tier``, least recently used first, until ``num_bytes`` more fit its budget.

        WARM models are demoted to cool; COOL ones are removed (cold: only at their source). Models
        in ``keep`` stay. Returns the keys moved, in order; it may fall short if ``keep`` holds the rest.
        """
        budget = self._budgets.get(tier)
        moved: list[str] = []
        if budget is None:
            return moved
        if tier is Tier.WARM and self._arena is not None:  # room in the arena is a contiguous run
            with self._room_lock:
                try:
                    plan = self._arena.plan("", num_bytes, self.evictable(tier), keep)
                except ValueError:  # no run can be freed that long: fall short, as below
                    return moved
                for key in plan.victims:
                    self.demote(key)
            return list(plan.victims)
        with self._room_lock:
            stats = self.statistics()
            used = stats.warm.bytes if tier is Tier.WARM else stats.cool.bytes
            for key in self.evictable(tier):
                if used + num_bytes <= budget:
                    break
                if key in keep:
                    continue
                with contextlib.suppress(KeyError):  # removed meanwhile: its bytes are gone anyway
                    model = self.get(key)
                    size = model.warm_bytes if tier is Tier.WARM else model.bytes
                    if tier is Tier.WARM:
                        self.demote(key)
                    else:
                        self.remove(key)
                    used -= size
                    moved.append(key)
        return moved

    def statistics(self) -> StoreStats:
        warm_models = warm_bytes = cool_models = cool_bytes = 0
        for key in self.keys():
            with contextlib.suppress(KeyError, FileNotFoundError):  # removed while we counted
                cool_bytes += self.get(key).bytes
                cool_models += 1
                if self.tier(key) is Tier.WARM:
                    warm_bytes += _Manifest.load(self._warm_root / key).warm_size
                    warm_models += 1
        return StoreStats(
            warm=TierStats(warm_models, warm_bytes, self._budgets[Tier.WARM]),
            cool=TierStats(cool_models, cool_bytes, self._budgets[Tier.COOL]),
            arena=self._arena.statistics() if self._arena is not None else None,
        )

    @contextlib.contextmanager
    def watch(self, key: str, progress: Callable[[int, int], None]) -> Iterator[None]:
        """Within the block, ``progress(done, total)`` hears the weight bytes of ``key``'s copy to the warm
        tier as a :meth:`promote` makes it (from the promoting thread)."""
        self._watchers[key] = progress
        try:
            yield
        finally:
            self._watchers.pop(key, None)

    def promote(self, key: str) -> Path:
        """Copy the model to the warm tier and check the copy's checksums; return the warm folder.

        Already warm: returns at once. First makes room under the warm budget (least recently used
        out first); ValueError if the model alone exceeds it. On a checksum mismatch raises
        CorruptCheckpoint, leaving no copy.
        """
        self._check_open(key)
        warm = self._warm_root / key
        self.touch(key)
        if self._arena is not None:
            return self._promote_to_arena(key, self._arena)
        if not (warm / MANIFEST).is_file():
            size, budget = self.get(key).warm_bytes, self._budgets[Tier.WARM]
            if budget is not None and size > budget:
                raise ValueError(f"model '{key}' ({size} bytes) exceeds the warm budget of {budget} bytes; raise it")
            self.make_room(size, Tier.WARM, keep={key})
        with self._lock(key):
            if (warm / MANIFEST).is_file():
                return warm
            manifest, cool = self._cool_manifest(key), self._models / key
            scratch = self._warm_root / f".promote-{key}.{secrets.token_hex(8)}"
            scratch.mkdir(parents=True)  # the warm root is made on first use, and closing removes it
            try:
                progress = self._watchers.get(key)
                if manifest.raw_bytes is None:
                    _copy(cool / WEIGHTS, scratch / WEIGHTS, progress)
                else:  # checks the frames and the decompressed chunks as it goes
                    _decompress(cool / WEIGHTS, scratch / WEIGHTS, self._verify_threads, key)
                    if progress is not None:
                        progress(manifest.warm_size, manifest.warm_size)
                _check_weights(
                    scratch / WEIGHTS,
                    manifest.warm_size,
                    self._verify_threads,
                    key,
                    cool / WEIGHTS,
                    chunks=manifest.raw_bytes is None,
                )
                (scratch / ASSETS).mkdir()
                for name, digest in manifest.assets.items():
                    _check_hash(cool / ASSETS / name, digest, key, copy_to=scratch / ASSETS / name)
                (scratch / MANIFEST).write_bytes(manifest.to_json())
                try:
                    os.rename(scratch, warm)
                except OSError:
                    if not (warm / MANIFEST).is_file():  # not another process's promote winning
                        raise
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return warm

    def _promote_to_arena(self, key: str, arena: ArenaIndex) -> Path:
        """Promote into a slab: plan and release room, read the checkpoint into the slab (checked as it
        is read), then write the warm folder naming the slab, renamed into place last."""
        warm = self._warm_root / key
        with self._lock(key):
            if (warm / MANIFEST).is_file():
                return warm
            manifest, cool = self._cool_manifest(key), self._models / key
            with self._room_lock:
                for _ in range(3):
                    plan = arena.plan(key, manifest.warm_size, self.evictable(Tier.WARM))
                    for victim in plan.victims:
                        self.demote(victim)
                    # a worker that locked a victim's slab before its folder went keeps it: plan again
                    if not arena.arena.in_use(plan.slab.offset, plan.slab.length):
                        break
                else:
                    raise ValueError(f"model '{key}' found no slab that workers were not loading from; try again")
                arena.reserve(key, plan.slab)
            scratch = self._warm_root / f".promote-{key}.{secrets.token_hex(8)}"
            try:
                scratch.mkdir()
                with _named(cool / WEIGHTS, cool / WEIGHTS, key):
                    arena.fill(plan.slab.offset, cool / WEIGHTS, self._verify_threads)
                    copied = read_index_at(arena.arena.path, plan.slab.offset, manifest.warm_size)
                if copied.file_bytes != manifest.warm_size:
                    raise CorruptCheckpoint(f"{cool / WEIGHTS} of model '{key}' is not the size its manifest says")
                (scratch / ASSETS).mkdir()
                for name, digest in manifest.assets.items():
                    _check_hash(cool / ASSETS / name, digest, key, copy_to=scratch / ASSETS / name)
                ref = SlabRef(arena.arena.path, plan.slab.offset, manifest.warm_size)
                (scratch / SLAB_FILE).write_bytes(ref.to_json())
                (scratch / MANIFEST).write_bytes(manifest.to_json())
                os.rename(scratch, warm)
                arena.commit(key)
            finally:
                arena.abandon(key)
                shutil.rmtree(scratch, ignore_errors=True)
        return warm

    def demote(self, key: str) -> None:
        """Drop the warm copy; nothing if there is none."""
        _check_key(key)
        with self._lock(key):
            _discard(self._warm_root / key, self._warm_root)
            if self._arena is not None:
                self._arena.release(key)

    def remove(self, key: str) -> None:
        """Drop the warm and cool copies; KeyError if the store does not hold ``key``."""
        self._check_open(key)
        with self._lock(key):
            if not (self._models / key).exists():
                raise KeyError(f"model '{key}' is not in the store; nothing to remove")
            _discard(self._warm_root / key, self._warm_root)
            if self._arena is not None:
                self._arena.release(key)
            _discard(self._models / key, self._staging)

    def verify(self, key: str) -> None:
        """Check the chunks of the cool copy, and the warm one if present, and the assets' hashes.

        CorruptCheckpoint on any mismatch, naming the file."""
        with self._lock(key):
            manifest = self._cool_manifest(key)
            folders = [self._models / key] + ([self._warm_root / key] if self.tier(key) is Tier.WARM else [])
            for folder in folders:
                warm = folder != self._models / key
                if warm and (folder / SLAB_FILE).is_file():
                    _check_slab(folder / SLAB_FILE, manifest.warm_size, self._verify_threads, key)
                else:
                    _check_weights(
                        folder / WEIGHTS, manifest.warm_size if warm else manifest.size, self._verify_threads, key
                    )
                for name, digest in manifest.assets.items():
                    _check_hash(folder / ASSETS / name, digest, key)

    def close(self) -> None:
        """Release the store; the last store open on this root removes the warm copies."""
        if self._lock_fd is None:
            return
        if self._arena is not None:
            self._arena.arena.close()
        with contextlib.suppress(BlockingIOError):  # another store is open on root: it may use them
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for entry in list(self._warm_root.glob("*")):
                if entry.name.startswith(_SCRATCH) or (_KEY.fullmatch(entry.name) and (entry / MANIFEST).is_file()):
                    shutil.rmtree(entry, ignore_errors=True)
                elif entry.name.startswith(ARENA_PREFIX):
                    entry.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # leave a warm_root holding files that aren't ours
                self._warm_root.rmdir()
        os.close(self._lock_fd)
        self._lock_fd = None

    def _check_open(self, key: str) -> None:
        _check_key(key)
        if self._lock_fd is None:
            raise RuntimeError("this Store is closed; open a new one")

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _cool_manifest(self, key: str) -> _Manifest:
        _check_key(key)
        try:
            return _Manifest.load(self._models / key)
        except FileNotFoundError:
            raise KeyError(f"model '{key}' is not in the store; import it (staging, then commit)") from None

    def _own_staging(self, staging: Path) -> Path:
        folder = Path(staging).resolve()
        if folder.parent != self._staging:
            raise ValueError(f"{staging} is not a staging folder of this store; get one from staging()")
        return folder

    def _clean(self) -> None:
        """Delete what a crash may have left: staging folders, incomplete or orphaned copies."""
        for entry in self._staging.iterdir():
            _delete(entry)
        for entry in self._models.iterdir():
            if not (_KEY.fullmatch(entry.name) and _is_complete(entry, entry.name, warm=False)):
                _log.warning("deleting %s: not a complete model (a crash or damage)", entry)
                _delete(entry)
        for entry in self._warm_root.glob("*"):  # nothing if the warm root does not exist
            if entry.name.startswith(_SCRATCH):
                _delete(entry)
            elif _KEY.fullmatch(entry.name) and entry.is_dir():
                cool = self._models / entry.name
                complete = _is_complete(entry, entry.name, warm=True) and (cool / MANIFEST).is_file()
                if not complete or _Manifest.load(entry) != _Manifest.load(cool):
                    _delete(entry)


def _default_warm_root(root: Path) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm / f"ember-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"
    return root / "warm"


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"{key!r} is not a model key; use 'name@version' of letters, digits and ._+-")


def _is_asset_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and not name.startswith(".") and "/" not in name


def _is_complete(folder: Path, key: str, *, warm: bool) -> bool:
    """A cheap structural check: manifest readable and naming ``key``, every file present, sizes right."""
    try:
        manifest = _Manifest.load(folder)
        files_ok = all((folder / ASSETS / n).is_file() for n in manifest.assets)
        size = manifest.warm_size if warm else manifest.size
        if warm and (folder / SLAB_FILE).is_file():  # in an arena: it must still exist at the recorded place
            ref = SlabRef.load(folder / SLAB_FILE)
            return manifest.key == key and files_ok and ref.length == size and ref.arena.is_file()
        return manifest.key == key and files_ok and (folder / WEIGHTS).stat().st_size == size
    except (OSError, CorruptCheckpoint):
        return False


def _hash_file(path: Path, key: str, *, copy_to: Path | None = None, sync: bool = False) -> tuple[str, int]:
    """The sha256 and size of ``path``, read in chunks and, with ``copy_to``, copied on the way."""
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb", buffering=0) as reader, contextlib.ExitStack() as stack:
            buf = bytearray(min(CHUNK_BYTES, os.fstat(reader.fileno()).st_size + 1))  # small files, small buffers
            view = memoryview(buf)
            writer = stack.enter_context(open(copy_to, "wb")) if copy_to else None
            while n := reader.readinto(buf):
                digest.update(view[:n])
                size += n
                if writer:
                    writer.write(view[:n])
            if sync:
                os.fsync(reader.fileno())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path} of model '{key}' is missing; {_REPAIR}") from None
    return digest.hexdigest(), size


def _check_hash(path: Path, expected: str, key: str, *, copy_to: Path | None = None) -> None:
    if _hash_file(path, key, copy_to=copy_to)[0] != expected:
        raise CorruptCheckpoint(f"{path} of model '{key}' fails its sha256 check; {_REPAIR}")


def check_file(path: Path, threads: int = 4) -> int:
    """Check an Ember checkpoint, compressed (its frames) or not (its chunks); the uncompressed size."""
    if is_compressed(path):
        compressed = read_compressed_index(path)
        verify_frames(compressed, threads)
        return compressed.raw.file_bytes
    index = read_index(path)
    verify_chunks(index, threads)
    return index.file_bytes


def _check_weights(
    path: Path, size: int, threads: int, key: str, copy_of: Path | None = None, *, chunks: bool = True
) -> None:
    """The checkpoint at ``path`` (a copy of ``copy_of``) is ``size`` bytes, its index (and chunks) sound."""
    shown = copy_of or path
    if not path.is_file():
        raise CorruptCheckpoint(f"{shown} of model '{key}' is missing; {_REPAIR}")
    with _named(path, shown, key):
        file_bytes = path.stat().st_size
        if file_bytes != size:
            raise CorruptCheckpoint(
                f"checkpoint {path} is damaged: it is {file_bytes} bytes but its manifest says {size}"
            )
        if chunks:
            check_file(path, threads)
        else:
            read_index(path)


#: Bytes per step of a watched copy: progress is heard this often.
COPY_STEP_BYTES = 64 << 20


def _copy(src: Path, dst: Path, progress: Callable[[int, int], None] | None) -> None:
    """``shutil.copyfile``; watched, the same kernel copy (``sendfile``) in steps, each one reported."""
    if progress is None:
        shutil.copyfile(src, dst)
        return
    total = src.stat().st_size
    with open(src, "rb") as source, open(dst, "wb") as target:
        done = 0
        while done < total:
            sent = os.sendfile(target.fileno(), source.fileno(), done, min(COPY_STEP_BYTES, total - done))
            if sent == 0:
                raise OSError(f"{src} ended at {done} of {total} bytes while being copied")
            done += sent
            progress(done, total)
    if total == 0:
        progress(0, 0)


def _check_slab(path: Path, size: int, threads: int, key: str) -> None:
    """The checkpoint a ``weights.slab`` names is ``size`` bytes, its index and chunks sound."""
    ref = SlabRef.load(path)
    with _named(ref.arena, path, key):
        index = read_index_at(ref.arena, ref.offset, ref.length)
        if index.file_bytes != size:
            raise CorruptCheckpoint(f"checkpoint {ref.arena} is damaged: it is {index.file_bytes} bytes, not {size}")
        verify_chunks(index, threads)


def _decompress(src: Path, dst: Path, threads: int, key: str) -> None:
    with _named(src, src, key):
        decompress_checkpoint(src, dst, threads)


@contextlib.contextmanager
def _named(path: Path, shown: Path, key: str) -> Iterator[None]:
    """Re-word a CorruptCheckpoint about ``path`` as one about model ``key``'s file ``shown``."""
    try:
        yield
    except CorruptCheckpoint as exc:
        problem = exc.message.removeprefix(f"checkpoint {path} is damaged: ").removesuffix(f"; {_FORMAT_REPAIR}")
        raise CorruptCheckpoint(f"{shown} of model '{key}' is damaged: {problem}; {_REPAIR}") from None


def _discard(folder: Path, scratch_parent: Path) -> None:
    """Remove ``folder`` by first renaming it away, so no half-deleted copy is ever visible."""
    trash = scratch_parent / f".trash-{folder.name}.{secrets.token_hex(8)}"
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _delete(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as out:
        out.write(data)
