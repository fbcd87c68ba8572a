"""The load benchmark: Ember's loader beside torch.load, safetensors and the raw link, in one run.

Used by ``benchmarks/load.py`` and ``ember store bench``. One checkpoint of random fp16 tensors
(fixed seed, a mix of sizes) is written in each format; every method then loads it and *touches*
it. "Loaded" means every byte is resident and readable: after each method returns, one byte of
every 4 KiB page of every tensor is read (for a method that already copied the data this costs
little; for a memory map it is what faults the pages in), and the timing includes it. Each method
runs ``repeat`` times, the methods interleaved round by round so noise from other processes falls
on all of them alike, and the best time counts.

Two kinds of load, compared like with like. *Mapped*: ``ember (mmap)`` and
``safetensors.load_file`` (whose default backend on the CPU also maps the file and hands out views,
checked: resident anonymous memory does not grow) both return views over the page cache, so the
timing is the kernel's page faults and nothing is copied; neither can beat the other by much, and
both can beat the copying "ceiling". *Copied* (private bytes, safe from later changes to the file):
``ember (read into new buffer)`` against ``safetensors.load_file pread`` (its ``backend="pread"``,
safetensors >= 0.7), both measured against the ceiling, which copies too.

The ceiling is the raw link: ``threads`` threads ``preadv`` the Ember file's data region, in 16 MiB
pieces, into a buffer allocated and faulted in beforehand. Sources: ``page cache`` (files read once
before timing), ``cold disk`` (the files evicted from the page cache before each run: by
``/proc/sys/vm/drop_caches`` where allowed, else ``posix_fadvise(DONTNEED)`` per file), and ``shm``
(the Ember file in /dev/shm: the warm tier of a CPU host). On a CUDA host the same sources are
measured again to the device (``-> cuda``: torch.load with ``map_location``, safetensors with
``device=``, Ember's staged loader; a device load counts once ``torch.cuda.synchronize`` returns),
and Ember from /dev/shm against a plain pinned host->device copy of the same bytes; beside them the
/dev/shm file mapped and page-locked in place with ``cudaHostRegister``, per load and once ahead
(:func:`_registered`): what a warm tier registered as pinned memory would reach; and
``ember (warm arena) -> cuda``, the store's own warm copy in its arena, registered once, loaded
with :func:`load_checkpoint` as a CUDA worker loads a warm model.

``store.promote`` is the platform's own cool -> warm step, timed as the controller runs it: the
same checkpoint committed to a :class:`Store` under the work folder whose warm tier is an arena
(:mod:`ember.store.arena`, allocated and touched when the store opens, before any timing), read
into a slab with its chunk checksums checked as it goes, from page cache and from cold disk; its
warm copy is dropped before each run. ``store.promote (file per model)`` is the same promotion
into a store without an arena, which copies into a fresh /dev/shm file and then checks it.
:mod:`ember.store.bandwidths` turns these rows into the link speeds ``ember serve`` predicts first
loads with.

torch and safetensors are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.store.arena import register_arena
from ember.store.bandwidths import PROMOTE, Row
from ember.store.convert import write_checkpoint
from ember.store.format import PREAMBLE_BYTES, read_index
from ember.store.loader import LoaderConfig, load_checkpoint
from ember.store.store import WEIGHTS, Store

if TYPE_CHECKING:
    import torch

__all__ = ["PROMOTE", "Row", "run_benchmark"]

_PAGE = 4096
#: The same promotion into a warm tier of one shared-memory file per model (a store without an arena).
PROMOTE_FILES = "store.promote (file per model)"
#: The warm tier's load onto the device from the store's arena (pinned once), as a CUDA worker does it.
ARENA_TO_CUDA = "ember (warm arena) -> cuda"
_KEY = "bench@1"
_SIZES_MIB = (64, 16, 4, 1, 0.25, 0.0625)  # a mix of tensor sizes, like a model's matrices and vectors


def make_tensors(size_bytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    total, i = 0, 0
    while total < size_bytes:
        numel = max(1, min(int(_SIZES_MIB[i % len(_SIZES_MIB)] * (1 << 20)) // 2, (size_bytes - total) // 2))
        tensors[f"layer{i // len(_SIZES_MIB)}.t{i % len(_SIZES_MIB)}"] = torch.randn(
            numel, generator=generator, dtype=torch.float32
        ).to(torch.float16)
        total += numel * 2
        i += 1
    return tensors


def touch(tensors: dict[str, torch.Tensor]) -> int:
    """Read one byte of every page of every tensor; the sum, so the reads cannot be skipped."""
    total = 0
    for tensor in tensors.values():
        flat = tensor.reshape(-1).view(__import__("torch").uint8)
        total += int(flat[::_PAGE].sum())
    return total


def ceiling(path: Path, threads: int, chunk_bytes: int = 16 << 20) -> Callable[[], int]:
    """The raw link: parallel reads of the checkpoint's data into a pre-faulted buffer."""
    index = read_index(path)
    buffer = mmap.mmap(-1, max(_PAGE, index.data_length))
    buffer.write(b"\1" * len(buffer))  # fault it in before timing
    view = memoryview(buffer)

    def run() -> int:
        fd = os.open(path, os.O_RDONLY)
        try:

            def read(start: int) -> int:
                end = min(index.data_length, start + chunk_bytes)
                got = 0
                while got < end - start:
                    got += os.preadv(fd, [view[start + got : end]], PREAMBLE_BYTES + start + got)
                return got

            with ThreadPoolExecutor(threads) as pool:
                return sum(pool.map(read, range(0, index.data_length, chunk_bytes)))
        finally:
            os.close(fd)

    return run


