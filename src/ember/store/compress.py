"""The compressed tier: an Ember checkpoint with its tensor bytes split into byte planes and zstd'd.

    [0, 4096)            the preamble of :mod:`ember.store.format`, with the magic ``EMBERCZ\\x01``
    [4096, 4096 + S)     frames: each the stored planes of one piece of the raw data, back to back
    [4096 + S, end)      index: {"codec": "zstd-byteplane", "raw": <the uncompressed file's index>,
                         "raw_length": D, "frames": [[raw offset, raw length, width,
                         [stored bytes of each plane], crc32 of the stored bytes], ...]}

The idea is ZipNN's: in a float tensor the byte holding the sign and most of the exponent is highly
skewed (a trained model's weights sit within a few powers of two), while the mantissa bytes are
close to random. Compressing the whole tensor mixes the two and zstd finds little; splitting each
element's bytes into planes (byte k of every element together) lets zstd code the exponent plane
at 2.4-2.8x and leave the mantissa planes alone. Each plane is stored zstd'd only when that saves
at least 5%, else as it is, so decompressing it is a copy; a frame no plane of which shrinks is
stored verbatim and read straight into place. The width of the planes is the dtype's item size,
which also suits integers (the high bytes of small int64s are zero) and leaves 1-byte dtypes whole.

Frames are at most ``frame_bytes`` (4 MiB) of raw data and never straddle tensors of different
widths. They decompress independently, ``threads`` at a time: zstd, zlib's crc32 and numpy's copies
all release the GIL. A frame lands at its raw offset in one zero-filled buffer laid out exactly as
the uncompressed file's data region, so the loader hands out the same aligned views either way,
and :func:`decompress_checkpoint` rebuilds the uncompressed file bit for bit (the raw index is
kept), which is how the store's warm tier gets a mappable copy.

Integrity: the crc32 of every frame's stored bytes (checked by :func:`verify_frames` and on loads
with ``verify``) names a damaged frame; a decompressed copy is checked against the uncompressed
file's own chunk crc32s, end to end. numpy and zstandard are imported inside the functions.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.store.format import (
    ITEMSIZE,
    MAGIC,
    MAGIC_COMPRESSED,
    PREAMBLE_BYTES,
    Index,
    atomic_file,
    corrupt,
    index_blob,
    index_body,
    parse_index,
    preamble,
    read_container,
    read_index,
    verify_chunks,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "CompressedIndex",
    "Frame",
    "compress_checkpoint",
    "compression_pays",
    "decode_frame",
    "decompress_checkpoint",
    "decompress_into",
    "read_compressed_index",
    "verify_frames",
]

CODEC = "zstd-byteplane"
FRAME_BYTES = 4 << 20
LEVEL = 1  # level 1 coded the exponent planes of MiniLM's weights 10-15% smaller than level 3
MIN_PLANE_SAVING = 0.05
_WIDTHS = frozenset({1, 2, 4, 8, 16})


@dataclass(frozen=True)
class Frame:
    """One piece of raw data: where it goes, its element width, how its planes are stored, its crc32."""

    raw_offset: int
    raw_length: int
    width: int
    planes: tuple[int, ...]  # stored bytes of each plane; raw_length // width means stored as it is
    file_offset: int
    crc32: int

    @property
    def stored_bytes(self) -> int:
        return sum(self.planes)

    @property
    def verbatim(self) -> bool:
        return self.width == 1 and self.planes[0] == self.raw_length


@dataclass(frozen=True)
class CompressedIndex:
    """A validated compressed checkpoint: its frames, and ``raw``, the index of the file it decompresses to.

    ``raw.path`` is the compressed file; ``raw.file_bytes`` is the size of the uncompressed file.
    """

    path: Path
    raw: Index
    raw_body: dict[str, Any]
    frames: tuple[Frame, ...]
    file_bytes: int

    @property
    def ratio(self) -> float:
        """Uncompressed file bytes over compressed file bytes."""
        return self.raw.file_bytes / self.file_bytes


def read_compressed_index(path: Path) -> CompressedIndex:
    """Read and validate the preamble, index and frame table of the compressed checkpoint at ``path``."""
    path = Path(path)
    chunk_bytes, stored_length, size, body = read_container(path, MAGIC_COMPRESSED)
    try:
        if body["codec"] != CODEC:
            raise ValueError(f"codec {body['codec']!r} is not {CODEC!r}")
        raw_body, raw_length = body["raw"], body["raw_length"]
        if not isinstance(raw_body, dict) or type(raw_length) is not int or raw_length < 0:
            raise ValueError("no raw index or raw length")
        frames, cursor = [], PREAMBLE_BYTES
        for raw_frame in body["frames"]:
            frames.append(_frame(raw_frame, cursor))
            cursor += frames[-1].stored_bytes
    except (ValueError, KeyError, TypeError) as exc:
        raise corrupt(path, f"its index is malformed ({exc!r})") from None
    if cursor != PREAMBLE_BYTES + stored_length:
        raise corrupt(path, f"its frames hold {cursor - PREAMBLE_BYTES} bytes but its data region {stored_length}")
    raw_bytes = PREAMBLE_BYTES + raw_length + len(index_blob(raw_body))
    raw = parse_index(path, raw_body, chunk_bytes, raw_length, raw_bytes)
    _check_cover(path, frames, raw)
    return CompressedIndex(path, raw, raw_body, tuple(frames), size)


def _frame(raw: Any, file_offset: int) -> Frame:
    raw_offset, raw_length, width, planes, crc = raw
    numbers = [raw_offset, raw_length, width, crc, *planes]
    if not all(type(n) is int and n >= 0 for n in numbers) or width not in _WIDTHS or len(planes) != width:
        raise ValueError(f"frame {raw!r} is not offsets, a width of {sorted(_WIDTHS)} and one length per plane")
    if raw_length == 0 or raw_length % width or any(n > raw_length // width for n in planes):
        raise ValueError(f"frame {raw!r} has a length its width does not divide, or planes that grew")
    return Frame(raw_offset, raw_length, width, tuple(planes), file_offset, crc)


def _check_cover(path: Path, frames: list[Frame], raw: Index) -> None:
    """Frames follow each other in the raw data, stay inside it, and cover every tensor's bytes."""
    spans: list[list[int]] = []  # runs of touching frames: [start, end)
    for number, frame in enumerate(frames):
        end = frame.raw_offset + frame.raw_length
        if (spans and frame.raw_offset < spans[-1][1]) or end > raw.data_length:
            raise corrupt(path, f"frame {number} lies outside the raw data or overlaps the frame before it")
        if spans and frame.raw_offset == spans[-1][1]:
            spans[-1][1] = end
        else:
            spans.append([frame.raw_offset, end])
    starts = [start for start, _ in spans]
    for entry in raw.tensors:
        at = bisect.bisect_right(starts, entry.offset) - 1
        if entry.length and (at < 0 or entry.offset + entry.length > spans[at][1]):
            raise corrupt(path, f"the bytes of tensor '{entry.name}' are in no frame")


