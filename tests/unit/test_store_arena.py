"""Tests for the store's warm arena: promotion into slabs, views over them, eviction, crashes, restarts."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ember.errors import CorruptCheckpoint
from ember.store import Store, StoredModel, Tier, load_checkpoint, write_checkpoint
from ember.store.arena import SLAB_FILE, SlabRef, register_arena
from ember.store.slabs import slab_length

PAGE = 4096


def add(store: Store, key: str, numel: int = 3000, *, compress: bool = False) -> StoredModel:
    folder = store.staging(key)
    values = torch.arange(numel, dtype=torch.float32) if not compress else torch.zeros(numel)
    write_checkpoint(folder / "weights.ember", {"w": values + len(key), "b": torch.ones(7)})
    (folder / "assets").mkdir()
    (folder / "assets" / "vocab.txt").write_bytes(key.encode())
    return store.commit(key, folder, compress=compress)


def slab_of(store: Store, key: str) -> int:
    return slab_length(store.get(key).warm_bytes, PAGE)


def open_arena(tmp_path: Path, slabs: float) -> Store:
    budget = int(slabs * _slab_bytes(tmp_path))
    return Store(tmp_path / "root", warm_root=tmp_path / "shm", warm_budget_bytes=budget, arena=True)


def _slab_bytes(tmp_path: Path) -> int:
    probe = Store(tmp_path / "probe", warm_root=tmp_path / "probe-shm")
    try:
        return slab_length(add(probe, "probe@1").warm_bytes, PAGE)
    finally:
        probe.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_arena(tmp_path, 3)
    yield opened
    opened.close()


def expected(key: str, numel: int = 3000) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.float32) + len(key)


def test_a_promoted_model_lives_in_a_slab_and_loads_as_views(store: Store, tmp_path: Path) -> None:
    add(store, "m@1")
    warm = store.promote("m@1")
    assert store.tier("m@1") is Tier.WARM and store.weights_path("m@1") == warm / SLAB_FILE
    assert not (warm / "weights.ember").exists() and store.assets("m@1") == {"vocab.txt": b"m@1"}
    ref = SlabRef.load(warm / SLAB_FILE)
    assert ref.arena.parent == tmp_path / "shm" and ref.arena.name.startswith(".arena-")
    tensors = load_checkpoint(store.weights_path("m@1"))
    assert torch.equal(tensors["w"], expected("m@1")) and torch.equal(tensors["b"], torch.ones(7))
    tensors["w"][0] = -1.0  # a private view: the arena keeps the promoted bytes
    assert torch.equal(load_checkpoint(store.weights_path("m@1"))["w"], expected("m@1"))
    store.verify("m@1")
    stats = store.statistics().arena
    assert stats is not None and stats.models == 1 and stats.used_bytes == slab_of(store, "m@1")
    assert stats.largest_free_bytes == stats.bytes - stats.used_bytes


def test_a_compressed_model_is_decompressed_into_its_slab(tmp_path: Path) -> None:
    store = Store(tmp_path / "root", warm_root=tmp_path / "shm", warm_budget_bytes=4 << 20, arena=True)
    try:
        model = add(store, "z@1", 200_000, compress=True)
        assert model.raw_bytes is not None and model.bytes < model.raw_bytes
        store.promote("z@1")
        assert torch.equal(load_checkpoint(store.weights_path("z@1"))["w"], torch.zeros(200_000) + 3)
        store.verify("z@1")
    finally:
        store.close()


def test_two_models_promoted_and_evicted_in_a_loop_keep_the_arena_whole(tmp_path: Path) -> None:
    store = open_arena(tmp_path, 1.5)  # one model at a time
    try:
        add(store, "a@1")
        add(store, "b@1")
        size = store.statistics().arena
        assert size is not None
        for _ in range(5):
            for key, other in (("a@1", "b@1"), ("b@1", "a@1")):
                store.promote(key)
                assert store.tier(key) is Tier.WARM and store.tier(other) is Tier.COOL  # evicted to fit
                assert torch.equal(load_checkpoint(store.weights_path(key))["w"], expected(key))
        store.demote("a@1")
        store.demote("b@1")
        gc.collect()
        stats = store.statistics().arena
        assert stats is not None and stats.used_bytes == 0 and stats.largest_free_bytes == size.bytes
    finally:
        store.close()


def test_a_slab_a_worker_holds_is_neither_evicted_nor_reused(tmp_path: Path) -> None:
    store = open_arena(tmp_path, 1.5)
    try:
        add(store, "a@1")
        add(store, "b@1")
        store.promote("a@1")
        held = load_checkpoint(store.weights_path("a@1"))  # a CPU worker's tensors: views of the slab
        with pytest.raises(ValueError, match="does not fit the warm arena"):
            store.promote("b@1")
        store.demote("a@1")  # gone from the warm tier, but its bytes are still in use
        with pytest.raises(ValueError, match="does not fit the warm arena"):
            store.promote("b@1")
        assert torch.equal(held["w"], expected("a@1"))
        del held
        gc.collect()  # the last view goes, and with it the worker's read lock
        store.promote("b@1")
        assert torch.equal(load_checkpoint(store.weights_path("b@1"))["w"], expected("b@1"))
    finally:
        store.close()


def test_a_model_larger_than_the_arena_is_refused(tmp_path: Path) -> None:
    store = open_arena(tmp_path, 0.5)
    try:
        add(store, "m@1")
        with pytest.raises(ValueError, match="exceeds the warm budget"):
            store.promote("m@1")
        assert store.tier("m@1") is Tier.COOL
    finally:
        store.close()


def test_damage_in_a_slab_is_found_by_verify(store: Store) -> None:
    add(store, "m@1")
    ref = SlabRef.load(store.promote("m@1") / SLAB_FILE)
    with open(ref.arena, "r+b") as arena:
        arena.seek(ref.offset + PAGE + 100)
        arena.write(b"\xff\xff")
    with pytest.raises(CorruptCheckpoint, match="m@1"):
        store.verify("m@1")


def test_an_arena_needs_a_budget_and_the_store_to_itself(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="warm budget"):
        Store(tmp_path / "root", warm_root=tmp_path / "shm", arena=True)
    other = Store(tmp_path / "root", warm_root=tmp_path / "shm")
    try:
        with pytest.raises(ValueError, match="another store is open"):
            Store(tmp_path / "root", warm_root=tmp_path / "shm", warm_budget_bytes=1 << 20, arena=True)
    finally:
        other.close()


def test_closing_the_last_store_removes_the_arena(store: Store, tmp_path: Path) -> None:
    add(store, "m@1")
    store.promote("m@1")
    store.close()
    assert not (tmp_path / "shm").exists()


_KILLED_MID_COPY = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from ember.store import Store
    from ember.store.arena import Arena

    def dying(self, offset, source, index, threads, *, verify=True):
        self.view[offset : offset + 4096] = b"x" * 4096  # part of the copy, then the process dies
        os.kill(os.getpid(), signal.SIGKILL)

    store = Store(Path(sys.argv[1]), warm_root=Path(sys.argv[2]), warm_budget_bytes=int(sys.argv[3]), arena=True)
    store.promote("kept@1")
    Arena.fill = dying
    store.promote("cut@1")
    """
)


