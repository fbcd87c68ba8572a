"""A worker's end of a TCP connection from the gateway: listen, take the one connection that opens
with the worker's secret token, and stop listening.

A worker that runs on another machine (a Ray actor) cannot be handed a socketpair: it listens on its
node's address instead, and tells the gateway the port and a random token through Ray. Frames are
pickles, so only a peer that proves it holds the token is served; any other connection is closed,
and after :data:`MAX_ATTEMPTS` of them the worker stops listening.
"""

from __future__ import annotations

import hmac
import secrets
import socket

__all__ = ["MAX_ATTEMPTS", "TOKEN_BYTES", "accept_one", "listen", "new_token"]

TOKEN_BYTES = 32
#: Connections that may fail the token check before the worker stops listening.
MAX_ATTEMPTS = 16
#: How long a connection has to send the token.
TOKEN_TIMEOUT_S = 10.0


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def listen(host: str) -> socket.socket:
    """A socket listening on ``host`` (an IP address), on a port the kernel picks."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, 0), family=family, backlog=MAX_ATTEMPTS)


def accept_one(
    listener: socket.socket, token: bytes, attempts: int = MAX_ATTEMPTS, token_timeout_s: float = TOKEN_TIMEOUT_S
) -> socket.socket | None:
    """The first connection to ``listener`` whose first bytes are ``token`` (with TCP_NODELAY set),
    or None after ``attempts`` connections that were not. Closes ``listener`` either way."""
    try:
        for _ in range(attempts):
            conn, _ = listener.accept()
            try:
                conn.settimeout(token_timeout_s)
                got = _recv_exactly(conn, len(token))
            except OSError:  # a timeout, or a reset
                got = None
            if got is not None and hmac.compare_digest(got, token):
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return conn
            conn.close()
        return None
    finally:
        listener.close()


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    got = b""
    while len(got) < size:
        chunk = conn.recv(size - len(got))
        if not chunk:
            return None
        got += chunk
    return got
