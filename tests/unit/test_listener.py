"""A worker's TCP listener takes only the connection that opens with its token, then stops listening."""

from __future__ import annotations

import socket
import threading

from ember.worker.listener import accept_one, listen, new_token
from ember.worker.protocol import Ping, Reply, recv_message, send_message


def _accept_in_thread(listener: socket.socket, token: bytes, attempts: int) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(accept_one(listener, token, attempts, 5.0)))
    thread.start()
    return thread, got


def test_a_wrong_token_is_closed_and_the_right_one_served() -> None:
    token = new_token()
    listener = listen("127.0.0.1")
    address = listener.getsockname()
    thread, got = _accept_in_thread(listener, token, attempts=4)
    with socket.create_connection(address) as stranger:
        stranger.sendall(b"x" * len(token))
        assert stranger.recv(1) == b""  # closed without a word
    with socket.create_connection(address) as gateway:
        gateway.sendall(token)
        send_message(gateway, Ping(1))
        thread.join()
        (worker,) = got
        assert isinstance(worker, socket.socket)
        with worker:
            assert worker.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert recv_message(worker) == Ping(1)
            send_message(worker, Reply(1, True))
            assert recv_message(gateway) == Reply(1, True)
    try:  # the listener is closed: nobody else gets in
        socket.create_connection(address, timeout=5.0).close()
    except ConnectionRefusedError:
        pass
    else:
        raise AssertionError("the listener still accepts connections")


def test_it_stops_listening_after_too_many_wrong_tokens() -> None:
    token = new_token()
    listener = listen("127.0.0.1")
    address = listener.getsockname()
    thread, got = _accept_in_thread(listener, token, attempts=2)
    for _ in range(2):
        with socket.create_connection(address) as stranger:
            stranger.sendall(b"not the token")
            stranger.shutdown(socket.SHUT_WR)  # short of the token's length: the worker sees the end
            assert stranger.recv(1) == b""
    thread.join()
    assert got == [None]
