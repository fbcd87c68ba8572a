"""The store's tiers onto the device, the load bench's GPU rows, and models of real shape. Needs CUDA."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.bench.load import ARENA_TO_CUDA, run_benchmark
from ember.store import LoaderConfig, Store, compress_checkpoint, load_checkpoint, write_checkpoint
from ember.store.bandwidths import measured_bandwidths
from ember.store.store import WEIGHTS
from ember.worker.host import ModelHost
from ember.worker.main import start_libraries

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def named() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(1 << 20, generator=generator).to(torch.bfloat16),
        "v": torch.randn(333, generator=generator).to(torch.float16),
        "n": torch.arange(7),
    }


@pytest.mark.parametrize("compress", [False, True])
def test_each_tier_loads_onto_the_device_bit_for_bit(tmp_path: Path, compress: bool) -> None:
    tensors = named()
    with contextlib.closing(Store(tmp_path / "store", warm_root=tmp_path / "warm")) as store:
        staging = store.staging("m@1")
        write_checkpoint(staging / "weights.ember", tensors)
        store.commit("m@1", staging, compress=compress)
        cool = store.get("m@1").path / WEIGHTS
        warm = store.promote("m@1") / WEIGHTS
        config = LoaderConfig(threads=2, chunk_bytes=1 << 20, pinned_buffers=2, verify=True)
        for path in (cool, warm):
            loaded = load_checkpoint(path, "cuda:0", config)
            for name, tensor in tensors.items():
                assert loaded[name].is_cuda
                assert torch.equal(loaded[name].cpu(), tensor), (path, name)


def test_compressed_file_onto_the_device_matches_the_raw_one(tmp_path: Path) -> None:
    tensors = named()
    write_checkpoint(tmp_path / "w.ember", tensors)
    compress_checkpoint(tmp_path / "w.ember", tmp_path / "w.emberz")
    raw = load_checkpoint(tmp_path / "w.ember", "cuda:0")
    packed = load_checkpoint(tmp_path / "w.emberz", "cuda:0", LoaderConfig(threads=3))
    assert all(torch.equal(raw[n], packed[n]) for n in tensors)


def test_the_load_bench_measures_the_device_links(tmp_path: Path) -> None:
    rows, notes = run_benchmark(0.02, repeat=1, threads=2, cold=False, workdir=tmp_path, say=lambda _: None)
    sources = {row.source for row in rows}
    assert {"page cache -> cuda", "shm -> cuda"} <= sources
    assert notes["cuda"] is True and notes["arena_pinned"] is True
    assert all(row.gb_per_s > 0 for row in rows)
    assert any(r.source == "shm -> cuda" and r.method == ARENA_TO_CUDA for r in rows)
    links, _ = measured_bandwidths(rows, cuda=True)
    staged = next(r for r in rows if r.source == "shm -> cuda" and r.method == "ember (staged) -> cuda")
    assert links.host_to_device_bytes_per_s == pytest.approx(staged.gb_per_s * 1e9, rel=1e-3)


def test_the_worker_starts_the_math_libraries() -> None:
    start_libraries(torch.device("cuda:0"))
    assert torch.cuda.is_initialized()


@pytest.mark.parametrize(
    ("cls", "name", "batch"),
    [
        ("ResNetTiny", "image", np.ones((3, 3, 224, 224), np.float32)),
        ("DecoderTiny", "input_ids", np.arange(40, dtype=np.int64).reshape(4, 10)),
    ],
)
def test_configured_models_answer_on_the_device_as_on_the_cpu(tmp_path: Path, cls: str, name: str, batch) -> None:
    ref = f"{EXAMPLES / 'configured.py'}:{cls}"
    (tmp_path / "staging").mkdir()
    ModelHost(torch.device("cpu")).import_model(ref, {}, tmp_path / "staging")
    weights = tmp_path / "staging" / "weights.ember"
    answers = []
    for device in ("cpu", "cuda:0"):
        host = ModelHost(torch.device(device))
        host.load(f"{cls}@1", ref, {}, weights, {})
        (out,) = host.infer(f"{cls}@1", [{name: batch}]).outputs
        assert not isinstance(out, str), out
        answers.append(next(iter(out.values())))
    np.testing.assert_array_equal(answers[0], answers[1])
