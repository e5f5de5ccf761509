"""Shared machinery of the benchmarks in bench/: measure a command, serve files, check output.

Nothing here is a benchmark by itself. It provides:

- `measure()`: run one command in its own session with a bounded wait, and report its wall time,
  the CPU time of its process tree (from `wait4` rusage), the peak RSS of the command's own
  process (sampled `VmRSS`, plus `VmHWM` at the last sample) and the peak *summed* RSS of its whole
  process tree (every process that descends from it or stays in its session), sampled from /proc
  every ~20 ms by a thread. (`wait4`'s ru_maxrss is no substitute: subprocess spawns with vfork,
  so it counts the parent's memory at exec time.) Leftover processes are reported as a leak and
  killed.
- `NginxServer`: nginx on 127.0.0.1 on a free port with its own prefix, config, pid and temp
  directories, stopped and reaped on exit. nginx (sendfile, byte ranges) is the HTTP source, so
  the server is never the slowest part.
- `sparse_diff()`: a sparse-aware byte comparison of two files (only ranges that hold data in
  either file are read; holes are zeros).
- small statistics and table helpers.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import select
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

MIB = 1024 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SAMPLE_INTERVAL_S = 0.02
LEAK_GRACE_S = 3.0
"""How long descendants may outlive the measured command before they count as leaked."""


# --------------------------------------------------------------------------------------------------
# process-tree sampling


def _read_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, session) of a process from /proc/<pid>/stat, or None if it is gone."""
    fields = pid_stat(pid)
    return None if fields is None else (int(fields[1]), int(fields[3]))


def _read_rss(pid: int) -> int | None:
    """Resident set size in bytes (the `VmRSS` of /proc/<pid>/status, read from statm)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def read_bytes(path: str) -> bytes:
    """A file's bytes; b"" when it is gone (a /proc file of a process that exited)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def stat_fields(path: str) -> list[bytes] | None:
    """The fields of a /proc stat file (`/proc/<pid>/stat`, or a task's) after the command
    name, state first; None when the process is gone."""
    data = read_bytes(path)
    if not data:
        return None
    # comm may hold spaces and parentheses: the fields start after the last ')'
    return data[data.rfind(b")") + 2 :].split()


def pid_stat(pid: int) -> list[bytes] | None:
    return stat_fields(f"/proc/{pid}/stat")


