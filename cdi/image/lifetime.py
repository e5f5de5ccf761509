"""Child processes that die with their parent: `die_with_parent(parent)`, for a `preexec_fn`.

Owns the Linux PR_SET_PDEATHSIG call. A worker's helpers (qemu-img, started by the importer)
and the node agent's containers are started with it, so that a parent killed with SIGKILL
takes its children along instead of leaving them to init, still writing into a volume that a
restarted parent writes again. The signal follows the *thread* that forked the child: start
children from a thread that outlives them (the event loop's).

The returned function runs between fork and exec, where only async-signal-safe work is sound:
it calls one C function through a handle loaded at import and allocates nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Final

PR_SET_PDEATHSIG: Final = 1
#: Exit status of a child whose parent died before the death signal was armed.
ORPHANED_EXIT: Final = 127


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


PRCTL: Final = _libc_prctl()


def die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec step: SIGKILL this child when `parent` (the caller's `os.getpid()`) dies, and
    exit at once if it already has. A no-op where prctl is unavailable."""
    prctl = PRCTL

    def arm() -> None:
        if prctl is None:
            return
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(ORPHANED_EXIT)

    return arm


def rearm_in_child(expected_parent: int | None = None) -> None:
    """From inside a child whose program replaced the death signal (nbdkit arms SIGTERM at
    start, and on SIGTERM waits for plugin calls in flight): arm SIGKILL again, and exit if the
    parent is already gone (re-parented to `expected_parent`'s successor, usually init)."""
    if PRCTL is None:
        return
    PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = os.getppid()
    if parent == 1 or (expected_parent is not None and parent != expected_parent):
        os._exit(ORPHANED_EXIT)