def test_a_promotion_killed_mid_copy_leaves_no_slab_taken_and_a_restart_keeps_the_rest(tmp_path: Path) -> None:
    budget = 3 * _slab_bytes(tmp_path)
    root, shm = tmp_path / "root", tmp_path / "shm"
    first = Store(root, warm_root=shm)
    add(first, "kept@1")
    add(first, "cut@1")
    first.close()
    done = _run(_KILLED_MID_COPY, root, shm, budget)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert any(p.name.startswith(".promote-cut@1") for p in shm.iterdir())  # the crash left its scratch folder
    store = Store(root, warm_root=shm, warm_budget_bytes=budget, arena=True)
    try:
        assert store.tier("cut@1") is Tier.COOL and store.tier("kept@1") is Tier.WARM
        assert not any(p.name.startswith(".promote-") for p in shm.iterdir())
        stats = store.statistics().arena
        assert stats is not None and stats.models == 1 and stats.used_bytes == slab_of(store, "kept@1")
        assert torch.equal(load_checkpoint(store.weights_path("kept@1"))["w"], expected("kept@1"))
        store.promote("cut@1")
        assert torch.equal(load_checkpoint(store.weights_path("cut@1"))["w"], expected("cut@1"))
        store.verify("kept@1")
    finally:
        store.close()