def vm_bytes(pid: int, keys: Sequence[str] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """Selected `Vm*` lines of /proc/<pid>/status, in bytes."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name in keys:
                    found[name] = int(value.split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _list_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def session_members(sid: int) -> list[int]:
    """Live processes (not zombies) whose session id is `sid`."""
    members = []
    for pid in _list_pids():
        info = _read_stat(pid)
        if info is not None and info[1] == sid and (_read_rss(pid) or 0) > 0:
            members.append(pid)
    return members


class TreeSampler:
    """Samples the RSS of a process and of its process tree from a thread.

    The tree is the root, every process in the root's session (the measured command is started
    with `start_new_session=True`, so that is everything it spawned unless a child called
    setsid), every descendant by parent pid, and every process once seen in the tree for as long
    as it lives. (ppid, session) are read once per new pid, so a sample costs one listdir of /proc
    plus one statm read per tree member.
    """

    def __init__(self, root: int, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.root = root
        self.interval = interval
        self.main_peak_rss = 0
        self.main_hwm = 0
        self.tree_peak_rss = 0
        self.tree_peak_procs = 0
        self.samples = 0
        self.seen: dict[int, str] = {}
        self._info: dict[int, tuple[int, int]] = {}
        self._members: set[int] = {root}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"rss-{root}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        pids = _list_pids()
        alive = set(pids)
        for pid in list(self._info):
            if pid not in alive:
                del self._info[pid]
        for pid in pids:
            if pid not in self._info:
                info = _read_stat(pid)
                if info is not None:
                    self._info[pid] = info
        members = {pid for pid in self._members if pid in alive}
        members.add(self.root)
        members.update(pid for pid, (_, sid) in self._info.items() if sid == self.root)
        grew = True
        while grew:  # descendants by ppid (a child that called setsid is still found here)
            grew = False
            for pid, (ppid, _) in self._info.items():
                if ppid in members and pid not in members:
                    members.add(pid)
                    grew = True
        self._members = members
        total = 0
        procs = 0
        for pid in members:
            rss = _read_rss(pid)
            if rss:
                total += rss
                procs += 1
                if pid not in self.seen:
                    self.seen[pid] = _comm(pid)
        status = vm_bytes(self.root)
        if "VmRSS" in status:
            self.main_peak_rss = max(self.main_peak_rss, status["VmRSS"])
        if "VmHWM" in status:
            self.main_hwm = status["VmHWM"]  # the value at the last sample that saw the process
        if total > self.tree_peak_rss:
            self.tree_peak_rss = total
        self.tree_peak_procs = max(self.tree_peak_procs, procs)
        self.samples += 1


@dataclass
class RunResult:
    """One measured command."""

    label: str
    argv: list[str]
    wall_s: float = 0.0
    cpu_s: float = 0.0
    main_peak_rss: int = 0
    main_hwm: int = 0
    tree_peak_rss: int = 0
    tree_peak_procs: int = 0
    samples: int = 0
    returncode: int | None = None
    error: str | None = None
    processes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def measure(
    label: str,
    argv: Sequence[str],
    *,
    logdir: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> RunResult:
    """Run `argv` to completion (at most `timeout` seconds) and measure it.

    stdout and stderr go to `<logdir>/<label>.out|.err`. The command runs in a new session, so a
    timeout kills its whole group. A non-zero exit, a timeout or processes left behind after
    the command exits are reported in `error`.
    """
    result = RunResult(label=label, argv=list(argv))
    logdir.mkdir(parents=True, exist_ok=True)
    out_path = logdir / f"{label}.out"
    err_path = logdir / f"{label}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    sampler = TreeSampler(proc.pid)
    sampler.start()
    pidfd = -1
    try:
        pidfd = os.pidfd_open(proc.pid)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            result.error = f"timed out after {timeout:g} s"
            _killpg(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        result.wall_s = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        result.returncode = proc.returncode
        result.cpu_s = usage.ru_utime + usage.ru_stime
    finally:
        sampler.stop()
        if pidfd >= 0:
            os.close(pidfd)
        if proc.returncode is None:  # interrupted: never leave the command behind
            _killpg(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        leftovers = _wait_leftovers(proc.pid, sampler.seen, LEAK_GRACE_S)
        if leftovers:
            names = ", ".join(f"{pid}:{_comm(pid)}" for pid in leftovers)
            _killpg(proc.pid)
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if result.error is None:
                result.error = f"left processes running after exit: {names}"
    result.main_peak_rss = sampler.main_peak_rss
    result.main_hwm = sampler.main_hwm
    result.tree_peak_rss = sampler.tree_peak_rss
    result.tree_peak_procs = sampler.tree_peak_procs
    result.samples = sampler.samples
    result.processes = sorted(set(sampler.seen.values()))
    if result.error is None and result.returncode != 0:
        result.error = f"exit status {result.returncode}: {_tail(err_path) or _tail(out_path)}"
    return result


def _wait_leftovers(root: int, seen: Mapping[int, str], grace: float) -> list[int]:
    """Processes of the measured tree still running `grace` seconds after the root exited."""
    deadline = time.monotonic() + grace
    while True:
        members = set(session_members(root))
        members.update(
            pid
            for pid, comm in seen.items()
            if pid != root and (_read_rss(pid) or 0) > 0 and _comm(pid) == comm
        )
        if not members or time.monotonic() >= deadline:
            return sorted(members)
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# nginx


def memory_state() -> str:
    """MemFree and MemAvailable now, for the report: writers pay for reclaiming the page cache
    when little memory is free (a 1 GiB clone measured 1.9 s after `echo 3 > drop_caches`, 3.7
    to 4.4 s with 5 GiB free of 24), so results are comparable only at similar values."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, value = line.partition(":")
            if name in ("MemTotal", "MemFree", "MemAvailable"):
                found[name] = int(value.split()[0]) // 1024
    if len(found) < 3:
        return "memory: unknown (/proc/meminfo unreadable)"
    return (
        f"memory at the start: MemFree {found['MemFree']} MiB, MemAvailable"
        f" {found['MemAvailable']} MiB of {found['MemTotal']} MiB (the rest is mostly page cache)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


NGINX_CONF = """\
{user}worker_processes 2;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    types {{ }}
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


class NginxServer:
    """nginx serving `root` on 127.0.0.1:<free port>, configured and run under `prefix`."""

    def __init__(self, root: Path, prefix: Path, probe: str, start_timeout: float = 10.0) -> None:
        self.root = root
        self.prefix = prefix
        self.probe = probe
        self.start_timeout = start_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> NginxServer:
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _ in range(3):  # the free port may be taken between probe and bind: retry
            self.port = free_port()
            conf = self.prefix / "nginx.conf"
            conf.write_text(
                NGINX_CONF.format(
                    user="user root;\n" if os.geteuid() == 0 else "",
                    prefix=self.prefix,
                    port=self.port,
                    root=self.root,
                )
            )
            log = open(self.prefix / "stderr.log", "wb")  # closed right after Popen
            try:
                self._proc = subprocess.Popen(
                    ["nginx", "-p", str(self.prefix), "-c", str(conf), "-e", "stderr"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            finally:
                log.close()
            try:
                self._wait_ready()
                return self
            except RuntimeError as err:
                last_error = str(err)
                self.stop()
        raise RuntimeError(f"nginx did not start: {last_error}")

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"exited with {self._proc.returncode}: {_tail(self.prefix / 'stderr.log')}"
                    f" {_tail(self.prefix / 'error.log')}"
                )
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", f"/{self.probe}", headers={"Range": "bytes=0-0"})
                response = conn.getresponse()
                response.read()
                if response.status == 206:
                    return
                raise RuntimeError(f"probe answered {response.status}, want 206 (byte ranges)")
            except OSError:
                time.sleep(0.05)
            finally:
                conn.close()
        raise RuntimeError(f"not ready after {self.start_timeout:.0f} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)  # fast shutdown
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        _killpg(proc.pid)  # workers too, whatever state the master is in
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# output checks


def data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The data (not hole) ranges of an open file within [start, end)."""
    offset = start
    while offset < end:
        try:
            first = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        if first >= end:
            return
        last = min(os.lseek(fd, first, os.SEEK_HOLE), end)
        yield first, last
        offset = last


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def sparse_diff(
    expected: Path, actual: Path, chunk: int = 8 * MIB, *, grown: bool = False
) -> str | None:
    """None if both files hold the same bytes, else what differs.

    Ranges that are holes in both files are equal (zeros) without being read. `grown`: `actual`
    may be longer (a volume grown to its size); past `expected`'s end it must read zeros.
    """
    if not actual.exists():
        return f"{actual} does not exist"
    want, got = expected.stat().st_size, actual.stat().st_size
    if got < want or (got > want and not grown):
        return f"size {got} != expected {want}"
    fd_a = os.open(expected, os.O_RDONLY)
    try:
        fd_b = os.open(actual, os.O_RDONLY)
        try:
            ranges = _merge([*data_ranges(fd_a, 0, want), *data_ranges(fd_b, 0, want)])
            for start, end in ranges:
                for offset in range(start, end, chunk):
                    length = min(chunk, end - offset)
                    if os.pread(fd_a, length, offset) != os.pread(fd_b, length, offset):
                        return f"content differs in [{offset}, {offset + length})"
            for start, end in data_ranges(fd_b, want, got):
                for offset in range(start, end, chunk):
                    piece = os.pread(fd_b, min(chunk, end - offset), offset)
                    if piece.count(0) != len(piece):
                        return f"non-zero bytes in [{offset}, {offset + len(piece)}) past the end"
        finally:
            os.close(fd_b)
    finally:
        os.close(fd_a)
    return None


# --------------------------------------------------------------------------------------------------
# reporting helpers


def best(values: Sequence[float]) -> float | None:
    return min(values) if values else None


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table, first column left-aligned, the others right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def tool_version(argv: Sequence[str]) -> str:
    """First line a tool prints for its version flag (stdout or stderr), or 'unavailable'."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else "unavailable"
