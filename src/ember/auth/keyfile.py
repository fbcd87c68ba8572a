"""The admin key file: made at first start in Ember's home, readable only by its owner (mode 0600)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from ember.auth.keys import ADMIN_KEY_FILE, KEY_PREFIX, NewKey, Role, new_key
from ember.errors import InvalidInput

if TYPE_CHECKING:
    from ember.registry import Registry

__all__ = ["ensure_admin_key", "read_key_file"]


def ensure_admin_key(home: Path, registry: Registry, now: float) -> NewKey | None:
    """Make an admin key and write it to ``home/admin.key`` unless that file exists; the new key, or None.

    A file that others may read is refused (as ssh refuses such a private key): whoever reads it is admin.
    Deleting the file and restarting makes a new admin key; revoke the old one with ``ember keys revoke``.
    """
    path = home / ADMIN_KEY_FILE
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise InvalidInput(
                f"{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`, or delete it and restart "
                "to get a new admin key"
            )
        return None
    made = new_key(Role.ADMIN, None, "made at first start", now)
    registry.add_key(made.record)
    _write_private(path, made.secret + "\n")
    return made


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
