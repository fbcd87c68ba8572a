"""A worker dies with the process that started it, even when that process is killed with SIGKILL.

A worker notices its parent's exit when its socket reaches EOF, but only between messages: one
running a long batch, or still importing torch at start, would outlive a killed ``ember serve`` by
as long as that takes, holding memory and a device. On Linux the kernel can send a signal to a
process when its parent dies (``prctl(PR_SET_PDEATHSIG)``); :func:`die_with_parent` asks for SIGKILL.
It runs first thing in ``python -m ember.worker``, before torch is imported, and then checks that
the parent named by :data:`PARENT_ENV` is still its parent (it may have died before the request).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["PARENT_ENV", "die_with_parent"]

#: The environment variable in which a backend passes its own pid to the workers it starts.
PARENT_ENV = "EMBER_WORKER_PARENT"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere nothing), and exit
    now if the parent in :data:`PARENT_ENV` is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            print(f"ember worker {os.getpid()}: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}", file=sys.stderr)
    parent = os.environ.get(PARENT_ENV)
    if parent is not None and parent.isdigit() and os.getppid() != int(parent):
        sys.exit(f"ember worker {os.getpid()}: the process that started it ({parent}) is gone; exiting")
