"""Container processes: start one with limits, find and signal its whole session, measure it.

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
* `kill_leftovers` kills what a previous agent over the same root left running: the children
  of its containers, which PR_SET_PDEATHSIG does not reach (see `leftover_processes`).
* `SessionCpu` samples the CPU time (utime+stime) of every process of chosen sessions, cheaply
  enough to do every 100 ms, and `signal_processes` signals a session's known processes without
  a /proc scan: the agent's CPU throttle applies a CPU limit by duty cycling with them (SIGSTOP
  a session that used more than its share of a period, SIGCONT it once the share is paid back,
  as `cpulimit` does). No cgroup is used or needed. There is no RLIMIT_CPU: it limits total CPU
  seconds (SIGXCPU, then SIGKILL), while a Kubernetes CPU limit is a rate.

Used by `cdi.agent.runner` only. It knows nothing about pods or the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cdi.image.lifetime import die_with_parent

log = logging.getLogger(__name__)

_PROC: Final = Path("/proc")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
#: The unit of utime and stime in /proc/<pid>/stat.
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
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
    # No RLIMIT_CPU: it caps the total CPU seconds a process may use (SIGXCPU, then SIGKILL),
    # which would kill any long-running worker, whereas a Kubernetes CPU limit is a rate (cores).
    # CPU limits are applied by the agent's throttle instead (duty cycling, see `SessionCpu`).


def _preexec(limits: Limits, parent: int) -> Callable[[], None]:
    arm = die_with_parent(parent)
    address_space = limits.address_space
    file_size = limits.file_size

    def setup() -> None:  # runs in the child between fork and exec: keep it to syscalls
        arm()
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
    index 0 is field 3 (state), 3 is the session id, 11 and 12 are utime and stime in clock
    ticks (all threads, live and ended), 21 is rss in pages."""
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


class SessionCpu:
    """CPU time of the processes of chosen sessions, cheap enough to sample every 100 ms.

    A full /proc scan reads the stat of every process of the machine (a millisecond per hundred
    processes); a sample here lists /proc and reads the stat only of pids it has not seen before
    and of members of the sessions asked for. That is sound because a process never joins an
    existing session except by being forked in it, as a new pid; and a pid still listed at two
    samples is the same process, since the kernel reuses a pid only after going round the whole
    pid space. A process that starts and ends between two samples is not seen (as with
    `cpulimit`; a cgroup would count it)."""

    def __init__(self) -> None:
        self._sid_of: dict[int, int] = {}
        """Session id of every pid seen, members or not."""

    def forget(self) -> None:
        """Drop what is known of /proc (nothing is being sampled for a while)."""
        self._sid_of.clear()

    def sample(self, sids: Collection[int]) -> dict[int, dict[int, int]]:
        """utime+stime in clock ticks of every process (zombies too) of each session in `sids`,
        by session id then pid."""
        wanted = set(sids)
        ticks: dict[int, dict[int, int]] = {sid: {} for sid in wanted}
        listed = {int(entry) for entry in os.listdir(_PROC) if entry.isdigit()}
        for pid in self._sid_of.keys() - listed:
            del self._sid_of[pid]
        for pid in listed:
            known = self._sid_of.get(pid)
            if known is not None and known not in wanted:
                continue  # not ours, and never will be
            fields = _stat_fields(str(pid))
            if fields is None:  # ended since the listing
                self._sid_of.pop(pid, None)
                continue
            sid = self._sid_of[pid] = int(fields[3])  # changes when a member calls setsid
            if sid in wanted:
                ticks[sid][pid] = int(fields[11]) + int(fields[12])
        return ticks


def signal_processes(sid: int, pids: Iterable[int], sig: int) -> None:
    """Signal the process group `sid` and each of `pids`; processes that ended are skipped."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def signal_session(sid: int, sig: int) -> None:
    """Signal the process group `sid` and every other process still in session `sid`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, sig)
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def leftover_processes(variable: str, under: Path) -> list[int]:
    """Live processes (not this one) whose environment variable `variable` names a path under
    the directory `under`.

    The runner gives every container a variable of its own that names a file in the
    container's directory, and children inherit the environment: so this finds the containers a
    previous agent over the same root started, and their children, still running after it died.
    PR_SET_PDEATHSIG reaches only a container's own process: what the container started (the
    importer's nbdkit and `qemu-img convert`) is re-parented to init when the agent is killed,
    and would go on writing into the volume. Other users' processes are not readable, and are
    not ours anyway."""
    prefix = f"{variable}=".encode() + os.fsencode(str(under)).rstrip(b"/") + b"/"
    me = os.getpid()
    found = []
    for entry in os.listdir(_PROC):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            environ = (_PROC / entry / "environ").read_bytes()
        except OSError:
            continue
        if any(var.startswith(prefix) for var in environ.split(b"\0")):
            fields = _stat_fields(entry)
            if fields and fields[0] != "Z":
                found.append(int(entry))
    return found


async def kill_leftovers(variable: str, under: Path) -> list[int]:
    """SIGKILL every `leftover_processes(variable, under)` and return their pids once they are
    gone (bounded: `LEFTOVER_WAIT`). For an agent starting over a root another agent used."""
    pids = await asyncio.to_thread(leftover_processes, variable, under)
    if not pids:
        return []
    log.warning("killing processes a previous agent left running pids=%s", pids)
    deadline = asyncio.get_running_loop().time() + LEFTOVER_WAIT
    while True:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        left = await asyncio.to_thread(leftover_processes, variable, under)
        if not left:
            return pids
        if asyncio.get_running_loop().time() > deadline:
            log.warning("processes still alive after SIGKILL pids=%s", left)
            return pids
        pids = sorted(set(pids) | set(left))
        await asyncio.sleep(0.01)


async def terminate(proc: asyncio.subprocess.Process, *, grace: float) -> None:
    """SIGTERM the process's session, SIGKILL it after `grace` seconds, reap the leader, and
    SIGKILL whatever of the session is left. Returns when the leader is reaped."""
    if proc.returncode is None:
        signal_session(proc.pid, signal.SIGTERM)
        # A stopped process (SIGSTOP: the CPU throttle, or anyone) leaves SIGTERM pending until
        # it is continued; sent after SIGTERM, SIGCONT makes it act on it now.
        signal_session(proc.pid, signal.SIGCONT)
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
