"""A real server with a warm arena: cool starts read into slabs, a kill and a restart keep them."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from harness import MODELS, Server, json_output, wait_until

from ember.store import Store

HEAVY = MODELS / "heavy.py"


def answers(server: Server, model: str) -> None:
    x = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(json_output(server.infer_json(model, {"x": x}), "y"), x)


def warm_root(home: Path) -> Path:
    """The store's default warm root: shared memory, named after the store's root."""
    return Path("/dev/shm", "ember-" + hashlib.sha256(str((home / "store").resolve()).encode()).hexdigest()[:12])


def arena_files(home: Path) -> list[Path]:
    return list(warm_root(home).glob(".arena-*"))


def test_cool_starts_fill_slabs_and_a_killed_server_restarts_with_them(tmp_path: Path) -> None:
    home = tmp_path / "home"
    server = Server(home, workers=1, args=("--warm-budget-mb", "64"))
    try:
        server.start()
        # the console lines may reach the log just after the server answers its readiness check
        started = wait_until(lambda: "warm arena:" in server.log_tail() and server.log_tail(), 60, "the arena line")
        assert "warm arena: 65.0 MB of shared memory, allocated and touched in" in started  # 2 MiB units
        server.deploy(f"{HEAVY}:Sized", "--name", "keeper", "--option", "mb=3")
        server.cli("unload", "keeper", "--to", "cool")
        assert server.tier("keeper") == "cool"
        answers(server, "keeper")  # a cool start: promoted into a slab, then loaded from it
        arena = server.status()["store"]["arena"]
        assert arena["models"] == 1 and 3 << 20 < arena["used_bytes"] < arena["bytes"]
        assert arena["largest_free_bytes"] == arena["bytes"] - arena["used_bytes"]
        files = arena_files(home)
        assert len(files) == 1

        server.kill()  # SIGKILL, server and workers: the arena and its index stay in shared memory
        server.start()
        assert arena_files(home) == files  # the same arena, opened again
        assert server.status()["store"]["arena"]["models"] == 1 and server.tier("keeper") == "warm"
        answers(server, "keeper")
        assert server.stop() == 0
        assert arena_files(home) == []  # the last store to close removes the arena
    finally:
        server.close()
        shutil.rmtree(warm_root(home), ignore_errors=True)  # what a failed run's kill left in shared memory


@pytest.fixture
def small_shm(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: shared memory too small for the arena asked for."""
    mount = tmp_path / "shm"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_an_arena_larger_than_shared_memory_is_refused_and_leaves_nothing(small_shm: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"bytes are free .*lower the warm budget"):
        Store(tmp_path / "root", warm_root=small_shm / "warm", warm_budget_bytes=64 << 20, arena=True)
    assert list(small_shm.rglob("*")) == []
    opened = Store(tmp_path / "root", warm_root=small_shm / "warm", warm_budget_bytes=4 << 20, arena=True)
    opened.close()  # a smaller one fits: the failed start left the root's lock free
