"""Tests for ember.store: the safetensors checkpoint codec and the store's warm and cool tiers."""

from __future__ import annotations

import ast
import gc
import hashlib
import json
import math
import os
import shutil
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.errors import CorruptCheckpoint
from ember.store import Store, StoredModel, StoreStats, Tier, TierStats, map_checkpoint, write_checkpoint

_NAMES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]
_NAMES += ["float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"]
DTYPES: list[torch.dtype] = [getattr(torch, name) for name in _NAMES if hasattr(torch, name)]
PROC_MAPS = Path("/proc/self/maps")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that NaNs and fp8 compare bit for bit."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.tensor(list(draw(st.binary(min_size=nbytes, max_size=nbytes))), dtype=torch.uint8)
    if dtype is torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in PROC_MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


def sample(path: Path) -> Path:
    write_checkpoint(path, {"w": torch.arange(12, dtype=torch.int32).reshape(3, 4) + 7, "b": torch.ones(5)})
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def raw_file(path: Path, header: object, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


# -- the checkpoint format -----------------------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(min_size=1, max_size=8), tensors(), max_size=5))
def test_round_trip_is_bitwise(tmp_path: Path, named: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "w.safetensors"
    assert write_checkpoint(path, named) == path.stat().st_size
    loaded = map_checkpoint(path)
    assert sorted(loaded) == sorted(named)
    assert all(same(loaded[name], tensor) for name, tensor in named.items())
    assert not path.with_suffix(".tmp").exists()


def test_views_sharing_storage_and_non_contiguous(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    named = {"base": base, "t": base.t(), "row": base[1], "col": base[:, 2], "scalar": base[0, 1]}
    write_checkpoint(tmp_path / "w.safetensors", named)
    loaded = map_checkpoint(tmp_path / "w.safetensors")
    assert all(same(loaded[name], tensor.contiguous()) for name, tensor in named.items())
    assert loaded["scalar"].shape == () and loaded["scalar"].item() == 1.0


def test_interoperates_with_safetensors(tmp_path: Path) -> None:
    named = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(5), "c": torch.tensor(True)}
    write_checkpoint(tmp_path / "ours.safetensors", named)
    theirs = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    assert all(same(theirs[name], tensor) for name, tensor in named.items())
    safetensors.torch.save_file(named, tmp_path / "theirs.safetensors")
    ours = map_checkpoint(tmp_path / "theirs.safetensors")
    assert all(same(ours[name], tensor) for name, tensor in named.items())


def test_write_rejects_what_safetensors_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="must be str"):
        write_checkpoint(tmp_path / "w.safetensors", {1: torch.ones(1)})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="complex"):
        write_checkpoint(tmp_path / "w.safetensors", {"z": torch.ones(2, dtype=torch.complex64)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not PROC_MAPS.exists(), reason="needs /proc/self/maps")
def test_cpu_tensors_are_views_over_the_file(tmp_path: Path) -> None:
    path = sample(tmp_path / "w.safetensors")
    before = path.read_bytes()
    loaded = map_checkpoint(path)
    ranges = mapped_ranges(path)
    assert ranges, "the file is not mapped"
    for tensor in loaded.values():  # a copy would live on the heap, outside the file's mapping
        start = tensor.data_ptr()
        assert any(low <= start and start + tensor.nbytes <= high for low, high in ranges)
    loaded["w"][0, 0] = -1  # copy-on-write: the file keeps its bytes
    assert path.read_bytes() == before
    assert map_checkpoint(path)["w"][0, 0] == 7


@pytest.mark.skipif(not PROC_MAPS.exists(), reason="needs /proc/self/maps")
def test_mapping_lives_exactly_as_long_as_the_tensors(tmp_path: Path) -> None:
    path = sample(tmp_path / "w.safetensors")
    loaded = map_checkpoint(path)
    kept, expected = loaded["w"], loaded["w"].clone()
    del loaded
    gc.collect()
    assert mapped_ranges(path) and torch.equal(kept, expected)
    del kept
    gc.collect()
    assert mapped_ranges(path) == []


def test_map_to_another_device(tmp_path: Path) -> None:
    path = sample(tmp_path / "w.safetensors")
    meta = map_checkpoint(path, device="meta")
    assert meta["w"].device.type == "meta" and meta["w"].shape == (3, 4)
    if torch.cuda.is_available():
        cuda = map_checkpoint(path, torch.device("cuda"))
        assert same(cuda["w"], map_checkpoint(path)["w"])


def test_empty_checkpoint_and_misaligned_foreign_file(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "empty.safetensors", {})
    assert map_checkpoint(tmp_path / "empty.safetensors") == {}
    blob = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    blob += b" " * (len(blob) % 4 == 0)  # another writer's file, its data not 4-byte aligned
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + struct.pack("<2f", 1.5, -2.0))
    assert (8 + len(blob)) % 4 and map_checkpoint(path)["x"].tolist() == [1.5, -2.0]


