"""The key files of Ember's home, made at first start and readable only by their owner (mode 0600):
``admin.key`` (an admin API key) and ``metrics.key`` (good for ``GET /metrics`` alone, for Prometheus)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from ember.auth.keys import ADMIN_KEY_FILE, KEY_PREFIX, METRICS_KEY_FILE, NewKey, Role, new_key
from ember.errors import InvalidInput

if TYPE_CHECKING:
    from ember.registry import Registry

__all__ = ["ensure_admin_key", "ensure_metrics_key", "read_key_file"]


def ensure_admin_key(home: Path, registry: Registry, now: float) -> NewKey | None:
    """Make an admin key and write it to ``home/admin.key`` unless that file exists; the new key, or None.

    A file that others may read is refused (as ssh refuses such a private key): whoever reads it is admin.
    Deleting the file and restarting makes a new admin key; revoke the old one with ``ember keys revoke``.
    """
    path = home / ADMIN_KEY_FILE
    if path.exists():
        _check_private(path, "admin key")
        return None
    made = new_key(Role.ADMIN, None, "made at first start", now)
    registry.add_key(made.record)
    _write_private(path, made.secret + "\n")
    return made


def ensure_metrics_key(home: Path) -> str:
    """The metrics key in ``home/metrics.key``, made and written there if the file does not exist.

    It opens ``GET /metrics`` and nothing else, so a Prometheus server can scrape without the admin
    key. It lives only in the file (no registry row): delete the file and restart for a new one. It is
    written with mode 0600, but unlike the admin key a wider mode is allowed (``chmod 640`` and a
    group for the Prometheus user): it reveals the metrics, never a model or a key.
    """
    path = home / METRICS_KEY_FILE
    if path.exists():
        key = read_key_file(path)
        if key is None:
            raise InvalidInput(f"{path} holds no Ember key; delete it and restart to get a new metrics key")
        return key
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    _write_private(path, key + "\n")
    return key


def _check_private(path: Path, what: str) -> None:
    """Refuse a key file that others may read (as ssh refuses such a private key)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise InvalidInput(
            f"{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`, or delete it and restart "
            f"to get a new {what}"
        )


def read_key_file(path: Path) -> str | None:
    """The key in ``path``, or None if there is no such readable file holding one."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text if text.startswith(KEY_PREFIX) else None


def _write_private(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o600)  # whatever the umask
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
