"""The warm arena onto the device: registered once as pinned memory, a model copied bit for bit. Needs CUDA."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from ember.store import Store, load_checkpoint, write_checkpoint
from ember.store.arena import SLAB_FILE, register_arena

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("compress", [False, True])
def test_a_slab_loads_onto_the_device_from_the_pinned_arena(tmp_path: Path, compress: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    tensors = {"w": torch.randn(1 << 20, generator=generator).to(torch.bfloat16), "n": torch.arange(7)}
    store = Store(tmp_path / "store", warm_root=tmp_path / "warm", warm_budget_bytes=64 << 20, arena=True)
    with contextlib.closing(store):
        staging = store.staging("m@1")
        write_checkpoint(staging / "weights.ember", tensors)
        store.commit("m@1", staging, compress=compress)
        store.promote("m@1")
        assert store.arena_path is not None and register_arena(store.arena_path)  # pinned, once per process
        path = store.weights_path("m@1")
        assert path.name == SLAB_FILE
        for _ in range(2):  # the second load reuses the registration
            loaded = load_checkpoint(path, "cuda:0")
            for name, tensor in tensors.items():
                assert loaded[name].is_cuda and torch.equal(loaded[name].cpu(), tensor), name
