"""The staged GPU loader: pinned buffers, asynchronous copies, one device allocation. Needs CUDA."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from ember.store import LoaderConfig, load_checkpoint, write_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def sample(path: Path) -> dict[str, torch.Tensor]:
    named = {
        "big": torch.randn(3 << 20).to(torch.float16),  # spans several 4 MiB reads
        "bf": torch.randn(1000).to(torch.bfloat16),
        "f8": torch.randn(77).to(torch.float8_e4m3fn),
        "i": torch.arange(5),
        "empty": torch.empty(0, 3),
    }
    write_checkpoint(path, named)
    return named


@pytest.mark.parametrize("direct_io", [False, True])
def test_tensors_land_on_the_device_as_views_of_one_allocation(tmp_path: Path, direct_io: bool) -> None:
    named = sample(tmp_path / "w.ember")
    config = LoaderConfig(threads=3, chunk_bytes=4 << 20, pinned_buffers=2, direct_io=direct_io, verify=True)
    loaded = load_checkpoint(tmp_path / "w.ember", "cuda:0", config)
    storages = {t.untyped_storage().data_ptr() for t in loaded.values() if t.numel()}
    assert len(storages) == 1
    for name, tensor in named.items():
        assert loaded[name].device.type == "cuda" and loaded[name].dtype == tensor.dtype
        assert torch.equal(bits(loaded[name]), bits(tensor)), name


def test_concurrent_device_loads_agree(tmp_path: Path) -> None:
    named = sample(tmp_path / "w.ember")
    results: list[dict[str, torch.Tensor]] = []
    config = LoaderConfig(threads=2, chunk_bytes=1 << 20, pinned_buffers=3)

    def load() -> None:
        results.append(load_checkpoint(tmp_path / "w.ember", "cuda:0", config))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    assert all(torch.equal(bits(r[n]), bits(t)) for r in results for n, t in named.items())


def test_compressed_checkpoints_decompress_onto_the_device(tmp_path: Path) -> None:
    from ember.store import compress_checkpoint

    named = sample(tmp_path / "w.ember")
    compress_checkpoint(tmp_path / "w.ember", tmp_path / "w.emberz")
    config = LoaderConfig(threads=3, chunk_bytes=1 << 20, pinned_buffers=2, verify=True)  # frames (4 MiB) > chunks
    loaded = load_checkpoint(tmp_path / "w.emberz", "cuda:0", config)
    assert len({t.untyped_storage().data_ptr() for t in loaded.values() if t.numel()}) == 1
    for name, tensor in named.items():
        assert loaded[name].device.type == "cuda" and torch.equal(bits(loaded[name]), bits(tensor)), name
