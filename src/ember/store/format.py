"""Ember's checkpoint format: tensor data laid out flat and aligned, an index, a checksum per chunk.

    [0, 4096)                  preamble: magic, version, alignment, chunk size, where the data and
                               the index are, the index's crc32, and the preamble's own crc32
    [4096, 4096 + D)           data: every tensor's bytes, each starting 256-byte aligned, zero padded
    [4096 + D, end)            index: UTF-8 JSON {"tensors": [[name, dtype, shape, offset, length]...],
                               "chunk_bytes": C, "chunks": [crc32 of each C-byte piece of the data],
                               "metadata": {str: str}}

Why this layout: the data region starts page aligned and is one contiguous run, so a loader reads
it in large sequential pieces (with ``O_DIRECT`` if it likes: every chunk starts on a 4 KiB
boundary) into one allocation and hands tensors out as views. Tensors start 256-byte aligned, the
alignment ``cudaMalloc`` guarantees, so a view is as aligned as a fresh allocation for any dtype
and any vectorised kernel; the padding costs at most 255 bytes a tensor. Checksums are zlib's
crc32 (stdlib, ~2 GB/s a core here, and it releases the GIL so chunks verify in parallel) over
8 MiB chunks: 128 numbers per GB keep the index small, and a damaged byte is named to within 8 MiB.

A file is written to a temporary name, synced and renamed: it appears complete or not at all.
:func:`read_index` validates the preamble, the index checksum and every entry (sizes, alignment,
overlaps, the file's exact length) before a tensor is built, so truncation or a flipped index byte
raises :class:`~ember.errors.CorruptCheckpoint` naming the file; :func:`verify_chunks` checks the data.

torch is imported inside the functions: only worker code imports it at module level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ember.errors import CorruptCheckpoint

if TYPE_CHECKING:
    import torch

__all__ = ["CHUNK_BYTES", "TENSOR_ALIGN", "Index", "TensorEntry", "read_index", "verify_chunks", "write_raw"]

MAGIC = b"EMBERCK\x01"
MAGIC_COMPRESSED = b"EMBERCZ\x01"  # the same container around compressed data (ember.store.compress)
VERSION = 1
PREAMBLE_BYTES = 4096
TENSOR_ALIGN = 256
CHUNK_BYTES = 8 << 20
MAX_INDEX_BYTES = 256 << 20
_PREAMBLE = struct.Struct("<8sIIQQQQQI")  # magic version align chunk data_off data_len index_off index_len index_crc
REPAIR = "delete it and import the model again from its source"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: its name, torch dtype name (``"bfloat16"``), shape, and byte range in the data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class Index:
    """A validated checkpoint's layout: where each tensor's bytes and each chunk's checksum are."""

    path: Path
    tensors: tuple[TensorEntry, ...]
    chunk_crcs: tuple[int, ...]
    chunk_bytes: int
    data_offset: int
    data_length: int
    file_bytes: int
    metadata: Mapping[str, str] = field(default_factory=dict)

    def chunks(self) -> list[tuple[int, int]]:
        """(file offset, length) of every checksummed chunk of the data, in order."""
        return [
            (self.data_offset + start, min(self.chunk_bytes, self.data_length - start))
            for start in range(0, self.data_length, self.chunk_bytes)
        ]


# every torch dtype a checkpoint can hold -> its bytes per element (quantized and sub-byte ones left out)
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
}  # fmt: skip


@functools.cache
def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name``; KeyError if this torch has none or Ember does not store it."""
    import torch

    dtype = getattr(torch, name, None)
    if name not in ITEMSIZE or not isinstance(dtype, torch.dtype):
        raise KeyError(name)
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The name a checkpoint records for ``dtype``; TypeError for one it cannot hold."""
    name = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise TypeError(f"dtype {dtype} cannot be stored in a checkpoint; convert the tensor (e.g. .float()) first")
    return name


