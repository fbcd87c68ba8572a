"""The warm-tier arena: one region of host shared memory that every warm model's weights live in.

    warm_root/.arena-<token>      the arena: one /dev/shm file of the warm budget's size
    warm_root/<key>/weights.slab  where the model's checkpoint lies in it (JSON: arena, offset, length)

Writing a model into freshly allocated shared-memory pages costs a page fault and a zeroing per
4 KiB; reading from the page cache into pages already mapped does not. So the arena is allocated
and mapped once, when the store opens (``MADV_POPULATE_WRITE``; ``ember serve`` prints how long
that took), with ``MADV_HUGEPAGE`` asked for first where its tmpfs mount offers huge pages.
A promotion then reads the cool checkpoint straight into the model's slab with parallel
positioned reads, each thread checking the crc32 of the chunk it just read while the others read,
so the checks overlap the reads instead of following them (with ISA-L's crc32 where the ``isal``
package is installed: zlib's runs at about 2 GB/s a core, slower than the page cache). A slab
holds the checkpoint byte for byte (preamble, data, index) from a page-aligned offset; where the
slabs go is :mod:`ember.store.slabs`' decision, and which model holds which slab is the store's index,
rebuilt at start from the ``weights.slab`` files of complete warm folders.

An arena whose file already exists with the right size (a restart after a crash) is opened again
with its contents; the store keeps only the warm copies whose slabs it can account for.

On the worker's side :func:`map_slab` binds a slab's tensors: on the CPU a private mapping of the
slab's range, its pages mapped read-only up front (views, no copy; writes stay in the process, so
a model that later takes the same slab never sees them); on a CUDA device one mapping of the
whole arena per process, registered once as pinned memory (``cudaHostRegister``), from which each
load is one host-to-device copy. If the registration is refused, the copy runs from pageable memory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import json
import math
import mmap
import os
import secrets
import shutil
import struct
import threading
import weakref
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ember.errors import CorruptCheckpoint
from ember.store.compress import CompressedIndex, decompress_into
from ember.store.format import MAGIC, PREAMBLE_BYTES, Index, index_blob, preamble, read_index_at

if TYPE_CHECKING:
    import torch

__all__ = ["ARENA_PREFIX", "SLAB_FILE", "Arena", "SlabRef", "map_slab", "register_arena"]

ARENA_PREFIX = ".arena-"
SLAB_FILE = "weights.slab"
PAGE = 4096
HUGE_PAGE = 2 << 20
_MADV_POPULATE_READ = 22  # Linux 5.14+; the mmap module names neither
_MADV_POPULATE_WRITE = 23


def _fastest_crc32() -> Callable[[memoryview, int], int]:
    """ISA-L's crc32 where installed (the ``isal`` package: zlib's checksum, 20.7 GB/s a core on the
    2-core CPU host against zlib's 1.9), else zlib's."""
    try:
        module = importlib.import_module("isal.isal_zlib")
    except ImportError:
        return zlib.crc32
    return cast(Callable[[memoryview, int], int], module.crc32)


_crc32 = _fastest_crc32()
READ_STEP = 1 << 20
_FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid (0 for open-file-description locks)
_SHMEM_HUGE = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")


@dataclass(frozen=True)
class SlabRef:
    """Where a warm model's checkpoint lies: ``length`` bytes from ``offset`` of the arena file ``arena``."""

    arena: Path
    offset: int
    length: int

    def to_json(self) -> bytes:
        return json.dumps({"arena": str(self.arena), "offset": self.offset, "length": self.length}).encode() + b"\n"

    @classmethod
    def load(cls, path: Path) -> SlabRef:
        """Read a ``weights.slab`` file: FileNotFoundError if absent, CorruptCheckpoint if malformed."""
        try:
            raw = json.loads(Path(path).read_bytes())
            ref = cls(Path(raw["arena"]), raw["offset"], raw["length"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpoint(
                f"{path} is not a slab reference Ember wrote ({exc!r}); promote the model again"
            ) from None
        if not (type(ref.offset) is int and type(ref.length) is int and ref.offset % PAGE == 0 and ref.length > 0):
            raise CorruptCheckpoint(f"{path} names an impossible slab; promote the model again")
        return ref


class Arena:
    """One shared-memory file of ``size_bytes`` (rounded up to its alignment), mapped and touched once."""

    def __init__(self, folder: Path, size_bytes: int) -> None:
        if size_bytes <= 0:
            raise ValueError(f"size_bytes={size_bytes}: an arena needs at least one byte")
        self.align = HUGE_PAGE if size_bytes >= 16 * HUGE_PAGE else PAGE
        self.size = math.ceil(size_bytes / self.align) * self.align
        folder.mkdir(parents=True, exist_ok=True)
        self.path, self.reused = self._open_file(folder, self.size)
        fd = os.open(self.path, os.O_RDWR)
        try:
            if not self.reused:
                os.ftruncate(fd, self.size)  # no pages yet: the touch below allocates them
            self._map = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self.huge_pages = _advise_huge(self._map, folder)  # before the touch, which decides the page size
            _touch(self._map, fd, self.size)
        except OSError as exc:
            if hasattr(self, "_map"):
                self._map.close()
            os.close(fd)
            fd = -1
            if not self.reused:
                self.path.unlink(missing_ok=True)
            free = shutil.disk_usage(folder).free
            raise ValueError(
                f"cannot allocate a {self.size}-byte warm arena in {folder}, where {free} bytes are free "
                f"({exc.strerror}); lower the warm budget or give the host more shared memory"
            ) from None
        finally:
            if fd >= 0:
                os.close(fd)
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._pools_lock = threading.Lock()
        self.view = memoryview(self._map)

    @staticmethod
    def _open_file(folder: Path, size: int) -> tuple[Path, bool]:
        """An arena file of the wanted size left by an earlier run, or a new one; others are deleted."""
        found: Path | None = None
        for entry in sorted(folder.glob(ARENA_PREFIX + "*")):
            if found is None and entry.is_file() and entry.stat().st_size == size:
                found = entry
            else:
                entry.unlink(missing_ok=True)
        if found is not None:
            return found, True
        path = folder / f"{ARENA_PREFIX}{secrets.token_hex(8)}"
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
        return path, False

    def fill(self, offset: int, source: Path, index: Index, threads: int, *, verify: bool = True) -> None:
        """Copy the checkpoint ``source`` (whose validated index is ``index``) to ``offset`` of the arena.

        ``threads`` threads read chunk-sized pieces with ``preadv`` straight into the arena, each
        checking its piece's crc32 as soon as it is read (with ``verify``). CorruptCheckpoint names
        the first bad chunk of ``source``.
        """
        if offset % PAGE or offset + index.file_bytes > self.size:
            raise ValueError(f"a {index.file_bytes}-byte checkpoint at {offset} does not fit the arena")
        pieces: list[tuple[int, int, int | None]] = [(0, index.data_offset, None)]  # (file offset, length, crc)
        pieces += [(start, length, crc) for (start, length), crc in zip(index.chunks(), index.chunk_crcs, strict=True)]
        tail = index.data_offset + index.data_length
        pieces.append((tail, index.file_bytes - tail, None))
        fd = os.open(source, os.O_RDONLY)
        try:

            def copy(piece: tuple[int, int, int | None]) -> int | None:
                start, length, crc = piece
                target = self.view[offset + start : offset + start + length]
                got, running = 0, 0
                while got < length:  # in steps small enough that the checksum reads them from the cache
                    n = os.preadv(fd, [target[got : got + READ_STEP]], start + got)
                    if n <= 0:
                        raise CorruptCheckpoint(f"{source} came back short at byte {start + got}; it shrank")
                    if verify and crc is not None:
                        running = _crc32(target[got : got + n], running)
                    got += n
                return None if not verify or crc is None or running == crc else start

            bad = [start for start in self._pool(threads).map(copy, pieces) if start is not None]
        finally:
            os.close(fd)
        if bad:
            raise CorruptCheckpoint(f"checkpoint {source} fails the crc32 check of the chunk at byte {bad[0]}")

    def _pool(self, threads: int) -> ThreadPoolExecutor:
        """Reader threads kept for the arena's life: starting four threads per promotion cost about
        10 ms on the busy 2-core host, as much as reading a 90 MB model."""
        with self._pools_lock:
            pool = self._pools.get(threads)
            if pool is None:
                pool = self._pools[threads] = ThreadPoolExecutor(max(1, threads), thread_name_prefix="ember-arena")
            return pool

    def fill_compressed(self, offset: int, compressed: CompressedIndex, threads: int) -> None:
        """Decompress the checkpoint ``compressed`` to ``offset``, checking its frames and chunks as it goes."""
        import numpy as np

        raw = compressed.raw
        if offset % PAGE or offset + raw.file_bytes > self.size:
            raise ValueError(f"a {raw.file_bytes}-byte checkpoint at {offset} does not fit the arena")
        slab = self.view[offset : offset + raw.file_bytes]
        data = np.frombuffer(slab, dtype=np.uint8, count=raw.data_length, offset=PREAMBLE_BYTES)
        data[:] = 0  # frames are decompressed into a zero-filled region
        decompress_into(compressed, data, threads, verify=True)
        blob = index_blob(compressed.raw_body)
        head = preamble(MAGIC, raw.chunk_bytes, raw.data_length, blob)
        slab[:PREAMBLE_BYTES] = head.ljust(PREAMBLE_BYTES, b"\0")
        slab[PREAMBLE_BYTES + raw.data_length :] = blob
        del data

    def in_use(self, offset: int, length: int) -> bool:
        """Whether a worker holds tensors over these bytes (a read lock on the range, see :func:`map_slab`)."""
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, offset, length, 0)
        fd = os.open(self.path, os.O_RDWR)
        try:
            found = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
        finally:
            os.close(fd)
        return int(struct.unpack(_FLOCK, found)[0]) != fcntl.F_UNLCK

    def slab(self, offset: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes of the arena from ``offset``."""
        return self.view[offset : offset + length]

    def close(self) -> None:
        """Unmap the arena (the file stays: the store removes it); a view still held keeps it mapped."""
        for pool in self._pools.values():
            pool.shutdown()
        self.view.release()
        with contextlib.suppress(BufferError):
            self._map.close()


def _advise_huge(region: mmap.mmap, folder: Path) -> bool:
    """Ask for huge pages where the shared memory holding ``folder`` offers them; whether it does.

    A tmpfs mount offers them with ``huge=always|within_size|advise`` unless the host denies them
    all (``shmem_enabled`` ``deny``), or everywhere when it forces them (``force``).
    """
    try:
        setting = _SHMEM_HUGE.read_text()
    except OSError:
        setting = "[never]"
    offered = "[force]" in setting or ("[deny]" not in setting and _mount_offers_huge(folder))
    if offered and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            region.madvise(mmap.MADV_HUGEPAGE)
            return True
    return False


def _mount_offers_huge(folder: Path) -> bool:
    """Whether the tmpfs mount holding ``folder`` was mounted with huge pages on (``/proc/mounts``)."""
    target, best, options = str(folder.resolve()), "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "tmpfs":
            point = fields[1]
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, options = point, fields[3]
    return any(o in options.split(",") for o in ("huge=always", "huge=within_size", "huge=advise"))


def _touch(region: mmap.mmap, fd: int, size: int) -> None:
    """Allocate and map every page of ``region`` now, so no request pays for it later.

    ``MADV_POPULATE_WRITE`` (Linux 5.14+) does both, through the mapping, so huge pages where
    advised; it fails (an OSError) where shared memory runs out. An older kernel allocates with
    ``posix_fallocate`` and maps by reading one byte per page.
    """
    try:
        region.madvise(_MADV_POPULATE_WRITE)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: the kernel does not know the advice
            raise
        import numpy as np

        os.posix_fallocate(fd, 0, size)
        int(np.frombuffer(region, dtype=np.uint8)[::PAGE].sum())


# -- the worker's side -----------------------------------------------------------------------------


class _Mapping(mmap.mmap):
    """A memory map that can be weakly referenced, to close its lock's descriptor when it goes."""


class _Registered:
    """One process-wide mapping of an arena, registered as pinned memory once (CUDA hosts)."""

    def __init__(self, path: Path) -> None:
        import torch

        fd = os.open(path, os.O_RDWR)
        try:
            self.host = torch.frombuffer(mmap.mmap(fd, os.fstat(fd).st_size), dtype=torch.uint8)
        finally:
            os.close(fd)
        self.pinned = False
        if torch.cuda.is_available():
            cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            self.pinned = int(cudart.cudaHostRegister(self.host.data_ptr(), self.host.numel(), 0)) == 0
            if not self.pinned:
                _clear_cuda_error()


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a refused registration, so the next CUDA call that
    checks it (an allocation, say) does not report the refusal as its own failure.

    PyTorch's ``cudart()`` binds no ``cudaGetLastError``: call it in the runtime library this
    process already has loaded (found in ``/proc/self/maps``)."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    except OSError:
        return
    for path in sorted(paths):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(path).cudaGetLastError()


def register_arena(path: Path) -> bool:
    """Map the arena at ``path`` in this process and register it as pinned memory; whether it is pinned.

    A worker on a CUDA device calls it at start, so no load pays for it; :func:`map_slab` does it
    on first use otherwise."""
    return _registered(Path(path)).pinned


def _registered(path: Path) -> _Registered:
    with _MAPPED_LOCK:
        mapped = _MAPPED.get(path)
        if mapped is None:
            mapped = _MAPPED[path] = _Registered(path)
        return mapped


_MAPPED: dict[Path, _Registered] = {}
_MAPPED_LOCK = threading.Lock()


def map_slab(slab_file: Path, device: torch.device | str = "cpu") -> tuple[Index, torch.Tensor]:
    """The index and the data region of the checkpoint a ``weights.slab`` file points at, on ``device``.

    CPU: a private mapping of the slab, its pages mapped read-only up front
    (``MADV_POPULATE_READ``; ``MAP_POPULATE`` on a private writable mapping would copy every
    page). Other devices: one copy from the arena, which this process maps and registers once.
    Either way the slab is read under a read lock on its byte range, taken before the slab file
    is read a second time: a model demoted before that fails to load (FileNotFoundError, as a
    removed file would), and one demoted after keeps its slab until the lock goes (on the CPU,
    with the last tensor over it).
    """
    import torch

    ref = SlabRef.load(slab_file)
    target = torch.device(device)
    fd = os.open(ref.arena, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, ref.offset, ref.length, 0))
        if not slab_file.is_file() or SlabRef.load(slab_file) != ref:
            raise FileNotFoundError(f"{slab_file} left the warm tier while it was being loaded; load it again")
        index = read_index_at(ref.arena, ref.offset, ref.length)
        if index.data_length == 0:
            os.close(fd)
            return index, torch.empty(0, dtype=torch.uint8, device=target)
        if target.type == "cpu":
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            region = _Mapping(fd, ref.length, flags=mmap.MAP_PRIVATE, prot=prot, offset=ref.offset)
            weakref.finalize(region, os.close, fd)  # the lock lives as long as the mapping
            with contextlib.suppress(OSError):  # map the shared pages now, read-only: no copy on write yet
                region.madvise(_MADV_POPULATE_READ)
            return index, torch.frombuffer(region, dtype=torch.uint8, count=index.data_length, offset=PREAMBLE_BYTES)
        mapped = _registered(ref.arena)
        start = index.data_offset
        data = torch.empty(index.data_length, dtype=torch.uint8, device=target)
        data.copy_(mapped.host[start : start + index.data_length], non_blocking=mapped.pinned)
        torch.cuda.current_stream(target).synchronize()
        os.close(fd)
        return index, data
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