def evict(paths: list[Path]) -> str:
    """Drop ``paths`` from the page cache; the means used."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def warm_up(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as source:
            while source.read(16 << 20):
                pass


@contextmanager
def _workdir(where: Path | None) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="ember-bench-", dir=where))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_benchmark(
    size_gb: float = 1.0,
    repeat: int = 3,
    threads: int = 4,
    cold: bool = True,
    workdir: Path | None = None,
    loader: LoaderConfig | None = None,
    say: Callable[[str], None] = print,
    sweep: bool = False,
) -> tuple[list[Row], dict[str, Any]]:
    """Measure every method from every source; the rows and notes on how (eviction means, bytes)."""
    import safetensors.torch
    import torch

    loader = loader or LoaderConfig(threads=threads)
    notes: dict[str, Any] = {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "threads": threads}
    if torch.cuda.is_available():
        notes["device"] = torch.cuda.get_device_name()
    arena_bytes = int(size_gb * 1e9 * 1.05) + (64 << 20)  # the checkpoint, its index and padding, with room
    with (
        _workdir(workdir) as folder,
        contextlib.closing(
            Store(folder / "store", warm_budget_bytes=arena_bytes, verify_threads=threads, arena=True)
        ) as store,
        contextlib.closing(Store(folder / "store-files", verify_threads=threads)) as file_store,
    ):
        tensors = make_tensors(int(size_gb * 1e9))
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        files = {"ember": folder / "w.ember", "torch": folder / "w.pt", "safetensors": folder / "w.safetensors"}
        say(f"writing {nbytes / 1e9:.2f} GB of fp16 tensors ({len(tensors)} tensors) in three formats under {folder}")
        write_checkpoint(files["ember"], tensors)
        torch.save(tensors, files["torch"])
        safetensors.torch.save_file(tensors, files["safetensors"])
        del tensors
        promote, prepare_promote, cool_file = _committed(store, files["ember"], notes)
        promote_files, prepare_files, cool_file_files = _committed(file_store, files["ember"], {})
        read_loader = LoaderConfig(
            threads=loader.threads, chunk_bytes=loader.chunk_bytes, direct_io=loader.direct_io, map_on_cpu=False
        )
        methods: dict[str, Callable[[], object]] = {
            "ceiling (parallel pread)": ceiling(files["ember"], threads),
            "torch.load": lambda: touch(torch.load(files["torch"], weights_only=True)),
            "torch.load mmap=True": lambda: touch(torch.load(files["torch"], weights_only=True, mmap=True)),
            "safetensors.load_file": lambda: touch(safetensors.torch.load_file(files["safetensors"])),
            "ember (mmap)": lambda: touch(load_checkpoint(files["ember"], "cpu", loader)),
            "ember (read into new buffer)": lambda: touch(load_checkpoint(files["ember"], "cpu", read_loader)),
            PROMOTE: promote,
            PROMOTE_FILES: promote_files,
        }
        if "backend" in inspect.signature(safetensors.torch.load_file).parameters:  # safetensors >= 0.7
            methods["safetensors.load_file pread"] = lambda: touch(
                safetensors.torch.load_file(files["safetensors"], backend="pread")
            )
        on_disk = [*files.values(), cool_file, cool_file_files]

        def cached() -> None:
            prepare_promote()
            prepare_files()
            warm_up(on_disk)

        def evicted() -> None:
            prepare_promote()
            prepare_files()
            evict(on_disk)

        sources: list[tuple[str, Callable[[], object], dict[str, Callable[[], object]]]] = [
            ("page cache", cached, methods)
        ]
        if cold:
            means = evict(on_disk)
            notes["cold_eviction"] = means
            sources.append(("cold disk", evicted, methods))
        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * nbytes:
            with _workdir(shm) as shm_folder:
                shutil.copyfile(files["ember"], shm_folder / "w.ember")
                shm_methods: dict[str, Callable[[], object]] = {
                    "ceiling (parallel pread)": ceiling(shm_folder / "w.ember", threads),
                    "ember (mmap)": lambda: touch(load_checkpoint(shm_folder / "w.ember", "cpu", loader)),
                    "ember (read into new buffer)": lambda: touch(
                        load_checkpoint(shm_folder / "w.ember", "cpu", read_loader)
                    ),
                }
                rows_shm = _measure("shm", lambda: None, shm_methods, nbytes, repeat, say)
                if torch.cuda.is_available():  # the host tier against a plain pinned copy of the same bytes
                    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                    device_copy = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
                    host_methods: dict[str, Callable[[], object]] = {
                        "pinned h2d copy (ceiling)": _synced(lambda: device_copy.copy_(host, non_blocking=True)),
                        "ember (staged) -> cuda": _synced(
                            lambda: load_checkpoint(shm_folder / "w.ember", "cuda", loader)
                        ),
                    }
                    promote()  # the store's copy into its arena, registered once as a worker does at start
                    slab = store.weights_path(_KEY)
                    notes["arena_pinned"] = store.arena_path is not None and register_arena(store.arena_path)
                    host_methods[ARENA_TO_CUDA] = _synced(lambda: load_checkpoint(slab, "cuda"))
                    with _registered(shm_folder / "w.ember", device_copy, notes) as registered:
                        rows_shm += _measure(
                            "shm -> cuda",
                            lambda: None,
                            host_methods | registered,
                            nbytes,
                            repeat,
                            say,
                            "pinned h2d copy (ceiling)",
                        )
                    del host, device_copy
        else:
            rows_shm = []
        rows: list[Row] = []
        if sweep:  # the staged loader's inner loop (parallel preads into a reused buffer) per setting
            settings = {
                f"pread threads={t} chunk={c}MiB": ceiling(files["ember"], t, c << 20)
                for t in (1, 2, 4, 8)
                for c in (1, 4, 16, 64)
            }
            settings["ceiling (parallel pread)"] = ceiling(files["ember"], threads)
            rows += _measure("sweep", lambda: warm_up([files["ember"]]), settings, nbytes, repeat, say)
        if torch.cuda.is_available():
            gpu_methods: dict[str, Callable[[], object]] = {  # the store's promotion is host-side only
                "ceiling (parallel pread)": ceiling(files["ember"], threads),
                "torch.load -> cuda": _synced(
                    lambda: torch.load(files["torch"], weights_only=True, map_location="cuda")
                ),
                "safetensors.load_file -> cuda": _synced(
                    lambda: safetensors.torch.load_file(files["safetensors"], device="cuda")
                ),
                "ember (staged) -> cuda": _synced(lambda: load_checkpoint(files["ember"], "cuda", loader)),
            }
            sources += [(f"{source} -> cuda", prepare, gpu_methods) for source, prepare, _ in sources]
        for source, prepare, table in sources:
            rows += _measure(source, prepare, table, nbytes, repeat, say)
        rows += rows_shm
    return rows, notes


def _committed(
    store: Store, checkpoint: Path, notes: dict[str, Any]
) -> tuple[Callable[[], object], Callable[[], object], Path]:
    """Commit ``checkpoint`` to ``store``: its promotion, what undoes one, and its cool file."""
    key = _KEY
    staging = store.staging(key)
    shutil.copyfile(checkpoint, staging / WEIGHTS)
    store.commit(key, staging)

    def promote() -> object:
        warm = store.promote(key)
        notes["warm_tier"] = str(warm.parent)
        return warm

    return promote, lambda: store.demote(key), store.weights_path(key)


def _measure(
    source: str,
    prepare: Callable[[], object],
    methods: Mapping[str, Callable[[], object]],
    nbytes: int,
    repeat: int,
    say: Callable[[str], None],
    ceiling_name: str = "ceiling (parallel pread)",
) -> list[Row]:
    best = dict.fromkeys(methods, math.inf)
    for round_number in range(repeat):
        for name, method in methods.items():
            prepare()
            start = time.perf_counter()  # clock-ok: a benchmark measures wall time
            method()
            best[name] = min(best[name], time.perf_counter() - start)  # clock-ok
        say(f"  {source}: round {round_number + 1}/{repeat} done")
    top = nbytes / best[ceiling_name] / 1e9
    rows = []
    for name, seconds in best.items():
        rate = nbytes / seconds / 1e9
        rows.append(Row(name, source, round(rate, 3), round(rate / top, 3), round(seconds, 4), nbytes))
    return rows


@contextmanager
def _registered(
    path: Path, device_copy: torch.Tensor, notes: dict[str, Any]
) -> Iterator[dict[str, Callable[[], object]]]:
    """The warm file mapped and page-locked in place (``cudaHostRegister``), then copied to the device.

    Two rows: ``registered mapping -> cuda (register per load)`` unregisters the last registration,
    registers and copies (what a warm tier of plain files would pay on every load);
    ``... (pre-registered)`` only copies, the registration held from the row before (what a warm tier
    registered once, as an arena, pays per load). No rows if the runtime refuses the registration;
    the reason goes in ``notes``.
    """
    import torch

    data = read_index(path).data_length
    fd = os.open(path, os.O_RDWR)
    try:
        host = torch.frombuffer(mmap.mmap(fd, PREAMBLE_BYTES + data), dtype=torch.uint8)[PREAMBLE_BYTES:]
    finally:
        os.close(fd)
    start, cudart = host.data_ptr() - PREAMBLE_BYTES, torch.cuda.cudart()  # type: ignore[no-untyped-call]
    held = [False]

    def release() -> None:
        if held[0]:
            cudart.cudaHostUnregister(start)
            held[0] = False

    def register() -> None:
        release()
        error = int(cudart.cudaHostRegister(start, PREAMBLE_BYTES + data, 0))
        if error != 0:
            raise RuntimeError(f"cudaHostRegister failed with CUDA error {error}")
        held[0] = True

    def copy() -> object:
        if not held[0]:
            register()
        return device_copy[:data].copy_(host, non_blocking=True)

    def per_load() -> object:
        register()
        return _synced(copy)()

    try:
        register()
    except RuntimeError as exc:
        notes["registered_mapping"] = str(exc)
        yield {}
        return
    try:
        yield {
            "registered mapping -> cuda (register per load)": per_load,
            "registered mapping -> cuda (pre-registered)": _synced(copy),
        }
    finally:
        release()  # the mapping goes with the last tensor over it


def _synced(load: Callable[[], object]) -> Callable[[], object]:
    """``load``, then wait for the device: data on a GPU counts as loaded once its copies are done."""

    def run() -> object:
        import torch

        result = load()
        torch.cuda.synchronize()
        return result

    return run


def format_table(rows: list[Row]) -> str:
    lines = [f"{'source':<20} {'method':<30} {'GB/s':>8} {'x ceiling':>10} {'seconds':>9}"]
    for row in rows:
        lines.append(
            f"{row.source:<20} {row.method:<30} {row.gb_per_s:>8.2f} {row.ratio_to_ceiling:>10.2f} {row.seconds:>9.3f}"
        )
    return "\n".join(lines)