def compress_checkpoint(
    src: Path,
    dst: Path,
    *,
    level: int = LEVEL,
    frame_bytes: int = FRAME_BYTES,
    threads: int = 4,
) -> int:
    """Write a compressed copy of the Ember checkpoint ``src`` to ``dst``, atomically; return its size.

    ``src``'s chunks are checked first, so a damaged file is never compressed into a sound-looking one.
    """
    import numpy as np

    if frame_bytes <= 0 or frame_bytes % PREAMBLE_BYTES:
        raise ValueError(f"frame_bytes={frame_bytes}: use a positive multiple of {PREAMBLE_BYTES}")
    index = read_index(Path(src))
    verify_chunks(index, threads)
    with open(src, "rb") as source:
        mapped = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mapped, dtype=np.uint8, count=index.data_length, offset=PREAMBLE_BYTES)
    plan = _plan(index, frame_bytes)
    records: list[list[Any]] = []
    stored = 0

    def encode(piece: tuple[int, int, int]) -> tuple[int, list[Any]]:
        start, length, width = piece
        return _encode(data[start : start + length], width, level)

    with atomic_file(Path(dst)) as out, ThreadPoolExecutor(max(1, threads)) as pool:
        out.write(bytes(PREAMBLE_BYTES))
        for (start, length, _), (width, planes) in zip(
            plan, _bounded_map(pool, encode, plan, 2 * threads), strict=True
        ):
            crc = 0
            for plane in planes:
                out.write(plane)
                crc = zlib.crc32(plane, crc)
            records.append([start, length, width, [len(p) for p in planes], crc])
            stored += sum(len(p) for p in planes)
        body = {"codec": CODEC, "raw": index_body(index), "raw_length": index.data_length, "frames": records}
        blob = index_blob(body)
        out.write(blob)
        out.seek(0)
        out.write(preamble(MAGIC_COMPRESSED, index.chunk_bytes, stored, blob))
    return PREAMBLE_BYTES + stored + len(blob)


