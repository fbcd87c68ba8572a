"""Tests for the compressed tier: byte-plane zstd checkpoints, their loads, integrity and store accounting."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensor_cases import same, tensors
from typer.testing import CliRunner

from ember.cli import app
from ember.errors import CorruptCheckpoint
from ember.store import (
    LoaderConfig,
    Store,
    Tier,
    compress_checkpoint,
    decompress_checkpoint,
    export_safetensors,
    import_source,
    load_checkpoint,
    read_compressed_index,
    write_checkpoint,
)
from ember.store.compress import compression_pays, verify_frames
from ember.store.format import (
    ITEMSIZE,
    MAGIC_COMPRESSED,
    PREAMBLE_BYTES,
    TENSOR_ALIGN,
    index_blob,
    preamble,
    read_container,
)
from ember.store.safetensors_io import map_safetensors

DTYPES: list[torch.dtype] = [getattr(torch, n) for n in ITEMSIZE if isinstance(getattr(torch, n, None), torch.dtype)]
CHECKED = LoaderConfig(threads=3, verify=True)
SMALL_FRAMES = 4096  # so that small tensors span several frames


@st.composite
def weights_like(draw: st.DrawFn) -> torch.Tensor:
    """A tensor with a trained model's statistics: normal floats, small integers, sparse booleans."""
    dtype = draw(
        st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool])
    )
    shape = tuple(draw(st.lists(st.integers(0, 40), max_size=3)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 0.05).to(dtype)
    if dtype is torch.bool:
        return torch.rand(shape, generator=generator) < 0.1
    return torch.randint(0, 512, shape, generator=generator, dtype=dtype)


def compressed(tmp_path: Path, named: dict[str, torch.Tensor], frame_bytes: int = SMALL_FRAMES) -> Path:
    raw, packed = tmp_path / "w.ember", tmp_path / "w.emberz"
    write_checkpoint(raw, named)
    assert compress_checkpoint(raw, packed, frame_bytes=frame_bytes, threads=2) == packed.stat().st_size
    return packed


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(min_size=1, max_size=8), tensors(DTYPES, 6) | weights_like(), max_size=5))
def test_compressed_round_trip_is_bitwise_for_every_dtype(tmp_path: Path, named: dict[str, torch.Tensor]) -> None:
    packed = compressed(tmp_path, named)
    for config in (LoaderConfig(), CHECKED, LoaderConfig(threads=1, map_on_cpu=False)):
        loaded = load_checkpoint(packed, "cpu", config)
        assert list(loaded) == list(named)
        assert all(same(loaded[name], tensor) for name, tensor in named.items())
        assert all(t.data_ptr() % TENSOR_ALIGN == 0 for t in loaded.values() if t.numel())
    assert decompress_checkpoint(packed, tmp_path / "back.ember", threads=3) == (tmp_path / "w.ember").stat().st_size
    assert (tmp_path / "back.ember").read_bytes() == (tmp_path / "w.ember").read_bytes()


