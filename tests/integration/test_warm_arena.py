"""A real server with a warm arena: cool starts read into slabs, a kill and a restart keep them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from harness import MODELS, Server, json_output

HEAVY = MODELS / "heavy.py"


def answers(server: Server, model: str) -> None:
    x = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(json_output(server.infer_json(model, {"x": x}), "y"), x)


def arena_files(home: Path) -> list[Path]:
    """The arena files in the store's default warm root (shared memory, named after the store's root)."""
    name = hashlib.sha256(str((home / "store").resolve()).encode()).hexdigest()[:12]
    return list(Path("/dev/shm", f"ember-{name}").glob(".arena-*"))


def test_cool_starts_fill_slabs_and_a_killed_server_restarts_with_them(tmp_path: Path) -> None:
    home = tmp_path / "home"
    server = Server(home, workers=1, args=("--warm-budget-mb", "64"))
    try:
        server.start()
        assert "warm arena: 65.0 MB of shared memory, allocated and touched in" in server.log_tail()  # 2 MiB units
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