def _plan(index: Index, frame_bytes: int) -> list[tuple[int, int, int]]:
    """(raw offset, length, width) of each frame: runs of same-width tensors cut into ``frame_bytes``."""
    runs: list[list[int]] = []  # [start, end, width]; the zero padding between tensors of a run joins it
    for entry in sorted(index.tensors, key=lambda e: e.offset):
        width = ITEMSIZE[entry.dtype]
        if not entry.length:
            continue
        if runs and runs[-1][2] == width:
            runs[-1][1] = entry.offset + entry.length
        else:
            runs.append([entry.offset, entry.offset + entry.length, width])
    return [(s, min(frame_bytes, end - s), w) for start, end, w in runs for s in range(start, end, frame_bytes)]


_local = threading.local()


def _encode(data: npt.NDArray[np.uint8], width: int, level: int) -> tuple[int, list[Any]]:
    """The width and stored planes of one frame: each plane zstd'd if that saves enough, else as is."""
    import numpy as np
    import zstandard

    compressors: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("compressors", {})
    compressor = compressors.get(level)
    if compressor is None:  # one per thread and level: a compressor is not thread-safe
        compressor = compressors[level] = zstandard.ZstdCompressor(level=level)
    if width == 1:
        planes = [data]
    else:
        columns = data.reshape(-1, width)
        planes = [np.ascontiguousarray(columns[:, k]) for k in range(width)]
    stored: list[Any] = []
    for plane in planes:
        packed = compressor.compress(plane.data)
        stored.append(packed if len(packed) < len(plane) * (1 - MIN_PLANE_SAVING) else plane)
    if width > 1 and all(p is q for p, q in zip(stored, planes, strict=True)):
        return 1, [data]  # nothing shrank: store the frame verbatim, so a load reads it straight into place
    return width, stored