def write_raw(
    path: Path,
    tensors: Iterable[tuple[str, str, tuple[int, ...], memoryview | bytes]],
    metadata: Mapping[str, str] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``(name, dtype name, shape, bytes)`` tensors to ``path`` atomically; return its size.

    The bytes must be the tensor's contiguous little-endian contents. Needs no torch, so tests and
    fakes can write checkpoints from plain bytes. ``progress`` is called with the data bytes written
    so far (alignment padding included) after every chunk.
    """
    if chunk_bytes <= 0 or chunk_bytes % PREAMBLE_BYTES:
        raise ValueError(f"chunk_bytes={chunk_bytes}: use a positive multiple of {PREAMBLE_BYTES}")
    path = Path(path)
    entries: list[list[object]] = []
    crcs: list[int] = []
    crc, filled, cursor, names = 0, 0, 0, set()

    def feed(out: Any, data: memoryview) -> None:
        nonlocal crc, filled, cursor
        while len(data):
            take = min(len(data), chunk_bytes - filled)
            out.write(data[:take])
            crc = zlib.crc32(data[:take], crc)
            cursor += take
            filled += take
            data = data[take:]
            if filled == chunk_bytes:
                crcs.append(crc)
                crc, filled = 0, 0
                if progress is not None:
                    progress(cursor)

    with atomic_file(path) as out:
        out.write(bytes(PREAMBLE_BYTES))
        for name, dtype, shape, raw in tensors:
            if not isinstance(name, str) or name in names:
                raise ValueError(f"tensor name {name!r} is not a string or appears twice; rename it")
            names.add(name)
            data = memoryview(raw).cast("B")
            feed(out, memoryview(bytes(-cursor % TENSOR_ALIGN)))
            entries.append([name, dtype, list(shape), cursor, len(data)])
            feed(out, data)
        if filled:
            crcs.append(crc)
        blob = index_blob(
            {"tensors": entries, "chunk_bytes": chunk_bytes, "chunks": crcs, "metadata": dict(metadata or {})}
        )
        out.write(blob)
        out.seek(0)
        out.write(preamble(MAGIC, chunk_bytes, cursor, blob))
    return PREAMBLE_BYTES + cursor + len(blob)


def index_blob(body: Mapping[str, Any]) -> bytes:
    """The index as stored: compact JSON, so the same body always gives the same bytes."""
    return json.dumps(body, separators=(",", ":")).encode()


def preamble(magic: bytes, chunk_bytes: int, data_length: int, blob: bytes) -> bytes:
    """The preamble of a file whose data region is ``data_length`` bytes, followed by the index ``blob``."""
    fields = (magic, VERSION, TENSOR_ALIGN, chunk_bytes, PREAMBLE_BYTES, data_length)
    head = _PREAMBLE.pack(*fields, PREAMBLE_BYTES + data_length, len(blob), zlib.crc32(blob))
    return head + struct.pack("<I", zlib.crc32(head))


def is_compressed(path: Path) -> bool:
    """Whether ``path`` starts like a compressed Ember checkpoint (nothing more is checked)."""
    with open(path, "rb") as source:
        return source.read(len(MAGIC_COMPRESSED)) == MAGIC_COMPRESSED


def read_index(path: Path) -> Index:
    """Read and validate the preamble and index of the checkpoint at ``path`` (not the data)."""
    path = Path(path)
    chunk_bytes, data_length, size, body = read_container(path, MAGIC)
    return parse_index(path, body, chunk_bytes, data_length, size)


def read_index_at(path: Path, base: int, size: int) -> Index:
    """The index of a checkpoint held as ``size`` bytes from byte ``base`` of the file at ``path``.

    The warm-tier arena holds checkpoints this way; the index's ``data_offset`` and ``chunks()``
    are positions in the whole file, so :func:`verify_chunks` checks the copy in place.
    """
    path = Path(path)
    chunk_bytes, data_length, size, body = read_container(path, MAGIC, (base, size))
    index = parse_index(path, body, chunk_bytes, data_length, size)
    return dataclasses.replace(index, data_offset=base + PREAMBLE_BYTES)


def read_container(path: Path, magic: bytes, window: tuple[int, int] | None = None) -> tuple[int, int, int, Any]:
    """Validate the preamble and the index checksum of a file starting with ``magic``.

    Returns the chunk size, the data region's length, the file's size and the parsed index JSON.
    With ``window`` (base, size) the checkpoint is those bytes of a larger file.
    """
    with open(path, "rb") as source:
        base, size = window if window is not None else (0, os.fstat(source.fileno()).st_size)
        source.seek(base)
        head = source.read(_PREAMBLE.size + 4)
        if len(head) < _PREAMBLE.size + 4 or size < PREAMBLE_BYTES:
            raise corrupt(path, f"it is {size} bytes long, shorter than the {PREAMBLE_BYTES}-byte preamble")
        found, version, align, chunk_bytes, data_offset, data_length, index_offset, index_length, index_crc = (
            _PREAMBLE.unpack_from(head)
        )
        kinds = {MAGIC: "an uncompressed", MAGIC_COMPRESSED: "a compressed"}
        if found not in kinds:
            raise corrupt(path, "it does not start with Ember's magic bytes (not an Ember checkpoint?)")
        if found != magic:
            what = f"it is {kinds[found]} Ember checkpoint, not {kinds.get(magic, 'an Ember')} one"
            raise corrupt(path, f"{what}; read it with load_checkpoint")
        if struct.unpack_from("<I", head, _PREAMBLE.size)[0] != zlib.crc32(head[: _PREAMBLE.size]):
            raise corrupt(path, "its preamble fails its crc32 check")
        if version != VERSION:
            raise corrupt(path, f"it is format version {version}; this Ember reads version {VERSION}")
        if data_offset != PREAMBLE_BYTES or index_offset != data_offset + data_length or index_length > MAX_INDEX_BYTES:
            raise corrupt(path, "its preamble describes an impossible layout")
        if chunk_bytes <= 0 or chunk_bytes % PREAMBLE_BYTES or align != TENSOR_ALIGN:
            raise corrupt(path, f"its chunk size {chunk_bytes} or alignment {align} is not one Ember writes")
        if index_offset + index_length != size:
            raise corrupt(
                path, f"it is {size} bytes long but its preamble says {index_offset + index_length} (truncated?)"
            )
        source.seek(base + index_offset)
        blob = source.read(index_length)
    if len(blob) != index_length or zlib.crc32(blob) != index_crc:
        raise corrupt(path, "its index fails its crc32 check")
    try:
        return chunk_bytes, data_length, size, json.loads(blob)
    except ValueError as exc:
        raise corrupt(path, f"its index is not JSON ({exc})") from None


def parse_index(path: Path, body: Any, chunk_bytes: int, data_length: int, size: int) -> Index:
    """Validate an index body describing ``data_length`` bytes of tensor data in a ``size``-byte file."""
    try:
        tensors = tuple(_entry(raw) for raw in body["tensors"])
        crcs = tuple(int(c) for c in body["chunks"])
        metadata = {str(k): str(v) for k, v in body["metadata"].items()}
        if body["chunk_bytes"] != chunk_bytes:
            raise ValueError("chunk sizes disagree")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise corrupt(path, f"its index is malformed ({exc!r})") from None
    if len(crcs) != math.ceil(data_length / chunk_bytes):
        raise corrupt(path, f"its index holds {len(crcs)} chunk checksums for {data_length} bytes of data")
    cursor, names = 0, set()
    for entry in sorted(tensors, key=lambda e: (e.offset, e.length)):
        if entry.offset < cursor or entry.offset % TENSOR_ALIGN or entry.offset + entry.length > data_length:
            raise corrupt(path, f"tensor '{entry.name}' lies outside the data, overlaps another or is misaligned")
        if entry.name in names:
            raise corrupt(path, f"tensor '{entry.name}' appears twice")
        names.add(entry.name)
        cursor = entry.offset + entry.length
    return Index(path, tensors, crcs, chunk_bytes, PREAMBLE_BYTES, data_length, size, metadata)


def index_body(index: Index) -> dict[str, Any]:
    """The JSON body of ``index``, exactly as :func:`write_raw` wrote it."""
    entries = [[e.name, e.dtype, list(e.shape), e.offset, e.length] for e in index.tensors]
    return {
        "tensors": entries,
        "chunk_bytes": index.chunk_bytes,
        "chunks": list(index.chunk_crcs),
        "metadata": dict(index.metadata),
    }


def _entry(raw: Any) -> TensorEntry:
    name, dtype, shape, offset, length = raw
    if not isinstance(name, str) or not isinstance(dtype, str):
        raise ValueError(f"entry {raw!r} has no string name and dtype")
    counts = [shape, offset, length] if isinstance(shape, list) else []
    if not counts or not all(type(n) is int and n >= 0 for n in [*shape, offset, length]):
        raise ValueError(f"entry {name!r} has a shape or byte range that is not non-negative integers")
    itemsize = ITEMSIZE.get(dtype)
    if itemsize is None:
        raise ValueError(f"tensor {name!r} has dtype {dtype!r}, which Ember does not store")
    if math.prod(shape) * itemsize != length:
        raise ValueError(f"tensor {name!r} spans {length} bytes but shape {shape} of {dtype} needs more or fewer")
    return TensorEntry(name, dtype, tuple(shape), offset, length)


def verify_chunks(index: Index, threads: int = 4) -> None:
    """Check every data chunk against its crc32, ``threads`` at a time; CorruptCheckpoint on the first bad one."""
    fd = os.open(index.path, os.O_RDONLY)
    try:

        def check(chunk: tuple[int, tuple[int, int]]) -> int | None:
            number, (start, length) = chunk
            data = os.pread(fd, length, start)
            return None if len(data) == length and zlib.crc32(data) == index.chunk_crcs[number] else number

        with ThreadPoolExecutor(max(1, threads)) as pool:
            bad = [n for n in pool.map(check, enumerate(index.chunks())) if n is not None]
    finally:
        os.close(fd)
    if bad:
        start, length = index.chunks()[bad[0]]
        raise corrupt(
            index.path, f"{len(bad)} data chunk(s) fail their crc32 check, first bytes {start}..{start + length}"
        )


def corrupt(path: Path, problem: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"checkpoint {path} is damaged: {problem}; {REPAIR}")


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder after a rename in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write ``path`` all or nothing: into a temporary file, flushed to disk, then renamed over it.

    On any error the temporary file is removed and ``path`` is untouched.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w+b") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
