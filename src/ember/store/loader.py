"""The loader: an Ember checkpoint's tensors, on the CPU without a copy or on a device at link speed.

On the CPU (:attr:`LoaderConfig.map_on_cpu`, the default) the tensors are views over one private
memory map of the file: a warm model lives in ``/dev/shm``, so a worker maps it and pays page faults,
not copies; writes to a tensor stay in the process. ``torch.frombuffer`` holds the ``mmap``, so the
mapping lives exactly as long as the last tensor over it.

On a device the data region is read in large aligned chunks by a small thread pool into a reused
pool of pinned host buffers, and each filled buffer is copied with ``non_blocking=True`` on a side
stream into ONE device allocation per model while the threads read the next chunks; a buffer goes
back to the pool when the event recorded after its copy has fired. Tensors are views of that one
allocation. The pipeline itself (:func:`_staged`) takes the copy as a function, so the unit tests
drive it on the CPU with a copy that only happens when waited for. With ``map_on_cpu=False`` a CPU
load reads in parallel straight into one fresh page-aligned host allocation instead of mapping.

A warm model in the store's arena is named by its ``weights.slab`` (:mod:`ember.store.arena`):
its tensors are views of a private mapping of the slab on the CPU (mapped up front, read-only),
and one copy from the arena (mapped and registered as pinned memory once per process) on a device.

A compressed checkpoint (:mod:`ember.store.compress`) is decompressed by ``config.threads`` threads
into one fresh page-aligned host allocation laid out as the uncompressed data region, so the
tensors are the same aligned views; ``verify`` checks each frame and the result. To a device the
staged pipeline below runs over the frames instead of fixed chunks: each reader thread decompresses
a frame into a pinned buffer, which is copied out as a read chunk would be (``verify`` then checks
the frames; the result is on the device, where its chunk crc32s are not recomputed).

Defaults come from measurement (``benchmarks/load.py --sweep``: parallel ``preadv`` from the page
cache into a reused buffer, the staged path's inner loop) on the 2-core CPU host this was written
on: 4-64 MiB reads were within noise of each other and 1 MiB reads 20-30% slower, so 16 MiB (a
0.3 ms copy at 55 GB/s, so launches stay cheap); one thread per core up to 4 (the H200 calibration
found 4 threads ahead of 8 from the page cache). Buffered I/O by default: on the H200 cold disk
O_DIRECT was slower (1.74 vs 2.18 GB/s, 8 threads). All of it is a :class:`LoaderConfig`.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from ember.errors import CorruptCheckpoint
from ember.store.arena import SLAB_FILE, map_slab
from ember.store.compress import CompressedIndex, decode_frame, decompress_into, read_compressed_index
from ember.store.format import PREAMBLE_BYTES, Index, is_compressed, read_index, torch_dtype, verify_chunks

if TYPE_CHECKING:
    import torch

__all__ = ["LoaderConfig", "load_checkpoint", "map_checkpoint"]

_PAGE = 4096


@dataclass(frozen=True)
class LoaderConfig:
    """How to load: reader threads, bytes per read, direct I/O, pinned buffers, checksums.

    ``verify`` checks every data chunk's crc32 before building a tensor; the store already does so on
    commit, promote and ``verify``, so the worker's load of a promoted copy leaves it off.
    """

    threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    chunk_bytes: int = 16 << 20
    direct_io: bool = False
    pinned_buffers: int = 8
    verify: bool = False
    map_on_cpu: bool = True

    def __post_init__(self) -> None:
        if self.threads < 1 or self.pinned_buffers < 1:
            raise ValueError(f"threads={self.threads}, pinned_buffers={self.pinned_buffers}: use at least 1 of each")
        if self.chunk_bytes <= 0 or self.chunk_bytes % _PAGE:
            raise ValueError(f"chunk_bytes={self.chunk_bytes}: use a positive multiple of {_PAGE}")


DEFAULT_CONFIG = LoaderConfig()


def map_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with the default :class:`LoaderConfig` (zero-copy views on the CPU)."""
    return load_checkpoint(path, device)


