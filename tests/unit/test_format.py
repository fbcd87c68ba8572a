"""Tests for Ember's checkpoint format, its loader and its importers and exporter."""

from __future__ import annotations

import math
import struct
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensor_cases import same, tensors

from ember.errors import CorruptCheckpoint
from ember.store import (
    LoaderConfig,
    export_safetensors,
    import_source,
    load_checkpoint,
    map_checkpoint,
    read_index,
    verify_chunks,
    write_checkpoint,
)
from ember.store.format import ITEMSIZE, PREAMBLE_BYTES, TENSOR_ALIGN, write_raw

DTYPES: list[torch.dtype] = [getattr(torch, n) for n in ITEMSIZE if isinstance(getattr(torch, n, None), torch.dtype)]
# small chunks, so that even tiny checkpoints span several reads and checksums
SMALL_READS = LoaderConfig(threads=3, chunk_bytes=4096, map_on_cpu=False, verify=True)


def sample(path: Path, numel: int = 5000) -> dict[str, torch.Tensor]:
    named = {
        "w": torch.arange(numel, dtype=torch.float32).reshape(-1, 10),
        "b": torch.randn(7).to(torch.bfloat16),
        "f8": torch.randn(33).to(torch.float8_e4m3fn),
        "i": torch.arange(3, dtype=torch.int64),
    }
    write_checkpoint(path, named)
    return named


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(min_size=1, max_size=8), tensors(DTYPES, 6), max_size=5))
def test_round_trip_is_bitwise_through_every_load_path(tmp_path: Path, named: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "w.ember"
    assert write_checkpoint(path, named) == path.stat().st_size
    for config in (LoaderConfig(), SMALL_READS):
        loaded = load_checkpoint(path, "cpu", config)
        assert list(loaded) == list(named)
        assert all(same(loaded[name], tensor) for name, tensor in named.items())
    assert all(e.offset % TENSOR_ALIGN == 0 for e in read_index(path).tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["w.ember"]


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_every_dtype_in_the_table_exists_in_torch_or_is_skipped() -> None:
    assert {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float16} <= set(DTYPES)
    with pytest.raises(TypeError, match="cannot be stored"):
        write_checkpoint(
            Path("/nonexistent/w.ember"), {"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)}
        )


def test_cpu_load_maps_the_file_and_writes_stay_private(tmp_path: Path) -> None:
    path = tmp_path / "w.ember"
    sample(path)
    before = path.read_bytes()
    loaded = map_checkpoint(path)
    loaded["w"][0, 0] = -1
    assert path.read_bytes() == before and map_checkpoint(path)["w"][0, 0] == 0
    assert map_checkpoint(path, "meta")["w"].device.type == "meta"


def test_views_and_non_contiguous_tensors(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    named = {
        "base": base,
        "t": base.t(),
        "col": base[:, 2],
        "scalar": base[0, 1],
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
    }
    write_checkpoint(tmp_path / "w.ember", named)
    loaded = load_checkpoint(tmp_path / "w.ember", "cpu", SMALL_READS)
    assert all(same(loaded[n], t.resolve_conj()) for n, t in named.items())


def test_flipped_data_byte_is_caught_by_its_chunk(tmp_path: Path) -> None:
    path = tmp_path / "w.ember"
    sample(path, numel=10_000)
    raw = bytearray(path.read_bytes())
    raw[PREAMBLE_BYTES + 9000] ^= 0x10
    path.write_bytes(raw)
    read_index(path)  # the index is intact
    with pytest.raises(CorruptCheckpoint, match=r"w\.ember is damaged: 1 data chunk"):
        verify_chunks(read_index(path))
    with pytest.raises(CorruptCheckpoint, match="crc32"):
        load_checkpoint(path, "cpu", SMALL_READS)


def test_any_flipped_preamble_or_index_byte_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "w.ember"
    sample(path, numel=10)
    good = path.read_bytes()
    index = read_index(path)
    positions = list(range(0, struct.calcsize("<8sIIQQQQQI") + 4)) + list(
        range(index.data_offset + index.data_length, len(good))
    )
    for position in positions:
        bad = bytearray(good)
        bad[position] ^= 0xFF
        path.write_bytes(bad)
        with pytest.raises(CorruptCheckpoint) as caught:
            load_checkpoint(path)
        assert str(path) in caught.value.message


def test_truncation_and_extension_are_corrupt(tmp_path: Path) -> None:
    good = (tmp_path / "good.ember", sample(tmp_path / "good.ember"))[0].read_bytes()
    for cut in (0, 7, 100, PREAMBLE_BYTES, PREAMBLE_BYTES + 10, len(good) // 2, len(good) - 1):
        path = tmp_path / f"cut{cut}.ember"
        path.write_bytes(good[:cut])
        with pytest.raises(CorruptCheckpoint) as caught:
            load_checkpoint(path)
        assert str(path) in caught.value.message
    (tmp_path / "long.ember").write_bytes(good + b"\0")
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        load_checkpoint(tmp_path / "long.ember")
    (tmp_path / "st.ember").write_bytes(b"\x10" + bytes(8000))
    with pytest.raises(CorruptCheckpoint, match="magic"):
        load_checkpoint(tmp_path / "st.ember")


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def broken() -> object:
        yield ("a", "uint8", (4,), b"abcd")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_raw(tmp_path / "w.ember", broken())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="twice"):
        write_raw(tmp_path / "w.ember", [("a", "uint8", (1,), b"a"), ("a", "uint8", (1,), b"b")])
    assert list(tmp_path.iterdir()) == []


def test_concurrent_loads_of_one_checkpoint_agree(tmp_path: Path) -> None:
    path = tmp_path / "w.ember"
    named = sample(path, numel=50_000)
    results: list[dict[str, torch.Tensor]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def load(config: LoaderConfig) -> None:
        barrier.wait()
        try:
            results.append(load_checkpoint(path, "cpu", config))
        except BaseException as exc:  # pragma: no cover - the assertion shows it
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(c,)) for c in [LoaderConfig(), SMALL_READS] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 8
    assert all(same(r[n], t) for r in results for n, t in named.items())


def test_import_safetensors_torch_and_sharded_folders_then_export(tmp_path: Path) -> None:
    named = {"a.weight": torch.randn(4, 4).to(torch.bfloat16), "b.bias": torch.arange(6), "c": torch.ones(2)}
    safetensors.torch.save_file(named, tmp_path / "one.safetensors")
    torch.save(named, tmp_path / "sd.pt")
    torch.save({"state_dict": named}, tmp_path / "wrapped.bin")
    hf = tmp_path / "hf"
    hf.mkdir()
    safetensors.torch.save_file({"a.weight": named["a.weight"]}, hf / "model-00001-of-00002.safetensors")
    safetensors.torch.save_file({k: named[k] for k in ("b.bias", "c")}, hf / "model-00002-of-00002.safetensors")
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors"}
    weight_map["c"] = "model-00002-of-00002.safetensors"
    (hf / "model.safetensors.index.json").write_text('{"weight_map": ' + str(weight_map).replace("'", '"') + "}")
    for source in ("one.safetensors", "sd.pt", "wrapped.bin", "hf"):
        out = tmp_path / f"{source}.ember"
        assert import_source(tmp_path / source, out) == out.stat().st_size
        loaded = map_checkpoint(out)
        assert sorted(loaded) == sorted(named) and all(same(loaded[n], t) for n, t in named.items()), source
    export_safetensors(tmp_path / "hf.ember", tmp_path / "back.safetensors")
    back = safetensors.torch.load_file(tmp_path / "back.safetensors")
    assert all(same(back[n], t) for n, t in named.items())
    with pytest.raises(ValueError, match="import a"):
        import_source(tmp_path / "one.safetensors.ember", tmp_path / "x.ember")


def test_loader_config_is_checked() -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        LoaderConfig(chunk_bytes=1000)
    with pytest.raises(ValueError, match="at least 1"):
        LoaderConfig(threads=0)


class LazyCopy:
    """A copy that happens only when waited for, as an asynchronous device copy might: a buffer
    reused before its copy was waited for would show up as wrong bytes in the target."""

    def __init__(self, target: torch.Tensor, buffer: torch.Tensor, start: int, length: int, log: list[str]) -> None:
        self.target, self.buffer, self.start, self.length, self.log = target, buffer, start, length, log
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        if not self.done:
            self.target[self.start : self.start + self.length].copy_(self.buffer[: self.length])
            self.done = True
            self.log.append("copied")


@pytest.mark.parametrize(("threads", "buffers"), [(1, 1), (3, 2), (4, 8)])
def test_the_staged_pipeline_never_reuses_a_buffer_before_its_copy(tmp_path: Path, threads: int, buffers: int) -> None:
    from ember.store.loader import _staged

    path = tmp_path / "w.ember"
    sample(path, numel=20_000)  # ~80 KB: 20 reads of 4 KiB
    index = read_index(path)
    target = torch.zeros(index.data_length, dtype=torch.uint8)
    pool = [torch.full((4096,), 0xEE, dtype=torch.uint8) for _ in range(buffers)]
    log: list[str] = []
    config = LoaderConfig(threads=threads, chunk_bytes=4096)
    _staged(index, config, pool, lambda buffer, start, length: LazyCopy(target, buffer, start, length, log))
    assert len(log) == math.ceil(index.data_length / 4096)
    expected = path.read_bytes()[index.data_offset : index.data_offset + index.data_length]
    assert bytes(target.numpy()) == expected


def test_writing_reports_its_progress_chunk_by_chunk(tmp_path: Path) -> None:
    heard: list[int] = []
    data = bytes(range(256)) * 64  # 16 KiB: four 4 KiB chunks
    write_raw(tmp_path / "w.ember", [("w", "uint8", (len(data),), data)], chunk_bytes=4096, progress=heard.append)
    assert heard == [4096, 8192, 12288, 16384]
    seen: list[tuple[int, int]] = []
    named = {"w": torch.arange(50_000, dtype=torch.float32), "b": torch.ones(3)}
    write_checkpoint(tmp_path / "c.ember", named, progress=lambda done, total: seen.append((done, total)))
    total = 50_000 * 4 + 3 * 4
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert same(load_checkpoint(tmp_path / "c.ember", torch.device("cpu"))["w"], named["w"])
