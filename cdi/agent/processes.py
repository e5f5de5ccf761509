"""Container processes: start one with limits, find and signal its whole session, measure memory.

Owns the OS side of running a container as a local process (Linux):

* `spawn` starts it in a new session (so it and everything it starts share one session id, the
  leader's pid), stdin from /dev/null and stdout+stderr into one pipe the agent copies to the log.
  Between fork and exec it sets `PR_SET_PDEATHSIG=SIGKILL` (the process dies when the agent's
  event-loop thread does, even if the agent is killed with SIGKILL) and the rlimits:
  RLIMIT_AS (the memory backstop, see `Limits`) and RLIMIT_FSIZE (no file it writes can grow
  past the largest volume it mounts). That runs as a `preexec_fn`, which CPython warns is unsafe
  with threads because the child might need a lock another thread held at fork time; the
  function here only calls two C functions (prctl through a handle loaded beforehand, setrlimit)
  and allocates nothing, which is what makes it safe in practice.
* `signal_session` sends a signal to the process group *and* to every process that kept the
  session id (children that moved to a group of their own), so nothing is left behind.
* `resident_by_session` sums resident memory per session from /proc, for the memory watchdog:
  the kubelet enforces a memory limit on resident memory (cgroup), so the agent does the same.

Used by `cdi.agent.runner` only. It knows nothing about pods or the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG: Final = 1
_PROC: Final = Path("/proc")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
#: Seconds `kill` waits for the rest of a session to die after SIGKILL (normally microseconds;
#: a process in uninterruptible sleep takes until its I/O returns).
LEFTOVER_WAIT: Final = 2.0


@dataclass(frozen=True, slots=True)
class Limits:
    address_space: int | None = None
    """RLIMIT_AS in bytes. Address space counts reservations that never use memory (thread
    stacks, malloc arenas, mapped files), so set to the memory limit itself it breaks threaded
    programs like qemu-img; the agent sets a multiple of the limit, as a backstop against an
    allocation burst between two watchdog samples, and enforces the limit on resident memory."""
    file_size: int | None = None
    """RLIMIT_FSIZE in bytes: the largest file the process may write (EFBIG, or SIGXFSZ for
    programs that do not ignore it)."""


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL: Final = _libc_prctl()


def _preexec(limits: Limits, parent: int) -> Callable[[], None]:
    prctl = _PRCTL
    address_space = limits.address_space
    file_size = limits.file_size

    def setup() -> None:  # runs in the child between fork and exec: keep it to syscalls
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the agent died before prctl took effect
                os._exit(127)
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        if file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    return setup


async def spawn(
    argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, limits: Limits
) -> asyncio.subprocess.Process:
    """Start `argv` (argv[0] an executable path) as the leader of a new session. Raises OSError
    when it cannot be executed."""
    return await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
        preexec_fn=_preexec(limits, os.getpid()),  # safe as written: see the module docstring
    )


def _stat_fields(pid: str) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (which may hold spaces and parens):
    index 0 is field 3 (state), 3 is the session id, 21 is rss in pages."""
    try:
        raw = (_PROC / pid / "stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].decode().split()


def session_members(sid: int, *, zombies: bool = True) -> list[int]:
    """Processes in session `sid` (without `zombies`: only those not yet dead)."""
    members = []
    for entry in os.listdir(_PROC):
        fields = _stat_fields(entry) if entry.isdigit() else None
        if fields and int(fields[3]) == sid and (zombies or fields[0] != "Z"):
            members.append(int(entry))
    return members


def resident_by_session() -> dict[int, int]:
    """Resident bytes per session id, over every process of this machine we can see."""
    usage: dict[int, int] = {}
    for entry in os.listdir(_PROC):
        if entry.isdigit() and (fields := _stat_fields(entry)):
            sid = int(fields[3])
            usage[sid] = usage.get(sid, 0) + int(fields[21]) * _PAGE
    return usage


def signal_session(sid: int, sig: int) -> None:
    """Signal the process group `sid` and every other process still in session `sid`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, sig)
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


async def terminate(proc: asyncio.subprocess.Process, *, grace: float) -> None:
    """SIGTERM the process's session, SIGKILL it after `grace` seconds, reap the leader, and
    SIGKILL whatever of the session is left. Returns when the leader is reaped."""
    if proc.returncode is None:
        signal_session(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=grace)
        except TimeoutError:
            log.info("grace period over pid=%d grace=%.1f; killing", proc.pid, grace)
    await kill(proc)


async def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the process's session, reap the leader, and return once no process of the
    session is alive (bounded: `LEFTOVER_WAIT`)."""
    if proc.returncode is None:
        signal_session(proc.pid, signal.SIGKILL)
        await proc.wait()
    # Children that outlived the leader (daemonized, or just slower to die) go too. They are
    # not ours to reap (init is their parent now), but they are dead when this returns.
    deadline = asyncio.get_running_loop().time() + LEFTOVER_WAIT
    while left := session_members(proc.pid, zombies=False):
        signal_session(proc.pid, signal.SIGKILL)
        if asyncio.get_running_loop().time() > deadline:
            log.warning("session %d: processes still alive after SIGKILL pids=%s", proc.pid, left)
            return
        await asyncio.sleep(0.01)