def load_checkpoint(
    path: Path, device: torch.device | str = "cpu", config: LoaderConfig = DEFAULT_CONFIG
) -> dict[str, torch.Tensor]:
    """Return the tensors of the Ember checkpoint at ``path`` on ``device``, in the file's order.

    The index is validated in full (and, with ``config.verify``, every chunk) before any tensor is
    built: a damaged file raises CorruptCheckpoint and nothing is returned.
    """
    import torch

    target = torch.device(device)
    if Path(path).name == SLAB_FILE:  # a warm model in the arena: views of its slab, or one copy from it
        index, data = map_slab(Path(path), "cpu" if target.type == "meta" else target)
        if config.verify:
            verify_chunks(index, config.threads)
        return _tensors(index, data, target)
    compressed = read_compressed_index(Path(path)) if is_compressed(Path(path)) else None
    index = compressed.raw if compressed else read_index(Path(path))
    if config.verify and not compressed:
        verify_chunks(index, config.threads)
    if target.type == "meta" or index.data_length == 0:
        return {e.name: torch.empty(e.shape, dtype=torch_dtype(e.dtype), device=target) for e in index.tensors}
    if compressed and target.type == "cpu":
        data = _decompress(compressed, config)
    elif compressed:
        data = _read_to_device(index, target, config, compressed)
    elif target.type == "cpu" and config.map_on_cpu:
        data = _map(index)
    elif target.type == "cpu":
        data = _read_to_host(index, config)
    else:
        data = _read_to_device(index, target, config)
    return _tensors(index, data, target)


def _tensors(index: Index, data: torch.Tensor, target: torch.device) -> dict[str, torch.Tensor]:
    """The index's tensors as views of ``data`` (its data region on ``target``)."""
    import torch

    if target.type == "meta" or index.data_length == 0:
        return {e.name: torch.empty(e.shape, dtype=torch_dtype(e.dtype), device=target) for e in index.tensors}
    tensors: dict[str, torch.Tensor] = {}
    for entry in index.tensors:
        dtype = torch_dtype(entry.dtype)
        if entry.length == 0:
            tensors[entry.name] = torch.empty(entry.shape, dtype=dtype, device=target)
        else:
            tensors[entry.name] = data[entry.offset : entry.offset + entry.length].view(dtype).view(entry.shape)
    return tensors


def _map(index: Index) -> torch.Tensor:
    import torch

    with open(index.path, "rb") as source:
        mapped = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_COPY)
    if len(mapped) != index.file_bytes:  # changed since its index was read
        mapped.close()
        raise CorruptCheckpoint(f"checkpoint {index.path} changed while it was being mapped; load it again")
    return torch.frombuffer(mapped, dtype=torch.uint8, count=index.data_length, offset=index.data_offset)


def _open(index: Index, config: LoaderConfig) -> int:
    if config.direct_io and hasattr(os, "O_DIRECT"):
        try:
            return os.open(index.path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # tmpfs and some others refuse O_DIRECT: read through the page cache instead
            pass
    return os.open(index.path, os.O_RDONLY)


def _pread(fd: int, buffer: memoryview, offset: int, need: int) -> None:
    """Fill ``buffer`` from ``offset`` (it may extend past the end of the file); at least ``need`` bytes."""
    got = 0
    while got < need:
        n = os.preadv(fd, [buffer[got:]], offset + got)
        if n <= 0:
            raise CorruptCheckpoint(f"a read at byte {offset + got} came back short; the file shrank, load it again")
        got += n


def _ranges(index: Index, config: LoaderConfig) -> list[tuple[int, int]]:
    """(offset in the data, length) of each read, ``config.chunk_bytes`` apart."""
    step = config.chunk_bytes
    return [(start, min(step, index.data_length - start)) for start in range(0, index.data_length, step)]


def _read_to_host(index: Index, config: LoaderConfig) -> torch.Tensor:
    """The data region read in parallel chunks into one page-aligned host allocation."""
    import torch

    padded = max(_PAGE, math.ceil(index.data_length / _PAGE) * _PAGE)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)  # fault in at once
    host = mmap.mmap(-1, padded, flags=flags)  # anonymous: page aligned, so O_DIRECT reads may land in it
    view = memoryview(host)
    fd = _open(index, config)
    try:

        def read(span: tuple[int, int]) -> None:
            start, length = span
            end = min(padded, start + math.ceil(length / _PAGE) * _PAGE)
            _pread(fd, view[start:end], PREAMBLE_BYTES + start, length)

        with ThreadPoolExecutor(config.threads) as pool:
            list(pool.map(read, _ranges(index, config)))
    finally:
        os.close(fd)
        view.release()
    return torch.frombuffer(host, dtype=torch.uint8, count=index.data_length)