def test_truncation_anywhere_is_corrupt(tmp_path: Path) -> None:
    good = sample(tmp_path / "good.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    cuts = [0, 3, 7, 8, 9, header_end // 2, header_end - 1, header_end, header_end + 1, len(good) - 1]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(good[:cut])
        with pytest.raises(CorruptCheckpoint) as caught:
            map_checkpoint(path)
        assert str(path) in caught.value.message
    (tmp_path / "long.safetensors").write_bytes(good + b"\0")
    with pytest.raises(CorruptCheckpoint, match="belong to no tensor"):
        map_checkpoint(tmp_path / "long.safetensors")


def test_any_flipped_header_byte_is_corrupt(tmp_path: Path) -> None:
    good = sample(tmp_path / "good.safetensors").read_bytes()
    path = tmp_path / "bad.safetensors"
    for position in range(8 + struct.unpack("<Q", good[:8])[0]):
        bad = bytearray(good)
        bad[position] ^= 0xFF
        path.write_bytes(bad)
        with pytest.raises(CorruptCheckpoint, match="damaged"):
            map_checkpoint(path)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ({"x": entry("C128", [1], 0, 16)}, "dtype"),
        ({"x": entry("F32", [3], 0, 16)}, "spans"),
        ({"x": entry("F32", [True], 0, 4)}, "shape"),
        ({"x": entry("F32", [1], -4, 0)}, "data_offsets"),
        ({"x": entry("I64", [2], 0, 16), "y": entry("U8", [8], 8, 16)}, "overlaps"),
        ({"x": entry("I64", [1], 8, 16)}, "belong to no tensor"),
        ({"x": [1, 2]}, "not an object"),
        ({"__metadata__": {"k": 1}}, "__metadata__"),
        ([], "not a JSON object"),
    ],
)
def test_malformed_headers_are_corrupt(tmp_path: Path, header: object, problem: str) -> None:
    with pytest.raises(CorruptCheckpoint, match=problem):
        map_checkpoint(raw_file(tmp_path / "bad.safetensors", header, bytes(16)))


def torch_imports(nodes: Iterable[ast.AST]) -> list[str]:
    found: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(node.module or "")
    return [name for name in found if name.split(".")[0] == "torch"]


def test_torch_is_imported_only_inside_checkpoint_functions() -> None:
    source = Path(__file__).parents[2] / "src" / "ember" / "store"
    assert torch_imports(ast.walk(ast.parse((source / "store.py").read_text()))) == []
    assert torch_imports(ast.parse((source / "checkpoint.py").read_text()).body) == []


# -- the store -----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "root", warm_root=tmp_path / "shm")
    yield opened
    opened.close()


def add(store: Store, key: str, numel: int = 10, assets: dict[str, bytes] | None = None) -> StoredModel:
    folder = store.staging(key)
    write_checkpoint(folder / "weights.safetensors", {"w": torch.arange(numel, dtype=torch.float32)})
    if assets:
        (folder / "assets").mkdir()
        for name, data in assets.items():
            (folder / "assets" / name).write_bytes(data)
    return store.commit(key, folder)


def test_tiers_from_cold_to_warm_and_back(store: Store, tmp_path: Path) -> None:
    assert store.tier("m@1") is Tier.COLD and store.keys() == []
    model = add(store, "m@1", assets={"vocab.txt": b"a b", "config.json": b"{}"})
    weights = model.path / "weights.safetensors"
    assert model == store.get("m@1")
    assert (model.key, model.bytes, model.assets) == (
        "m@1",
        weights.stat().st_size,
        ("config.json", "vocab.txt"),
    )
    assert model.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert store.tier("m@1") is Tier.COOL and store.weights_path("m@1") == weights
    warm = store.promote("m@1")
    assert warm == tmp_path / "shm" / "m@1" and store.tier("m@1") is Tier.WARM
    assert store.promote("m@1") == warm
    assert store.weights_path("m@1") == warm / "weights.safetensors"
    assert torch.equal(map_checkpoint(store.weights_path("m@1"))["w"], torch.arange(10.0))
    assert store.assets("m@1") == {"config.json": b"{}", "vocab.txt": b"a b"}
    store.verify("m@1")
    store.demote("m@1")
    store.demote("m@1")
    assert store.tier("m@1") is Tier.COOL and store.assets("m@1")["vocab.txt"] == b"a b"
    store.remove("m@1")
    assert store.tier("m@1") is Tier.COLD and store.keys() == [] and not model.path.exists()
    with pytest.raises(KeyError, match="not in the store"):
        store.get("m@1")
    with pytest.raises(KeyError):
        store.remove("m@1")


def test_commit_checks_its_input(store: Store) -> None:
    add(store, "m@1")
    folder = store.staging("m@1")
    with pytest.raises(ValueError, match="holds no weights"):
        store.commit("m@1", folder)
    write_checkpoint(folder / "weights.safetensors", {"w": torch.ones(1)})
    with pytest.raises(ValueError, match="already in the store"):
        store.commit("m@1", folder)
    (folder / "stray").write_bytes(b"")
    with pytest.raises(ValueError, match="stray"):
        store.commit("m@2", folder)
    store.abort(folder)
    assert not folder.exists()
    for key in ("", "../up", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="not a model key"):
            store.tier(key)