def test_a_restart_with_another_arena_size_drops_the_warm_copies(tmp_path: Path) -> None:
    slab = _slab_bytes(tmp_path)
    root, shm = tmp_path / "root", tmp_path / "shm"
    first = Store(root, warm_root=shm)
    add(first, "kept@1")
    add(first, "cut@1")
    first.close()
    crashed = _run(_KILLED_MID_COPY, root, shm, 3 * slab)  # leaves kept@1 warm in a 3-slab arena
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()
    resized = Store(root, warm_root=shm, warm_budget_bytes=5 * slab, arena=True)
    try:
        assert resized.tier("kept@1") is Tier.COOL
        stats = resized.statistics().arena
        assert stats is not None and stats.used_bytes == 0 and stats.bytes == 5 * slab
        assert len([p for p in shm.iterdir() if p.name.startswith(".arena-")]) == 1
    finally:
        resized.close()


def _run(script: str, root: Path, shm: Path, budget: int) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", script, str(root), str(shm), str(budget)], env=env, capture_output=True
    )


def test_a_promotion_from_a_damaged_cool_copy_fails_and_takes_no_slab(store: Store) -> None:
    model = add(store, "m@1")
    with open(model.path / "weights.ember", "r+b") as cool:
        cool.seek(PAGE + 100)
        cool.write(b"\xff\xff")
    with pytest.raises(CorruptCheckpoint, match="m@1"):
        store.promote("m@1")
    stats = store.statistics().arena
    assert store.tier("m@1") is Tier.COOL and stats is not None and stats.used_bytes == 0


def test_a_worker_maps_the_arena_once_and_pins_it_only_with_cuda(store: Store) -> None:
    add(store, "m@1")
    store.promote("m@1")
    assert store.arena_path is not None
    assert register_arena(store.arena_path) is torch.cuda.is_available()
    assert torch.equal(load_checkpoint(store.weights_path("m@1"))["w"], expected("m@1"))


def test_a_slab_demoted_before_its_load_is_not_read(store: Store) -> None:
    add(store, "m@1")
    store.promote("m@1")
    path = store.weights_path("m@1")
    store.demote("m@1")  # as if the controller demoted it while the worker was told to load it
    with pytest.raises(FileNotFoundError):
        load_checkpoint(path)


def test_make_room_frees_a_contiguous_run_and_never_moves_a_kept_model(tmp_path: Path) -> None:
    store = open_arena(tmp_path, 2)
    try:
        for key in ("a@1", "b@1"):
            add(store, key)
            store.promote(key)
        store.touch("a@1")  # b is now the least recently used
        assert store.make_room(1, Tier.WARM, keep={"b@1"}) == ["a@1"]
        assert store.tier("b@1") is Tier.WARM and store.tier("a@1") is Tier.COOL
        assert store.make_room(10 * slab_of(store, "b@1"), Tier.WARM) == []  # larger than the arena: falls short
    finally:
        store.close()


def test_an_arena_store_drops_warm_copies_outside_its_arena(tmp_path: Path) -> None:
    slab = _slab_bytes(tmp_path)
    root, shm = tmp_path / "root", tmp_path / "shm"
    crashed = _run(_PROMOTE_WITHOUT_ARENA_AND_DIE, root, shm, 0)  # a warm file copy, left as a crash leaves it
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()
    assert (shm / "m@1" / "weights.ember").is_file()
    store = Store(root, warm_root=shm, warm_budget_bytes=3 * slab, arena=True)
    try:
        assert store.tier("m@1") is Tier.COOL and not (shm / "m@1").exists()
        store.promote("m@1")
        assert store.weights_path("m@1").name == SLAB_FILE
    finally:
        store.close()


_PROMOTE_WITHOUT_ARENA_AND_DIE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    from ember.store import Store, write_checkpoint

    store = Store(Path(sys.argv[1]), warm_root=Path(sys.argv[2]))
    folder = store.staging("m@1")
    write_checkpoint(folder / "weights.ember", {"w": torch.arange(3000, dtype=torch.float32)})
    store.commit("m@1", folder)
    store.promote("m@1")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)