def _bounded_map(
    pool: ThreadPoolExecutor, fn: Any, items: list[tuple[int, int, int]], window: int
) -> Iterator[tuple[int, list[Any]]]:
    """``fn`` over ``items`` in order, at most ``window`` results held at once."""
    pending: deque[Future[tuple[int, list[Any]]]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= max(1, window):
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def decompress_into(
    cindex: CompressedIndex, out: npt.NDArray[np.uint8], threads: int = 4, *, verify: bool = False
) -> None:
    """Decompress every frame, ``threads`` at a time, into ``out``: a zero-filled raw data region.

    With ``verify`` each frame's stored bytes are checked before they are used, and the result
    against the uncompressed file's chunk crc32s. Damage raises CorruptCheckpoint naming the frame.
    """
    if len(out) != cindex.raw.data_length:
        raise ValueError(f"the buffer holds {len(out)} bytes; the raw data is {cindex.raw.data_length}")
    fd = os.open(cindex.path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(
                pool.map(
                    lambda n: decode_frame(fd, cindex, n, _slot(out, cindex.frames[n]), verify),
                    range(len(cindex.frames)),
                )
            )
    finally:
        os.close(fd)
    if verify:
        _check_raw_chunks(cindex, out, threads)


def _slot(out: npt.NDArray[np.uint8], frame: Frame) -> npt.NDArray[np.uint8]:
    return out[frame.raw_offset : frame.raw_offset + frame.raw_length]


def decode_frame(fd: int, cindex: CompressedIndex, number: int, target: npt.NDArray[np.uint8], verify: bool) -> None:
    """Read frame ``number`` from ``fd`` (the compressed file) and decompress it into ``target``.

    ``target`` is the frame's ``raw_length`` bytes: its slot in the raw data, or a staging buffer.
    """
    import numpy as np
    import zstandard

    frame = cindex.frames[number]
    view = (target.data if frame.verbatim else memoryview(_scratch(frame.stored_bytes))).cast("B")[: frame.stored_bytes]
    got = 0
    while got < frame.stored_bytes:
        n = os.preadv(fd, [view[got:]], frame.file_offset + got)
        if n <= 0:
            raise corrupt(cindex.path, f"frame {number} is cut short (the file shrank?)")
        got += n
    if verify and zlib.crc32(view) != frame.crc32:
        end = frame.file_offset + frame.stored_bytes
        raise corrupt(cindex.path, f"frame {number} (bytes {frame.file_offset}..{end}) fails its crc32 check")
    if frame.verbatim:
        return
    decompressor: zstandard.ZstdDecompressor | None = _local.__dict__.get("decompressor")
    if decompressor is None:  # one per thread: a decompressor is not thread-safe
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    columns, size, at = target.reshape(-1, frame.width), frame.raw_length // frame.width, 0
    for k, length in enumerate(frame.planes):
        piece = view[at : at + length]
        at += length
        try:
            plane = piece if length == size else decompressor.decompress(piece, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise corrupt(cindex.path, f"plane {k} of frame {number} does not decompress ({exc})") from None
        if len(plane) != size:
            raise corrupt(cindex.path, f"plane {k} of frame {number} decompresses to {len(plane)} bytes, not {size}")
        columns[:, k] = np.frombuffer(plane, dtype=np.uint8)


def _scratch(size: int) -> bytearray:
    """This thread's buffer for stored frames, kept between frames: fresh pages cost a fault each."""
    scratch: bytearray | None = _local.__dict__.get("scratch")
    if scratch is None or len(scratch) < size:
        scratch = _local.scratch = bytearray(max(size, FRAME_BYTES))
    return scratch


def _check_raw_chunks(cindex: CompressedIndex, out: npt.NDArray[np.uint8], threads: int) -> None:
    raw = cindex.raw
    starts = range(0, raw.data_length, raw.chunk_bytes)

    def check(number: int) -> bool:
        start = starts[number]
        return zlib.crc32(out[start : start + raw.chunk_bytes].data) == raw.chunk_crcs[number]

    with ThreadPoolExecutor(max(1, threads)) as pool:
        bad = [n for n, ok in enumerate(pool.map(check, range(len(starts)))) if not ok]
    if bad:
        start = starts[bad[0]]
        raise corrupt(
            cindex.path,
            f"{len(bad)} decompressed chunk(s) fail their crc32 check, first raw bytes {start}.."
            f"{min(raw.data_length, start + raw.chunk_bytes)}",
        )


def verify_frames(cindex: CompressedIndex, threads: int = 4) -> None:
    """Check every frame's stored bytes against its crc32; CorruptCheckpoint naming the first bad one."""
    fd = os.open(cindex.path, os.O_RDONLY)
    try:

        def check(frame: Frame) -> bool:
            data = os.pread(fd, frame.stored_bytes, frame.file_offset)
            return len(data) == frame.stored_bytes and zlib.crc32(data) == frame.crc32

        with ThreadPoolExecutor(max(1, threads)) as pool:
            bad = [n for n, ok in enumerate(pool.map(check, cindex.frames)) if not ok]
    finally:
        os.close(fd)
    if bad:
        frame = cindex.frames[bad[0]]
        end = frame.file_offset + frame.stored_bytes
        raise corrupt(
            cindex.path,
            f"{len(bad)} frame(s) fail their crc32 check, first frame {bad[0]} (bytes {frame.file_offset}..{end})",
        )


def decompress_checkpoint(src: Path, dst: Path, threads: int = 4) -> int:
    """Rebuild the uncompressed checkpoint of ``src`` at ``dst``, bit for bit, checked end to end; its size."""
    import numpy as np

    cindex = read_compressed_index(Path(src))
    raw = cindex.raw
    blob = index_blob(cindex.raw_body)
    with atomic_file(Path(dst)) as out:
        out.truncate(PREAMBLE_BYTES + raw.data_length)  # a sparse, zero-filled data region to decompress into
        if raw.data_length:
            mapped = mmap.mmap(out.fileno(), PREAMBLE_BYTES + raw.data_length)
            data = np.frombuffer(mapped, dtype=np.uint8, count=raw.data_length, offset=PREAMBLE_BYTES)
            decompress_into(cindex, data, threads, verify=True)
            del data, mapped  # written back by the fsync that ends atomic_file
        out.seek(PREAMBLE_BYTES + raw.data_length)
        out.write(blob)
        out.seek(0)
        out.write(preamble(MAGIC, raw.chunk_bytes, raw.data_length, blob))
    return raw.file_bytes


def compression_pays(
    raw_bytes: int, compressed_bytes: int, source_bytes_per_s: float, decompress_bytes_per_s: float
) -> bool:
    """Whether reading ``compressed_bytes`` and decompressing beats reading ``raw_bytes``.

    Reads and decompression overlap (frames are read and decoded by the same threads in parallel),
    so a compressed load takes about the longer of the two: it wins when the source is slower
    than decompression (``decompress_bytes_per_s`` counts raw bytes out) and the file is smaller.
    """
    if min(source_bytes_per_s, decompress_bytes_per_s) <= 0:
        raise ValueError("bandwidths must be positive")
    compressed_s = max(compressed_bytes / source_bytes_per_s, raw_bytes / decompress_bytes_per_s)
    return compressed_s < raw_bytes / source_bytes_per_s