def test_exponent_planes_compress_and_random_bytes_are_stored_verbatim(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    normal = {"w": (torch.randn(1 << 20, generator=generator) * 0.02).to(torch.bfloat16)}
    index = read_compressed_index(compressed(tmp_path, normal, frame_bytes=1 << 20))
    assert index.ratio > 1.3  # the high byte (sign, exponent) of N(0, 0.02) holds ~3 bits of 8
    assert all(f.width == 2 and f.planes[1] < f.planes[0] for f in index.frames)

    noise = {"w": torch.randint(0, 256, (1 << 20,), generator=generator, dtype=torch.uint8).view(torch.bfloat16)}
    index = read_compressed_index(compressed(tmp_path, noise, frame_bytes=1 << 20))
    assert all(f.verbatim for f in index.frames) and 0.99 < index.ratio <= 1.0


def test_frames_never_mix_widths_and_skip_padding(tmp_path: Path) -> None:
    named = {"a": torch.zeros(3, dtype=torch.float32), "b": torch.zeros(5, dtype=torch.float32), "c": torch.ones(7)}
    named["d"] = torch.zeros(9, dtype=torch.int8)
    index = read_compressed_index(compressed(tmp_path, named))
    assert [(f.raw_offset, f.raw_length, f.width) for f in index.frames] == [(0, 2 * 256 + 7 * 4, 4), (768, 9, 1)]


def test_import_and_export_through_the_compressed_form(tmp_path: Path) -> None:
    named = {"w": (torch.randn(64, 64) * 0.1).to(torch.float16), "ids": torch.arange(100)}
    write_checkpoint(tmp_path / "src.ember", named)
    export_safetensors(tmp_path / "src.ember", tmp_path / "src.safetensors")
    size = import_source(tmp_path / "src.safetensors", tmp_path / "w.emberz", compress=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.ember", "src.safetensors", "w.emberz"]
    assert read_compressed_index(tmp_path / "w.emberz").file_bytes == size
    export_safetensors(tmp_path / "w.emberz", tmp_path / "back.safetensors")
    back = map_safetensors(tmp_path / "back.safetensors")
    assert all(same(back[name], tensor) for name, tensor in named.items())


# -- integrity -------------------------------------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x40]))


@pytest.fixture
def damaged(tmp_path: Path) -> Iterator[tuple[Path, int, dict[str, torch.Tensor]]]:
    """A compressed checkpoint with one byte of a zstd'd plane of frame 2 flipped; that frame's number."""
    named = {"w": (torch.randn(16384) * 0.05).to(torch.bfloat16), "b": torch.arange(2048)}
    packed = compressed(tmp_path, named)
    frame = read_compressed_index(packed).frames[2]
    assert frame.width == 2 and frame.planes[1] < frame.planes[0]
    flip(packed, frame.file_offset + frame.planes[0] + frame.planes[1] // 2)
    yield packed, 2, named


def test_a_flipped_byte_is_named_by_frame_and_nothing_is_loaded(damaged: tuple[Path, int, object]) -> None:
    packed, number, _ = damaged
    index = read_compressed_index(packed)  # the index is sound: the damage is in the data
    with pytest.raises(CorruptCheckpoint, match=rf"w.emberz is damaged: 1 frame\(s\) fail.*first frame {number} "):
        verify_frames(index)
    with pytest.raises(CorruptCheckpoint, match=rf"frame {number} \(bytes \d+\.\.\d+\) fails its crc32"):
        load_checkpoint(packed, "cpu", CHECKED)
    with pytest.raises(CorruptCheckpoint, match="frame"):
        decompress_checkpoint(packed, packed.with_name("back.ember"))
    assert not packed.with_name("back.ember").exists()
    assert [p.name for p in packed.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_truncation_and_a_damaged_frame_table_are_refused(tmp_path: Path) -> None:
    packed = compressed(tmp_path, {"w": (torch.randn(8192) * 0.05).to(torch.float32)})
    whole = packed.read_bytes()
    packed.write_bytes(whole[:-1])
    with pytest.raises(CorruptCheckpoint, match=r"bytes long but its preamble says \d+ \(truncated\?\)"):
        load_checkpoint(packed)
    packed.write_bytes(whole)
    chunk_bytes, stored, _, body = read_container(packed, MAGIC_COMPRESSED)

    def rewritten(change: Callable[[dict[str, Any]], int]) -> Path:
        edited = json.loads(json.dumps(body))
        dropped = change(edited)  # the stored bytes it removed from the end
        blob = index_blob(edited)
        head = preamble(MAGIC_COMPRESSED, chunk_bytes, stored - dropped, blob).ljust(PREAMBLE_BYTES, b"\0")
        packed.write_bytes(head + whole[PREAMBLE_BYTES : PREAMBLE_BYTES + stored - dropped] + blob)
        return packed

    def overlap(edited: dict[str, Any]) -> int:
        edited["frames"][1][0] = edited["frames"][0][0]
        return 0

    def drop_last(edited: dict[str, Any]) -> int:
        return int(sum(edited["frames"].pop()[3]))

    def odd_width(edited: dict[str, Any]) -> int:
        edited["frames"][0][2] = 3
        return 0

    with pytest.raises(CorruptCheckpoint, match="frame 1 lies outside the raw data or overlaps"):
        load_checkpoint(rewritten(overlap))
    with pytest.raises(CorruptCheckpoint, match="the bytes of tensor 'w' are in no frame"):
        load_checkpoint(rewritten(drop_last))
    with pytest.raises(CorruptCheckpoint, match="its index is malformed"):
        load_checkpoint(rewritten(odd_width))
    packed.write_bytes(whole)
    with pytest.raises(CorruptCheckpoint, match="it is a compressed Ember checkpoint, not an uncompressed one"):
        compress_checkpoint(packed, tmp_path / "again.emberz")


# -- concurrency -----------------------------------------------------------------------------------


def test_concurrent_loads_of_one_compressed_file_agree(tmp_path: Path) -> None:
    named = {f"t{i}": (torch.randn(4096 + i) * 0.05).to(torch.bfloat16) for i in range(8)}
    packed = compressed(tmp_path, named)
    results: list[bool] = []
    lock = threading.Lock()

    def load() -> None:
        loaded = load_checkpoint(packed, "cpu", LoaderConfig(threads=2, verify=True))
        ok = all(same(loaded[name], tensor) for name, tensor in named.items())
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 6


# -- the store -------------------------------------------------------------------------------------


def stage(store: Store, key: str, named: dict[str, torch.Tensor]) -> None:
    folder = store.staging(key)
    write_checkpoint(folder / "weights.ember", named)
    store.commit(key, folder, compress=True)


def normal(numel: int, seed: int) -> dict[str, torch.Tensor]:
    return {"w": (torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)}


def raw_size(named: dict[str, torch.Tensor], tmp_path: Path) -> int:
    return write_checkpoint(tmp_path / "measure.ember", named)


def test_store_keeps_compressed_cool_copies_and_decompresses_into_warm(tmp_path: Path) -> None:
    store = Store(tmp_path / "root", warm_root=tmp_path / "shm")
    try:
        named = normal(1 << 16, 0)
        raw = raw_size(named, tmp_path)
        stage(store, "m@1", named)
        model = store.get("m@1")
        assert model.raw_bytes == raw and model.bytes < raw / 1.3 and model.warm_bytes == raw
        cool = store.weights_path("m@1")
        assert cool.read_bytes().startswith(MAGIC_COMPRESSED)
        assert hashlib.sha256(cool.read_bytes()).hexdigest() == model.sha256
        assert store.statistics().cool.bytes == model.bytes and store.statistics().warm.bytes == 0

        warm = store.promote("m@1") / "weights.ember"
        assert store.weights_path("m@1") == warm and warm.read_bytes() == (tmp_path / "measure.ember").read_bytes()
        assert same(load_checkpoint(warm)["w"], named["w"]) and same(load_checkpoint(cool)["w"], named["w"])
        stats = store.statistics()
        assert (stats.warm.bytes, stats.cool.bytes) == (raw, model.bytes)
        store.verify("m@1")
        store.demote("m@1")
        assert store.tier("m@1") is Tier.COOL and store.get("m@1") == model
    finally:
        store.close()


def test_incompressible_weights_stay_uncompressed(tmp_path: Path) -> None:
    store = Store(tmp_path / "root", warm_root=tmp_path / "shm")
    try:
        noise = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8).view(torch.float16)
        stage(store, "m@1", {"w": noise})
        model = store.get("m@1")
        assert model.raw_bytes is None and model.bytes == model.warm_bytes
        assert not store.weights_path("m@1").read_bytes().startswith(MAGIC_COMPRESSED)
        assert not list((tmp_path / "root").rglob("*.z"))  # the trial compression left nothing behind
    finally:
        store.close()


def test_budgets_count_compressed_bytes_cool_and_raw_bytes_warm(tmp_path: Path) -> None:
    models = {"a@1": normal(1 << 15, 1), "b@1": normal(1 << 15, 2)}
    raw = raw_size(models["a@1"], tmp_path)
    probe = Store(tmp_path / "probe", warm_root=tmp_path / "probe-shm")
    stage(probe, "a@1", models["a@1"])
    packed = probe.get("a@1").bytes
    probe.close()
    assert packed < raw / 1.3  # so a budget of two compressed copies holds less than two raw ones

    # cool: room for both compressed copies, not for two raw ones; warm: room for one raw copy only
    store = Store(
        tmp_path / "root", warm_root=tmp_path / "shm", cool_budget_bytes=2 * packed + 1024, warm_budget_bytes=raw
    )
    try:
        for key, named in models.items():
            stage(store, key, named)
        assert store.statistics().cool.bytes == sum(store.get(k).bytes for k in models) <= 2 * packed + 1024
        store.promote("a@1")
        store.promote("b@1")  # a's raw bytes must leave first, though both compressed copies would fit
        assert store.tier("a@1") is Tier.COOL and store.tier("b@1") is Tier.WARM
        assert store.statistics().warm.bytes == raw
        assert store.make_room(raw, Tier.WARM) == ["b@1"] and store.statistics().warm.bytes == 0
    finally:
        store.close()


def test_store_verify_and_promote_name_a_damaged_compressed_copy(tmp_path: Path) -> None:
    store = Store(tmp_path / "root", warm_root=tmp_path / "shm")
    try:
        stage(store, "m@1", normal(1 << 15, 3))
        cool = store.weights_path("m@1")
        frame = read_compressed_index(cool).frames[0]
        flip(cool, frame.file_offset + 5)
        with pytest.raises(CorruptCheckpoint, match=r"weights.ember of model 'm@1' is damaged: .*frame 0"):
            store.verify("m@1")
        with pytest.raises(CorruptCheckpoint, match=r"weights.ember of model 'm@1' is damaged: .*frame 0"):
            store.promote("m@1")
        assert store.tier("m@1") is Tier.COOL and list((tmp_path / "shm").iterdir()) == []
    finally:
        store.close()


def test_cli_imports_lists_and_verifies_compressed_models(tmp_path: Path) -> None:
    runner = CliRunner()
    home = tmp_path / "home"
    write_checkpoint(tmp_path / "src.ember", normal(1 << 15, 4))
    export_safetensors(tmp_path / "src.ember", tmp_path / "src.safetensors")
    source = str(tmp_path / "src.safetensors")
    result = runner.invoke(app, ["store", "import", source, "--key", "m@1", "--compress", "--home", str(home)])
    assert result.exit_code == 0 and "compressed 1." in result.output, result.output
    result = runner.invoke(app, ["store", "ls", "--home", str(home)])
    assert result.exit_code == 0 and "m@1" in result.output and "1." in result.output, result.output
    result = runner.invoke(app, ["store", "verify", "m@1", "--home", str(home)])
    assert result.exit_code == 0 and "m@1: ok" in result.output, result.output

    out = tmp_path / "w.emberz"
    result = runner.invoke(app, ["store", "import", source, "--out", str(out), "--compress"])
    assert result.exit_code == 0 and out.read_bytes().startswith(MAGIC_COMPRESSED), result.output
    assert runner.invoke(app, ["store", "verify", str(out)]).exit_code == 0
    flip(out, read_compressed_index(out).frames[0].file_offset)
    result = runner.invoke(app, ["store", "verify", str(out)])
    assert result.exit_code == 1 and "frame 0" in result.output, result.output


# -- where compression pays --------------------------------------------------------------------------


def test_compression_pays_only_when_the_source_is_slower_than_decompression() -> None:
    gb = 10**9
    assert compression_pays(gb, gb // 2, source_bytes_per_s=0.5e9, decompress_bytes_per_s=2e9)
    assert not compression_pays(gb, gb // 2, source_bytes_per_s=10e9, decompress_bytes_per_s=2e9)
    assert not compression_pays(gb, gb, source_bytes_per_s=0.5e9, decompress_bytes_per_s=2e9)
    with pytest.raises(ValueError, match="positive"):
        compression_pays(gb, gb, 0, 1)


@pytest.mark.parametrize(("threads", "buffers"), [(1, 1), (3, 2)])
def test_the_staged_device_pipeline_decompresses_frame_by_frame(tmp_path: Path, threads: int, buffers: int) -> None:
    from test_format import LazyCopy

    from ember.store.loader import _staged

    named = {"w": (torch.randn(20_000) * 0.05).to(torch.bfloat16), "i": torch.arange(3000), "b": torch.ones(5) > 0}
    packed = compressed(tmp_path, named)
    index = read_compressed_index(packed)
    target = torch.zeros(index.raw.data_length, dtype=torch.uint8)
    pool = [torch.full((SMALL_FRAMES,), 0xEE, dtype=torch.uint8) for _ in range(buffers)]
    log: list[str] = []
    config = LoaderConfig(threads=threads, verify=True)
    _staged(index.raw, config, pool, lambda b, start, n: LazyCopy(target, b, start, n, log), index)
    assert len(log) == len(index.frames) > 10
    raw = (tmp_path / "w.ember").read_bytes()
    assert bytes(target.numpy()) == raw[PREAMBLE_BYTES : PREAMBLE_BYTES + index.raw.data_length]


def test_a_restart_keeps_a_sound_warm_copy_of_a_compressed_model(tmp_path: Path) -> None:
    root, shm = tmp_path / "root", tmp_path / "shm"
    first = Store(root, warm_root=shm)
    stage(first, "m@1", normal(1 << 15, 5))
    stage(first, "n@1", normal(1 << 15, 6))
    kept = {key: tmp_path / f"kept-{key}" for key in ("m@1", "n@1")}
    for key, copy in kept.items():
        shutil.copytree(first.promote(key), copy)
    first.close()  # removes the warm copies; put them back as a crash would have left them
    shutil.copytree(kept["m@1"], shm / "m@1")
    shutil.copytree(kept["n@1"], shm / "n@1")
    shutil.copyfile(root / "models" / "n@1" / "weights.ember", shm / "n@1" / "weights.ember")  # the wrong size
    reopened = Store(root, warm_root=shm)
    try:
        assert reopened.tier("m@1") is Tier.WARM and reopened.tier("n@1") is Tier.COOL
        assert reopened.statistics().warm.bytes == reopened.get("m@1").raw_bytes
        reopened.verify("m@1")
    finally:
        reopened.close()
