"""Faults around the weights, each on a real server: a kill during an import, a disk that fills during
one, a checkpoint damaged on disk, and slow clients holding connections.

After each, the registry and the store are consistent (nothing half-imported, no scratch folder
left), the other models keep serving, and every request got an answer.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from harness import MODELS, REPO, Server, error_of, json_output, served, wait_until

HEAVY = MODELS / "heavy.py"


def names(server: Server) -> list[str]:
    return sorted(m["name"] for m in server.get_json("/admin/models"))


def answers(server: Server, model: str) -> None:
    x = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(json_output(server.infer_json(model, {"x": x}), "y"), x)


def scratch_left(home: Path) -> list[Path]:
    return list((home / "store" / "staging").iterdir())


def test_a_server_killed_during_an_import_restarts_without_it(tmp_path: Path) -> None:
    home, gates = tmp_path / "home", tmp_path / "gates"
    gates.mkdir()
    server = Server(home, workers=1)
    try:
        server.start()
        server.deploy(f"{HEAVY}:Sized", "--name", "keeper")
        gated = ("--name", "half", "--option", f"gate_dir={json.dumps(str(gates))}")
        deploying = subprocess.Popen(
            [sys.executable, "-m", "ember.cli", "deploy", f"{HEAVY}:GatedImport", *gated, "--url", server.url],
            cwd=REPO,
            env=server.env(),  # with the admin key
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: (gates / "started").exists(), 120, "the import to begin")
        assert scratch_left(home), "the import should be writing into a staging folder"

        server.kill()  # SIGKILL, server and workers, mid-import
        _, err = deploying.communicate(timeout=120)
        assert deploying.returncode != 0 and err.strip(), "the deploy must fail, and say so"

        server.start()
        assert names(server) == ["keeper"]
        assert scratch_left(home) == []
        assert not any(path.name.startswith("half") for path in (home / "code").glob("*"))
        answers(server, "keeper")
        (gates / "go").touch()
        server.deploy(f"{HEAVY}:GatedImport", *gated)  # the name is free again, and the import completes
        answers(server, "half")
        assert server.stop() == 0
    finally:
        server.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 96 MiB tmpfs: a disk that an import can fill."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_during_an_import_fails_it_cleanly(small_disk: Path) -> None:
    home = small_disk / "home"
    with served(Server(home, workers=1)) as server:
        server.deploy(f"{HEAVY}:Sized", "--name", "keeper")
        free_before = shutil.disk_usage(small_disk).free

        done = server.cli("deploy", f"{HEAVY}:Sized", "--name", "big", "--option", "mb=200")

        assert done.returncode != 0
        assert "disk under Ember's home is full" in done.stdout + done.stderr
        assert names(server) == ["keeper"]
        assert scratch_left(home) == []
        assert shutil.disk_usage(small_disk).free >= free_before - (1 << 20)  # its partial file is gone
        answers(server, "keeper")
        server.deploy(f"{HEAVY}:Sized", "--name", "small", "--option", "mb=4")  # room enough for this
        answers(server, "small")


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with served(Server(tmp_path_factory.mktemp("store-faults") / "home", workers=1)) as running:
        running.deploy(f"{HEAVY}:Sized", "--name", "keeper")
        yield running


def test_a_checkpoint_damaged_on_disk_is_refused_by_name(own: Server) -> None:
    own.deploy(f"{HEAVY}:Sized", "--name", "fragile", "--option", "mb=2")
    answers(own, "fragile")
    own.cli("unload", "fragile")
    wait_until(lambda: own.tier("fragile") == "cool", 60, "fragile to reach the cool tier")
    weights = own.home / "store" / "models" / "fragile@1" / "weights.ember"
    with weights.open("r+b") as f:  # flip one byte of tensor data, well past the header
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))

    response = own.infer_json("fragile", {"x": np.ones((1, 3), dtype=np.float32)})

    assert response.status_code == 500
    assert response.headers["ember-error"] == "CorruptCheckpoint"
    assert "fragile" in error_of(response)
    assert own.tier("fragile") == "cool"  # the instance built from the damaged copy meanwhile was unloaded
    answers(own, "keeper")
    verify = own.cli("store", "verify", "--home", str(own.home), with_url=False)
    assert verify.returncode == 1 and "fragile@1" in verify.stderr


def test_slow_clients_do_not_hold_up_the_others(own: Server) -> None:
    host, port = "127.0.0.1", own.port
    # One sends its headers and part of its body, one part of its headers; both then go quiet.
    body_part = f"POST /v2/models/keeper/infer HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n\r\n" + "{"
    slow = [socket.create_connection((host, port)) for _ in range(2)]
    try:
        slow[0].sendall(body_part.encode())
        slow[1].sendall(b"POST /v2/models/keeper/infer HTTP/1.1\r\nHost: ")
        for _ in range(20):
            answers(own, "keeper")
    finally:
        for sock in slow:
            sock.close()
    answers(own, "keeper")