def test_promote_refuses_a_damaged_copy(store: Store, tmp_path: Path) -> None:
    model = add(store, "m@1", assets={"vocab.txt": b"abc"})
    weights = model.path / "weights.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0x01
    weights.write_bytes(damaged)
    with pytest.raises(CorruptCheckpoint, match=r"weights\.safetensors of model 'm@1'"):
        store.promote("m@1")
    assert store.tier("m@1") is Tier.COOL and list((tmp_path / "shm").iterdir()) == []
    with pytest.raises(CorruptCheckpoint, match="m@1"):
        store.verify("m@1")


def test_verify_checks_assets_and_the_warm_copy(store: Store) -> None:
    add(store, "m@1", assets={"vocab.txt": b"abc"})
    warm = store.promote("m@1")
    (warm / "assets" / "vocab.txt").write_bytes(b"abd")
    with pytest.raises(CorruptCheckpoint, match=r"vocab\.txt of model 'm@1'"):
        store.verify("m@1")
    store.demote("m@1")
    store.verify("m@1")
    (store.get("m@1").path / "weights.safetensors").unlink()
    with pytest.raises(CorruptCheckpoint, match="missing"):
        store.verify("m@1")


def test_construction_deletes_what_a_crash_left(tmp_path: Path) -> None:
    with_model = Store(tmp_path / "root", warm_root=tmp_path / "shm")
    cool = add(with_model, "good@1").path
    with_model.close()
    root, shm = tmp_path / "root", tmp_path / "shm"
    shutil.copytree(cool, shm / "good@1")  # a complete warm copy survives
    (root / "staging" / "import.123").mkdir()
    (root / "staging" / "import.123" / "weights.safetensors").write_bytes(b"partial")
    (root / "models" / "half@1").mkdir()
    (root / "models" / "half@1" / "weights.safetensors").write_bytes(b"no manifest")
    (shm / ".promote-good@1.abc").mkdir()
    (shm / "half@1").mkdir()  # warm, but its manifest never written
    shutil.copytree(cool, shm / "gone@1")  # warm copy of a model no longer on disk
    (shm / "gone@1" / "manifest.json").write_text((cool / "manifest.json").read_text().replace("good", "gone"))
    reopened = Store(root, warm_root=shm)
    try:
        assert list((root / "staging").iterdir()) == []
        assert [p.name for p in (root / "models").iterdir()] == ["good@1"]
        assert [p.name for p in shm.iterdir()] == ["good@1"]
        assert reopened.tier("good@1") is Tier.WARM and reopened.keys() == ["good@1"]
    finally:
        reopened.close()
    assert not shm.exists()


def test_a_second_store_on_the_root_leaves_the_first_ones_work(store: Store, tmp_path: Path) -> None:
    add(store, "m@1")
    store.promote("m@1")
    pending = store.staging("m@2")
    second = Store(tmp_path / "root", warm_root=tmp_path / "shm")
    assert pending.exists() and second.tier("m@1") is Tier.WARM
    second.close()
    assert store.tier("m@1") is Tier.WARM  # the first store is still open: its warm copy stays


def test_statistics_count_models_and_bytes_per_tier(store: Store) -> None:
    assert store.statistics() == StoreStats(warm=TierStats(0, 0), cool=TierStats(0, 0))
    small, large = add(store, "small@1", 10), add(store, "large@1", 1000)
    store.promote("large@1")
    assert store.statistics() == StoreStats(
        warm=TierStats(models=1, bytes=large.bytes), cool=TierStats(models=2, bytes=small.bytes + large.bytes)
    )


def test_concurrent_promotes_make_one_warm_copy(store: Store, tmp_path: Path) -> None:
    add(store, "m@1", numel=1 << 20)
    add(store, "n@1")
    barrier, results, errors = threading.Barrier(5), [], []

    def promote(key: str) -> None:
        barrier.wait()
        try:
            results.append(store.promote(key))
        except Exception as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(key,)) for key in ["m@1"] * 4 + ["n@1"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == [tmp_path / "shm" / "m@1"] * 4 + [tmp_path / "shm" / "n@1"]
    assert sorted(p.name for p in (tmp_path / "shm").iterdir()) == ["m@1", "n@1"]
    store.verify("m@1")


def test_default_warm_root_is_shared_memory_and_close_removes_it(tmp_path: Path) -> None:
    opened = Store(tmp_path / "root")
    try:
        add(opened, "m@1")
        warm_root = opened.promote("m@1").parent
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            assert warm_root.parent == Path("/dev/shm") and warm_root.name.startswith("ember-")
        else:
            assert warm_root == tmp_path / "root" / "warm"
    finally:
        opened.close()
    assert not warm_root.exists()
    with pytest.raises(RuntimeError, match="closed"):
        opened.promote("m@1")
