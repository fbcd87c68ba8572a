"""The warm arena onto the device: registered once as pinned memory, a model copied bit for bit. Needs CUDA."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ember.store import Store, load_checkpoint, write_checkpoint
from ember.store.arena import SLAB_FILE, register_arena

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def shm() -> Iterator[Path]:
    """A folder in shared memory, where ``ember serve`` keeps its warm tier."""
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="ember-test-") as folder:
        yield Path(folder)


@pytest.mark.parametrize("compress", [False, True])
def test_a_slab_loads_onto_the_device_from_the_pinned_arena(tmp_path: Path, shm: Path, compress: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    tensors = {"w": torch.randn(1 << 20, generator=generator).to(torch.bfloat16), "n": torch.arange(7)}
    store = Store(tmp_path / "store", warm_root=shm, warm_budget_bytes=64 << 20, arena=True)
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


def test_a_refused_registration_leaves_the_device_usable(tmp_path: Path) -> None:
    """An arena the runtime will not pin (some sandboxes refuse file mappings off shared memory) is
    copied from unpinned; the refusal must not surface as the next CUDA call's error."""
    generator = torch.Generator().manual_seed(3)
    tensors = {"w": torch.randn(1 << 16, generator=generator)}
    store = Store(tmp_path / "store", warm_root=tmp_path / "warm", warm_budget_bytes=16 << 20, arena=True)
    with contextlib.closing(store):
        staging = store.staging("m@1")
        write_checkpoint(staging / "weights.ember", tensors)
        store.commit("m@1", staging)
        store.promote("m@1")
        assert store.arena_path is not None
        register_arena(store.arena_path)  # pinned or refused, either way the device stays usable
        assert torch.equal(torch.ones(4, device="cuda:0").cpu(), torch.ones(4))
        loaded = load_checkpoint(store.weights_path("m@1"), "cuda:0")
        assert torch.equal(loaded["w"].cpu(), tensors["w"])
