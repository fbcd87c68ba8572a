"""Tests for ember.store.store: the warm and cool tiers, their budgets and eviction order."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ember.errors import CorruptCheckpoint
from ember.store import Store, StoredModel, StoreStats, Tier, TierStats, map_checkpoint, write_checkpoint

# -- the store -----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "root", warm_root=tmp_path / "shm")
    yield opened
    opened.close()


def add(store: Store, key: str, numel: int = 10, assets: dict[str, bytes] | None = None) -> StoredModel:
    folder = store.staging(key)
    write_checkpoint(folder / "weights.ember", {"w": torch.arange(numel, dtype=torch.float32)})
    if assets:
        (folder / "assets").mkdir()
        for name, data in assets.items():
            (folder / "assets" / name).write_bytes(data)
    return store.commit(key, folder)


def test_tiers_from_cold_to_warm_and_back(store: Store, tmp_path: Path) -> None:
    assert store.tier("m@1") is Tier.COLD and store.keys() == []
    model = add(store, "m@1", assets={"vocab.txt": b"a b", "config.json": b"{}"})
    weights = model.path / "weights.ember"
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
    assert store.weights_path("m@1") == warm / "weights.ember"
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
    write_checkpoint(folder / "weights.ember", {"w": torch.ones(1)})
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
    weights = model.path / "weights.ember"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0x01
    weights.write_bytes(damaged)
    with pytest.raises(CorruptCheckpoint, match=r"weights\.ember of model 'm@1' is damaged: its index"):
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
    (store.get("m@1").path / "weights.ember").unlink()
    with pytest.raises(CorruptCheckpoint, match="missing"):
        store.verify("m@1")


def test_construction_deletes_what_a_crash_left(tmp_path: Path) -> None:
    with_model = Store(tmp_path / "root", warm_root=tmp_path / "shm")
    cool = add(with_model, "good@1").path
    with_model.close()
    root, shm = tmp_path / "root", tmp_path / "shm"
    shutil.copytree(cool, shm / "good@1")  # a complete warm copy survives
    (root / "staging" / "import.123").mkdir()
    (root / "staging" / "import.123" / "weights.ember").write_bytes(b"partial")
    (root / "models" / "half@1").mkdir()
    (root / "models" / "half@1" / "weights.ember").write_bytes(b"no manifest")
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


# -- budgets and eviction ------------------------------------------------------------------------


def test_warm_budget_evicts_least_recently_used_first(tmp_path: Path) -> None:
    opened = Store(tmp_path / "root", warm_root=tmp_path / "shm", warm_budget_bytes=1)
    try:
        sizes = {key: add(opened, key, numel=4096).bytes for key in ("a@1", "b@1", "c@1", "big@1")}
        opened.remove("big@1")
        opened.close()
        budget = 2 * sizes["a@1"]  # two of the three fit
        store = Store(tmp_path / "root", warm_root=tmp_path / "shm", warm_budget_bytes=budget)
        assert store.evictable(Tier.WARM) == [] and store.evictable(Tier.COOL) == ["a@1", "b@1", "c@1"]
        store.promote("a@1")
        store.promote("b@1")
        store.weights_path("a@1")  # a use: b is now the least recently used
        assert store.evictable() == ["b@1", "a@1"]
        store.promote("c@1")
        assert store.tier("b@1") is Tier.COOL and store.evictable() == ["a@1", "c@1"]
        stats = store.statistics()
        assert stats.warm == TierStats(2, 2 * sizes["a@1"], budget)
        assert stats.cool == TierStats(3, 3 * sizes["a@1"], None)
        assert store.make_room(sizes["a@1"], keep={"a@1"}) == ["c@1"]
        assert store.make_room(0) == [] and store.evictable() == ["a@1"]
        store.close()
    finally:
        opened.close()


def test_a_model_larger_than_the_warm_budget_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "root", warm_root=tmp_path / "shm", warm_budget_bytes=100)
    try:
        add(store, "m@1")
        with pytest.raises(ValueError, match="exceeds the warm budget"):
            store.promote("m@1")
        assert store.tier("m@1") is Tier.COOL
    finally:
        store.close()


def test_cool_budget_refuses_a_commit_and_make_room_removes_cool_models(tmp_path: Path) -> None:
    probe = Store(tmp_path / "probe", warm_root=tmp_path / "probe-shm")
    size = add(probe, "x@1").bytes
    probe.close()
    store = Store(tmp_path / "root", warm_root=tmp_path / "shm", cool_budget_bytes=2 * size)
    try:
        add(store, "a@1")
        add(store, "b@1")
        with pytest.raises(ValueError, match="cool tier's budget"):
            add(store, "c@1")
        store.promote("a@1")  # warm models are not evictable from cool
        assert store.evictable(Tier.COOL) == ["b@1"]
        assert store.make_room(size, Tier.COOL) == ["b@1"]
        assert store.tier("b@1") is Tier.COLD
        add(store, "c@1")
        assert store.statistics().cool == TierStats(2, 2 * size, 2 * size)
        with pytest.raises(ValueError, match="no budget"):
            store.evictable(Tier.HOT)
    finally:
        store.close()


def test_verify_finds_a_flipped_data_byte(store: Store) -> None:
    model = add(store, "m@1", numel=10_000)
    weights = model.path / "weights.ember"
    damaged = bytearray(weights.read_bytes())
    damaged[4096 + 100] ^= 0x01
    weights.write_bytes(damaged)
    with pytest.raises(CorruptCheckpoint, match=r"weights\.ember of model 'm@1' is damaged: 1 data chunk"):
        store.verify("m@1")
    with pytest.raises(CorruptCheckpoint, match="m@1"):
        store.promote("m@1")
    assert store.tier("m@1") is Tier.COOL


def test_commit_refuses_weights_that_are_not_an_ember_checkpoint(store: Store) -> None:
    folder = store.staging("m@1")
    (folder / "weights.ember").write_bytes(b"not a checkpoint" * 300)
    with pytest.raises(CorruptCheckpoint, match="magic"):
        store.commit("m@1", folder)
    assert store.tier("m@1") is Tier.COLD


def test_a_watched_promote_reports_the_bytes_it_copies(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import ember.store.store as store_module

    monkeypatch.setattr(store_module, "COPY_STEP_BYTES", 4096)  # several steps for a small checkpoint
    model = add(store, "m@1", numel=10_000)
    heard: list[tuple[int, int]] = []
    with store.watch("m@1", lambda done, total: heard.append((done, total))):
        store.promote("m@1")
    assert heard[-1] == (model.bytes, model.bytes) and len(heard) == -(-model.bytes // 4096)
    assert [d for d, _ in heard] == sorted(d for d, _ in heard)
    assert store.tier("m@1") is Tier.WARM
    store.demote("m@1")
    heard.clear()
    store.promote("m@1")  # no longer watched
    assert heard == []
