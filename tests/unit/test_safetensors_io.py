"""Tests for ember.store.safetensors_io: the safetensors codec used to import and export weights."""

from __future__ import annotations

import ast
import gc
import json
import struct
from collections.abc import Iterable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensor_cases import same, tensors

from ember.errors import CorruptCheckpoint
from ember.store import map_safetensors, write_safetensors

_NAMES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]
_NAMES += ["float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"]
DTYPES: list[torch.dtype] = [getattr(torch, name) for name in _NAMES if hasattr(torch, name)]
PROC_MAPS = Path("/proc/self/maps")


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in PROC_MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


def sample(path: Path) -> Path:
    write_safetensors(path, {"w": torch.arange(12, dtype=torch.int32).reshape(3, 4) + 7, "b": torch.ones(5)})
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def raw_file(path: Path, header: object, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


# -- the codec -----------------------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(min_size=1, max_size=8), tensors(DTYPES, 5), max_size=5))
def test_round_trip_is_bitwise(tmp_path: Path, named: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "w.safetensors"
    assert write_safetensors(path, named) == path.stat().st_size
    loaded = map_safetensors(path)
    assert sorted(loaded) == sorted(named)
    assert all(same(loaded[name], tensor) for name, tensor in named.items())
    assert not path.with_name(path.name + ".tmp").exists()


def test_views_sharing_storage_and_non_contiguous(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    named = {"base": base, "t": base.t(), "row": base[1], "col": base[:, 2], "scalar": base[0, 1]}
    write_safetensors(tmp_path / "w.safetensors", named)
    loaded = map_safetensors(tmp_path / "w.safetensors")
    assert all(same(loaded[name], tensor.contiguous()) for name, tensor in named.items())
    assert loaded["scalar"].shape == () and loaded["scalar"].item() == 1.0


def test_interoperates_with_safetensors(tmp_path: Path) -> None:
    named = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(5), "c": torch.tensor(True)}
    write_safetensors(tmp_path / "ours.safetensors", named)
    theirs = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    assert all(same(theirs[name], tensor) for name, tensor in named.items())
    safetensors.torch.save_file(named, tmp_path / "theirs.safetensors")
    ours = map_safetensors(tmp_path / "theirs.safetensors")
    assert all(same(ours[name], tensor) for name, tensor in named.items())


def test_write_rejects_what_safetensors_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="must be str"):
        write_safetensors(tmp_path / "w.safetensors", {1: torch.ones(1)})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="complex"):
        write_safetensors(tmp_path / "w.safetensors", {"z": torch.ones(2, dtype=torch.complex64)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not PROC_MAPS.exists(), reason="needs /proc/self/maps")
def test_cpu_tensors_are_views_over_the_file(tmp_path: Path) -> None:
    path = sample(tmp_path / "w.safetensors")
    before = path.read_bytes()
    loaded = map_safetensors(path)
    ranges = mapped_ranges(path)
    assert ranges, "the file is not mapped"
    for tensor in loaded.values():  # a copy would live on the heap, outside the file's mapping
        start = tensor.data_ptr()
        assert any(low <= start and start + tensor.nbytes <= high for low, high in ranges)
    loaded["w"][0, 0] = -1  # copy-on-write: the file keeps its bytes
    assert path.read_bytes() == before
    assert map_safetensors(path)["w"][0, 0] == 7


@pytest.mark.skipif(not PROC_MAPS.exists(), reason="needs /proc/self/maps")
def test_mapping_lives_exactly_as_long_as_the_tensors(tmp_path: Path) -> None:
    path = sample(tmp_path / "w.safetensors")
    loaded = map_safetensors(path)
    kept, expected = loaded["w"], loaded["w"].clone()
    del loaded
    gc.collect()
    assert mapped_ranges(path) and torch.equal(kept, expected)
    del kept
    gc.collect()
    assert mapped_ranges(path) == []


def test_map_to_another_device(tmp_path: Path) -> None:
    path = sample(tmp_path / "w.safetensors")
    meta = map_safetensors(path, device="meta")
    assert meta["w"].device.type == "meta" and meta["w"].shape == (3, 4)
    if torch.cuda.is_available():
        cuda = map_safetensors(path, torch.device("cuda"))
        assert same(cuda["w"], map_safetensors(path)["w"])


def test_empty_checkpoint_and_misaligned_foreign_file(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "empty.safetensors", {})
    assert map_safetensors(tmp_path / "empty.safetensors") == {}
    blob = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    blob += b" " * (len(blob) % 4 == 0)  # another writer's file, its data not 4-byte aligned
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + struct.pack("<2f", 1.5, -2.0))
    assert (8 + len(blob)) % 4 and map_safetensors(path)["x"].tolist() == [1.5, -2.0]


def test_truncation_anywhere_is_corrupt(tmp_path: Path) -> None:
    good = sample(tmp_path / "good.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    cuts = [0, 3, 7, 8, 9, header_end // 2, header_end - 1, header_end, header_end + 1, len(good) - 1]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(good[:cut])
        with pytest.raises(CorruptCheckpoint) as caught:
            map_safetensors(path)
        assert str(path) in caught.value.message
    (tmp_path / "long.safetensors").write_bytes(good + b"\0")
    with pytest.raises(CorruptCheckpoint, match="belong to no tensor"):
        map_safetensors(tmp_path / "long.safetensors")


def test_any_flipped_header_byte_is_corrupt(tmp_path: Path) -> None:
    good = sample(tmp_path / "good.safetensors").read_bytes()
    path = tmp_path / "bad.safetensors"
    for position in range(8 + struct.unpack("<Q", good[:8])[0]):
        bad = bytearray(good)
        bad[position] ^= 0xFF
        path.write_bytes(bad)
        with pytest.raises(CorruptCheckpoint, match="damaged"):
            map_safetensors(path)


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
        map_safetensors(raw_file(tmp_path / "bad.safetensors", header, bytes(16)))


def torch_imports(nodes: Iterable[ast.AST]) -> list[str]:
    found: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(node.module or "")
    return [name for name in found if name.split(".")[0] == "torch"]


def test_torch_is_imported_only_inside_functions() -> None:
    source = Path(__file__).parents[2] / "src" / "ember" / "store"
    assert torch_imports(ast.walk(ast.parse((source / "store.py").read_text()))) == []
    for module in ("safetensors_io.py", "format.py", "convert.py", "loader.py"):
        assert torch_imports(ast.parse((source / module).read_text()).body) == [], module
