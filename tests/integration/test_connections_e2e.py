"""Idle and half-sent connections against a real ``ember serve`` whose file descriptor limit is low.

Without a key, a client could open more connections than the server has descriptors and send nothing
(or half a request head); then no request got in, an admin's included. The server closes a
connection whose request head has not arrived within a few seconds, and caps the connections that
have not shown a key (``ember.gateway.connections``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from harness import Server, served

#: The server's descriptor limit, and the idle connections opened against it: more than it has.
MAX_OPEN_FILES = 400
IDLE_CONNECTIONS = 420
#: How long a test waits for the server to close what it must close: a bound, not a measurement.
CLOSE_WITHIN_S = 120.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("connections") / "home"
    with served(Server(home, workers=1, args=("--spare-workers", "0"), max_open_files=MAX_OPEN_FILES)) as running:
        yield running


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within :data:`CLOSE_WITHIN_S`."""
    sock.settimeout(CLOSE_WITHIN_S)
    try:
        while sock.recv(4096):
            pass  # an answer (a 4xx) before the close is fine
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_idle_and_half_sent_connections_do_not_keep_an_admin_out(server: Server) -> None:
    idle: list[socket.socket] = []
    try:
        for i in range(IDLE_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=CLOSE_WITHIN_S)
            if i % 2:  # half of them send part of a request head, and then nothing
                sock.sendall(b"GET /admin/status HTTP/1.1\r\nHost: ember\r\nX-Slow: ")
            idle.append(sock)
        with httpx.Client(timeout=CLOSE_WITHIN_S) as client:
            r = client.get(f"{server.url}/admin/status", headers=server.auth)
            assert r.status_code == 200, r.text
            assert client.get(f"{server.url}/admin/models", headers=server.auth).status_code == 200
        still_open = [i for i, sock in enumerate(idle) if not closed_by_server(sock)]
        assert not still_open, f"the server kept {len(still_open)} idle connections open"
    finally:
        for sock in idle:
            sock.close()
    # Keyed requests on fresh connections are answered afterwards, too.
    assert server.http.get(f"{server.url}/admin/status").status_code == 200


def test_a_half_sent_head_on_a_kept_alive_connection_is_closed(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=CLOSE_WITHIN_S) as sock:
        key = server.key.encode()
        sock.sendall(b"GET /admin/status HTTP/1.1\r\nHost: ember\r\nAuthorization: Bearer " + key + b"\r\n\r\n")
        head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        sock.sendall(b"GET /admin/status HTTP/1.1\r\nHost: ember\r\n")  # and never the rest
        assert closed_by_server(sock)