def _decompress(compressed: CompressedIndex, config: LoaderConfig) -> torch.Tensor:
    """The raw data region decompressed in parallel into one page-aligned host allocation."""
    import numpy as np
    import torch

    size = compressed.raw.data_length
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)  # zero pages, faulted in at once
    host = mmap.mmap(-1, max(_PAGE, math.ceil(size / _PAGE) * _PAGE), flags=flags)  # page aligned
    decompress_into(compressed, np.frombuffer(host, dtype=np.uint8, count=size), config.threads, verify=config.verify)
    return torch.frombuffer(host, dtype=torch.uint8, count=size)


class _PinnedPool:
    """Pinned host buffers of one size, handed out per load and kept for the next one."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, count: int, size: int) -> list[torch.Tensor]:
        import torch

        with self._lock:
            free = self._free.setdefault(size, [])
            taken = [free.pop() for _ in range(min(count, len(free)))]
        while len(taken) < count:
            taken.append(torch.empty(size, dtype=torch.uint8, pin_memory=True))
        return taken

    def give(self, buffers: list[torch.Tensor], size: int) -> None:
        with self._lock:
            self._free.setdefault(size, []).extend(buffers)


_PINNED = _PinnedPool()


class _Pending(Protocol):
    """A copy in flight: ``torch.cuda.Event`` is one (``query``: finished?; ``synchronize``: wait)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


def _staged(
    index: Index,
    config: LoaderConfig,
    buffers: list[torch.Tensor],
    start_copy: Callable[[torch.Tensor, int, int], _Pending],
    compressed: CompressedIndex | None = None,
) -> None:
    """Read the data in ``config.chunk_bytes`` pieces, ``config.threads`` at a time, into ``buffers``.

    Each filled buffer goes to ``start_copy(buffer, data offset, length)``, which starts copying it
    out and returns its pending copy; the buffer is read into again only once that copy is done.
    Returns when every copy is done. With ``compressed`` the pieces are its frames, each decompressed
    into a buffer (which must hold the largest frame) by the thread that reads it.
    """
    size = min(b.numel() for b in buffers)
    free = deque(buffers)
    spans = [(f.raw_offset, f.raw_length) for f in compressed.frames] if compressed else _ranges(index, config)
    todo = deque(enumerate(spans))
    reads: deque[tuple[Future[None], torch.Tensor, int, int]] = deque()
    copies: deque[tuple[_Pending, torch.Tensor]] = deque()
    fd = os.open(compressed.path, os.O_RDONLY) if compressed else _open(index, config)

    def read(number: int, buffer: torch.Tensor, start: int, length: int) -> None:
        if compressed:
            decode_frame(fd, compressed, number, buffer.numpy()[:length], config.verify)
            return
        rounded = min(size, math.ceil(length / _PAGE) * _PAGE)
        _pread(fd, buffer.numpy().data[:rounded], PREAMBLE_BYTES + start, length)

    try:
        with ThreadPoolExecutor(config.threads) as pool:
            while todo or reads:
                while free and todo:  # keep every free buffer busy reading
                    buffer, (number, (start, length)) = free.popleft(), todo.popleft()
                    reads.append((pool.submit(read, number, buffer, start, length), buffer, start, length))
                done, buffer, start, length = reads.popleft()
                done.result()
                copies.append((start_copy(buffer, start, length), buffer))
                while copies and (not free or copies[0][0].query()):  # recycle buffers whose copy is done
                    pending, buffer = copies.popleft()
                    pending.synchronize()
                    free.append(buffer)
    finally:
        for pending, _ in copies:  # no buffer is given back while a copy may still read it
            pending.synchronize()
        os.close(fd)


def _read_to_device(
    index: Index, device: torch.device, config: LoaderConfig, compressed: CompressedIndex | None = None
) -> torch.Tensor:
    """Parallel chunk reads (or frame decompressions) into pinned buffers, each copied asynchronously
    into one device allocation."""
    import torch

    target = torch.empty(index.data_length, dtype=torch.uint8, device=device)
    largest = max((f.raw_length for f in compressed.frames), default=0) if compressed else 0
    size = max(config.chunk_bytes, math.ceil(largest / _PAGE) * _PAGE)
    buffers = _PINNED.take(max(config.pinned_buffers, config.threads + 1), size)
    stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream(device))  # the allocation may reuse memory still in use there

    def start_copy(buffer: torch.Tensor, start: int, length: int) -> _Pending:
        with torch.cuda.stream(stream):
            target[start : start + length].copy_(buffer[:length], non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        return cast(_Pending, event)

    try:
        _staged(index, config, buffers, start_copy, compressed)
    finally:
        stream.synchronize()
        _PINNED.give(buffers, size)
    torch.cuda.current_stream(device).wait_stream(stream)
    return target
